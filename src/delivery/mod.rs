//! The delivery engine. The database is the record; memory is the fast path:
//! publish commits events and deliveries (leased to this node) and hands them straight to the dispatcher;
//! the scheduler reads the database only for retries that come due, expired leases and overflow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{now_ms, SecretKey};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::{AttemptRecord, DeliveryJob, DynStore, Lease, NewEvent, Outcome, PublishOutcome, Signals, Standing};

pub mod attempt;
pub mod events;
pub mod retention;
mod routes;

use attempt::{Attempt, RetryPolicy};
use routes::{Routes, Targets};

/// How long the application's secret keys are cached before being read again.
const KEY_CACHE_TTL: Duration = Duration::from_secs(1);
/// How long other attempts go on with an application's previous keys while one attempt reads them again;
/// past it (that read failed or was abandoned) the next attempt reads them.
const KEY_REFRESH_WAIT: Duration = Duration::from_secs(5);
/// Attempts sent and not yet recorded, per request slot (`--max-in-flight`): bounds the duplicates a crash
/// can cause while commits run beside the requests.
const UNRECORDED_PER_SLOT: usize = 2;
/// How long successful attempt results gather before they are committed together.
const RECORD_LINGER: Duration = Duration::from_millis(10);
/// Most deliveries one scheduler claim takes.
const CLAIM_BATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: String,
    pub workers: bool,
    pub max_in_flight: usize,
    pub retry: RetryPolicy,
    pub attempt_timeout: Duration,
    pub disable_after: Duration,
    pub standard_webhooks: bool,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    pub client: crate::callback::DeliveryClient,
}

pub struct Engine {
    store: DynStore,
    settings: Settings,
    pub metrics: Arc<Metrics>,
    queue: mpsc::UnboundedSender<DeliveryJob>,
    /// Jobs in memory: queued or in flight. Bounded by `buffer()`, so a backlog stays in the database.
    held: AtomicUsize,
    /// Set when the scheduler left due work in the database for lack of room.
    starved: AtomicBool,
    /// When an operator last asked for deliveries to be attempted now (ms since the epoch).
    kicked_at: AtomicI64,
    wake: Notify,
    keys: Mutex<HashMap<i64, CachedKeys>>,
    /// Held while an application's keys are read for the first time, so its attempts wait for one read.
    keys_loading: tokio::sync::Mutex<()>,
    /// Where subscriptions stand now, for jobs read before a change.
    routes: Routes,
    /// Callback URLs as checked and parsed: a subscription's URL is checked once, not on every attempt.
    targets: Targets,
}

/// An application's secret keys as last read.
struct CachedKeys {
    read_at: Instant,
    keys: Arc<Vec<SecretKey>>,
    /// Since when one attempt has been reading them again.
    refreshing: Option<Instant>,
}

/// What the cache holds for an application.
enum Cached {
    Usable(Arc<Vec<SecretKey>>),
    /// Due to be read again, by the caller that was told so; usable meanwhile if that read fails.
    Stale(Arc<Vec<SecretKey>>),
    Missing,
}

impl Engine {
    pub fn new(
        store: DynStore,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<DeliveryJob>) {
        let (queue, rx) = mpsc::unbounded_channel();
        let targets = Targets::new(settings.client.policy());
        let engine = Arc::new(Self {
            store,
            settings,
            metrics,
            queue,
            held: AtomicUsize::new(0),
            starved: AtomicBool::new(false),
            kicked_at: AtomicI64::new(i64::MIN),
            wake: Notify::new(),
            keys: Mutex::new(HashMap::new()),
            keys_loading: tokio::sync::Mutex::new(()),
            routes: Routes::default(),
            targets,
        });
        (engine, rx)
    }

    fn buffer(&self) -> usize {
        self.settings.max_in_flight * 4
    }

    fn lease(&self) -> Lease {
        Lease {
            owner: self.settings.node_id.clone(),
            until: now_ms() + self.settings.lease.as_millis() as i64,
        }
    }

