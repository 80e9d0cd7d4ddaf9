//! What one group commit does on the hot connection: publishes (fan-out, events, deliveries), attempt results
//! (attempts, the deliveries' new states, subscriptions' failure clocks) and retention passes.

use std::collections::HashMap;

use super::sql::{chunks, INSERT_ATTEMPTS, INSERT_DELIVERIES, INSERT_EVENTS, UPDATE_DELIVERIES};
use super::writer::HELD;
use crate::domain::delivery::{AttemptRecord, DeliveryJob, Lease, NewEvent, Outcome, PublishOutcome, Standing};
use crate::domain::{now_ms, EventName};
use crate::error::{Error, Result};
use crate::store::common::id_bound;
use crate::store::rules;
use crate::store::Pruned;

/// A retention pass on the hot connection, in a transaction of its own. That connection does not check
/// foreign keys, which matters here: deliveries have no index on their event (see migration 0003), so
/// checking each removed event's references would read every delivery. The pass keeps them by construction:
/// a delivery's attempts go with it, and an event goes only when no delivery refers to it.
pub(super) fn prune_rows(conn: &mut rusqlite::Connection, before: i64, limit: i64) -> Result<Pruned> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // The primary key is walked up to where `before` falls in it: a pass costs what it removes (and the
    // unfinished deliveries it steps over), not the size of the table.
    let gone: Vec<(i64, String)> = tx
        .prepare_cached(&format!(
            "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
               WHERE id < {} AND created_at < ?1 AND updated_at < ?1 AND state IN ('delivered', 'failed', 'cancelled') \
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
    own_secret: bool,
}

pub(super) fn publish_all(
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
         w.secret_key IS NOT NULL FROM user_subscriptions s JOIN webhooks w ON w.webhook_key = s.webhook_key \
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
                            own_secret: r.get(4)?,
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
                        own_secret: t.own_secret,
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
    let keys = rules::subscriptions_where(records.iter().copied(), |r| pred(r.outcome));
    if keys.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&keys)
        .map(Some)
        .map_err(|e| Error::Internal(e.to_string()))
}

pub(super) fn record_all(tx: &rusqlite::Transaction, records: &[&AttemptRecord], disable_after_ms: i64) -> Result<()> {
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
        let reason = rules::disabled_reason(disable_after_ms, now);
        tx.prepare_cached(
            "UPDATE OR FAIL user_subscriptions SET state = 'INACTIVE', inactive_reason = ?1 \
             WHERE state = 'ACTIVE' AND failing_since <= ?2 AND subscription_key IN (SELECT value FROM json_each(?3))",
        )?
        .execute(rusqlite::params![reason, now.saturating_sub(disable_after_ms), keys])?;
    }
    if let Some(keys) = &gone {
        let reason = rules::gone_reason(now);
        tx.prepare_cached(
            "UPDATE OR FAIL user_subscriptions SET state = 'INACTIVE', inactive_reason = ?1 \
             WHERE state = 'ACTIVE' AND subscription_key IN (SELECT value FROM json_each(?2))",
        )?
        .execute(rusqlite::params![reason, keys])?;
    }
    Ok(())
}
