//! The scheduler: claims due deliveries from the database (retries, a backlog, expired leases) whenever there
//! is room in memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Engine, CLAIM_BATCH};
use crate::domain::now_ms;

impl Engine {
    /// Claims due deliveries from the database whenever there is room in memory.
    pub(super) async fn schedule(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let room = self.buffer().saturating_sub(self.held.load(Ordering::Relaxed));
            let mut wait = self.settings.poll_interval;
            // Claim in batches: with little room, wait for results to free more.
            if room < self.buffer() / 8 {
                self.starved.store(true, Ordering::Relaxed);
            } else {
                let limit = room.min(CLAIM_BATCH);
                let claimed_at = now_ms();
                let routes_seen = self.routes.version();
                match self.store.claim_due(claimed_at, &self.lease(), limit as i64).await {
                    Ok(jobs) => {
                        let full = jobs.len() == limit;
                        for mut job in jobs {
                            job.routes_seen = routes_seen;
                            self.enqueue(job);
                        }
                        if full {
                            continue;
                        }
                        self.starved.store(false, Ordering::Relaxed);
                        match self.store.next_due(now_ms()).await {
                            Ok(next) => match after_claim(claimed_at, next, now_ms()) {
                                AfterClaim::ClaimAgain => continue,
                                AfterClaim::WaitMs(ms) => wait = wait.min(Duration::from_millis(ms)),
                                // The next recorded result wakes the scheduler.
                                AfterClaim::Starved => self.starved.store(true, Ordering::Relaxed),
                                AfterClaim::Poll => {}
                            },
                            Err(e) => {
                                tracing::warn!(error = %e, "reading the next due delivery failed")
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming due deliveries failed; will try again")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// What the scheduler does after a claim that left room, given the earliest due time of a delivery no node
/// holds (`next`, read after the claim).
#[derive(Debug, PartialEq, Eq)]
enum AfterClaim {
    /// A delivery fell due between the claim and now (a retry due within milliseconds): claim it now, rather
    /// than take it for one the claim could not have and wait for a wake-up that may never come.
    ClaimAgain,
    /// The next delivery falls due this many milliseconds from now.
    WaitMs(u64),
    /// Due when the claim ran, yet not claimed: held in memory here (or locked by another node). The next
    /// recorded result wakes the scheduler.
    Starved,
    /// Nothing waits: sleep until woken or the poll interval.
    Poll,
}

fn after_claim(claimed_at: i64, next: Option<i64>, now: i64) -> AfterClaim {
    match next {
        None => AfterClaim::Poll,
        Some(at) if at <= claimed_at => AfterClaim::Starved,
        Some(at) if at <= now => AfterClaim::ClaimAgain,
        Some(at) => AfterClaim::WaitMs((at - now) as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_due_since_the_claim_is_claimed_at_once() {
        // Due 2 ms after the claim read the clock, read back 5 ms after: the claim could not have taken it.
        assert_eq!(after_claim(1_000, Some(1_002), 1_005), AfterClaim::ClaimAgain);
        assert_eq!(after_claim(1_000, Some(1_005), 1_005), AfterClaim::ClaimAgain);
    }

    #[test]
    fn after_a_claim_the_scheduler_waits_for_what_is_due_later_or_for_a_result() {
        assert_eq!(after_claim(1_000, Some(1_020), 1_005), AfterClaim::WaitMs(15));
        // Due when the claim ran and not taken by it: another holds it, and its result will wake the scheduler.
        assert_eq!(after_claim(1_000, Some(1_000), 1_005), AfterClaim::Starved);
        assert_eq!(after_claim(1_000, Some(900), 1_005), AfterClaim::Starved);
        assert_eq!(after_claim(1_000, None, 1_005), AfterClaim::Poll);
    }
}
