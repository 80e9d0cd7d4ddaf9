//! SQLite store: WAL, one write connection owned by a group-commit writer for the hot path, a pool of readers.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::common::{id_bound, sql_store};
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
    commits: Arc<Histogram>,
    /// What claims read with (see `claim_rows`).
    claims: Arc<std::sync::Mutex<ClaimReader>>,
    signals: SignalSlot,
}

/// Waiting deliveries are read through the due index (which holds only them): the table has no index on their
/// subscription or webhook, which would cost every delivery's insert and completion a write.
const PENDING_DELIVERIES: &str = "deliveries INDEXED BY deliveries_due";

impl SqliteStore {
    /// One process owns the file: a change is heard here only.
    async fn changed(&self, change: Changed) {
        match change {
            Changed::Keys(app_id) => self.signals.keys(Some(app_id)),
            Changed::Routes { resumed } => {
                self.signals.routes();
                if resumed > 0 {
                    self.signals.work();
                }
            }
        }
    }
}

/// The read connection claims use, driven directly through rusqlite, and where the last full claim stopped.
struct ClaimReader {
    conn: rusqlite::Connection,
    from: Option<ClaimFrom>,
}

/// The due-index position, `(next_attempt_at, id)`, of the last row a full claim read, and when this run of
/// full claims began. Every delivery this process holds is pending and due, so it sits at the front of the due
/// index: while a backlog drains, each claim would otherwise step over all of them (up to the scheduler's buffer,
/// 1,024 by default) before the rows it can take. A claim that comes back short starts again from the front, and
/// so does one a second after the run began, so a delivery left behind the position (released without a new
/// due time) waits at most that long.
#[derive(Debug, Clone, Copy)]
struct ClaimFrom {
    next_attempt_at: i64,
    id: i64,
    since: Instant,
}

/// How long claims keep reading from a position before they start from the front again.
const CLAIM_FROM_FOR: Duration = Duration::from_secs(1);

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
    /// The ids held, as a JSON array for `json_each`.
    fn ids_json(&self) -> Result<String> {
        serde_json::to_string(&self.ids).map_err(|e| Error::Internal(e.to_string()))
    }

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
    /// Starts a read; returns the ids held now, as a JSON array, if asked for.
    fn start(held: &'a Held, with_ids: bool) -> Result<(Self, Option<String>)> {
        let mut h = holdings(held);
        let ids = if with_ids { Some(h.ids_json()?) } else { None };
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
    /// A retention pass: a transaction of its own, apart from the group it arrived with.
    Prune {
        before: i64,
        limit: i64,
        reply: oneshot::Sender<Result<Pruned>>,
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
        let path = opts.get_filename().to_path_buf();
        if url.contains(":memory:") || url.contains("mode=memory") || path.as_os_str().is_empty() {
            return Err(Error::bad_request(
                "an in-memory SQLite database cannot be shared by the service's connections: use sqlite://FILE",
            ));
        }
        // Migrations, management writes and lease clean-up; the delivery hot path has its own connection.
        let write_opts = opts
            .clone()
            // Checkpoints run beside the writers (see `checkpoint`), not inside their commits.
            .pragma("wal_autocheckpoint", "0")
            .statement_cache_capacity(32);
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
        let claim_path = path.clone();
        let hot = tokio::task::spawn_blocking(move || Hot::open(&path, sync))
            .await
            .map_err(|e| Error::Internal(format!("opening the database: {e}")))??;
        let claims = tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open_with_flags(
                claim_path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.execute_batch("PRAGMA cache_size = -2000; PRAGMA temp_store = MEMORY;")?;
            Ok::<_, Error>(conn)
        })
        .await
        .map_err(|e| Error::Internal(format!("opening the database: {e}")))??;
        let read = SqlitePoolOptions::new()
            .max_connections(pool_size.max(1))
            .connect_with(opts.clone().read_only(true).statement_cache_capacity(16))
            .await?;
        let (writer, rx) = mpsc::channel(4096);
        let held: Held = Arc::default();
        let gate = Gate::default();
        let commits = Arc::new(Histogram::commits());
        {
            let (held, gate, commits) = (held.clone(), gate.clone(), commits.clone());
            std::thread::Builder::new()
                .name("sqlite-writer".into())
                .spawn(move || run_writer(hot, rx, held, gate, &commits))
                .map_err(|e| Error::Internal(format!("starting the database writer: {e}")))?;
        }
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
            commits,
            claims: Arc::new(std::sync::Mutex::new(ClaimReader {
                conn: claims,
                from: None,
            })),
            signals: SignalSlot::default(),
        })
    }
}

