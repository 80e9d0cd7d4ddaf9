//! Prometheus counters for the delivery path: lock-free atomics, rendered in the text format on scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::store::QueueStats;

/// Upper bounds of the attempt latency histogram, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub const OUTCOMES: [&str; 4] = ["delivered", "retry", "failed", "gone"];

#[derive(Debug, Default)]
pub struct Metrics {
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub deliveries_created: AtomicU64,
    attempts: [AtomicU64; 4],
    latency_buckets: [AtomicU64; 14],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn attempt(&self, outcome: usize, seconds: f64) {
        self.attempts[outcome].fetch_add(1, Relaxed);
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    pub fn attempts_with(&self, outcome: &str) -> u64 {
        OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.attempts[i].load(Relaxed))
    }

    pub fn render(&self, queue: QueueStats, now_ms: i64) -> String {
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
        let _ = writeln!(
            s,
            "# HELP g2w_attempt_duration_seconds Time from sending an attempt to its answer.\n\
             # TYPE g2w_attempt_duration_seconds histogram"
        );
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "g2w_attempt_duration_seconds_bucket{{le=\"{le}\"}} {}",
                self.latency_buckets[i].load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(s, "g2w_attempt_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            s,
            "g2w_attempt_duration_seconds_sum {}",
            self.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "g2w_attempt_duration_seconds_count {count}");
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
