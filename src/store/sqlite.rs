//! SQLite store: WAL, one write connection owned by a group-commit writer for the hot path, a pool of readers.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::common::sql_store;
use super::*;
use crate::domain::{format_ms, new_key, now_ms, State};

pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    writer: mpsc::Sender<WriteOp>,
    /// Deliveries this process holds in memory (queued or in flight). One process owns a SQLite file, so
    /// leases live here rather than in the database: claiming costs a read, not a write and an fsync, and a
    /// restart resumes everything that was held.
    held: Held,
}

type Held = Arc<std::sync::Mutex<Holdings>>;

/// What this process holds, and what it let go of while claims were reading. A claim reads without the lock;
/// a delivery whose result was committed during that read may still look pending to it, so such deliveries are
/// remembered until no claim is reading, and claims skip them (they are taken by a later claim if due again).
#[derive(Default)]
struct Holdings {
    ids: HashSet<i64>,
    claims_reading: usize,
    released_while_reading: HashSet<i64>,
}

impl Holdings {
    fn release(&mut self, id: i64) {
        self.ids.remove(&id);
        if self.claims_reading > 0 {
            self.released_while_reading.insert(id);
        }
    }
}

/// Counts a claim's read for as long as it runs, however it ends.
struct ClaimRead<'a>(&'a Held);

impl<'a> ClaimRead<'a> {
    /// Starts a read; returns the ids held now, as a JSON array.
    fn start(held: &'a Held) -> Result<(Self, String)> {
        let mut h = holdings(held);
        let ids = serde_json::to_string(&h.ids).map_err(|e| Error::Internal(e.to_string()))?;
        h.claims_reading += 1;
        Ok((Self(held), ids))
    }
}

impl Drop for ClaimRead<'_> {
    fn drop(&mut self) {
        let mut h = holdings(self.0);
        h.claims_reading -= 1;
        if h.claims_reading == 0 {
            h.released_while_reading.clear();
        }
    }
}

fn holdings(held: &Held) -> std::sync::MutexGuard<'_, Holdings> {
    // A panic while holding this lock cannot leave the sets half-updated in a way that matters more than
    // stopping would; carry on with them.
    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Held by the writer while it applies a group, and by the checkpointer while it finishes a checkpoint.
type Gate = Arc<tokio::sync::Mutex<()>>;

/// Leases of a single process never expire while it runs.
const HELD: i64 = i64::MAX;

