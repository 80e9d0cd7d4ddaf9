//! The group-commit writer: one thread owns the hot-path write connection and commits every waiting publish and
//! attempt result in one transaction; a checkpointer beside it keeps the WAL short.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::sqlite::SqliteSynchronous;
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::held::{holdings, Held};
use super::hot::{prune_rows, publish_all, record_all};
use super::sql::SHAPES;
use crate::domain::delivery::{AttemptRecord, Lease, NewEvent, PublishOutcome};
use crate::error::Result;
use crate::metrics::Histogram;
use crate::store::Pruned;

/// Held by the writer while it applies a group, and by the checkpointer while it finishes a checkpoint.
pub(super) type Gate = Arc<tokio::sync::Mutex<()>>;

/// Leases of a single process never expire while it runs.
pub(super) const HELD: i64 = i64::MAX;

/// Hot-path writes, grouped by the writer into one transaction per batch.
pub(super) enum WriteOp {
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
    /// A retention pass: a transaction of its own, apart from the group it arrived with.
    Prune {
        before: i64,
        limit: i64,
        reply: oneshot::Sender<Result<Pruned>>,
    },
}

/// Most operations one group commit carries.
pub(super) const MAX_BATCH: usize = 512;

/// The connection that carries the delivery hot path (publishes and attempt results), owned by the writer.
/// rusqlite drives it on the writer's own thread: a group commit is one hand-off from the async runtime, its
/// statements are prepared once and bound in place, and RETURNING rows are read where they are produced. (Through sqlx's
/// connection worker each statement was a round trip between threads, with every bound value copied first.)
pub(super) struct Hot {
    pub(super) conn: rusqlite::Connection,
    /// Ids given to the next delivery and the next event: assigned here, so a group's jobs are known without
    /// reading rows back.
    pub(super) next_id: i64,
    pub(super) next_event: i64,
}

impl Hot {
    pub(super) fn open(path: &std::path::Path, sync: SqliteSynchronous) -> Result<Self> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let sync = match sync {
            SqliteSynchronous::Off => "OFF",
            SqliteSynchronous::Normal => "NORMAL",
            SqliteSynchronous::Full => "FULL",
            SqliteSynchronous::Extra => "EXTRA",
        };
        // An 8 MB page cache holds the B-tree pages a group commit touches, so large groups neither spill to
        // the WAL mid-transaction nor re-read pages. The statement cache holds the shapes of multi-row
        // statements `chunks` makes.
        // Foreign keys are not checked here (as the PostgreSQL schema has no foreign-key triggers on these
        // tables): the hot path keeps its references by construction (deliveries only for events inserted in
        // the same group, attempts only for deliveries this node holds; neither is ever deleted). Without
        // them, and with OR FAIL on its statements (any failure rolls the whole group back anyway), a
        // multi-row statement needs no statement journal: SQLite would otherwise copy every page it touches
        // to be able to undo that one statement.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = OFF; \
             PRAGMA cache_size = -8000; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 0; \
             PRAGMA journal_size_limit = 67108864;"
        ))?;
        conn.set_prepared_statement_cache_capacity(4 * SHAPES + 16);
        // Past every id ever given, not only those still stored: retention may have removed the newest.
        let next_id = conn.query_row(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM deliveries), 0), \
               COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'), 0)) + 1",
            [],
            |r| r.get(0),
        )?;
        let next_event = conn.query_row("SELECT COALESCE(MAX(rowid), 0) + 1 FROM events", [], |r| r.get(0))?;
        Ok(Self {
            conn,
            next_id,
            next_event,
        })
    }
}

