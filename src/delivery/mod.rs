//! The delivery engine. The database is the record; memory is the fast path:
//! publish commits events and deliveries (leased to this node) and hands them straight to the dispatcher;
//! the scheduler reads the database only for retries that come due, expired leases and overflow.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::delivery::{AttemptRecord, DeliveryJob, Lease, NewEvent, Outcome, PublishOutcome, Standing};
use crate::domain::now_ms;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::{DynStore, Signals};

pub mod attempt;
mod keys;
mod lanes;
pub mod retention;
mod routes;
mod scheduler;

use attempt::{Attempt, RetryPolicy};
use keys::Keys;
use lanes::{Admit, Lanes};
use routes::{Routes, Targets};

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
    pub max_in_flight_per_destination: usize,
    pub retry: RetryPolicy,
    pub attempt_timeout: Duration,
    pub disable_after: Duration,
    pub standard_webhooks: bool,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    pub client: crate::outbound::DeliveryClient,
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
    /// The applications' secret keys as last read.
    keys: Keys,
    /// Where subscriptions stand now, for jobs read before a change.
    routes: Routes,
    /// Callback URLs as checked and parsed: a subscription's URL is checked once, not on every attempt.
    targets: Targets,
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
            keys: Keys::default(),
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
                    engine.keys.changed(app_id);
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
        let mut lanes = Lanes::new(self.settings.max_in_flight_per_destination);
        // Attempts that ended, by destination: their slots go to the next job waiting there.
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<String>();
        loop {
            let (job, dest) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(dest) = ended_rx.recv() => match lanes.finished(&dest) {
                    Some(next) => (next, dest),
                    None => continue,
                },
                job = rx.recv() => {
                    let Some(job) = job else { break };
                    let dest = Lanes::destination(&job.url);
                    match lanes.admit(&dest, job) {
                        Admit::Go(job) => (job, dest),
                        Admit::Wait => continue,
                    }
                }
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
                let _ = ended_tx.send(dest);
                continue; // the permit drops here
            }
            let engine = self.clone();
            let (results, ended) = (results.clone(), ended_tx.clone());
            attempts.spawn(async move {
                let record = engine.attempt(&job).await;
                // The request slot frees when the response arrives; the record slot travels with the result
                // and frees once it is committed, so commits do not hold back requests.
                drop(permit);
                let _ = ended.send(dest);
                let _ = results.send((record, record_slot));
            });
        }
        // Jobs still waiting for a slot of their destination stay leased until shutdown releases the leases.
        let waiting = lanes.drain_waiting();
        self.held.fetch_sub(waiting, Ordering::Relaxed);
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
        let (standing, url, own_secret) = match &fresh {
            None => (job.standing, job.url.as_str(), job.own_secret),
            Some(r) => (r.standing, r.url.as_deref().unwrap_or(&job.url), r.own_secret),
        };
        match standing {
            Standing::Active => {}
            Standing::Inactive => return self.not_sent(job, Outcome::Paused),
            Standing::Gone(why) => return self.not_sent(job, Outcome::Cancelled(why)),
        }
        let key = match own_secret {
            true => match self.keys.webhook(&self.store, &job.webhook_key).await {
                Ok(Some(k)) => Ok(k),
                Ok(None) => Err("the webhook's own secret key is gone".to_string()),
                Err(e) => Err(format!("the webhook's secret key could not be read: {e}")),
            },
            false => match self.keys.current(&self.store, job.app_id).await {
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
            _ => crate::store::rules::PAUSED,
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
}
