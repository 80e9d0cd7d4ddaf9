//! SQLite store: WAL, one write connection owned by a group-commit writer for the hot path, a pool of readers.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

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

const WEBHOOK_COLS: &str = "w.webhook_key AS w_key, w.event_name AS w_event_name, \
    w.event_version AS w_event_version, w.callback_url AS w_callback_url, w.state AS w_state, \
    w.secret_key AS w_secret_key, w.created_at AS w_created_at";

const DELIVERY_COLS: &str = "id, event_key, event_name, webhook_key, subscription_key, url, state, \
    attempts, next_attempt_at, last_status, last_error, created_at, updated_at";

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

    async fn fetch_subscriptions(&self, tenant: Tenant, key: Option<&str>) -> Result<Vec<Subscription>> {
        let sql = format!(
            "SELECT s.subscription_key, s.organizer_key, s.callback_url, s.state, s.inactive_reason, \
             s.created_at, {WEBHOOK_COLS} FROM user_subscriptions s \
             JOIN webhooks w ON w.webhook_key = s.webhook_key \
             WHERE s.app_id = $1 AND s.organizer_key = $2 AND ($3 IS NULL OR s.subscription_key = $3) \
             ORDER BY s.created_at, s.subscription_key"
        );
        let rows = sqlx::query(&sql)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .bind(key)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(subscription_from_row).collect()
    }
}

fn webhook_from_row(row: &SqliteRow) -> Result<Webhook> {
    let name: String = row.try_get("w_event_name")?;
    let state: String = row.try_get("w_state")?;
    Ok(Webhook {
        key: row.try_get("w_key")?,
        event_name: EventName::parse(&name).ok_or_else(|| Error::Internal(format!("stored event name `{name}`")))?,
        event_version: row.try_get("w_event_version")?,
        callback_url: row.try_get("w_callback_url")?,
        state: State::parse(&state),
        secret_key: row.try_get("w_secret_key")?,
        created_at: row.try_get("w_created_at")?,
    })
}

fn subscription_from_row(row: &SqliteRow) -> Result<Subscription> {
    let webhook = webhook_from_row(row)?;
    let state: String = row.try_get("state")?;
    Ok(Subscription {
        key: row.try_get("subscription_key")?,
        organizer_key: row.try_get("organizer_key")?,
        webhook_key: webhook.key.clone(),
        callback_url: row.try_get("callback_url")?,
        state: State::parse(&state),
        inactive_reason: row.try_get("inactive_reason")?,
        created_at: row.try_get("created_at")?,
        webhook,
    })
}

