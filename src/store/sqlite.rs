//! SQLite store: WAL, one write connection owned by a group-commit writer for the hot path, a pool of readers.

use std::str::FromStr;
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
}

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
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite")
            .run(&write)
            .await
            .map_err(|e| Error::Internal(format!("migrating the database: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(pool_size.max(1))
            .connect_with(opts.read_only(true))
            .await?;
        let (writer, rx) = mpsc::channel(4096);
        tokio::spawn(run_writer(write.clone(), rx));
        Ok(Self { read, write, writer })
    }

    async fn send<T>(&self, op: WriteOp, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.writer
            .send(op)
            .await
            .map_err(|_| Error::Unavailable("the database writer has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the database writer has stopped".into()))?
    }
}

/// The group-commit writer: drains waiting operations, applies them in one transaction (each under its own
/// savepoint, so one failing operation does not undo the others), commits once, then answers each.
async fn run_writer(pool: SqlitePool, mut rx: mpsc::Receiver<WriteOp>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ops: Vec<WriteOp> = std::mem::take(&mut batch);
        match apply_batch(&pool, &ops).await {
            Ok(results) => {
                for (op, result) in ops.into_iter().zip(results) {
                    answer(op, result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                let msg = e.to_string();
                for op in ops {
                    answer(op, Err(Error::Internal(msg.clone())));
                }
            }
        }
    }
}

enum OpResult {
    Published(Vec<PublishOutcome>),
    Recorded,
}

fn answer(op: WriteOp, result: Result<OpResult>) {
    match (op, result) {
        (WriteOp::Publish { reply, .. }, Ok(OpResult::Published(v))) => {
            let _ = reply.send(Ok(v));
        }
        (WriteOp::Record { reply, .. }, Ok(_)) => {
            let _ = reply.send(Ok(()));
        }
        (WriteOp::Publish { reply, .. }, Err(e)) => {
            let _ = reply.send(Err(e));
        }
        (WriteOp::Record { reply, .. }, Err(e)) => {
            let _ = reply.send(Err(e));
        }
        (WriteOp::Publish { reply, .. }, Ok(OpResult::Recorded)) => {
            let _ = reply.send(Err(Error::Internal("writer answered the wrong operation".into())));
        }
    }
}

async fn apply_batch(pool: &SqlitePool, ops: &[WriteOp]) -> Result<Vec<Result<OpResult>>> {
    let mut tx = pool.begin().await?;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        sqlx::query("SAVEPOINT op").execute(&mut *tx).await?;
        let result = match op {
            WriteOp::Publish { events, lease, .. } => publish_in(&mut tx, events, lease.as_ref())
                .await
                .map(OpResult::Published),
            WriteOp::Record {
                results,
                disable_after_ms,
                ..
            } => record_in(&mut tx, results, *disable_after_ms)
                .await
                .map(|_| OpResult::Recorded),
        };
        if result.is_err() {
            sqlx::query("ROLLBACK TO op").execute(&mut *tx).await?;
        }
        sqlx::query("RELEASE op").execute(&mut *tx).await?;
        results.push(result);
    }
    tx.commit().await?;
    Ok(results)
}

async fn publish_in(
    conn: &mut SqliteConnection,
    events: &[NewEvent],
    lease: Option<&Lease>,
) -> Result<Vec<PublishOutcome>> {
    let now = now_ms();
    let mut out = Vec::with_capacity(events.len());
    for ev in events {
        let inserted = sqlx::query(
            "INSERT INTO events (event_key, organizer_key, event_name, body, deliveries, created_at) \
             VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (event_key) DO NOTHING",
        )
        .bind(&ev.event_key)
        .bind(ev.organizer_key)
        .bind(ev.event_name.as_str())
        .bind(ev.body.as_ref())
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 0 {
            let deliveries: i64 = sqlx::query_scalar("SELECT deliveries FROM events WHERE event_key = $1")
                .bind(&ev.event_key)
                .fetch_one(&mut *conn)
                .await?;
            out.push(PublishOutcome {
                event_key: ev.event_key.clone(),
                deliveries,
                duplicate: true,
                jobs: Vec::new(),
            });
            continue;
        }
        let targets = sqlx::query(
            "SELECT s.subscription_key, s.app_id, s.webhook_key, COALESCE(s.callback_url, w.callback_url) AS url, \
             w.secret_key FROM user_subscriptions s JOIN webhooks w ON w.webhook_key = s.webhook_key \
             WHERE s.organizer_key = $1 AND w.event_name = $2 AND s.state = 'ACTIVE' AND w.state = 'ACTIVE'",
        )
        .bind(ev.organizer_key)
        .bind(ev.event_name.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let mut jobs = Vec::with_capacity(targets.len());
        for t in &targets {
            let subscription_key: String = t.try_get("subscription_key")?;
            let app_id: i64 = t.try_get("app_id")?;
            let webhook_key: String = t.try_get("webhook_key")?;
            let url: String = t.try_get("url")?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO deliveries (event_key, event_name, app_id, webhook_key, subscription_key, url, state, \
                 attempts, next_attempt_at, lease_owner, lease_until, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, $9, $7, $7) RETURNING id",
            )
            .bind(&ev.event_key)
            .bind(ev.event_name.as_str())
            .bind(app_id)
            .bind(&webhook_key)
            .bind(&subscription_key)
            .bind(&url)
            .bind(now)
            .bind(lease.map(|l| l.owner.as_str()))
            .bind(lease.map_or(0, |l| l.until))
            .fetch_one(&mut *conn)
            .await?;
            if lease.is_some() {
                jobs.push(DeliveryJob {
                    id,
                    event_key: ev.event_key.clone(),
                    app_id,
                    subscription_key,
                    url,
                    body: ev.body.clone(),
                    webhook_secret: t.try_get("secret_key")?,
                    attempts: 0,
                    lease_until: lease.map_or(0, |l| l.until),
                });
            }
        }
        let count = targets.len() as i64;
        if count > 0 {
            sqlx::query("UPDATE events SET deliveries = $1 WHERE event_key = $2")
                .bind(count)
                .bind(&ev.event_key)
                .execute(&mut *conn)
                .await?;
        }
        out.push(PublishOutcome {
            event_key: ev.event_key.clone(),
            deliveries: count,
            duplicate: false,
            jobs,
        });
    }
    Ok(out)
}

async fn record_in(conn: &mut SqliteConnection, results: &[AttemptRecord], disable_after_ms: i64) -> Result<()> {
    let now = now_ms();
    for r in results {
        sqlx::query(
            "INSERT INTO attempts (delivery_id, number, node, started_at, duration_ms, status_code, error, \
             response_excerpt) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(r.delivery_id)
        .bind(r.number)
        .bind(&r.node)
        .bind(r.started_at)
        .bind(r.duration_ms)
        .bind(r.status_code)
        .bind(&r.error)
        .bind(&r.response_excerpt)
        .execute(&mut *conn)
        .await?;
        let (state, next) = match r.outcome {
            Outcome::Delivered => ("delivered", now),
            Outcome::RetryAt(at) => ("pending", at),
            Outcome::Failed | Outcome::Gone => ("failed", now),
        };
        sqlx::query(
            "UPDATE deliveries SET state = $1, attempts = $2, next_attempt_at = $3, lease_owner = NULL, \
             lease_until = 0, last_status = $4, last_error = $5, updated_at = $6 WHERE id = $7",
        )
        .bind(state)
        .bind(r.number)
        .bind(next)
        .bind(r.status_code)
        .bind(&r.error)
        .bind(now)
        .bind(r.delivery_id)
        .execute(&mut *conn)
        .await?;
        match r.outcome {
            Outcome::Delivered => {
                sqlx::query(
                    "UPDATE user_subscriptions SET failing_since = NULL \
                     WHERE subscription_key = $1 AND failing_since IS NOT NULL",
                )
                .bind(&r.subscription_key)
                .execute(&mut *conn)
                .await?;
            }
            Outcome::Gone => {
                sqlx::query(
                    "UPDATE user_subscriptions SET state = 'INACTIVE', inactive_reason = $1 \
                     WHERE subscription_key = $2 AND state = 'ACTIVE'",
                )
                .bind(format!("the callback answered 410 Gone at {}", format_ms(now)))
                .bind(&r.subscription_key)
                .execute(&mut *conn)
                .await?;
            }
            Outcome::RetryAt(_) | Outcome::Failed => {
                sqlx::query(
                    "UPDATE user_subscriptions SET failing_since = COALESCE(failing_since, $1) \
                     WHERE subscription_key = $2",
                )
                .bind(r.started_at)
                .bind(&r.subscription_key)
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE user_subscriptions SET state = 'INACTIVE', inactive_reason = $1 \
                     WHERE subscription_key = $2 AND state = 'ACTIVE' AND failing_since <= $3",
                )
                .bind(format!(
                    "every delivery failed for {} s; deactivated at {}",
                    disable_after_ms / 1000,
                    format_ms(now)
                ))
                .bind(&r.subscription_key)
                .bind(now - disable_after_ms)
                .execute(&mut *conn)
                .await?;
            }
        }
    }
    Ok(())
}

sql_store!(SqliteStore, Sqlite, SqliteRow, {
    async fn publish(&self, events: Vec<NewEvent>, lease: Option<Lease>) -> Result<Vec<PublishOutcome>> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Publish { events, lease, reply }, rx).await
    }

    async fn claim_due(&self, now: i64, lease: &Lease, limit: i64) -> Result<Vec<DeliveryJob>> {
        let mut tx = self.write.begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE deliveries SET lease_owner = $1, lease_until = $2 WHERE id IN ( \
             SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= $3 AND lease_until < $3 \
             ORDER BY next_attempt_at LIMIT $4) RETURNING id",
        )
        .bind(&lease.owner)
        .bind(lease.until)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT d.id, d.event_key, d.app_id, d.subscription_key, d.url, d.attempts, e.body, w.secret_key \
             FROM deliveries d JOIN events e ON e.event_key = d.event_key \
             LEFT JOIN webhooks w ON w.webhook_key = d.webhook_key WHERE d.id IN (",
        );
        let mut sep = qb.separated(", ");
        for id in &ids {
            sep.push_bind(id);
        }
        qb.push(") ORDER BY d.next_attempt_at");
        let rows = qb.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        jobs_from_rows(&rows, lease.until)
    }

    async fn record_attempts(&self, results: Vec<AttemptRecord>, disable_after_ms: i64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(
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
