//! Publishing on PostgreSQL: group-commit tasks, and the one statement that commits a group's events and their
//! deliveries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::notify_work;
use crate::domain::delivery::{DeliveryJob, Lease, NewEvent, PublishOutcome, Standing};
use crate::domain::now_ms;
use crate::error::Result;
use crate::metrics::Histogram;

/// One publish request waiting for a group commit.
pub(super) struct PublishOp {
    pub(super) events: Vec<NewEvent>,
    pub(super) lease: Option<Lease>,
    pub(super) reply: oneshot::Sender<Result<Vec<PublishOutcome>>>,
}

/// Group-commit tasks: each takes every publish waiting and commits them in one transaction, so concurrent
/// one-event requests share a transaction (and its WAL flush) instead of each holding a connection for its own.
/// Two let one group fill while the other commits.
const PUBLISHERS: usize = 2;
/// Most publish requests one group carries (each holds at most 1,000 events).
const MAX_GROUP: usize = 64;

pub(super) fn spawn_publishers(pool: PgPool, commits: Arc<Histogram>) -> mpsc::Sender<PublishOp> {
    let (tx, rx) = mpsc::channel::<PublishOp>(4096);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..PUBLISHERS {
        let (rx, pool, commits) = (rx.clone(), pool.clone(), commits.clone());
        tokio::spawn(async move {
            let mut ops = Vec::with_capacity(MAX_GROUP);
            loop {
                if rx.lock().await.recv_many(&mut ops, MAX_GROUP).await == 0 {
                    return;
                }
                let (leased, unleased): (Vec<_>, Vec<_>) = ops.drain(..).partition(|op| op.lease.is_some());
                for group in [leased, unleased] {
                    if !group.is_empty() {
                        let started = Instant::now();
                        publish_group(&pool, group).await;
                        commits.observe_since(started);
                    }
                }
            }
        });
    }
    tx
}