/// Hot-path writes, grouped by the writer into one transaction per batch.
enum WriteOp {
    Publish {
        events: Vec<NewEvent>,
        lease: Option<Lease>,
        reply: oneshot::Sender<Result<Vec<PublishOutcome>>>,
    },
    Record {
        results: Vec<AttemptRecord>,
        disable_after_ms: i64,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Most operations one group commit carries.
const MAX_BATCH: usize = 512;

impl SqliteStore {
    pub async fn open(url: &str, pool_size: u32, synchronous: &str) -> Result<Self> {
        let sync = SqliteSynchronous::from_str(synchronous)
            .map_err(|_| Error::bad_request(format!("unknown SQLite synchronous mode `{synchronous}`")))?;
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // The writer's page cache (8 MB) holds the B-tree pages a group commit touches, so large groups neither
        // spill to the WAL mid-transaction nor re-read pages; statement journals stay in memory. Its statement
        // cache holds the few shapes of multi-row statements `chunks` makes (with one 2,000-row statement cached
        // per row count, the process grew past 150 MiB).
        let write_opts = opts
            .clone()
            .pragma("cache_size", "-8000")
            .pragma("temp_store", "memory")
            // Checkpoints run beside the writer (see `checkpoint`), not inside its commits.
            .pragma("wal_autocheckpoint", "0")
            // A WAL that grew past this (a long read held it) is cut back when it starts over.
            .pragma("journal_size_limit", "67108864")
            .statement_cache_capacity(64);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(write_opts)
            .await?;
        sqlx::migrate!("migrations/sqlite")
            .run(&write)
            .await
            .map_err(|e| Error::Internal(format!("migrating the database: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(pool_size.max(1))
            .connect_with(opts.clone().read_only(true).statement_cache_capacity(16))
            .await?;
        let (writer, rx) = mpsc::channel(4096);
        let held: Held = Arc::default();
        let gate = Gate::default();
        tokio::spawn(run_writer(write.clone(), rx, held.clone(), gate.clone()));
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        tokio::spawn(checkpoint(checkpointer, writer.downgrade(), gate));
        Ok(Self {
            read,
            write,
            writer,
            held,
        })
    }
}

/// The group-commit writer: drains every waiting operation, applies them together with set-based statements in
/// one transaction, commits once (one fsync for all), then answers each. Inputs are validated before they get
/// here, so a failure is the database's and fails the whole group, which then retries or reports it.
async fn run_writer(pool: SqlitePool, mut rx: mpsc::Receiver<WriteOp>, held: Held, gate: Gate) {
    let mut next_id = match sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(id), 0) + 1 FROM deliveries")
        .fetch_one(&pool)
        .await
    {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "the writer cannot read the database");
            return;
        }
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ops: Vec<WriteOp> = std::mem::take(&mut batch);
        let pause = gate.lock().await;
        let first_id = next_id;
        let mut result = apply_batch(&pool, &ops, &mut next_id, &held).await;
        // SQLITE_BUSY (another process, such as a CLI command, holds the lock): try again before failing.
        for _ in 0..20 {
            match &result {
                Err(Error::Database(sqlx::Error::Database(d))) if d.code().as_deref() == Some("5") => {
                    holdings(&held).ids.retain(|id| *id < first_id || *id >= next_id);
                    next_id = first_id;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    result = apply_batch(&pool, &ops, &mut next_id, &held).await;
                }
                _ => break,
            }
        }
        drop(pause);
        match result {
            Ok(mut published) => {
                // Recorded deliveries are committed in their new state: they may be claimed again when due.
                let mut h = holdings(&held);
                for op in &ops {
                    if let WriteOp::Record { results, .. } = op {
                        for r in results {
                            h.release(r.delivery_id);
                        }
                    }
                }
                drop(h);
                for op in ops {
                    match op {
                        WriteOp::Publish { reply, .. } => {
                            let _ = reply.send(Ok(published.remove(0)));
                        }
                        WriteOp::Record { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                holdings(&held).ids.retain(|id| *id < first_id || *id >= next_id);
                next_id = first_id;
                tracing::error!(error = %e, "group commit failed");
                for op in ops {
                    match op {
                        WriteOp::Publish { reply, .. } => {
                            let _ = reply.send(Err(e.for_each_of_a_group()));
                        }
                        WriteOp::Record { reply, .. } => {
                            let _ = reply.send(Err(e.for_each_of_a_group()));
                        }
                    }
                }
            }
        }
    }
}

/// WAL frames (pages) past which a checkpoint briefly pauses the writer to finish, about 16 MiB.
const WAL_RESTART_FRAMES: i64 = 4096;

/// Copies the WAL back into the database from its own connection, beside the writer, so commits stay short.
/// PASSIVE never blocks the writer, but under steady writes it never catches up either, and the WAL only starts
/// over once a checkpoint has copied all of it: it would grow without bound (1.6 GB after 300,000 events). So
/// once the WAL passes `WAL_RESTART_FRAMES`, a second pass runs with the writer paused between two groups; it
/// copies only what the first pass left, and the writer's next transaction writes the WAL from its start again.
async fn checkpoint(pool: SqlitePool, store_alive: mpsc::WeakSender<WriteOp>, gate: Gate) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        if store_alive.upgrade().is_none() {
            // The store is gone: a last checkpoint leaves the database file complete.
            let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await;
            pool.close().await;
            return;
        }
        let result = match passive_checkpoint(&pool).await {
            Ok(frames) if frames >= WAL_RESTART_FRAMES => {
                let _pause = gate.lock().await;
                passive_checkpoint(&pool).await
            }
            other => other,
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// One PASSIVE checkpoint; returns the WAL's length in frames.
async fn passive_checkpoint(pool: &SqlitePool) -> std::result::Result<i64, sqlx::Error> {
    let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(pool).await?;
    row.try_get(1)
}

/// Most rows per multi-row statement (at most 14 parameters each, far under SQLite's limit of 32,766).
const ROWS_PER_STATEMENT: usize = 256;

/// Splits rows into chunks whose lengths are powers of two, largest first, so a multi-row statement comes in at
/// most nine shapes per table: each is prepared once and stays in the statement cache, where one statement
/// per row count (as a plain split gives) would either be prepared again for every group or fill the cache
/// with hundreds of large compiled programs.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = ROWS_PER_STATEMENT.min(1 << rows.len().ilog2());
        let (chunk, rest) = rows.split_at(n);
        rows = rest;
        Some(chunk)
    })
}

/// Applies a group; returns the publish outcomes in the order of the publish operations.
async fn apply_batch(
    pool: &SqlitePool,
    ops: &[WriteOp],
    next_id: &mut i64,
    held: &Held,
) -> Result<Vec<Vec<PublishOutcome>>> {
    let mut tx = pool.begin().await?;
    let publishes: Vec<(&[NewEvent], Option<&Lease>)> = ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::Publish { events, lease, .. } => Some((events.as_slice(), lease.as_ref())),
            WriteOp::Record { .. } => None,
        })
        .collect();
    let published = publish_all(&mut tx, &publishes, next_id).await?;
    // Held before the commit makes them visible, so a concurrent claim cannot take them too.
    holdings(held)
        .ids
        .extend(published.iter().flatten().flat_map(|o| o.jobs.iter().map(|j| j.id)));
    let mut records = Vec::new();
    let mut disable_after_ms = i64::MAX;
    for op in ops {
        if let WriteOp::Record {
            results,
            disable_after_ms: d,
            ..
        } = op
        {
            records.extend(results.iter());
            disable_after_ms = disable_after_ms.min(*d);
        }
    }
    if !records.is_empty() {
        record_all(&mut tx, &records, disable_after_ms).await?;
    }
    tx.commit().await?;
    Ok(published)
}

/// Where one (organizer, event name) fans out to.
struct Target {
    subscription_key: String,
    app_id: i64,
    webhook_key: String,
    url: String,
    secret_key: Option<String>,
}

async fn publish_all(
    conn: &mut SqliteConnection,
    ops: &[(&[NewEvent], Option<&Lease>)],
    next_id: &mut i64,
) -> Result<Vec<Vec<PublishOutcome>>> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    // Fan-out targets: one query per distinct (organizer, event name) in the group.
    let mut targets: HashMap<(i64, EventName), Vec<Target>> = HashMap::new();
    for ev in ops.iter().flat_map(|(events, _)| events.iter()) {
        let key = (ev.organizer_key, ev.event_name);
        if targets.contains_key(&key) {
            continue;
        }
        let rows = sqlx::query(
            "SELECT s.subscription_key, s.app_id, s.webhook_key, COALESCE(s.callback_url, w.callback_url) AS url, \
             w.secret_key FROM user_subscriptions s JOIN webhooks w ON w.webhook_key = s.webhook_key \
             WHERE s.organizer_key = $1 AND w.event_name = $2 AND s.state = 'ACTIVE' AND w.state = 'ACTIVE'",
        )
        .bind(ev.organizer_key)
        .bind(ev.event_name.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let list = rows
            .iter()
            .map(|r| {
                Ok(Target {
                    subscription_key: r.try_get("subscription_key")?,
                    app_id: r.try_get("app_id")?,
                    webhook_key: r.try_get("webhook_key")?,
                    url: r.try_get("url")?,
                    secret_key: r.try_get("secret_key")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        targets.insert(key, list);
    }
    let fan_out = |ev: &NewEvent| {
        targets
            .get(&(ev.organizer_key, ev.event_name))
            .map_or(&[][..], Vec::as_slice)
    };

    // Events, first occurrence of each key in the group; ON CONFLICT keeps publishing idempotent.
    let mut firsts: Vec<&NewEvent> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for ev in ops.iter().flat_map(|(events, _)| events.iter()) {
        if seen.insert(ev.event_key.as_str()) {
            firsts.push(ev);
        }
    }
    let mut inserted: HashSet<String> = HashSet::new();
    for chunk in chunks(&firsts) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (event_key, organizer_key, event_name, body, deliveries, created_at) ",
        );
        qb.push_values(chunk, |mut b, ev| {
            b.push_bind(&ev.event_key)
                .push_bind(ev.organizer_key)
                .push_bind(ev.event_name.as_str())
                .push_bind(ev.body.as_ref())
                .push_bind(fan_out(ev).len() as i64)
                .push_bind(now);
        });
        qb.push(" ON CONFLICT (event_key) DO NOTHING RETURNING event_key");
        inserted.extend(qb.build_query_scalar::<String>().fetch_all(&mut *conn).await?);
    }
    let repeated: Vec<&str> = ops
        .iter()
        .flat_map(|(events, _)| events.iter())
        .map(|e| e.event_key.as_str())
        .filter(|k| !inserted.contains(*k))
        .collect();
    let mut earlier: HashMap<String, i64> = HashMap::new();
    for chunk in repeated.chunks(ROWS_PER_STATEMENT) {
        // Rare (repeated keys): not worth a cached statement per length.
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT event_key, deliveries FROM events WHERE event_key IN (");
        let mut list = qb.separated(", ");
        for k in chunk {
            list.push_bind(*k);
        }
        qb.push(")");
        for r in qb.build().persistent(false).fetch_all(&mut *conn).await? {
            earlier.insert(r.try_get("event_key")?, r.try_get("deliveries")?);
        }
    }

    // Deliveries, with ids from the writer's counter so the jobs are known without reading them back.
    let mut rows: Vec<(i64, &NewEvent, &Target)> = Vec::new();
    let mut out: Vec<Vec<PublishOutcome>> = Vec::with_capacity(ops.len());
    let mut created: HashSet<&str> = HashSet::new();
    for (events, lease) in ops {
        let mut outcomes = Vec::with_capacity(events.len());
        for ev in events.iter() {
            let fresh = inserted.contains(&ev.event_key) && created.insert(ev.event_key.as_str());
            if !fresh {
                outcomes.push(PublishOutcome {
                    event_key: ev.event_key.clone(),
                    deliveries: earlier.get(&ev.event_key).copied().unwrap_or(fan_out(ev).len() as i64),
                    duplicate: true,
                    jobs: Vec::new(),
                });
                continue;
            }
            let mut jobs = Vec::new();
            for t in fan_out(ev) {
                let id = *next_id;
                *next_id += 1;
                rows.push((id, ev, t));
                if lease.is_some() {
                    jobs.push(DeliveryJob {
                        id,
                        event_key: ev.event_key.clone(),
                        app_id: t.app_id,
                        subscription_key: t.subscription_key.clone(),
                        url: t.url.clone(),
                        body: ev.body.clone(),
                        webhook_secret: t.secret_key.clone(),
                        attempts: 0,
                        lease_until: HELD,
                    });
                }
            }
            outcomes.push(PublishOutcome {
                event_key: ev.event_key.clone(),
                deliveries: fan_out(ev).len() as i64,
                duplicate: false,
                jobs,
            });
        }
        out.push(outcomes);
    }
    for chunk in chunks(&rows) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO deliveries (id, event_key, event_name, app_id, webhook_key, subscription_key, url, state, \
             attempts, next_attempt_at, lease_owner, lease_until, created_at, updated_at) ",
        );
        qb.push_values(chunk, |mut b, (id, ev, t)| {
            b.push_bind(*id)
                .push_bind(&ev.event_key)
                .push_bind(ev.event_name.as_str())
                .push_bind(t.app_id)
                .push_bind(&t.webhook_key)
                .push_bind(&t.subscription_key)
                .push_bind(&t.url)
                .push("'pending'")
                .push("0")
                .push_bind(now)
                .push("NULL")
                .push("0")
                .push_bind(now)
                .push_bind(now);
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(out)
}

/// Builds `... IN (k1, k2, ...)` over distinct keys.
fn push_in<'a>(qb: &mut QueryBuilder<'a, Sqlite>, keys: &'a [&'a str]) {
    qb.push(" IN (");
    let mut list = qb.separated(", ");
    for k in keys {
        list.push_bind(*k);
    }
    qb.push(")");
}

fn distinct_subscriptions<'a>(records: &[&'a AttemptRecord], pred: impl Fn(Outcome) -> bool) -> Vec<&'a str> {
    let mut keys: Vec<&str> = records
        .iter()
        .filter(|r| pred(r.outcome))
        .map(|r| r.subscription_key.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

async fn record_all(conn: &mut SqliteConnection, records: &[&AttemptRecord], disable_after_ms: i64) -> Result<()> {
    let now = now_ms();
    for chunk in chunks(records) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO attempts (delivery_id, number, node, started_at, duration_ms, status_code, error, \
             response_excerpt) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(r.delivery_id)
                .push_bind(r.number)
                .push_bind(&r.node)
                .push_bind(r.started_at)
                .push_bind(r.duration_ms)
                .push_bind(r.status_code)
                .push_bind(&r.error)
                .push_bind(&r.response_excerpt);
        });
        qb.build().execute(&mut *conn).await?;

