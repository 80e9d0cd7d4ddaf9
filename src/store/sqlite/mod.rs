//! SQLite store: WAL, one write connection owned by a group-commit writer for the hot path (`writer`, `hot`,
//! `sql`), a read-only connection for claims (`claims`), in-memory leases (`held`), and a pool of readers.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::common::sql_store;
use super::*;
use crate::domain::{new_key, now_ms, State};

mod claims;
mod held;
mod hot;
mod sql;
mod writer;

use claims::{claim_rows, ClaimReader};
use held::{holdings, Held};
use writer::{checkpoint, run_writer, Gate, Hot, WriteOp};

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
    /// Seals and opens the secrets it stores.
    ring: Arc<Keyring>,
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

impl SqliteStore {
    pub async fn open(
        url: &str,
        pool_size: u32,
        durability: crate::config::Durability,
        ring: Arc<Keyring>,
    ) -> Result<Self> {
        let sync = match durability {
            crate::config::Durability::Full => SqliteSynchronous::Full,
            crate::config::Durability::Normal => SqliteSynchronous::Normal,
            crate::config::Durability::Off => SqliteSynchronous::Off,
        };
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let path = opts.get_filename().to_path_buf();
        if url.contains(":memory:") || url.contains("mode=memory") || path.as_os_str().is_empty() {
            return Err(Error::Config(
                "an in-memory SQLite database cannot be shared by the service's connections: use sqlite://FILE".into(),
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
        sqlx::migrate!("migrations/sqlite").run(&write).await?;
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
            ring,
        })
    }
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
        self.reads_and_writes().await
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
    #[tokio::test]
    async fn an_in_memory_database_is_refused_with_a_clear_error() {
        for url in ["sqlite::memory:", "sqlite://:memory:", "sqlite://x.db?mode=memory"] {
            match SqliteStore::open(url, 1, crate::config::Durability::Full, Arc::new(Keyring::none())).await {
                Err(Error::Config(msg)) => assert!(msg.contains("use sqlite://FILE"), "{msg}"),
                Err(e) => panic!("{url}: {e}"),
                Ok(_) => panic!("{url} was accepted"),
            }
        }
    }

    #[tokio::test]
    async fn the_hot_path_connection_commits_durably() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let _store = SqliteStore::open(
            &format!("sqlite://{}", path.display()),
            1,
            crate::config::Durability::Full,
            Arc::new(Keyring::none()),
        )
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
}
