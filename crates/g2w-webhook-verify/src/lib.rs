//! Verify GoToWebinar webhook deliveries and parse their events.
//!
//! Every delivery from GoToWebinar (or g2w-webhooks) is a `POST` of one JSON event with two headers:
//!
//! - `X-Webhook-Signature-Timestamp`: when it was signed, e.g. `2019-04-04T05:47:04.517Z`
//! - `X-Webhook-Signature`: `base64(HMAC-SHA256(secret, timestamp + ":" + raw body))`
//!
//! ```
//! use g2w_webhook_verify::{Event, Verifier};
//!
//! let secret = "f1679e36-17fe-48fa-93da-44195fd9e293";
//! let timestamp = "2019-04-04T05:47:04.517Z";
//! let body = br#"{"eventName":"registrant.joined","eventVersion":"1.0.0","product":"g2w","eventKey":"7fc43482-b239-45e2-a8f8-3ca2f1fbada8"}"#;
//! let signature = "Ojq+1Ngu6hwhaxMz1MKghhg8SaUE9O7U7qtYZE0/vEI=";
//!
//! let verifier = Verifier::new(secret);
//! verifier.verify(timestamp, signature, body)?;
//!
//! // A full registrant.joined delivery, parsed once verified (over the raw bytes, never re-serialized JSON).
//! let body = br#"{"eventName":"registrant.joined","eventKey":"74d38461-9db8-4e41-8f59-d99f00b82411","sessionKey":15887209,"webinarKey":5620084814059709442,"registrantKey":8325357307900339981,"joinTime":1554356793898}"#;
//! let signature = g2w_webhook_verify::sign(secret, timestamp, body);
//! verifier.verify(timestamp, &signature, body)?;
//! let event = Event::parse(body)?;
//! assert_eq!(event.event_key(), Some("74d38461-9db8-4e41-8f59-d99f00b82411"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! During a key rotation, accept both keys; to refuse old deliveries being replayed, set a tolerance:
//!
//! ```
//! use std::time::Duration;
//! use g2w_webhook_verify::{sign, Verifier, VerifyError};
//!
//! let verifier = Verifier::new("new-key").with_key("old-key").tolerance(Duration::from_secs(300));
//! let now = "2030-01-01T00:00:00.000Z";
//! let sig = sign("old-key", now, b"{}");
//! assert_eq!(verifier.verify(now, &sig, b"{}"), Err(VerifyError::TooOld));
//! ```
//!
//! With the `axum` feature, [`axum::VerifiedEvent`] verifies and parses a delivery in a handler.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

mod events;
pub use events::*;

#[cfg(feature = "axum")]
pub mod axum;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Webhook-Signature";
/// The header carrying the signed timestamp.
pub const TIMESTAMP_HEADER: &str = "X-Webhook-Signature-Timestamp";

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC accepts keys of any length");
    m.update(timestamp.as_bytes());
    m.update(b":");
    m.update(body);
    m
}