        let mut qb = QueryBuilder::<Sqlite>::new("UPDATE deliveries SET state = v.column2, attempts = v.column3, ");
        qb.push("next_attempt_at = v.column4, lease_owner = NULL, lease_until = 0, last_status = v.column5, ");
        qb.push("last_error = v.column6, updated_at = ")
            .push_bind(now)
            .push(" FROM (");
        qb.push_values(chunk, |mut b, r| {
            let (state, next) = match r.outcome {
                Outcome::Delivered => ("delivered", now),
                Outcome::RetryAt(at) => ("pending", at),
                Outcome::Failed | Outcome::Gone => ("failed", now),
            };
            b.push_bind(r.delivery_id)
                .push_bind(state)
                .push_bind(r.number)
                .push_bind(next)
                .push_bind(r.status_code)
                .push_bind(&r.error);
        });
        qb.push(") AS v WHERE deliveries.id = v.column1");
        qb.build().execute(&mut *conn).await?;
    }

    // A subscription's failure clock: started by a failure, stopped by any success.
    let failing = distinct_subscriptions(records, |o| matches!(o, Outcome::RetryAt(_) | Outcome::Failed));
    let delivered = distinct_subscriptions(records, |o| o == Outcome::Delivered);
    let gone = distinct_subscriptions(records, |o| o == Outcome::Gone);
    if !failing.is_empty() {
        let mut qb =
            QueryBuilder::<Sqlite>::new("UPDATE user_subscriptions SET failing_since = COALESCE(failing_since, ");
        qb.push_bind(now).push(") WHERE subscription_key");
        push_in(&mut qb, &failing);
        qb.build().persistent(false).execute(&mut *conn).await?;
    }
    if !delivered.is_empty() {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "UPDATE user_subscriptions SET failing_since = NULL WHERE failing_since IS NOT NULL AND subscription_key",
        );
        push_in(&mut qb, &delivered);
        qb.build().persistent(false).execute(&mut *conn).await?;
    }
    if !failing.is_empty() {
        let reason = format!(
            "every delivery failed for {} s; deactivated at {}",
            disable_after_ms / 1000,
            format_ms(now)
        );
        let mut qb =
            QueryBuilder::<Sqlite>::new("UPDATE user_subscriptions SET state = 'INACTIVE', inactive_reason = ");
        qb.push_bind(reason)
            .push(" WHERE state = 'ACTIVE' AND failing_since <= ")
            .push_bind(now.saturating_sub(disable_after_ms))
            .push(" AND subscription_key");
        push_in(&mut qb, &failing);
        qb.build().persistent(false).execute(&mut *conn).await?;
    }
    if !gone.is_empty() {
        let mut qb =
            QueryBuilder::<Sqlite>::new("UPDATE user_subscriptions SET state = 'INACTIVE', inactive_reason = ");
        qb.push_bind(format!("the callback answered 410 Gone at {}", format_ms(now)))
            .push(" WHERE state = 'ACTIVE' AND subscription_key");
        push_in(&mut qb, &gone);
        qb.build().persistent(false).execute(&mut *conn).await?;
    }
    Ok(())
}

