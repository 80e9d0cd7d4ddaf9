//! PostgreSQL store: the scale-out path. Several nodes share one database; deliveries are claimed with
//! `FOR UPDATE SKIP LOCKED` under a lease that expires, and `LISTEN/NOTIFY` wakes idle workers on every node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgListener, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use tokio::sync::{mpsc, oneshot};

use super::common::{id_bound, sql_store};
use super::*;
use crate::domain::{new_key, now_ms, State};

mod publish;

use publish::{spawn_publishers, PublishOp};

/// The channel that announces deliveries any node may take.
const WORK_CHANNEL: &str = "g2w_work";
/// The channel that announces changes to subscriptions and webhooks (`routes`) and to an application's secret
/// keys (`keys:APP_ID`), so every node's engine follows them before its next attempt.
const CONFIG_CHANNEL: &str = "g2w_config";

/// A claim walks the due index; PostgreSQL's planner picks the index for waiting deliveries by itself.
const PENDING_DELIVERIES: &str = "deliveries";

/// Wakes the idle workers of every node: deliveries nobody holds are due.
async fn notify_work<'e>(db: impl sqlx::PgExecutor<'e>) -> std::result::Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WORK_CHANNEL)
        .execute(db)
        .await?;
    Ok(())
}

pub struct PgStore {
    read: PgPool,
    write: PgPool,
    publisher: mpsc::Sender<PublishOp>,
    commits: Arc<Histogram>,
    signals: Arc<SignalSlot>,
    /// Seals and opens the secrets it stores.
    ring: Arc<Keyring>,
}

impl PgStore {
    /// Tells this node's engine at once, and every other node's through `NOTIFY` (committed already: if the
    /// notification fails, other nodes catch up when their LISTEN connection comes back, which assumes a change).
    async fn changed(&self, change: Changed) {
        let payload = match change {
            Changed::Keys(app_id) => {
                self.signals.keys(Some(app_id));
                format!("keys:{app_id}")
            }
            Changed::Routes { resumed } => {
                self.signals.routes();
                if resumed > 0 {
                    self.signals.work();
                    if let Err(e) = notify_work(&self.write).await {
                        tracing::warn!(error = %e, "could not notify the workers of resumed deliveries");
                    }
                }
                "routes".to_string()
            }
        };
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CONFIG_CHANNEL)
            .bind(payload)
            .execute(&self.write)
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not tell the other nodes of a change");
        }
    }
}

impl PgStore {
    pub async fn open(url: &str, pool_size: u32, ring: Arc<Keyring>) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(2))
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        let commits = Arc::new(Histogram::commits());
        Ok(Self {
            read: pool.clone(),
            publisher: spawn_publishers(pool.clone(), commits.clone()),
            write: pool,
            commits,
            signals: Arc::default(),
            ring,
        })
    }
}

/// Claimed rows (id, event_key, app_id, webhook_key, subscription_key, url, attempts, body, own_secret,
/// updated_at, w_state, s_state) as jobs, sharing one body buffer per event.
fn jobs_from_rows(rows: &[PgRow], lease_until: i64) -> Result<Vec<DeliveryJob>> {
    let mut bodies: std::collections::HashMap<String, Bytes> = std::collections::HashMap::new();
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
            let w_state: Option<String> = r.try_get("w_state")?;
            let s_state: Option<String> = r.try_get("s_state")?;
            Ok(DeliveryJob {
                id: r.try_get("id")?,
                event_key,
                app_id: r.try_get("app_id")?,
                webhook_key: r.try_get("webhook_key")?,
                subscription_key: r.try_get("subscription_key")?,
                url: r.try_get("url")?,
                body,
                own_secret: r.try_get("own_secret")?,
                attempts: r.try_get("attempts")?,
                lease_until,
                updated_at: r.try_get("updated_at")?,
                standing: Standing::of(w_state.as_deref(), s_state.as_deref()),
                routes_seen: 0,
            })
        })
        .collect()
}