fn delivery_from_row(row: &SqliteRow) -> Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: row.try_get("id")?,
        event_key: row.try_get("event_key")?,
        event_name: row.try_get("event_name")?,
        webhook_key: row.try_get("webhook_key")?,
        subscription_key: row.try_get("subscription_key")?,
        url: row.try_get("url")?,
        state: row.try_get("state")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status: row.try_get("last_status")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn duplicate_webhook(name: EventName, url: &str) -> Error {
    Error::Conflict(format!(
        "a webhook for eventName {} and callbackUrl {url} already exists in this application",
        name.as_str()
    ))
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

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn ensure_app(&self, name: &str) -> Result<i64> {
        sqlx::query("INSERT INTO applications (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(now_ms())
            .execute(&self.write)
            .await?;
        Ok(sqlx::query_scalar("SELECT id FROM applications WHERE name = $1")
            .bind(name)
            .fetch_one(&self.write)
            .await?)
    }

    async fn insert_token(&self, token_hash: &str, tenant: Tenant) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (token_hash, app_id, organizer_key, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (token_hash) DO UPDATE SET revoked_at = NULL",
        )
        .bind(token_hash)
        .bind(tenant.app_id)
        .bind(tenant.organizer_key)
        .bind(now_ms())
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn revoke_token(&self, token_hash: &str) -> Result<bool> {
        let n = sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(token_hash)
            .execute(&self.write)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn find_token(&self, token_hash: &str) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT app_id, organizer_key FROM tokens WHERE token_hash = $1 AND revoked_at IS NULL")
            .bind(token_hash)
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| {
            Ok(Tenant {
                app_id: r.try_get("app_id")?,
                organizer_key: r.try_get("organizer_key")?,
            })
        })
        .transpose()
    }

    async fn meta_get_or_insert(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.write)
            .await?;
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_one(&self.write)
            .await?)
    }

    async fn create_secret_key(&self, app_id: i64, value: &str, valid_from: i64) -> Result<SecretKey> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO secret_keys (app_id, value, valid_from, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(app_id)
        .bind(value)
        .bind(valid_from)
        .bind(now_ms())
        .fetch_one(&self.write)
        .await?;
        Ok(SecretKey {
            id,
            value: value.to_string(),
            valid_from,
        })
    }

    async fn secret_keys(&self, app_id: i64) -> Result<Vec<SecretKey>> {
        let rows =
            sqlx::query("SELECT id, value, valid_from FROM secret_keys WHERE app_id = $1 ORDER BY valid_from, id")
                .bind(app_id)
                .fetch_all(&self.read)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(SecretKey {
                    id: r.try_get("id")?,
                    value: r.try_get("value")?,
                    valid_from: r.try_get("valid_from")?,
                })
            })
            .collect()
    }

    async fn create_webhooks(&self, app_id: i64, new: Vec<NewWebhook>) -> Result<Vec<Webhook>> {
        let mut tx = self.write.begin().await?;
        let now = now_ms();
        let mut keys = Vec::with_capacity(new.len());
        for w in &new {
            let key = new_key();
            let res = sqlx::query(
                "INSERT INTO webhooks (webhook_key, app_id, event_name, event_version, callback_url, state, \
                 secret_key, created_at) VALUES ($1, $2, $3, $4, $5, 'INACTIVE', $6, $7)",
            )
            .bind(&key)
            .bind(app_id)
            .bind(w.event_name.as_str())
            .bind(&w.event_version)
            .bind(&w.callback_url)
            .bind(&w.secret_key)
            .bind(now)
            .execute(&mut *tx)
            .await;
            match res {
                Err(e) if is_unique_violation(&e) => return Err(duplicate_webhook(w.event_name, &w.callback_url)),
                other => other?,
            };
            keys.push(key);
        }
        tx.commit().await?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(
                self.get_webhook(app_id, &key)
                    .await?
                    .ok_or_else(|| Error::Internal("created webhook vanished".into()))?,
            );
        }
        Ok(out)
    }

    async fn get_webhook(&self, app_id: i64, key: &str) -> Result<Option<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks w WHERE w.app_id = $1 AND w.webhook_key = $2");
        let row = sqlx::query(&sql)
            .bind(app_id)
            .bind(key)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    async fn list_webhooks(&self, app_id: i64) -> Result<Vec<Webhook>> {
        let sql =
            format!("SELECT {WEBHOOK_COLS} FROM webhooks w WHERE w.app_id = $1 ORDER BY w.created_at, w.webhook_key");
        let rows = sqlx::query(&sql).bind(app_id).fetch_all(&self.read).await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn update_webhooks(&self, app_id: i64, changes: Vec<WebhookChange>) -> Result<()> {
        let mut tx = self.write.begin().await?;
        for c in &changes {
            let res = sqlx::query(
                "UPDATE webhooks SET state = COALESCE($1, state), callback_url = COALESCE($2, callback_url) \
                 WHERE webhook_key = $3 AND app_id = $4",
            )
            .bind(c.state.map(State::as_str))
            .bind(&c.callback_url)
            .bind(&c.key)
            .bind(app_id)
            .execute(&mut *tx)
            .await;
            let n = match res {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Error::Conflict(format!(
                        "another webhook of this application already has eventName and callbackUrl {}",
                        c.callback_url.as_deref().unwrap_or_default()
                    )))
                }
                other => other?.rows_affected(),
            };
            if n == 0 {
                return Err(Error::not_found(format!("webhookKey {} not found", c.key)));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_webhooks(&self, app_id: i64, keys: &[String]) -> Result<()> {
        let mut tx = self.write.begin().await?;
        for key in keys {
            sqlx::query("DELETE FROM user_subscriptions WHERE webhook_key = $1 AND app_id = $2")
                .bind(key)
                .bind(app_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM webhooks WHERE webhook_key = $1 AND app_id = $2")
                .bind(key)
                .bind(app_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_subscriptions(&self, tenant: Tenant, new: Vec<NewSubscription>) -> Result<Vec<Subscription>> {
        let mut tx = self.write.begin().await?;
        let now = now_ms();
        let mut keys = Vec::with_capacity(new.len());
        for s in &new {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT webhook_key FROM webhooks WHERE webhook_key = $1 AND app_id = $2")
                    .bind(&s.webhook_key)
                    .bind(tenant.app_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_none() {
                return Err(Error::not_found(format!("webhookKey {} not found", s.webhook_key)));
            }
            let key = new_key();
            sqlx::query(
                "INSERT INTO user_subscriptions (subscription_key, app_id, organizer_key, webhook_key, callback_url, \
                 state, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&key)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .bind(&s.webhook_key)
            .bind(&s.callback_url)
            .bind(s.state.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            keys.push(key);
        }
        tx.commit().await?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(
                self.get_subscription(tenant, &key)
                    .await?
                    .ok_or_else(|| Error::Internal("created subscription vanished".into()))?,
            );
        }
        Ok(out)
    }

    async fn get_subscription(&self, tenant: Tenant, key: &str) -> Result<Option<Subscription>> {
        Ok(self.fetch_subscriptions(tenant, Some(key)).await?.into_iter().next())
    }

    async fn list_subscriptions(&self, tenant: Tenant) -> Result<Vec<Subscription>> {
        self.fetch_subscriptions(tenant, None).await
    }

    async fn update_subscriptions(&self, tenant: Tenant, changes: Vec<SubscriptionChange>) -> Result<()> {
        let mut tx = self.write.begin().await?;
        for c in &changes {
            // Reactivating clears the reason and the failure clock of an automatic deactivation.
            let reactivate = c.state == Some(State::Active);
            let n = sqlx::query(
                "UPDATE user_subscriptions SET state = COALESCE($1, state), callback_url = COALESCE($2, callback_url), \
                 inactive_reason = CASE WHEN $3 THEN NULL ELSE inactive_reason END, \
                 failing_since = CASE WHEN $3 THEN NULL ELSE failing_since END \
                 WHERE subscription_key = $4 AND app_id = $5 AND organizer_key = $6",
            )
            .bind(c.state.map(State::as_str))
            .bind(&c.callback_url)
            .bind(reactivate)
            .bind(&c.key)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                return Err(Error::not_found(format!("userSubscriptionKey {} not found", c.key)));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_subscriptions(&self, tenant: Tenant, keys: &[String]) -> Result<u64> {
        let mut tx = self.write.begin().await?;
        let mut n = 0;
        for key in keys {
            n += sqlx::query(
                "DELETE FROM user_subscriptions WHERE subscription_key = $1 AND app_id = $2 AND organizer_key = $3",
            )
            .bind(key)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

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
        let mut bodies: HashMap<String, Bytes> = HashMap::new();
        rows.iter()
            .map(|r| {
                let event_key: String = r.try_get("event_key")?;
                let body = match bodies.get(&event_key) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Bytes::from(r.try_get::<Vec<u8>, _>("body")?);
                        bodies.insert(event_key.clone(), b.clone());
                        b
                    }
                };
                Ok(DeliveryJob {
                    id: r.try_get("id")?,
                    event_key,
                    app_id: r.try_get("app_id")?,
                    subscription_key: r.try_get("subscription_key")?,
                    url: r.try_get("url")?,
                    body,
                    webhook_secret: r.try_get("secret_key")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect()
    }

    async fn next_due(&self, now: i64) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT next_attempt_at FROM deliveries WHERE state = 'pending' AND lease_until < $1 \
             ORDER BY next_attempt_at LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.read)
        .await?)
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

    async fn release_leases(&self, owner: Option<&str>) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = 0 \
             WHERE state = 'pending' AND lease_until > 0 AND ($1 IS NULL OR lease_owner = $1)",
        )
        .bind(owner)
        .execute(&self.write)
        .await?
        .rows_affected())
    }

    async fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<DeliveryRow>> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT {DELIVERY_COLS} FROM deliveries WHERE 1 = 1"));
        if let Some(v) = &f.state {
            qb.push(" AND state = ").push_bind(v);
        }
        if let Some(v) = &f.webhook_key {
            qb.push(" AND webhook_key = ").push_bind(v);
        }
        if let Some(v) = &f.subscription_key {
            qb.push(" AND subscription_key = ").push_bind(v);
        }
        if let Some(v) = &f.event_name {
            qb.push(" AND event_name = ").push_bind(v);
        }
        if let Some(v) = &f.event_key {
            qb.push(" AND event_key = ").push_bind(v);
        }
        if let Some(v) = f.since {
            qb.push(" AND created_at >= ").push_bind(v);
        }
        if let Some(v) = f.until {
            qb.push(" AND created_at < ").push_bind(v);
        }
        if let Some(v) = f.before_id {
            qb.push(" AND id < ").push_bind(v);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(f.limit);
        let rows = qb.build().fetch_all(&self.read).await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn get_delivery(&self, id: i64) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>> {
        let sql = format!("SELECT {DELIVERY_COLS} FROM deliveries WHERE id = $1");
        let Some(row) = sqlx::query(&sql).bind(id).fetch_optional(&self.read).await? else {
            return Ok(None);
        };
        let attempts = sqlx::query(
            "SELECT number, node, started_at, duration_ms, status_code, error, response_excerpt \
             FROM attempts WHERE delivery_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(|r| {
            Ok(AttemptRow {
                number: r.try_get("number")?,
                node: r.try_get("node")?,
                started_at: r.try_get("started_at")?,
                duration_ms: r.try_get("duration_ms")?,
                status_code: r.try_get("status_code")?,
                error: r.try_get("error")?,
                response_excerpt: r.try_get("response_excerpt")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Some((delivery_from_row(&row)?, attempts)))
    }

    async fn retry_deliveries(&self, target: RetryTarget<'_>) -> Result<u64> {
        let (cond, key): (&str, String) = match target {
            RetryTarget::Delivery(id) => ("id = $2", id.to_string()),
            RetryTarget::Event(k) => ("event_key = $2", k.to_string()),
            RetryTarget::FailedOfSubscription(k) => ("subscription_key = $2 AND state = 'failed'", k.to_string()),
        };
        let sql = format!(
            "UPDATE deliveries SET state = 'pending', next_attempt_at = $1, lease_owner = NULL, lease_until = 0, \
             updated_at = $1 WHERE {cond}"
        );
        let mut q = sqlx::query(&sql).bind(now_ms());
        q = match target {
            RetryTarget::Delivery(id) => q.bind(id),
            _ => q.bind(key),
        };
        Ok(q.execute(&self.write).await?.rows_affected())
    }

    async fn queue_stats(&self) -> Result<QueueStats> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM deliveries WHERE state = 'pending'")
                .fetch_one(&self.read)
                .await?;
        Ok(QueueStats {
            waiting: row.try_get("n")?,
            oldest_waiting_created_at: row.try_get("oldest")?,
        })
    }
}