sql_store!(SqliteStore, Sqlite, SqliteRow, {
    async fn publish(&self, events: Vec<NewEvent>, lease: Option<Lease>) -> Result<Vec<PublishOutcome>> {
        let (reply, rx) = oneshot::channel();
        ask(&self.writer, WriteOp::Publish { events, lease, reply }, rx).await
    }

    async fn claim_due(&self, now: i64, _lease: &Lease, limit: i64) -> Result<Vec<DeliveryJob>> {
        // One statement: due rows from the due index, skipping those this process holds (passed as one JSON
        // array, which SQLite turns into a temporary index), so only the rows taken are read and returned.
        let (reading, holding) = ClaimRead::start(&self.held)?;
        let rows = sqlx::query(
            "SELECT d.id, d.event_key, d.app_id, d.subscription_key, d.url, d.attempts, e.body, w.secret_key \
             FROM deliveries d JOIN events e ON e.event_key = d.event_key \
             LEFT JOIN webhooks w ON w.webhook_key = d.webhook_key \
             WHERE d.state = 'pending' AND d.next_attempt_at <= $1 \
               AND d.id NOT IN (SELECT value FROM json_each($2)) \
             ORDER BY d.next_attempt_at LIMIT $3",
        )
        .bind(now)
        .bind(holding)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        let mut h = holdings(&self.held);
        // Taken meanwhile by a publish's fast path, or recorded while this claim read: not this claim's.
        let jobs: Vec<DeliveryJob> = jobs_from_rows(&rows, HELD)?
            .into_iter()
            .filter(|j| !h.ids.contains(&j.id) && !h.released_while_reading.contains(&j.id))
            .collect();
        h.ids.extend(jobs.iter().map(|j| j.id));
        drop(h);
        drop(reading);
        Ok(jobs)
    }

    async fn release_leases(&self, _owner: Option<&str>) -> Result<u64> {
        // Leases live in memory (one process per file); rows leased by older versions are cleared too.
        let n = {
            let mut h = holdings(&self.held);
            let n = h.ids.len() as u64;
            h.ids.clear();
            n
        };
        sqlx::query(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = 0 WHERE state = 'pending' AND lease_until > 0",
        )
        .execute(&self.write)
        .await?;
        Ok(n)
    }

    async fn record_attempts(&self, results: Vec<AttemptRecord>, disable_after_ms: i64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        ask(
            &self.writer,
            WriteOp::Record {
                results,
                disable_after_ms,
                reply,
            },
            rx,
        )
        .await
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_released_while_a_claim_reads_are_not_claimable_by_it() {
        let held = Held::default();
        holdings(&held).ids.extend([1, 2]);
        let (reading, ids) = ClaimRead::start(&held).expect("start");
        let mut sent: Vec<i64> = serde_json::from_str(&ids).expect("JSON array");
        sent.sort_unstable();
        assert_eq!(sent, [1, 2]);
        // Delivery 1's result is committed while the claim reads: the claim may have seen it pending.
        holdings(&held).release(1);
        assert!(!holdings(&held).ids.contains(&1));
        assert!(holdings(&held).released_while_reading.contains(&1));
        drop(reading);
        assert!(
            holdings(&held).released_while_reading.is_empty(),
            "forgotten once no claim reads"
        );
        holdings(&held).release(2);
        assert!(
            holdings(&held).released_while_reading.is_empty(),
            "nothing to remember without a claim"
        );
    }

    #[test]
    fn chunks_are_powers_of_two_and_cover_every_row() {
        for n in [0usize, 1, 2, 3, 7, 255, 256, 257, 1000, 4097] {
            let rows: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = chunks(&rows).collect();
            assert!(parts
                .iter()
                .all(|c| c.len().is_power_of_two() && c.len() <= ROWS_PER_STATEMENT));
            assert_eq!(parts.concat(), rows, "{n} rows");
        }
    }
}
