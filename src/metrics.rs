//! Prometheus counters for the delivery path: lock-free atomics, rendered in the text format on scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::domain::delivery::QueueStats;

/// Upper bounds of the attempt latency histogram, in seconds.
const ATTEMPT_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the store's commit histogram, in seconds: a commit that waits on the disk takes from a
/// fraction of a millisecond (an idle disk) to hundreds (a stalled one).
const COMMIT_BUCKETS: [f64; 14] = [
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

pub const OUTCOMES: [&str; 4] = ["delivered", "retry", "failed", "gone"];

/// A Prometheus histogram of durations: cumulative bucket counts, a count and a sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64; 14],
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64; 14]) -> Self {
        Self {
            bounds,
            buckets: [const { AtomicU64::new(0) }; 14],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// A histogram of the store's group commits.
    pub const fn commits() -> Self {
        Self::new(&COMMIT_BUCKETS)
    }

    pub fn observe(&self, seconds: f64) {
        for (bucket, le) in self.buckets.iter().zip(self.bounds) {
            if seconds <= *le {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    pub fn observe_since(&self, start: std::time::Instant) {
        self.observe(start.elapsed().as_secs_f64());
    }

    fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, le) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {}", bucket.load(Relaxed));
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(s, "{name}_count {count}");
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub deliveries_created: AtomicU64,
    pub pruned_deliveries: AtomicU64,
    pub pruned_events: AtomicU64,
    /// Scrapes whose read of the waiting deliveries failed (their gauges are left out, not shown as 0).
    pub queue_read_errors: AtomicU64,
    attempts: [AtomicU64; 4],
    attempt_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events_accepted: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            deliveries_created: AtomicU64::new(0),
            pruned_deliveries: AtomicU64::new(0),
            pruned_events: AtomicU64::new(0),
            queue_read_errors: AtomicU64::new(0),
            attempts: Default::default(),
            attempt_seconds: Histogram::new(&ATTEMPT_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn attempt(&self, outcome: usize, seconds: f64) {
        self.attempts[outcome].fetch_add(1, Relaxed);
        self.attempt_seconds.observe(seconds);
    }

    /// The Prometheus text; `queue` is `None` when the waiting deliveries could not be read.
    pub fn render(&self, queue: Option<QueueStats>, commits: &Histogram, now_ms: i64) -> String {
        let mut s = String::with_capacity(2048);
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut s,
            "g2w_events_accepted_total",
            "Events accepted for delivery.",
            self.events_accepted.load(Relaxed),
        );
        counter(
            &mut s,
            "g2w_events_duplicate_total",
            "Events published again with a known eventKey.",
            self.events_duplicate.load(Relaxed),
        );
        counter(
            &mut s,
            "g2w_deliveries_created_total",
            "Deliveries created by fan-out.",
            self.deliveries_created.load(Relaxed),
        );
        counter(
            &mut s,
            "g2w_deliveries_pruned_total",
            "Finished deliveries removed (with their attempts) once past the retention period.",
            self.pruned_deliveries.load(Relaxed),
        );
        counter(
            &mut s,
            "g2w_events_pruned_total",
            "Events removed once past the retention period with no delivery left.",
            self.pruned_events.load(Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP g2w_attempts_total Delivery attempts by outcome.\n# TYPE g2w_attempts_total counter"
        );
        for (i, o) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                s,
                "g2w_attempts_total{{outcome=\"{o}\"}} {}",
                self.attempts[i].load(Relaxed)
            );
        }
        self.attempt_seconds.render(
            &mut s,
            "g2w_attempt_duration_seconds",
            "Time from sending an attempt to its answer.",
        );
        commits.render(
            &mut s,
            "g2w_store_commit_duration_seconds",
            "Time the store takes to write and commit one group of publishes or attempt results, \
             waiting for the disk included.",
        );
        counter(
            &mut s,
            "g2w_queue_read_errors_total",
            "Scrapes that could not read the waiting deliveries (the waiting gauges are absent from those).",
            self.queue_read_errors.load(Relaxed),
        );
        let Some(queue) = queue else {
            return s;
        };
        let age = queue
            .oldest_waiting_created_at
            .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
        let _ = writeln!(
            s,
            "# HELP g2w_deliveries_waiting Deliveries not yet delivered or failed.\n# TYPE g2w_deliveries_waiting gauge\n\
             g2w_deliveries_waiting {}\n\
             # HELP g2w_oldest_waiting_age_seconds Age of the oldest waiting delivery.\n\
             # TYPE g2w_oldest_waiting_age_seconds gauge\ng2w_oldest_waiting_age_seconds {age}",
            queue.waiting
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_read_of_the_queue_leaves_its_gauges_out_and_counts_the_error() {
        let m = Metrics::default();
        let commits = Histogram::commits();
        let queue = QueueStats {
            waiting: 3,
            oldest_waiting_created_at: Some(1_000),
        };
        let read = m.render(Some(queue), &commits, 3_000);
        assert!(read.contains("\ng2w_deliveries_waiting 3\n"), "{read}");
        assert!(read.contains("\ng2w_oldest_waiting_age_seconds 2\n"), "{read}");
        m.queue_read_errors.fetch_add(1, Relaxed);
        let failed = m.render(None, &commits, 3_000);
        assert!(
            !failed.contains("g2w_deliveries_waiting"),
            "not a misleading 0: {failed}"
        );
        assert!(failed.contains("\ng2w_queue_read_errors_total 1\n"), "{failed}");
    }
}