/// Keeps a LISTEN connection open (reconnecting after failures) and passes every notification on.
fn listen(pool: PgPool, signals: Arc<SignalSlot>) {
    tokio::spawn(async move {
        loop {
            let result: Result<(), sqlx::Error> = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen_all([WORK_CHANNEL, CONFIG_CHANNEL]).await?;
                // A reconnect may have missed notifications: look for work once, and assume every change.
                signals.work();
                signals.routes();
                signals.keys(None);
                loop {
                    let n = listener.recv().await?;
                    match (n.channel(), n.payload()) {
                        (WORK_CHANNEL, _) => signals.work(),
                        (_, "routes") => signals.routes(),
                        (_, keys) => signals.keys(keys.strip_prefix("keys:").and_then(|k| k.parse().ok())),
                    }
                }
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// The advisory lock a node holds while it prunes (`g2wR` in ASCII), with the schema's hash as its second
/// half: deployments in separate schemas of one database prune independently.
pub const RETENTION_LOCK: i32 = 0x6732_7752;

sql_store!(PgStore, Postgres, PgRow, {
    async fn publish(&self, events: Vec<NewEvent>, lease: Option<Lease>) -> Result<Vec<PublishOutcome>> {
        let (reply, rx) = oneshot::channel();
        ask(&self.publisher, PublishOp { events, lease, reply }, rx).await
    }

    async fn ping(&self) -> Result<()> {
        if self.publisher.is_closed() {
            return Err(Error::Unavailable("the publish committers have stopped".into()));
        }
        self.reads_and_writes().await
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

    async fn claim_due(&self, now: i64, lease: &Lease, limit: i64) -> Result<Vec<DeliveryJob>> {
        // One statement: lease the due rows no other node has locked, and return them with their bodies and
        // keys. Its one good plan walks `deliveries_due` in order and stops after `limit` rows; but a queue
        // table's statistics are stale by nature (fresh, or grown by a burst since autovacuum last looked), and
        // with them the planner expects a handful of due rows and reads every pending one through a bitmap to
        // sort them: 6,000-12,700 rows read for each claim of 256 in a 20,000-event burst. So the claim runs
        // in a transaction that rules bitmap scans out.
        let mut tx = self.write.begin().await?;
        sqlx::query("SET LOCAL enable_bitmapscan = off")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "WITH c AS (SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= $3 \
               AND lease_until < $3 ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED), \
             u AS (UPDATE deliveries d SET lease_owner = $1, lease_until = $2 FROM c WHERE d.id = c.id \
               RETURNING d.id, d.event_key, d.app_id, d.subscription_key, d.url, d.attempts, d.webhook_key, \
                 d.next_attempt_at, d.updated_at) \
             SELECT u.id, u.event_key, u.app_id, u.webhook_key, u.subscription_key, \
               COALESCE(s.callback_url, w.callback_url, u.url) AS url, u.attempts, e.body, w.secret_key IS NOT NULL AS own_secret, \
               u.updated_at, w.state AS w_state, s.state AS s_state \
             FROM u JOIN events e ON e.event_key = u.event_key \
             LEFT JOIN webhooks w ON w.webhook_key = u.webhook_key \
             LEFT JOIN user_subscriptions s ON s.subscription_key = u.subscription_key ORDER BY u.next_attempt_at",
        )
        .bind(&lease.owner)
        .bind(lease.until)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        jobs_from_rows(&rows, lease.until)
    }

    async fn record_attempts(&self, results: Vec<AttemptRecord>, disable_after_ms: i64) -> Result<()> {
        let clock = Instant::now();
        let now = now_ms();
        let mut results = results;
        // A stable lock order keeps concurrent nodes from deadlocking on the same rows.
        results.sort_by_key(|r| r.delivery_id);
        let col = |f: &dyn Fn(&AttemptRecord) -> i64| results.iter().map(f).collect::<Vec<i64>>();
        let ids = col(&|r| r.delivery_id);
        let numbers = col(&|r| r.number);
        let started = col(&|r| r.started_at);
        let seen = col(&|r| r.job_updated_at);
        // Paused and cancelled deliveries were not sent: no attempt to log.
        let attempted: Vec<bool> = results.iter().map(|r| r.outcome.attempted()).collect();
        let durations = col(&|r| r.duration_ms);
        let statuses: Vec<Option<i64>> = results.iter().map(|r| r.status_code).collect();
        let errors: Vec<Option<String>> = results.iter().map(|r| r.error.clone()).collect();
        let excerpts: Vec<Option<String>> = results.iter().map(|r| r.response_excerpt.clone()).collect();
        let nodes: Vec<&str> = results.iter().map(|r| r.node.as_str()).collect();
        let (states, nexts): (Vec<&str>, Vec<i64>) = results.iter().map(|r| r.outcome.settles_as(now)).unzip();
        let delivered = rules::subscriptions_where(&results, |r| r.outcome == Outcome::Delivered);
        let gone = rules::subscriptions_where(&results, |r| r.outcome == Outcome::Gone);
        let failing = rules::subscriptions_where(&results, |r| r.outcome.is_failure());

        // The attempts, the deliveries' new states and the end of their subscriptions' failure clocks: one
        // statement, so the usual all-delivered batch is one round trip and its own transaction. A delivery
        // changed since its attempt's job was read (an operator's retry or redeliver, which always move
        // `updated_at`) keeps its new state and due time: the attempt is logged, and the delivery is attempted
        // again as asked. The recording node lets go of its lease either way (a retry leaves the lease alone,
        // so the delivery is not claimed again while its attempt is in flight); a lease another node holds (it
        // claimed the delivery after this one's lease expired) stays. It answers how many such retried
        // deliveries are now free, so the workers of every node are told (the retry may have been asked of
        // another node, which found the delivery leased).
        let record = sqlx::query(
            "WITH u AS ( \
               SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::int8[], $6::int8[], \
                 $7::text[], $8::text[], $9::text[], $10::int8[], $13::int8[], $14::bool[]) \
                 AS u(id, number, node, started, duration, status, error, excerpt, state, next, seen, attempted)), \
             a AS ( \
               INSERT INTO attempts (delivery_id, number, node, started_at, duration_ms, status_code, error, \
                 response_excerpt) \
               SELECT id, number, node, started, duration, status, error, excerpt FROM u WHERE u.attempted), \
             s AS ( \
               UPDATE user_subscriptions SET failing_since = NULL \
               WHERE subscription_key = ANY($12) AND failing_since IS NOT NULL), \
             r AS ( \
             UPDATE deliveries d SET \
               state = CASE WHEN d.updated_at <> u.seen \
                 AND NOT (u.state = 'delivered' AND d.state IN ('paused', 'cancelled')) THEN d.state ELSE u.state END, \
               attempts = GREATEST(d.attempts, u.number), \
               next_attempt_at = CASE WHEN d.updated_at <> u.seen THEN d.next_attempt_at ELSE u.next END, \
               lease_owner = CASE WHEN d.lease_owner <> u.node THEN d.lease_owner END, \
               lease_until = CASE WHEN d.lease_owner <> u.node THEN d.lease_until ELSE 0 END, \
               last_status = u.status, \
               last_error = CASE WHEN d.updated_at <> u.seen AND d.state IN ('paused', 'cancelled') \
                 AND u.state <> 'delivered' THEN d.last_error ELSE u.error END, \
               updated_at = CASE WHEN d.updated_at <> u.seen THEN d.updated_at ELSE $11 END \
             FROM u WHERE d.id = u.id RETURNING d.state, u.state AS settled_as) \
             SELECT count(*) FILTER (WHERE state = 'pending' AND settled_as <> 'pending') FROM r",
        )
        // Planned on every execution: a plan kept from when the table was small (a fresh database) joins by
        // scanning every delivery, and a kept plan is only replaced once autovacuum analyzes the table.
        .persistent(false)
        .bind(&ids)
        .bind(&numbers)
        .bind(&nodes)
        .bind(&started)
        .bind(&durations)
        .bind(&statuses)
        .bind(&errors)
        .bind(&excerpts)
        .bind(&states)
        .bind(&nexts)
        .bind(now)
        .bind(&delivered)
        .bind(&seen)
        .bind(&attempted);
        if failing.is_empty() && gone.is_empty() {
            let superseded: i64 = record.fetch_one(&self.write).await?.try_get(0)?;
            if superseded > 0 {
                // Committed already: if the notification fails, the workers find the delivery at their next poll.
                if let Err(e) = notify_work(&self.write).await {
                    tracing::warn!(error = %e, "could not notify the workers of a retried delivery");
                }
            }
            return Ok(());
        }
        let mut tx = self.write.begin().await?;
        // A failure starts the clock; a success in the same batch (the statement after) stops it again.
        if !failing.is_empty() {
            sqlx::query(
                "UPDATE user_subscriptions SET failing_since = COALESCE(failing_since, $1) \
                 WHERE subscription_key = ANY($2)",
            )
            .bind(now)
            .bind(&failing)
            .execute(&mut *tx)
            .await?;
        }
        let superseded: i64 = record.fetch_one(&mut *tx).await?.try_get(0)?;
        if !failing.is_empty() {
            sqlx::query(
                "UPDATE user_subscriptions SET state = 'INACTIVE', inactive_reason = $1 \
                 WHERE subscription_key = ANY($2) AND state = 'ACTIVE' AND failing_since <= $3",
            )
            .bind(rules::disabled_reason(disable_after_ms, now))
            .bind(&failing)
            .bind(now - disable_after_ms)
            .execute(&mut *tx)
            .await?;
        }
        if !gone.is_empty() {
            sqlx::query(
                "UPDATE user_subscriptions SET state = 'INACTIVE', inactive_reason = $1 \
                 WHERE subscription_key = ANY($2) AND state = 'ACTIVE'",
            )
            .bind(rules::gone_reason(now))
            .bind(&gone)
            .execute(&mut *tx)
            .await?;
        }
        if superseded > 0 || results.iter().any(|r| matches!(r.outcome, Outcome::RetryAt(_))) {
            notify_work(&mut *tx).await?;
        }
        tx.commit().await?;
        self.commits.observe_since(clock);
        Ok(())
    }

    async fn release_leases(&self, owner: Option<&str>) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = 0 \
             WHERE state = 'pending' AND lease_until > 0 AND (CAST($1 AS TEXT) IS NULL OR lease_owner = CAST($1 AS TEXT))",
        )
        .bind(owner)
        .execute(&self.write)
        .await?
        .rows_affected())
    }

    async fn prune(&self, before: i64, limit: i64) -> Result<Pruned> {
        // One node prunes a schema at a time: two passes that split one event's deliveries between them would each see
        // the other's still there, and leave the event behind for good.
        let mut tx = self.write.begin().await?;
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
            .bind(RETENTION_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !ours {
            return Ok(Pruned::default());
        }
        // One statement. Its parts share one snapshot, in which the deliveries it deletes still exist: an event
        // goes when no delivery outside those refers to it, looked for within the range of ids kept on it (one
        // range scan of the primary key per event, as a scalar subquery: written as `NOT EXISTS` it was planned
        // as a hash join over every delivery). The deliveries are found by walking the primary key up to where
        // `before` falls in it, so a pass costs what it removes (and the unfinished deliveries it steps over), not
        // the size of the tables. Rows the delivery path has locked are left for the next pass rather than waited
        // for.
        let sql = format!(
            "WITH d AS ( \
               DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                 WHERE id < {bound} AND created_at < $1 AND updated_at < $1 AND state IN ('delivered', 'failed', 'cancelled') \
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
               RETURNING id, event_key), \
             a AS (DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM d) RETURNING 1), \
             e AS (DELETE FROM events ev WHERE ev.event_key IN (SELECT event_key FROM d) \
               AND (SELECT x.id FROM deliveries x WHERE x.id BETWEEN ev.first_delivery AND ev.last_delivery \
                 AND x.event_key = ev.event_key AND x.id NOT IN (SELECT id FROM d) LIMIT 1) IS NULL RETURNING 1), \
             e0 AS (DELETE FROM events WHERE event_key IN (SELECT event_key FROM events \
               WHERE deliveries = 0 AND created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1) \
             SELECT (SELECT count(*) FROM d) AS deliveries, (SELECT count(*) FROM a) AS attempts, \
               (SELECT count(*) FROM e) + (SELECT count(*) FROM e0) AS events",
            bound = id_bound("$1")
        );
        let row = sqlx::query(&sql).bind(before).bind(limit).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        let count = |c: &str| row.try_get::<i64, _>(c).map(|n| n as u64);
        Ok(Pruned {
            deliveries: count("deliveries")?,
            attempts: count("attempts")?,
            events: count("events")?,
        })
    }

    fn commit_durations(&self) -> &Histogram {
        &self.commits
    }

    fn watch(&self, signals: Signals) {
        self.signals.set(signals);
        listen(self.write.clone(), self.signals.clone());
    }
});