/// The connection that carries the delivery hot path (publishes and attempt results), owned by the writer.
/// rusqlite drives it on the writer's own thread: a group commit is one hand-off from the async runtime, its
/// statements are prepared once and bound in place, and RETURNING rows are read where they are produced. (Through sqlx's
/// connection worker each statement was a round trip between threads, with every bound value copied first.)
struct Hot {
    conn: rusqlite::Connection,
    /// Ids given to the next delivery and the next event: assigned here, so a group's jobs are known without
    /// reading rows back.
    next_id: i64,
    next_event: i64,
}

impl Hot {
    fn open(path: &std::path::Path, sync: SqliteSynchronous) -> Result<Self> {
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
fn run_writer(mut hot: Hot, mut rx: mpsc::Receiver<WriteOp>, held: Held, gate: Gate, commits: &Histogram) {
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

/// Most rows per multi-row statement (at most 8 parameters each, far under SQLite's limit of 32,766).
const ROWS_PER_STATEMENT: usize = 256;
/// Up to this many rows go in one statement of exactly that many rows.
const EXACT_ROWS: usize = 32;
/// Statement shapes per table: 1 to `EXACT_ROWS` rows, then the powers of two up to `ROWS_PER_STATEMENT`.
const SHAPES: usize = EXACT_ROWS + (ROWS_PER_STATEMENT.ilog2() - EXACT_ROWS.ilog2()) as usize;

/// Splits rows into chunks of at most 35 lengths per table, so each shape of a multi-row statement is prepared
/// once and stays in the statement cache (one statement per row count, as a plain split gives, would either be
/// prepared again for every group or fill the cache with hundreds of large compiled programs). Groups of up
/// to `EXACT_ROWS` rows, which is what one-event publishes make, take one statement; larger groups take
/// power-of-two chunks, largest first, and the rest.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = if rows.len() <= EXACT_ROWS {
            rows.len()
        } else {
            ROWS_PER_STATEMENT.min(1 << rows.len().ilog2())
        };
        let (chunk, rest) = rows.split_at(n);
        rows = rest;
        Some(chunk)
    })
}

/// A multi-row statement: `head`, then `rows` copies of `row` (each `#` in it is the row's next parameter,
/// numbered after the `shared` parameters every row may refer to as ?1..), then `tail`. The text of each chunk
/// shape is built once.
struct MultiRow {
    head: &'static str,
    row: &'static str,
    tail: &'static str,
    shared: usize,
    /// Parameters per row: the `#`s of `row`, counted once (`param` runs for every bound value).
    per_row: usize,
    texts: [std::sync::OnceLock<String>; SHAPES],
}

impl MultiRow {
    const fn new(head: &'static str, row: &'static str, tail: &'static str, shared: usize) -> Self {
        let (bytes, mut i, mut per_row) = (row.as_bytes(), 0, 0);
        while i < bytes.len() {
            per_row += (bytes[i] == b'#') as usize;
            i += 1;
        }
        Self {
            head,
            row,
            tail,
            shared,
            per_row,
            texts: [const { std::sync::OnceLock::new() }; SHAPES],
        }
    }

    /// The text for `rows` rows (a length `chunks` makes).
    fn sql(&self, rows: usize) -> &str {
        let shape = if rows <= EXACT_ROWS {
            rows - 1
        } else {
            EXACT_ROWS - 1 + (rows.ilog2() - EXACT_ROWS.ilog2()) as usize
        };
        self.texts[shape].get_or_init(|| {
            let mut sql = String::from(self.head);
            let mut next = self.shared + 1;
            for r in 0..rows {
                if r > 0 {
                    sql.push_str(", ");
                }
                for part in self.row.split_inclusive('#') {
                    match part.strip_suffix('#') {
                        Some(text) => {
                            sql.push_str(text);
                            sql.push_str(&format!("?{next}"));
                            next += 1;
                        }
                        None => sql.push_str(part),
                    }
                }
            }
            sql.push_str(self.tail);
            sql
        })
    }

    /// The 1-based index of parameter `col` of row `row`.
    fn param(&self, row: usize, col: usize) -> usize {
        self.shared + row * self.per_row + col + 1
    }
}

static INSERT_EVENTS: MultiRow = MultiRow::new(
    "INSERT OR FAIL INTO events (rowid, event_key, organizer_key, event_name, body, deliveries, first_delivery, \
     last_delivery, created_at) VALUES ",
    "(#, #, #, #, #, #, #, #, ?1)",
    " ON CONFLICT (event_key) DO NOTHING RETURNING rowid",
    1,
);

