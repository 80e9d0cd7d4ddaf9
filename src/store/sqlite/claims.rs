//! Claims: due deliveries read through a read-only connection of their own, straight into jobs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::held::{holdings, ClaimRead, Held};
use super::writer::HELD;
use crate::domain::delivery::{DeliveryJob, Standing};
use crate::error::Result;

/// The read connection claims use, driven directly through rusqlite, and where the last full claim stopped.
pub(super) struct ClaimReader {
    pub(super) conn: rusqlite::Connection,
    pub(super) from: Option<ClaimFrom>,
}

/// The due-index position, `(next_attempt_at, id)`, of the last row a full claim read, and when this run of
/// full claims began. Every delivery this process holds is pending and due, so it sits at the front of the due
/// index: while a backlog drains, each claim would otherwise step over all of them (up to the scheduler's buffer,
/// 1,024 by default) before the rows it can take. A claim that comes back short starts again from the front, and
/// so does one a second after the run began, so a delivery left behind the position (released without a new
/// due time) waits at most that long.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClaimFrom {
    next_attempt_at: i64,
    id: i64,
    since: Instant,
}

/// How long claims keep reading from a position before they start from the front again.
pub(super) const CLAIM_FROM_FOR: Duration = Duration::from_secs(1);

/// Takes up to `limit` due deliveries this process does not hold, oldest due first, and holds them. Runs on a
/// blocking thread with the claim connection: rows are read straight into jobs (through sqlx each value was
/// copied once more and looked up by name, about a tenth of the server's CPU while a backlog drained).
pub(super) fn claim_rows(
    reader: &std::sync::Mutex<ClaimReader>,
    held: &Held,
    now: i64,
    limit: i64,
) -> Result<Vec<DeliveryJob>> {
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
         d.next_attempt_at, e.body, w.secret_key IS NOT NULL, d.updated_at, d.webhook_key, w.state, s.state \
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
            own_secret: r.get(8)?,
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
