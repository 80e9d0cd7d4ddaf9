//! GoTo's request limit, when `--rate-limit` asks for it: each token may make that many requests a second (a
//! second's worth at once, then evenly), and past it gets 429 with `Retry-After`, so an integration's handling
//! of the real service's limit can be tried here. Off by default.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::error::{Error, Result};

/// Most tokens tracked at once; past it the allowances start over (each token then has a full second's worth).
const MOST_TOKENS: usize = 10_000;

#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    /// Requests left to each token (by its hash) and when that was worked out.
    allowance: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            allowance: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from the allowance of the token with hash `token_hash`.
    pub fn take(&self, token_hash: &str, now: Instant) -> Result<()> {
        let mut all = self.allowance.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if all.len() >= MOST_TOKENS && !all.contains_key(token_hash) {
            all.clear();
        }
        let (left, at) = all.entry(token_hash.to_string()).or_insert((self.per_second, now));
        *left = (*left + now.saturating_duration_since(*at).as_secs_f64() * self.per_second).min(self.per_second);
        *at = now;
        if *left >= 1.0 {
            *left -= 1.0;
            Ok(())
        } else {
            Err(Error::TooManyRequests(format!(
                "at most {} a second with this token (--rate-limit): retry after a second",
                self.per_second
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_seconds_worth_at_once_then_evenly_and_each_token_its_own() {
        let limit = RateLimit::new(2);
        let t = Instant::now();
        assert!(limit.take("a", t).is_ok());
        assert!(limit.take("a", t).is_ok());
        assert!(matches!(limit.take("a", t), Err(Error::TooManyRequests(_))));
        assert!(limit.take("b", t).is_ok(), "another token has its own allowance");
        assert!(
            limit.take("a", t + Duration::from_millis(500)).is_ok(),
            "half a second refills one"
        );
        assert!(limit.take("a", t + Duration::from_millis(500)).is_err());
        assert!(limit.take("a", t + Duration::from_secs(10)).is_ok());
        assert!(
            limit.take("a", t + Duration::from_secs(10)).is_ok(),
            "but never more than a second's worth"
        );
        assert!(limit.take("a", t + Duration::from_secs(10)).is_err());
    }
}