    /// Commits the events and their deliveries, then hands the deliveries to this node's dispatcher.
    /// Returns only after the commit: an acknowledged event is never lost.
    pub async fn publish(&self, events: Vec<NewEvent>) -> Result<Vec<PublishOutcome>> {
        let room = self.settings.workers && self.held.load(Ordering::Relaxed) < self.buffer();
        let routes_seen = self.routes.version();
        let mut outcomes = self.store.publish(events, room.then(|| self.lease())).await?;
        let mut unleased = false;
        for o in &mut outcomes {
            if o.duplicate {
                self.metrics.events_duplicate.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.metrics.events_accepted.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .deliveries_created
                .fetch_add(o.deliveries as u64, Ordering::Relaxed);
            unleased |= o.jobs.len() as i64 != o.deliveries;
            for mut job in o.jobs.drain(..) {
                job.routes_seen = routes_seen;
                self.enqueue(job);
            }
        }
        if unleased {
            self.wake.notify_one();
        }
        Ok(outcomes)
    }

    fn enqueue(&self, job: DeliveryJob) {
        self.held.fetch_add(1, Ordering::Relaxed);
        if self.queue.send(job).is_err() {
            // The dispatcher has stopped (shutdown); the lease is released and the delivery waits in the database.
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Wakes the scheduler: operators asked for deliveries to be attempted now.
    pub fn kick(&self) {
        self.kicked_at.store(now_ms(), Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// An operator's retry may have found its delivery mid-attempt: held here, so the scheduler could not take
    /// it then. The attempt's result leaves it due (the retry stands), so results recorded until every attempt
    /// that was in flight at the retry has finished wake the scheduler again, rather than leaving the
    /// delivery for its next poll.
    fn kicked_recently(&self) -> bool {
        let window = self.settings.attempt_timeout.as_millis() as i64 + RECORD_LINGER.as_millis() as i64 + 1000;
        now_ms().saturating_sub(self.kicked_at.load(Ordering::Relaxed)) <= window
    }

    /// Forgets the cached keys of an application (`None`: of every application) after its keys changed.
    fn signing_keys_changed(&self, app_id: Option<i64>) {
        let mut keys = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match app_id {
            Some(app_id) => {
                keys.remove(&app_id);
            }
            None => keys.clear(),
        }
    }

    /// The application's newest secret key whose validFrom has passed; `None` when it has none. An error means
    /// its keys could not be read and none are cached. Either way the callback does not go out unsigned.
    ///
    /// Keys are read again once a second (a key created on another node is used within about that). Then one
    /// attempt reads them while the others go on with the keys it replaces, rather than every attempt in flight
    /// reading them at once; if that read fails they go on with those keys, and an attempt tries again after
    /// `KEY_REFRESH_WAIT`. An application seen for the first time (or whose keys changed on this node) has its
    /// attempts wait for one read.
    async fn app_key(&self, app_id: i64) -> Result<Option<String>> {
        let keys = match self.cached_keys(app_id) {
            Cached::Usable(keys) => keys,
            Cached::Stale(keys) => self.read_keys(app_id).await.unwrap_or(keys),
            Cached::Missing => {
                let _one_read = self.keys_loading.lock().await;
                match self.cached_keys(app_id) {
                    // Read by the attempt this one waited for.
                    Cached::Usable(keys) => keys,
                    _ => self.read_keys(app_id).await?,
                }
            }
        };
        let now = now_ms();
        Ok(keys
            .iter()
            .filter(|k| k.valid_from <= now)
            .max_by_key(|k| (k.valid_from, k.id))
            .map(|k| k.value.clone()))
    }

    /// The application's cached keys, as usable, due to be read again by this caller (now marked as being read),
    /// or missing.
    fn cached_keys(&self, app_id: i64) -> Cached {
        let mut cache = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match cache.get_mut(&app_id) {
            None => Cached::Missing,
            Some(c) if c.read_at.elapsed() < KEY_CACHE_TTL => Cached::Usable(c.keys.clone()),
            Some(c) if c.refreshing.is_some_and(|since| since.elapsed() < KEY_REFRESH_WAIT) => {
                Cached::Usable(c.keys.clone())
            }
            Some(c) => {
                c.refreshing = Some(Instant::now());
                Cached::Stale(c.keys.clone())
            }
        }
    }

    /// Reads the application's keys from the store into the cache.
    async fn read_keys(&self, app_id: i64) -> Result<Arc<Vec<SecretKey>>> {
        let fresh = match self.store.secret_keys(app_id).await {
            Ok(keys) => Arc::new(keys),
            Err(e) => {
                tracing::warn!(app_id, error = %e, "reading the application's secret keys failed");
                return Err(e);
            }
        };
        let mut cache = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.insert(
            app_id,
            CachedKeys {
                read_at: Instant::now(),
                keys: fresh.clone(),
                refreshing: None,
            },
        );
        Ok(fresh)
    }

    /// Starts the dispatcher, the result recorder and the scheduler. The returned handle finishes once shutdown
    /// has drained in-flight attempts (within the grace period), recorded their results and released leases.
    pub fn start(
        self: &Arc<Self>,
        rx: mpsc::UnboundedReceiver<DeliveryJob>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (work, routes, keys) = (Arc::downgrade(self), Arc::downgrade(self), Arc::downgrade(self));
        self.store.watch(Signals {
            work: Arc::new(move || {
                if let Some(engine) = work.upgrade() {
                    engine.wake.notify_one();
                }
            }),
            routes: Arc::new(move || {
                if let Some(engine) = routes.upgrade() {
                    engine.routes.changed();
                }
            }),
            keys: Arc::new(move |app_id| {
                if let Some(engine) = keys.upgrade() {
                    engine.signing_keys_changed(app_id);
                }
            }),
        });
        let engine = self.clone();
        tokio::spawn(async move {
            let (results_tx, results_rx) = mpsc::unbounded_channel();
            let recorder = tokio::spawn(engine.clone().record(results_rx));
            let scheduler = tokio::spawn(engine.clone().schedule(shutdown.clone()));
            let attempts = TaskTracker::new();
            engine.clone().dispatch(rx, results_tx, &attempts, shutdown).await;
            attempts.close();
            if tokio::time::timeout(engine.settings.shutdown_grace, attempts.wait())
                .await
                .is_err()
            {
                tracing::warn!("attempts still in flight after the shutdown grace period; they will be retried");
            }
            let _ = scheduler.await;
            let _ = recorder.await;
            match engine.store.release_leases(Some(&engine.settings.node_id)).await {
                Ok(n) if n > 0 => {
                    tracing::info!(released = n, "returned unstarted deliveries to the queue")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not release leases; they expire on their own")
                }
            }
        })
    }

    async fn dispatch(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<DeliveryJob>,
        results: mpsc::UnboundedSender<(AttemptRecord, OwnedSemaphorePermit)>,
        attempts: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.settings.max_in_flight));
        // Sent and not yet recorded: what a crash can make a receiver see twice.
        let unrecorded = Arc::new(Semaphore::new(self.settings.max_in_flight * UNRECORDED_PER_SLOT));
        loop {
            let job = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                job = rx.recv() => match job { Some(j) => j, None => break },
            };
            let (permit, record_slot) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = async {
                    let record_slot = unrecorded.clone().acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((permits.clone().acquire_owned().await?, record_slot))
                } => match p { Ok(p) => p, Err(_) => break },
            };
            // An attempt that could outlive this node's lease might overlap another node's: leave the delivery to
            // whoever claims it once the lease has expired.
            if now_ms() + self.settings.attempt_timeout.as_millis() as i64 >= job.lease_until {
                self.held.fetch_sub(1, Ordering::Relaxed);
                continue; // the permit drops here
            }
            let engine = self.clone();
            let results = results.clone();
            attempts.spawn(async move {
                let record = engine.attempt(&job).await;
                // The request slot frees when the response arrives; the record slot travels with the result
                // and frees once it is committed, so commits do not hold back requests.
                drop(permit);
                let _ = results.send((record, record_slot));
            });
        }
    }

    async fn attempt(&self, job: &DeliveryJob) -> AttemptRecord {
        let attempt = Attempt {
            client: &self.settings.client,
            policy: &self.settings.retry,
            node: &self.settings.node_id,
            standard_webhooks: self.settings.standard_webhooks,
        };
        // Where the subscription stands now, not when the delivery was published or claimed.
        let fresh = match self.routes.now(&self.store, job).await {
            Ok(fresh) => fresh,
            Err(e) => {
                let why = format!("the subscription's current state could not be read: {e}");
                return attempt.run(job, Err(why.clone()), Err(why)).await;
            }
        };
        let (standing, url, webhook_secret) = match &fresh {
            None => (job.standing, job.url.as_str(), job.webhook_secret.as_deref()),
            Some(r) => (
                r.standing,
                r.url.as_deref().unwrap_or(&job.url),
                r.webhook_secret.as_deref(),
            ),
        };
        match standing {
            Standing::Active => {}
            Standing::Inactive => return self.not_sent(job, Outcome::Paused),
            Standing::Gone(why) => return self.not_sent(job, Outcome::Cancelled(why)),
        }
        let key = match webhook_secret {
            Some(k) => Ok(k.to_string()),
            None => match self.app_key(job.app_id).await {
                Ok(Some(k)) => Ok(k),
                Ok(None) => Err(
                    "the application has no secret key valid now (POST /webhooks/secretkey creates \
                                 one); a callback never goes out unsigned"
                        .to_string(),
                ),
                Err(e) => Err(format!("the application's secret keys could not be read: {e}")),
            },
        };
        let record = attempt
            .run(job, key.as_deref().map_err(Clone::clone), self.targets.get(url))
            .await;
        let (idx, label) = match record.outcome {
            Outcome::Delivered => (0, "delivered"),
            Outcome::RetryAt(_) => (1, "retry"),
            Outcome::Failed | Outcome::Paused | Outcome::Cancelled(_) => (2, "failed"),
            Outcome::Gone => (3, "gone"),
        };
        self.metrics.attempt(idx, record.duration_ms as f64 / 1000.0);
        if record.outcome == Outcome::Delivered {
            tracing::debug!(event_key = %job.event_key, delivery_id = job.id, attempt = record.number, "delivered");
        } else {
            tracing::info!(
                event_key = %job.event_key, delivery_id = job.id, attempt = record.number, outcome = label,
                status = record.status_code, error = record.error.as_deref().unwrap_or(""), "delivery attempt failed"
            );
        }
        record
    }

    /// The record of a delivery that is not sent: its subscription or webhook is inactive (paused) or gone
    /// (cancelled). No attempt is logged or counted, and the failure clock is left alone.
    fn not_sent(&self, job: &DeliveryJob, outcome: Outcome) -> AttemptRecord {
        let why = match outcome {
            Outcome::Cancelled(c) => c.reason(),
            _ => "paused: subscription or webhook INACTIVE",
        };
        tracing::info!(event_key = %job.event_key, delivery_id = job.id, subscription = %job.subscription_key,
            reason = why, "delivery not sent");
        AttemptRecord {
            delivery_id: job.id,
            subscription_key: job.subscription_key.clone(),
            number: job.attempts,
            node: self.settings.node_id.clone(),
            started_at: now_ms(),
            job_updated_at: job.updated_at,
            duration_ms: 0,
            status_code: None,
            error: Some(why.to_string()),
            response_excerpt: None,
            outcome,
        }
    }

    /// Writes attempt results in batches. A failed write is retried until it succeeds: the lease keeps the
    /// delivery from being attempted elsewhere meanwhile, and if this process dies the lease expires instead.
    async fn record(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(AttemptRecord, OwnedSemaphorePermit)>) {
        let disable_after = self.settings.disable_after.as_millis() as i64;
        // A full batch is half the unrecorded slots, so the dispatcher never waits on a batch still gathering.
        let full = (self.settings.max_in_flight * UNRECORDED_PER_SLOT / 2).clamp(1, 1024);
        let mut batch = Vec::with_capacity(full);
        while rx.recv_many(&mut batch, full).await > 0 {
            // Successes gather for up to RECORD_LINGER: one commit then carries many of them, rather than one
            // commit (and one set of rewritten pages) for each at a low rate. A failure goes at once, because
            // its retry is due when recorded.
            let linger = tokio::time::Instant::now() + RECORD_LINGER;
            let failed = |new: &[(AttemptRecord, _)]| new.iter().any(|(r, _)| r.outcome != Outcome::Delivered);
            let mut failure = failed(&batch);
            while !failure && batch.len() < full {
                let (before, room) = (batch.len(), full - batch.len());
                match tokio::time::timeout_at(linger, rx.recv_many(&mut batch, room)).await {
                    Ok(n) if n > 0 => failure = failed(&batch[before..]),
                    _ => break,
                }
            }
            let (records, slots): (Vec<AttemptRecord>, Vec<OwnedSemaphorePermit>) = batch.drain(..).unzip();
            let retries = records.iter().any(|r| matches!(r.outcome, Outcome::RetryAt(_)));
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.store.record_attempts(records.clone(), disable_after).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, pending = records.len(), "recording attempts failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            self.held.fetch_sub(records.len(), Ordering::Relaxed);
            drop(slots);
            if retries || self.starved.load(Ordering::Relaxed) || self.kicked_recently() {
                self.wake.notify_one();
            }
        }
    }

    /// Claims due deliveries from the database whenever there is room in memory.
    async fn schedule(self: Arc<Self>, shutdown: CancellationToken) {
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