/// Computes the `X-Webhook-Signature` of a delivery.
///
/// ```
/// // The test vector of a real GoTo delivery.
/// let body = br#"{"eventName":"registrant.joined","eventVersion":"1.0.0","product":"g2w","eventKey":"7fc43482-b239-45e2-a8f8-3ca2f1fbada8"}"#;
/// assert_eq!(
///     g2w_webhook_verify::sign("f1679e36-17fe-48fa-93da-44195fd9e293", "2019-04-04T05:47:04.517Z", body),
///     "Ojq+1Ngu6hwhaxMz1MKghhg8SaUE9O7U7qtYZE0/vEI="
/// );
/// ```
pub fn sign(key: &str, timestamp: &str, body: &[u8]) -> String {
    STANDARD.encode(mac(key, timestamp, body).finalize().into_bytes())
}

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// A header is missing.
    MissingHeader(&'static str),
    /// The signature is not base64 or does not match any key.
    BadSignature,
    /// The timestamp is not an ISO-8601 date-time.
    BadTimestamp,
    /// The timestamp is outside the tolerance.
    TooOld,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::MissingHeader(h) => write!(f, "the {h} header is missing"),
            VerifyError::BadSignature => write!(f, "the signature does not match"),
            VerifyError::BadTimestamp => write!(f, "the signature timestamp is not an ISO-8601 date-time"),
            VerifyError::TooOld => write!(f, "the signature timestamp is outside the tolerance"),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Checks deliveries against one or more secret keys, in constant time.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<String>,
    tolerance: Option<Duration>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are secrets: never printed.
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl Verifier {
    /// A verifier for one secret key (the `value` of `POST /webhooks/secretkey`, or a webhook's `secretKey`).
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            keys: vec![key.into()],
            tolerance: None,
        }
    }

    /// Also accepts deliveries signed with `key` (key rotation).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Refuses deliveries whose timestamp is further than `tolerance` from now (replay protection). Deliveries
    /// are retried for hours, and a retry is signed afresh, so a few minutes is enough.
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = Some(tolerance);
        self
    }

    /// Verifies a delivery from its timestamp and signature headers and its raw body bytes.
    pub fn verify(&self, timestamp: &str, signature: &str, body: &[u8]) -> Result<(), VerifyError> {
        let given = STANDARD
            .decode(signature.trim())
            .map_err(|_| VerifyError::BadSignature)?;
        // Every key is tried, so timing does not reveal which one matched.
        let matched = self.keys.iter().fold(false, |ok, key| {
            mac(key, timestamp, body).verify_slice(&given).is_ok() | ok
        });
        if !matched {
            return Err(VerifyError::BadSignature);
        }
        if let Some(tolerance) = self.tolerance {
            let at = chrono::DateTime::parse_from_rfc3339(timestamp.trim()).map_err(|_| VerifyError::BadTimestamp)?;
            let age = (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
                .num_milliseconds()
                .unsigned_abs();
            if age > tolerance.as_millis() as u64 {
                return Err(VerifyError::TooOld);
            }
        }
        Ok(())
    }

    /// Verifies a delivery given a way to read its headers (case-insensitive names).
    ///
    /// ```
    /// use g2w_webhook_verify::{sign, Verifier};
    /// let ts = "2019-04-04T05:47:04.517Z";
    /// let sig = sign("secret", ts, b"{}");
    /// let headers = [("x-webhook-signature-timestamp", ts), ("x-webhook-signature", sig.as_str())];
    /// let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v);
    /// assert!(Verifier::new("secret").verify_headers(get, b"{}").is_ok());
    /// ```
    pub fn verify_headers<'a>(&self, header: impl Fn(&str) -> Option<&'a str>, body: &[u8]) -> Result<(), VerifyError> {
        let ts = header(TIMESTAMP_HEADER).ok_or(VerifyError::MissingHeader(TIMESTAMP_HEADER))?;
        let sig = header(SIGNATURE_HEADER).ok_or(VerifyError::MissingHeader(SIGNATURE_HEADER))?;
        self.verify(ts, sig, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "f1679e36-17fe-48fa-93da-44195fd9e293";
    const TS: &str = "2019-04-04T05:47:04.517Z";
    const BODY: &[u8] = br#"{"eventName":"registrant.joined","eventVersion":"1.0.0","product":"g2w","eventKey":"7fc43482-b239-45e2-a8f8-3ca2f1fbada8"}"#;
    const SIG: &str = "Ojq+1Ngu6hwhaxMz1MKghhg8SaUE9O7U7qtYZE0/vEI=";

    #[test]
    fn reference_test_vector() {
        assert_eq!(sign(KEY, TS, BODY), SIG);
        assert_eq!(Verifier::new(KEY).verify(TS, SIG, BODY), Ok(()));
    }

    #[test]
    fn tampered_body_is_refused() {
        let mut body = BODY.to_vec();
        body[10] ^= 1;
        assert_eq!(
            Verifier::new(KEY).verify(TS, SIG, &body),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn tampered_timestamp_is_refused() {
        assert_eq!(
            Verifier::new(KEY).verify("2019-04-04T05:47:04.518Z", SIG, BODY),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn wrong_key_is_refused() {
        assert_eq!(
            Verifier::new("another-key").verify(TS, SIG, BODY),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            Verifier::new(KEY).verify(TS, "not base64!", BODY),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn rotation_accepts_old_and_new_keys() {
        let old = sign("old", TS, BODY);
        let new = sign("new", TS, BODY);
        let v = Verifier::new("new").with_key("old");
        assert_eq!(v.verify(TS, &old, BODY), Ok(()));
        assert_eq!(v.verify(TS, &new, BODY), Ok(()));
        assert_eq!(
            Verifier::new("new").verify(TS, &old, BODY),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn tolerance_refuses_old_and_accepts_fresh() {
        let v = Verifier::new(KEY).tolerance(Duration::from_secs(300));
        assert_eq!(v.verify(TS, SIG, BODY), Err(VerifyError::TooOld));
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        assert_eq!(v.verify(&now, &sign(KEY, &now, BODY), BODY), Ok(()));
        assert_eq!(
            v.verify("yesterday", &sign(KEY, "yesterday", BODY), BODY),
            Err(VerifyError::BadTimestamp)
        );
    }

    #[test]
    fn debug_never_shows_keys() {
        assert!(!format!("{:?}", Verifier::new(KEY)).contains(KEY));
    }
}