/// The group-commit writer, on its own thread: drains every waiting operation, applies them together with
/// set-based statements in one transaction, commits once (one fsync for all), then answers each. Inputs are
/// validated before they get here, so a failure is the database's and fails the whole group, which then
/// retries or reports it. (A thread of its own, rather than a task handing each group to the blocking pool,
/// saves two thread wake-ups per group: one-event publishes make many small groups.)
pub(super) fn run_writer(mut hot: Hot, mut rx: mpsc::Receiver<WriteOp>, held: Held, gate: Gate, commits: &Histogram) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.blocking_recv_many(&mut batch, MAX_BATCH) > 0 {
        // A retention pass runs on its own, before the group it arrived with.
        let mut ops = Vec::with_capacity(batch.len());
        for op in batch.drain(..) {
            match op {
                WriteOp::Prune { before, limit, reply } => {
                    let _pause = gate.blocking_lock();
                    let _ = reply.send(prune_rows(&mut hot.conn, before, limit));
                }
                op => ops.push(op),
            }
        }
        if ops.is_empty() {
            continue;
        }
        let started = Instant::now();
        let pause = gate.blocking_lock();
        let mut attempt = 0;
        let result = loop {
            let result = apply_batch(&mut hot, &ops, &held);
            attempt += 1;
            match &result {
                // SQLITE_BUSY past the busy timeout (another process, such as a CLI command, holds the lock).
                Err(e) if attempt < 20 && e.is_busy() => std::thread::sleep(Duration::from_millis(50)),
                _ => break result,
            }
        };
        drop(pause);
        commits.observe_since(started);
        match result {
            Ok(published) => {
                let mut published = published.into_iter();
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
                            let _ = reply.send(Ok(published.next().unwrap_or_default()));
                        }
                        WriteOp::Record { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                        WriteOp::Prune { .. } => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                for op in ops {
                    match op {
                        WriteOp::Publish { reply, .. } => {
                            let _ = reply.send(Err(e.for_each_of_a_group()));
                        }
                        WriteOp::Record { reply, .. } => {
                            let _ = reply.send(Err(e.for_each_of_a_group()));
                        }
                        WriteOp::Prune { .. } => {}
                    }
                }
            }
        }
    }
}

/// WAL frames (pages) past which a checkpoint briefly pauses the writer to finish, about 16 MiB.
pub(super) const WAL_RESTART_FRAMES: i64 = 4096;

/// Copies the WAL back into the database from its own connection, beside the writer, so commits stay short.
/// PASSIVE never blocks the writer, but under steady writes it never catches up either, and the WAL only starts
/// over once a checkpoint has copied all of it: it would grow without bound (1.6 GB after 300,000 events). So
/// once the WAL passes `WAL_RESTART_FRAMES`, a second pass runs with the writer paused between two groups; it
/// copies only what the first pass left, and the writer's next transaction writes the WAL from its start again.
pub(super) async fn checkpoint(pool: SqlitePool, store_alive: mpsc::WeakSender<WriteOp>, gate: Gate) {
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
pub(super) async fn passive_checkpoint(pool: &SqlitePool) -> std::result::Result<i64, sqlx::Error> {
    let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(pool).await?;
    row.try_get(1)
}

/// Applies a group in one transaction; returns the publish outcomes in the order of the publish operations.
/// On failure the id counters are put back and the group's deliveries are no longer held.
pub(super) fn apply_batch(hot: &mut Hot, ops: &[WriteOp], held: &Held) -> Result<Vec<Vec<PublishOutcome>>> {
    let (first_id, first_event) = (hot.next_id, hot.next_event);
    let result = apply_batch_once(hot, ops, held);
    if result.is_err() {
        holdings(held).ids.retain(|id| *id < first_id || *id >= hot.next_id);
        (hot.next_id, hot.next_event) = (first_id, first_event);
    }
    result
}

pub(super) fn apply_batch_once(hot: &mut Hot, ops: &[WriteOp], held: &Held) -> Result<Vec<Vec<PublishOutcome>>> {
    let tx = hot
        .conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let publishes: Vec<(&[NewEvent], Option<&Lease>)> = ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::Publish { events, lease, .. } => Some((events.as_slice(), lease.as_ref())),
            WriteOp::Record { .. } | WriteOp::Prune { .. } => None,
        })
        .collect();
    let published = publish_all(&tx, &publishes, &mut hot.next_id, &mut hot.next_event)?;
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
        record_all(&tx, &records, disable_after_ms)?;
    }
    tx.commit()?;
    Ok(published)
}
