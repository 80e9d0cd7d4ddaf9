//! The hot path's multi-row statements: their text, built once per shape, and how rows are cut into shapes.

/// Most rows per multi-row statement (at most 8 parameters each, far under SQLite's limit of 32,766).
pub(super) const ROWS_PER_STATEMENT: usize = 256;
/// Up to this many rows go in one statement of exactly that many rows.
pub(super) const EXACT_ROWS: usize = 32;
/// Statement shapes per table: 1 to `EXACT_ROWS` rows, then the powers of two up to `ROWS_PER_STATEMENT`.
pub(super) const SHAPES: usize = EXACT_ROWS + (ROWS_PER_STATEMENT.ilog2() - EXACT_ROWS.ilog2()) as usize;

/// Splits rows into chunks of at most 35 lengths per table, so each shape of a multi-row statement is prepared
/// once and stays in the statement cache (one statement per row count, as a plain split gives, would either be
/// prepared again for every group or fill the cache with hundreds of large compiled programs). Groups of up
/// to `EXACT_ROWS` rows, which is what one-event publishes make, take one statement; larger groups take
/// power-of-two chunks, largest first, and the rest.
pub(super) fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
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
pub(super) struct MultiRow {
    head: &'static str,
    row: &'static str,
    tail: &'static str,
    shared: usize,
    /// Parameters per row: the `#`s of `row`, counted once (`param` runs for every bound value).
    pub(super) per_row: usize,
    texts: [std::sync::OnceLock<String>; SHAPES],
}

impl MultiRow {
    pub(super) const fn new(head: &'static str, row: &'static str, tail: &'static str, shared: usize) -> Self {
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
    pub(super) fn sql(&self, rows: usize) -> &str {
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
    pub(super) fn param(&self, row: usize, col: usize) -> usize {
        self.shared + row * self.per_row + col + 1
    }
}

pub(super) static INSERT_EVENTS: MultiRow = MultiRow::new(
    "INSERT OR FAIL INTO events (rowid, event_key, organizer_key, event_name, body, deliveries, first_delivery, \
     last_delivery, created_at) VALUES ",
    "(#, #, #, #, #, #, #, #, ?1)",
    " ON CONFLICT (event_key) DO NOTHING RETURNING rowid",
    1,
);

pub(super) static INSERT_DELIVERIES: MultiRow = MultiRow::new(
    "INSERT OR FAIL INTO deliveries (id, event_key, event_name, app_id, webhook_key, subscription_key, url, state, \
     attempts, next_attempt_at, lease_owner, lease_until, created_at, updated_at) VALUES ",
    "(#, #, #, #, #, #, #, 'pending', 0, ?1, NULL, 0, ?1, ?1)",
    "",
    1,
);

pub(super) static INSERT_ATTEMPTS: MultiRow = MultiRow::new(
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
pub(super) static UPDATE_DELIVERIES: MultiRow = MultiRow::new(
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

#[cfg(test)]
mod tests {
    use super::*;
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