static INSERT_DELIVERIES: MultiRow = MultiRow::new(
    "INSERT OR FAIL INTO deliveries (id, event_key, event_name, app_id, webhook_key, subscription_key, url, state, \
     attempts, next_attempt_at, lease_owner, lease_until, created_at, updated_at) VALUES ",
    "(#, #, #, #, #, #, #, 'pending', 0, ?1, NULL, 0, ?1, ?1)",
    "",
    1,
);

static INSERT_ATTEMPTS: MultiRow = MultiRow::new(
    "INSERT OR FAIL INTO attempts (delivery_id, number, node, started_at, duration_ms, status_code, error, \
     response_excerpt) VALUES ",
    "(#, #, #, #, #, #, #, #)",
    "",
    0,
);

/// A delivery changed since its attempt's job was read (an operator's retry or redeliver, a pause or a
/// cancellation, which always move `updated_at`) keeps its new state, due time and lease: the attempt is logged,
/// and the delivery is attempted again as asked, or stays paused or cancelled (a delivered attempt still settles
/// it as delivered). The rule is `store::KEEPS_CHANGE`, written for this statement's names.
static UPDATE_DELIVERIES: MultiRow = MultiRow::new(
    "UPDATE OR FAIL deliveries SET \
     state = CASE WHEN deliveries.updated_at <> v.column7 AND NOT (v.column2 = 'delivered' AND deliveries.state IN ('paused', 'cancelled')) THEN deliveries.state ELSE v.column2 END, \
     attempts = max(deliveries.attempts, v.column3), \
     next_attempt_at = CASE WHEN deliveries.updated_at <> v.column7 THEN deliveries.next_attempt_at ELSE v.column4 END, \
     lease_owner = CASE WHEN deliveries.updated_at <> v.column7 THEN deliveries.lease_owner END, \
     lease_until = CASE WHEN deliveries.updated_at <> v.column7 THEN deliveries.lease_until ELSE 0 END, \
     last_status = v.column5, \
     last_error = CASE WHEN deliveries.updated_at <> v.column7 AND deliveries.state IN ('paused', 'cancelled') AND v.column2 <> 'delivered' THEN deliveries.last_error ELSE v.column6 END, \
     updated_at = CASE WHEN deliveries.updated_at <> v.column7 THEN deliveries.updated_at ELSE ?1 END \
     FROM (VALUES ",
    "(#, #, #, #, #, #, #)",
    ") AS v WHERE deliveries.id = v.column1",
    1,
);

/// Applies a group in one transaction; returns the publish outcomes in the order of the publish operations.
/// On failure the id counters are put back and the group's deliveries are no longer held.
fn apply_batch(hot: &mut Hot, ops: &[WriteOp], held: &Held) -> Result<Vec<Vec<PublishOutcome>>> {
    let (first_id, first_event) = (hot.next_id, hot.next_event);
    let result = apply_batch_once(hot, ops, held);
    if result.is_err() {
        holdings(held).ids.retain(|id| *id < first_id || *id >= hot.next_id);
        (hot.next_id, hot.next_event) = (first_id, first_event);
    }
    result
}

