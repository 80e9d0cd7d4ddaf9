//! The deliveries this process holds in memory (queued or in flight): one process owns a SQLite file, so its
//! leases live here rather than in the database.

use std::collections::HashSet;
use std::sync::Arc;

use crate::error::{Error, Result};

pub(super) type Held = Arc<std::sync::Mutex<Holdings>>;

/// What this process holds, and what it let go of while claims were reading. A claim reads without the lock;
/// a delivery whose result was committed during that read may still look pending to it, so such deliveries are
/// remembered until no claim is reading, and claims skip them (they are taken by a later claim if due again).
#[derive(Default)]
pub(super) struct Holdings {
    pub(super) ids: HashSet<i64>,
    pub(super) claims_reading: usize,
    pub(super) released_while_reading: HashSet<i64>,
}

impl Holdings {
    /// The ids held, as a JSON array for `json_each`.
    pub(super) fn ids_json(&self) -> Result<String> {
        serde_json::to_string(&self.ids).map_err(|e| Error::Internal(e.to_string()))
    }

    pub(super) fn release(&mut self, id: i64) {
        self.ids.remove(&id);
        if self.claims_reading > 0 {
            self.released_while_reading.insert(id);
        }
    }
}

/// Counts a claim's read for as long as it runs, however it ends.
pub(super) struct ClaimRead<'a>(&'a Held);

impl<'a> ClaimRead<'a> {
    /// Starts a read; returns the ids held now, as a JSON array, if asked for.
    pub(super) fn start(held: &'a Held, with_ids: bool) -> Result<(Self, Option<String>)> {
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

pub(super) fn holdings(held: &Held) -> std::sync::MutexGuard<'_, Holdings> {
    // A panic while holding this lock cannot leave the sets half-updated in a way that matters more than
    // stopping would; carry on with them.
    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
}