/// Commits a group's events together and answers each request with its own outcomes.
async fn publish_group(pool: &PgPool, group: Vec<PublishOp>) {
    let lease = group.iter().filter_map(|op| op.lease.clone()).max_by_key(|l| l.until);
    let mut events = Vec::with_capacity(group.iter().map(|op| op.events.len()).sum());
    let mut replies = Vec::with_capacity(group.len());
    for op in group {
        replies.push((op.reply, op.events.len()));
        events.extend(op.events);
    }
    match publish(pool, events, lease).await {
        Ok(outcomes) => {
            let mut outcomes = outcomes.into_iter();
            for (reply, n) in replies {
                let _ = reply.send(Ok(outcomes.by_ref().take(n).collect()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "publish group commit failed");
            for (reply, _) in replies {
                let _ = reply.send(Err(e.for_each_of_a_group()));
            }
        }
    }
}

/// Commits events and their deliveries in one statement (idempotent on eventKey) and returns one outcome per
/// event, in order. One statement is one round trip and its own transaction: the events, their fan-out, their
/// deliveries and the rows to answer with are all worked out inside the database (six round trips before,
/// which one-event requests paid in full).
async fn publish(pool: &PgPool, events: Vec<NewEvent>, lease: Option<Lease>) -> Result<Vec<PublishOutcome>> {
    let now = now_ms();
    let keys: Vec<&str> = events.iter().map(|e| e.event_key.as_str()).collect();
    let orgs: Vec<i64> = events.iter().map(|e| e.organizer_key).collect();
    let names: Vec<&str> = events.iter().map(|e| e.event_name.as_str()).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_ref()).collect();
    // Rows: kind 1, a delivery created (and its webhook's secret key), only when this node takes them (a lease);
    // kind 2, an event inserted, with its count of deliveries; kind 3, an event the statement could not insert,
    // with the count stored by its first publish when that one is visible (committed before this statement
    // began) and the count its fan-out would give otherwise. Delivery ids are drawn in `targets`, so each event
    // keeps the range its deliveries lie in (how they are found again).
    let rows = sqlx::query(
        "WITH input AS ( \
           SELECT k, o, n, b, i FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::bytea[]) \
             WITH ORDINALITY AS t(k, o, n, b, i)), \
         firsts AS (SELECT DISTINCT ON (k) k, o, n, b FROM input ORDER BY k, i), \
         targets AS ( \
           SELECT nextval('deliveries_id_seq') AS id, f.k, f.n, s.subscription_key, s.app_id, s.webhook_key, \
                  COALESCE(s.callback_url, w.callback_url) AS url \
           FROM firsts f \
           JOIN user_subscriptions s ON s.organizer_key = f.o AND s.state = 'ACTIVE' \
           JOIN webhooks w ON w.webhook_key = s.webhook_key AND w.event_name = f.n AND w.state = 'ACTIVE'), \
         counted AS ( \
           SELECT f.k, f.o, f.n, f.b, COALESCE(tc.c, 0) AS c, tc.lo, tc.hi FROM firsts f \
           LEFT JOIN (SELECT k, count(*) AS c, min(id) AS lo, max(id) AS hi FROM targets GROUP BY k) tc \
             ON tc.k = f.k), \
         ev AS ( \
           INSERT INTO events (event_key, organizer_key, event_name, body, deliveries, first_delivery, \
             last_delivery, created_at) \
           SELECT k, o, n, b, c, lo, hi, $5 FROM counted ON CONFLICT (event_key) DO NOTHING \
           RETURNING event_key, deliveries), \
         ins AS ( \
           INSERT INTO deliveries (id, event_key, event_name, app_id, webhook_key, subscription_key, url, state, \
             attempts, next_attempt_at, lease_owner, lease_until, created_at, updated_at) \
           SELECT t.id, t.k, t.n, t.app_id, t.webhook_key, t.subscription_key, t.url, 'pending', 0, $5, $6, $7, $5, $5 \
           FROM targets t JOIN ev ON ev.event_key = t.k \
           RETURNING id, event_key, subscription_key, app_id, url, webhook_key) \
         SELECT 1 AS kind, ins.id, ins.event_key, ins.subscription_key, ins.app_id, ins.url, w.secret_key IS NOT NULL AS own_secret, \
                0::int8 AS deliveries, ins.webhook_key \
           FROM ins LEFT JOIN webhooks w ON w.webhook_key = ins.webhook_key WHERE $6::text IS NOT NULL \
         UNION ALL SELECT 2, 0, ev.event_key, NULL, 0, NULL, NULL, ev.deliveries, NULL FROM ev \
         UNION ALL SELECT 3, 0, c.k, NULL, 0, NULL, NULL, COALESCE(e.deliveries, c.c), NULL \
           FROM counted c LEFT JOIN events e ON e.event_key = c.k \
           WHERE NOT EXISTS (SELECT 1 FROM ev WHERE ev.event_key = c.k)",
    )
    .bind(&keys)
    .bind(&orgs)
    .bind(&names)
    .bind(&bodies)
    .bind(now)
    .bind(lease.as_ref().map(|l| l.owner.as_str()))
    .bind(lease.as_ref().map_or(0, |l| l.until))
    .fetch_all(pool)
    .await?;

    let bodies: HashMap<&str, &Bytes> = events.iter().map(|e| (e.event_key.as_str(), &e.body)).collect();
    let mut inserted: HashMap<String, i64> = HashMap::new();
    let mut earlier: HashMap<String, i64> = HashMap::new();
    let mut jobs: HashMap<String, Vec<DeliveryJob>> = HashMap::new();
    for r in &rows {
        let kind: i32 = r.try_get("kind")?;
        let event_key: String = r.try_get("event_key")?;
        match kind {
            1 => {
                let job = DeliveryJob {
                    id: r.try_get("id")?,
                    body: bodies.get(event_key.as_str()).map(|b| (*b).clone()).unwrap_or_default(),
                    event_key: event_key.clone(),
                    app_id: r.try_get("app_id")?,
                    webhook_key: r.try_get("webhook_key")?,
                    subscription_key: r.try_get("subscription_key")?,
                    url: r.try_get("url")?,
                    own_secret: r.try_get("own_secret")?,
                    attempts: 0,
                    lease_until: lease.as_ref().map_or(0, |l| l.until),
                    updated_at: now,
                    // The fan-out read only ACTIVE subscriptions of ACTIVE webhooks.
                    standing: Standing::Active,
                    routes_seen: 0,
                };
                jobs.entry(event_key).or_default().push(job);
            }
            2 => {
                inserted.insert(event_key, r.try_get("deliveries")?);
            }
            _ => {
                earlier.insert(event_key, r.try_get("deliveries")?);
            }
        }
    }
    if lease.is_none() && inserted.values().any(|n| *n > 0) {
        // Deliveries nobody holds: wake the workers of every node.
        notify_work(pool).await?;
    }
    // A key repeated within the group is a duplicate of its first occurrence.
    let mut created_here: HashMap<&str, i64> = HashMap::new();
    Ok(events
        .iter()
        .map(|e| {
            let first = inserted
                .get(&e.event_key)
                .filter(|_| !created_here.contains_key(e.event_key.as_str()));
            if let Some(&deliveries) = first {
                created_here.insert(e.event_key.as_str(), deliveries);
                PublishOutcome {
                    event_key: e.event_key.clone(),
                    deliveries,
                    duplicate: false,
                    jobs: jobs.remove(&e.event_key).unwrap_or_default(),
                }
            } else {
                PublishOutcome {
                    event_key: e.event_key.clone(),
                    deliveries: created_here
                        .get(e.event_key.as_str())
                        .or_else(|| earlier.get(&e.event_key))
                        .copied()
                        .unwrap_or_default(),
                    duplicate: true,
                    jobs: Vec::new(),
                }
            }
        })
        .collect())
}
