//! The decisions both backends make, written once as plain functions: each backend's SQL applies them.

use crate::domain::delivery::AttemptRecord;
use crate::domain::format_ms;

/// The `lastError` of a delivery paused because its subscription or webhook is INACTIVE.
pub const PAUSED: &str = "paused: subscription or webhook INACTIVE";

/// Why a subscription was set INACTIVE by the failure window.
pub fn disabled_reason(disable_after_ms: i64, now: i64) -> String {
    format!(
        "every delivery failed for {} s; deactivated at {}",
        disable_after_ms / 1000,
        format_ms(now)
    )
}

/// Why a subscription was set INACTIVE by its callback's 410.
pub fn gone_reason(now: i64) -> String {
    format!("the callback answered 410 Gone at {}", format_ms(now))
}

/// The distinct subscriptions of the records whose outcome matches (sorted: a stable lock order).
pub fn subscriptions_where<'a>(
    records: impl IntoIterator<Item = &'a AttemptRecord>,
    pred: impl Fn(&AttemptRecord) -> bool,
) -> Vec<&'a str> {
    let mut keys: Vec<&str> = records
        .into_iter()
        .filter(|r| pred(r))
        .map(|r| r.subscription_key.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::delivery::Outcome;

    #[test]
    fn reasons_say_what_happened_and_when() {
        assert_eq!(
            disabled_reason(86_400_000, 0),
            "every delivery failed for 86400 s; deactivated at 1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            gone_reason(1_000),
            "the callback answered 410 Gone at 1970-01-01T00:00:01.000Z"
        );
    }

    #[test]
    fn subscriptions_are_listed_once_in_order() {
        let record = |sub: &str, outcome| AttemptRecord {
            delivery_id: 1,
            subscription_key: sub.into(),
            number: 1,
            node: "n".into(),
            started_at: 0,
            job_updated_at: 0,
            duration_ms: 0,
            status_code: None,
            error: None,
            response_excerpt: None,
            outcome,
        };
        let records = [
            record("b", Outcome::Failed),
            record("a", Outcome::RetryAt(1)),
            record("b", Outcome::RetryAt(2)),
            record("c", Outcome::Delivered),
        ];
        assert_eq!(subscriptions_where(&records, |r| r.outcome.is_failure()), ["a", "b"]);
        assert!(subscriptions_where(&records, |r| r.outcome == Outcome::Gone).is_empty());
    }
}