fn apply_batch_once(hot: &mut Hot, ops: &[WriteOp], held: &Held) -> Result<Vec<Vec<PublishOutcome>>> {
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

/// A retention pass on the hot connection, in a transaction of its own. That connection does not check
/// foreign keys, which matters here: deliveries have no index on their event (see migration 0003), so
/// checking each removed event's references would read every delivery. The pass keeps them by construction:
/// a delivery's attempts go with it, and an event goes only when no delivery refers to it.
fn prune_rows(conn: &mut rusqlite::Connection, before: i64, limit: i64) -> Result<Pruned> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // The primary key is walked up to where `before` falls in it: a pass costs what it removes (and the
    // unfinished deliveries it steps over), not the size of the table.
    let gone: Vec<(i64, String)> = tx
        .prepare_cached(&format!(
            "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
               WHERE id < {} AND created_at < ?1 AND updated_at < ?1 AND state IN ('delivered', 'failed') \
               ORDER BY id LIMIT ?2) \
             RETURNING id, event_key",
            id_bound("?1")
        ))?
        .query_map(rusqlite::params![before, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let ids = serde_json::to_string(&gone.iter().map(|g| g.0).collect::<Vec<_>>())
        .map_err(|e| Error::Internal(e.to_string()))?;
    let attempts = tx
        .prepare_cached("DELETE FROM attempts WHERE delivery_id IN (SELECT value FROM json_each(?1))")?
        .execute([&ids])? as u64;
    let mut keys: Vec<&str> = gone.iter().map(|g| g.1.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let keys = serde_json::to_string(&keys).map_err(|e| Error::Internal(e.to_string()))?;
    // An event goes with its last delivery, looked for within the range of ids kept on it.
    let mut events = tx
        .prepare_cached(
            "DELETE FROM events WHERE event_key IN (SELECT value FROM json_each(?1)) \
               AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id BETWEEN events.first_delivery \
                 AND events.last_delivery AND d.event_key = events.event_key)",
        )?
        .execute([&keys])? as u64;
    events += tx
        .prepare_cached(
            "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events \
               WHERE deliveries = 0 AND created_at < ?1 LIMIT ?2)",
        )?
        .execute(rusqlite::params![before, limit])? as u64;
    tx.commit()?;
    Ok(Pruned {
        deliveries: gone.len() as u64,
        attempts,
        events,
    })
}

/// Where one (organizer, event name) fans out to.
struct Target {
    subscription_key: String,
    app_id: i64,
    webhook_key: String,
    url: String,
    secret_key: Option<String>,
}

fn publish_all(
    tx: &rusqlite::Transaction,
    ops: &[(&[NewEvent], Option<&Lease>)],
    next_id: &mut i64,
    next_event: &mut i64,
) -> Result<Vec<Vec<PublishOutcome>>> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let events: Vec<&NewEvent> = ops.iter().flat_map(|(events, _)| events.iter()).collect();

    // Fan-out targets: one query per distinct (organizer, event name) in the group.
    let mut groups: Vec<Vec<Target>> = Vec::new();
    let mut group_of: HashMap<(i64, EventName), usize> = HashMap::new();
    let mut fanout = tx.prepare_cached(
        "SELECT s.subscription_key, s.app_id, s.webhook_key, COALESCE(s.callback_url, w.callback_url), \
         w.secret_key FROM user_subscriptions s JOIN webhooks w ON w.webhook_key = s.webhook_key \
         WHERE s.organizer_key = ?1 AND w.event_name = ?2 AND s.state = 'ACTIVE' AND w.state = 'ACTIVE'",
    )?;
    let mut target_of = Vec::with_capacity(events.len());
    for ev in &events {
        let key = (ev.organizer_key, ev.event_name);
        let g = match group_of.get(&key) {
            Some(g) => *g,
            None => {
                let list = fanout
                    .query_map(rusqlite::params![ev.organizer_key, ev.event_name.as_str()], |r| {
                        Ok(Target {
                            subscription_key: r.get(0)?,
                            app_id: r.get(1)?,
                            webhook_key: r.get(2)?,
                            url: r.get(3)?,
                            secret_key: r.get(4)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                groups.push(list);
                group_of.insert(key, groups.len() - 1);
                groups.len() - 1
            }
        };
        target_of.push(g);
    }
    let fan_out = |i: usize| groups[target_of[i]].as_slice();

    // Events, in order, each with the next rowid; ON CONFLICT keeps publishing idempotent (a key repeated
    // within the group conflicts with its first occurrence). RETURNING names the rows inserted. Each event is
    // given the next ids from the writer's counter for its deliveries, and keeps their range (how they are found
    // again); an event not inserted leaves its ids unused.
    let mut first_ids = Vec::with_capacity(events.len());
    for i in 0..events.len() {
        first_ids.push(*next_id);
        *next_id += fan_out(i).len() as i64;
    }
    let first_event = *next_event;
    *next_event += events.len() as i64;
    let mut inserted = vec![false; events.len()];
    let mut offset = 0;
    for chunk in chunks(&events) {
        let mut stmt = tx.prepare_cached(INSERT_EVENTS.sql(chunk.len()))?;
        stmt.raw_bind_parameter(1, now)?;
        for (r, ev) in chunk.iter().enumerate() {
            let p = |c| INSERT_EVENTS.param(r, c);
            stmt.raw_bind_parameter(p(0), first_event + (offset + r) as i64)?;
            stmt.raw_bind_parameter(p(1), ev.event_key.as_str())?;
            stmt.raw_bind_parameter(p(2), ev.organizer_key)?;
            stmt.raw_bind_parameter(p(3), ev.event_name.as_str())?;
            stmt.raw_bind_parameter(p(4), ev.body.as_ref())?;
            let n = fan_out(offset + r).len() as i64;
            let first = first_ids[offset + r];
            stmt.raw_bind_parameter(p(5), n)?;
            stmt.raw_bind_parameter(p(6), (n > 0).then_some(first))?;
            stmt.raw_bind_parameter(p(7), (n > 0).then_some(first + n - 1))?;
        }
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next()? {
            let rowid: i64 = row.get(0)?;
            if let Some(slot) = usize::try_from(rowid - first_event)
                .ok()
                .and_then(|i| inserted.get_mut(i))
            {
                *slot = true;
            }
        }
        offset += chunk.len();
    }

    // Deliveries, with ids from the writer's counter so the jobs are known without reading them back.
    let mut earlier = tx.prepare_cached("SELECT deliveries FROM events WHERE event_key = ?1")?;
    let mut rows: Vec<(i64, &NewEvent, &Target)> = Vec::new();
    let mut out: Vec<Vec<PublishOutcome>> = Vec::with_capacity(ops.len());
    let mut i = 0;
    for (evs, lease) in ops {
        let mut outcomes = Vec::with_capacity(evs.len());
        for ev in evs.iter() {
            let targets = fan_out(i);
            if !inserted[i] {
                // Published before (or earlier in this group): the count its first publish created.
                let deliveries = earlier
                    .query_row([ev.event_key.as_str()], |r| r.get(0))
                    .unwrap_or(targets.len() as i64);
                outcomes.push(PublishOutcome {
                    event_key: ev.event_key.clone(),
                    deliveries,
                    duplicate: true,
                    jobs: Vec::new(),
                });
                i += 1;
                continue;
            }
            let mut jobs = Vec::new();
            for (id, t) in (first_ids[i]..).zip(targets) {
                rows.push((id, ev, t));
                if lease.is_some() {
                    jobs.push(DeliveryJob {
                        id,
                        event_key: ev.event_key.clone(),
                        app_id: t.app_id,
                        webhook_key: t.webhook_key.clone(),
                        subscription_key: t.subscription_key.clone(),
                        url: t.url.clone(),
                        body: ev.body.clone(),
                        webhook_secret: t.secret_key.clone(),
                        attempts: 0,
                        lease_until: HELD,
                        updated_at: now,
                        // The fan-out read only ACTIVE subscriptions of ACTIVE webhooks.
                        standing: Standing::Active,
                        routes_seen: 0,
                    });
                }
            }
            outcomes.push(PublishOutcome {
                event_key: ev.event_key.clone(),
                deliveries: targets.len() as i64,
                duplicate: false,
                jobs,
            });
            i += 1;
        }
        out.push(outcomes);
    }
    for chunk in chunks(&rows) {
        let mut stmt = tx.prepare_cached(INSERT_DELIVERIES.sql(chunk.len()))?;
        stmt.raw_bind_parameter(1, now)?;
        for (r, (id, ev, t)) in chunk.iter().enumerate() {
            let p = |c| INSERT_DELIVERIES.param(r, c);
            stmt.raw_bind_parameter(p(0), id)?;
            stmt.raw_bind_parameter(p(1), ev.event_key.as_str())?;
            stmt.raw_bind_parameter(p(2), ev.event_name.as_str())?;
            stmt.raw_bind_parameter(p(3), t.app_id)?;
            stmt.raw_bind_parameter(p(4), t.webhook_key.as_str())?;
            stmt.raw_bind_parameter(p(5), t.subscription_key.as_str())?;
            stmt.raw_bind_parameter(p(6), t.url.as_str())?;
        }
        stmt.raw_execute()?;
    }
    Ok(out)
}

/// The distinct subscriptions of the records whose outcome matches, as a JSON array.
fn subscriptions_where(records: &[&AttemptRecord], pred: impl Fn(Outcome) -> bool) -> Result<Option<String>> {
    let mut keys: Vec<&str> = records
        .iter()
        .filter(|r| pred(r.outcome))
        .map(|r| r.subscription_key.as_str())
        .collect();
    if keys.is_empty() {
        return Ok(None);
    }
    keys.sort_unstable();
    keys.dedup();
    serde_json::to_string(&keys)
        .map(Some)
        .map_err(|e| Error::Internal(e.to_string()))
}

fn record_all(tx: &rusqlite::Transaction, records: &[&AttemptRecord], disable_after_ms: i64) -> Result<()> {
    let now = now_ms();
    // Deliveries that were paused or cancelled instead of sent have no attempt to log.
    let attempted: Vec<&AttemptRecord>;
    let attempts = if records.iter().all(|r| r.outcome.attempted()) {
        records
    } else {
        attempted = records.iter().copied().filter(|r| r.outcome.attempted()).collect();
        &attempted
    };
    for chunk in chunks(attempts) {
        let mut stmt = tx.prepare_cached(INSERT_ATTEMPTS.sql(chunk.len()))?;
        for (i, r) in chunk.iter().enumerate() {
            let p = |c| INSERT_ATTEMPTS.param(i, c);
            stmt.raw_bind_parameter(p(0), r.delivery_id)?;
            stmt.raw_bind_parameter(p(1), r.number)?;
            stmt.raw_bind_parameter(p(2), r.node.as_str())?;
            stmt.raw_bind_parameter(p(3), r.started_at)?;
            stmt.raw_bind_parameter(p(4), r.duration_ms)?;
            stmt.raw_bind_parameter(p(5), r.status_code)?;
            stmt.raw_bind_parameter(p(6), r.error.as_deref())?;
            stmt.raw_bind_parameter(p(7), r.response_excerpt.as_deref())?;
        }
        stmt.raw_execute()?;
    }
    for chunk in chunks(records) {
        let mut stmt = tx.prepare_cached(UPDATE_DELIVERIES.sql(chunk.len()))?;
        stmt.raw_bind_parameter(1, now)?;
        for (i, r) in chunk.iter().enumerate() {
            let p = |c| UPDATE_DELIVERIES.param(i, c);
            let (state, next) = r.outcome.settles_as(now);
            stmt.raw_bind_parameter(p(0), r.delivery_id)?;
            stmt.raw_bind_parameter(p(1), state)?;
            stmt.raw_bind_parameter(p(2), r.number)?;
            stmt.raw_bind_parameter(p(3), next)?;
            stmt.raw_bind_parameter(p(4), r.status_code)?;
            stmt.raw_bind_parameter(p(5), r.error.as_deref())?;
            stmt.raw_bind_parameter(p(6), r.job_updated_at)?;
        }
        stmt.raw_execute()?;
    }

    // A subscription's failure clock: started by a failure, stopped by any success.
    let failing = subscriptions_where(records, Outcome::is_failure)?;
    let delivered = subscriptions_where(records, |o| o == Outcome::Delivered)?;
    let gone = subscriptions_where(records, |o| o == Outcome::Gone)?;
    if let Some(keys) = &failing {
        tx.prepare_cached(
            "UPDATE OR FAIL user_subscriptions SET failing_since = COALESCE(failing_since, ?1) \
             WHERE subscription_key IN (SELECT value FROM json_each(?2))",
        )?
        .execute(rusqlite::params![now, keys])?;
    }
    if let Some(keys) = &delivered {
        tx.prepare_cached(
            "UPDATE OR FAIL user_subscriptions SET failing_since = NULL \
             WHERE failing_since IS NOT NULL AND subscription_key IN (SELECT value FROM json_each(?1))",
        )?
        .execute([keys])?;
    }
    if let Some(keys) = &failing {
        let reason = format!(
            "every delivery failed for {} s; deactivated at {}",
            disable_after_ms / 1000,
            format_ms(now)
        );
        tx.prepare_cached(
            "UPDATE OR FAIL user_subscriptions SET state = 'INACTIVE', inactive_reason = ?1 \
             WHERE state = 'ACTIVE' AND failing_since <= ?2 AND subscription_key IN (SELECT value FROM json_each(?3))",
        )?
        .execute(rusqlite::params![reason, now.saturating_sub(disable_after_ms), keys])?;
    }
    if let Some(keys) = &gone {
        let reason = format!("the callback answered 410 Gone at {}", format_ms(now));
        tx.prepare_cached(
            "UPDATE OR FAIL user_subscriptions SET state = 'INACTIVE', inactive_reason = ?1 \
             WHERE state = 'ACTIVE' AND subscription_key IN (SELECT value FROM json_each(?2))",
        )?
        .execute(rusqlite::params![reason, keys])?;
    }
    Ok(())
}

/// Takes up to `limit` due deliveries this process does not hold, oldest due first, and holds them. Runs on a
/// blocking thread with the claim connection: rows are read straight into jobs (through sqlx each value was
/// copied once more and looked up by name, about a tenth of the server's CPU while a backlog drained).
fn claim_rows(reader: &std::sync::Mutex<ClaimReader>, held: &Held, now: i64, limit: i64) -> Result<Vec<DeliveryJob>> {
    let mut reader = reader.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // A position is used once: a claim that comes back short leaves none, and a run of full claims is cut
    // after `CLAIM_FROM_FOR`.
    let from = reader.from.take().filter(|f| f.since.elapsed() < CLAIM_FROM_FOR);
    // From the front: due rows from the due index, skipping those this process holds (passed as one JSON
    // array, which SQLite turns into a temporary index), so only the rows taken are read. From a position: the
    // rows held are behind it, except the few a publish's fast path took since, which are dropped below.
    let (reading, holding) = ClaimRead::start(held, from.is_none())?;
    // The subscription and webhook as they are now: their URL and key, and whether they still stand.
    const COLUMNS: &str = "SELECT d.id, d.event_key, d.app_id, d.subscription_key, \
         COALESCE(s.callback_url, w.callback_url, d.url), d.attempts, \
         d.next_attempt_at, e.body, w.secret_key, d.updated_at, d.webhook_key, w.state, s.state \
         FROM deliveries d JOIN events e ON e.event_key = d.event_key \
         LEFT JOIN webhooks w ON w.webhook_key = d.webhook_key \
         LEFT JOIN user_subscriptions s ON s.subscription_key = d.subscription_key \
         WHERE d.state = 'pending' AND d.next_attempt_at <= ?1";
    let mut stmt;
    let mut rows = match (from, holding) {
        (Some(f), _) => {
            stmt = reader.conn.prepare_cached(&format!(
                "{COLUMNS} AND d.next_attempt_at >= ?2 AND NOT (d.next_attempt_at = ?2 AND d.id <= ?3) \
                 ORDER BY d.next_attempt_at, d.id LIMIT ?4"
            ))?;
            stmt.query(rusqlite::params![now, f.next_attempt_at, f.id, limit])?
        }
        (None, holding) => {
            stmt = reader.conn.prepare_cached(&format!(
                "{COLUMNS} AND d.id NOT IN (SELECT value FROM json_each(?2)) \
                 ORDER BY d.next_attempt_at, d.id LIMIT ?3"
            ))?;
            stmt.query(rusqlite::params![now, holding.unwrap_or_default(), limit])?
        }
    };
    let mut bodies: HashMap<String, Bytes> = HashMap::new();
    let (mut jobs, mut read, mut last) = (Vec::new(), 0, None);
    while let Some(r) = rows.next()? {
        read += 1;
        let id: i64 = r.get(0)?;
        let event_key: String = r.get(1)?;
        last = Some((r.get::<_, i64>(6)?, id));
        let body = match bodies.get(&event_key) {
            Some(b) => b.clone(),
            None => {
                let b = Bytes::from(r.get::<_, Vec<u8>>(7)?);
                bodies.insert(event_key.clone(), b.clone());
                b
            }
        };
        let (w_state, s_state): (Option<String>, Option<String>) = (r.get(11)?, r.get(12)?);
        jobs.push(DeliveryJob {
            id,
            event_key,
            app_id: r.get(2)?,
            webhook_key: r.get(10)?,
            subscription_key: r.get(3)?,
            url: r.get(4)?,
            body,
            webhook_secret: r.get(8)?,
            attempts: r.get(5)?,
            lease_until: HELD,
            updated_at: r.get(9)?,
            standing: Standing::of(w_state.as_deref(), s_state.as_deref()),
            routes_seen: 0,
        });
    }
    drop(rows);
    drop(stmt);
    if let Some((next_attempt_at, id)) = last.filter(|_| read == limit) {
        // Full: the next claim starts after this one's last row.
        reader.from = Some(ClaimFrom {
            next_attempt_at,
            id,
            since: from.map_or_else(Instant::now, |f| f.since),
        });
    }
    drop(reader);
    let mut h = holdings(held);
    // Held (taken meanwhile by a publish's fast path, or behind a position), or recorded while this claim read:
    // not this claim's.
    jobs.retain(|j| !h.ids.contains(&j.id) && !h.released_while_reading.contains(&j.id));
    h.ids.extend(jobs.iter().map(|j| j.id));
    drop(h);
    drop(reading);
    Ok(jobs)
}

sql_store!(SqliteStore, Sqlite, SqliteRow, {
    fn commit_durations(&self) -> &Histogram {
        &self.commits
    }

    fn watch(&self, signals: Signals) {
        self.signals.set(signals);
    }

    async fn ping(&self) -> Result<()> {
        if self.writer.is_closed() {
            return Err(Error::Unavailable("the database writer has stopped".into()));
        }
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn publish(&self, events: Vec<NewEvent>, lease: Option<Lease>) -> Result<Vec<PublishOutcome>> {
        let (reply, rx) = oneshot::channel();
        ask(&self.writer, WriteOp::Publish { events, lease, reply }, rx).await
    }

    async fn claim_due(&self, now: i64, _lease: &Lease, limit: i64) -> Result<Vec<DeliveryJob>> {
        let (claims, held) = (self.claims.clone(), self.held.clone());
        tokio::task::spawn_blocking(move || claim_rows(&claims, &held, now, limit))
            .await
            .map_err(|e| Error::Internal(format!("claiming deliveries: {e}")))?
    }

    async fn next_due(&self, _now: i64) -> Result<Option<i64>> {
        // Deliveries this process holds stay pending while their attempts run: they are not waiting. (Counted,
        // they would report work due after every recorded result, and the scheduler would claim for nothing.)
        let holding = holdings(&self.held).ids_json()?;
        Ok(sqlx::query_scalar(
            "SELECT next_attempt_at FROM deliveries WHERE state = 'pending' \
               AND id NOT IN (SELECT value FROM json_each($1)) ORDER BY next_attempt_at LIMIT 1",
        )
        .bind(holding)
        .fetch_optional(&self.read)
        .await?)
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

    async fn prune(&self, before: i64, limit: i64) -> Result<Pruned> {
        let (reply, rx) = oneshot::channel();
        ask(&self.writer, WriteOp::Prune { before, limit, reply }, rx).await
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
        let (reading, ids) = ClaimRead::start(&held, true).expect("start");
        let mut sent: Vec<i64> = serde_json::from_str(&ids.expect("asked for")).expect("JSON array");
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
    fn multi_row_statements_number_their_parameters_after_the_shared_ones() {
        let m = MultiRow::new("INSERT INTO t VALUES ", "(#, #, ?1)", " RETURNING a", 1);
        assert_eq!(m.sql(2), "INSERT INTO t VALUES (?2, ?3, ?1), (?4, ?5, ?1) RETURNING a");
        assert_eq!(
            (m.param(0, 0), m.param(0, 1), m.param(1, 0), m.param(1, 1)),
            (2, 3, 4, 5)
        );
        let statements = [&INSERT_EVENTS, &INSERT_DELIVERIES, &INSERT_ATTEMPTS, &UPDATE_DELIVERIES];
        for s in statements {
            let sql = s.sql(ROWS_PER_STATEMENT);
            let last = s.param(ROWS_PER_STATEMENT - 1, s.per_row - 1);
            assert!(sql.contains(&format!("?{last}")) && !sql.contains(&format!("?{}", last + 1)));
        }
    }

    #[tokio::test]
    async fn an_unknown_synchronous_mode_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        match SqliteStore::open(&url, 1, "sometimes").await {
            Err(Error::BadRequest(msg)) => assert!(msg.contains("`sometimes`"), "{msg}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[tokio::test]
    async fn an_in_memory_database_is_refused_with_a_clear_error() {
        for url in ["sqlite::memory:", "sqlite://:memory:", "sqlite://x.db?mode=memory"] {
            match SqliteStore::open(url, 1, "full").await {
                Err(Error::BadRequest(msg)) => assert!(msg.contains("use sqlite://FILE"), "{msg}"),
                Err(e) => panic!("{url}: {e}"),
                Ok(_) => panic!("{url} was accepted"),
            }
        }
    }

    #[tokio::test]
    async fn the_hot_path_connection_commits_durably() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let _store = SqliteStore::open(&format!("sqlite://{}", path.display()), 1, "full")
            .await
            .expect("open");
        let hot = Hot::open(&path, SqliteSynchronous::Full).expect("hot connection");
        let pragma = |name: &str| -> String {
            hot.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .expect("pragma")
        };
        assert_eq!(pragma("journal_mode"), r#"Text("wal")"#);
        assert_eq!(pragma("synchronous"), "Integer(2)", "FULL: acknowledged means on disk");
        assert_eq!(
            pragma("foreign_keys"),
            "Integer(0)",
            "the hot path and retention keep their references by construction"
        );
        assert_eq!(
            pragma("wal_autocheckpoint"),
            "Integer(0)",
            "checkpoints run beside the writer"
        );
        assert_eq!((hot.next_id, hot.next_event), (1, 1));
        // The setting comes from the configured mode, not from SQLite's default.
        let normal = Hot::open(&path, SqliteSynchronous::Normal).expect("hot connection");
        let sync: i64 = normal
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("pragma");
        assert_eq!(sync, 1);
    }

    #[test]
    fn chunks_come_in_few_shapes_and_cover_every_row() {
        let mut shapes = std::collections::BTreeSet::new();
        for n in 0usize..3000 {
            let rows: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = chunks(&rows).collect();
            assert_eq!(parts.concat(), rows, "{n} rows");
            if (1..=EXACT_ROWS).contains(&n) {
                assert_eq!(parts.len(), 1, "{n} rows take one statement");
            }
            for c in &parts {
                assert!(c.len() <= EXACT_ROWS || c.len().is_power_of_two(), "{n}: {}", c.len());
                assert!(c.len() <= ROWS_PER_STATEMENT);
                // Every shape has a text slot of its own.
                assert!(INSERT_ATTEMPTS.sql(c.len()).matches("(?").count() == c.len());
                shapes.insert(c.len());
            }
        }
        assert_eq!(shapes.len(), SHAPES);
    }
}
