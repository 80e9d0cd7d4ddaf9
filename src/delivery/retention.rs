//! Retention: finished deliveries, their attempts and their events are removed once they are older than
//! `--retention`, so a long-running service's database stops growing at what that period holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::now_ms;
use crate::metrics::Metrics;
use crate::store::{DynStore, Pruned};

/// Rows of each kind one pass removes. On SQLite a pass holds the delivery path's writer for its length: about
/// 10 ms at 500 rows among 200,000, the commit's fsync included (measured with sqlite3 on this schema).
const BATCH: i64 = 500;
/// Longest time between two checks.
const MOST_BETWEEN: Duration = Duration::from_secs(60);
/// Pause between the passes of one check, so the delivery path's commits go between them.
const BETWEEN_PASSES: Duration = Duration::from_millis(20);

/// How often retention looks for old rows: every minute, or every quarter of the period when that is shorter
/// (a short period in a test or a demonstration is then kept to within a quarter of itself).
pub fn interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(50), MOST_BETWEEN)
}

/// Removes what has been finished for longer than `retention`, check after check, until shutdown.
pub async fn run(store: DynStore, retention: Duration, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval(retention)) => {}
        }
        let before = now_ms().saturating_sub(retention_ms);
        let mut total = Pruned::default();
        loop {
            match store.prune(before, BATCH).await {
                Ok(p) => {
                    // Counted per pass, so /metrics shows a long check's progress as it goes.
                    metrics.pruned_deliveries.fetch_add(p.deliveries, Ordering::Relaxed);
                    metrics.pruned_events.fetch_add(p.events, Ordering::Relaxed);
                    total.deliveries += p.deliveries;
                    total.attempts += p.attempts;
                    total.events += p.events;
                    if ((p.deliveries as i64) < BATCH && (p.events as i64) < BATCH) || shutdown.is_cancelled() {
                        break;
                    }
                    tokio::time::sleep(BETWEEN_PASSES).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "removing deliveries past their retention failed; will try again");
                    break;
                }
            }
        }
        if total != Pruned::default() {
            tracing::info!(
                deliveries = total.deliveries,
                attempts = total.attempts,
                events = total.events,
                "removed what was past its retention"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_come_every_minute_or_every_quarter_of_a_short_period() {
        assert_eq!(interval(Duration::from_secs(30 * 86_400)), MOST_BETWEEN);
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(interval(Duration::from_millis(1)), Duration::from_millis(50));
    }
}
