//! One delivery attempt: sign, POST, classify the answer, decide what happens next.

use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Uri};
use rand::Rng;

use crate::domain::delivery::{AttemptRecord, DeliveryJob, Outcome};
use crate::domain::{format_ms, now_ms};
use crate::outbound::{DeliveryClient, SendError};
use crate::signing;

/// First bytes of a response body kept with the attempt.
const EXCERPT: usize = 1024;
/// Longest Retry-After honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The retry policy: delays after each failed attempt, with jitter.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub schedule: Vec<Duration>,
}

impl RetryPolicy {
    /// What follows attempt `number` (1-based) that did not succeed.
    pub fn after_failure(&self, number: i64, status: Option<u16>, retry_after: Option<Duration>, now: i64) -> Outcome {
        if status == Some(410) {
            return Outcome::Gone;
        }
        let Some(base) = usize::try_from(number - 1).ok().and_then(|i| self.schedule.get(i)) else {
            return Outcome::Failed;
        };
        let delay = match (status, retry_after) {
            (Some(429 | 503), Some(ra)) => ra.min(MAX_RETRY_AFTER),
            _ => jitter(*base),
        };
        Outcome::RetryAt(now + delay.as_millis() as i64)
    }
}

/// Spreads retries over ±20% of the delay so failing receivers are not hit by synchronized waves.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

/// Retry-After as seconds or an HTTP date.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = at.timestamp_millis() - now_ms();
    Some(Duration::from_millis(ms.max(0) as u64))
}

pub struct Attempt<'a> {
    pub client: &'a DeliveryClient,
    pub policy: &'a RetryPolicy,
    pub node: &'a str,
    pub standard_webhooks: bool,
}

const SIGNATURE_TIMESTAMP: HeaderName = HeaderName::from_static("x-webhook-signature-timestamp");
const SIGNATURE: HeaderName = HeaderName::from_static("x-webhook-signature");
const STANDARD_ID: HeaderName = HeaderName::from_static("webhook-id");
const STANDARD_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const STANDARD_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// A header value from text the service made or the publisher sent; the error names the header.
fn value(name: &HeaderName, text: &str) -> Result<HeaderValue, SendError> {
    HeaderValue::from_str(text).map_err(|_| SendError::Other(format!("{name} cannot carry {text:?}")))
}

impl Attempt<'_> {
    /// The delivery's headers: content type and the signatures.
    fn headers(&self, job: &DeliveryJob, key: &str, started_at: i64) -> Result<HeaderMap, SendError> {
        let timestamp = format_ms(started_at);
        let mut headers = HeaderMap::with_capacity(8);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(SIGNATURE_TIMESTAMP, value(&SIGNATURE_TIMESTAMP, &timestamp)?);
        let signature = signing::sign(key, &timestamp, &job.body);
        headers.insert(SIGNATURE, value(&SIGNATURE, &signature)?);
        if self.standard_webhooks {
            let secs = started_at / 1000;
            headers.insert(STANDARD_ID, value(&STANDARD_ID, &job.event_key)?);
            headers.insert(STANDARD_TIMESTAMP, HeaderValue::from(secs));
            let signature = signing::sign_standard(key, &job.event_key, secs, &job.body);
            headers.insert(STANDARD_SIGNATURE, value(&STANDARD_SIGNATURE, &signature)?);
        }
        Ok(headers)
    }

    /// Sends the delivery to `url` (its callback URL as it stands now, checked against the address rules) signed
    /// with `key`, and returns the attempt's record. Either one as an error (no key valid now, the keys could not
    /// be read, an address the rules refuse) sends nothing: the attempt fails with that reason and is retried like
    /// any other. Nothing goes out unsigned.
    pub async fn run(
        &self,
        job: &DeliveryJob,
        key: std::result::Result<&str, String>,
        url: std::result::Result<Uri, String>,
    ) -> AttemptRecord {
        let started_at = now_ms();
        let clock = Instant::now();
        let url = url.map_err(SendError::Other);
        let headers = key
            .map_err(SendError::Other)
            .and_then(|key| self.headers(job, key, started_at));
        let result = match (url, headers) {
            (Ok(url), Ok(headers)) => self.client.post(url, headers, job.body.clone(), EXCERPT).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let number = job.attempts + 1;
        let mut record = AttemptRecord {
            delivery_id: job.id,
            subscription_key: job.subscription_key.clone(),
            number,
            node: self.node.to_string(),
            started_at,
            job_updated_at: job.updated_at,
            duration_ms: 0,
            status_code: None,
            error: None,
            response_excerpt: None,
            outcome: Outcome::Failed,
        };
        match result {
            Ok(answer) => {
                let status = answer.status;
                record.status_code = Some(i64::from(status.as_u16()));
                if !answer.excerpt.is_empty() {
                    record.response_excerpt = Some(String::from_utf8_lossy(&answer.excerpt).into_owned());
                }
                record.outcome = if status.is_success() {
                    Outcome::Delivered
                } else {
                    record.error = Some(format!("HTTP {}", status.as_u16()));
                    let retry_after = parse_retry_after(&answer.headers);
                    self.policy
                        .after_failure(number, Some(status.as_u16()), retry_after, now_ms())
                };
            }
            Err(e) => {
                record.error = Some(e.to_string());
                record.outcome = self.policy.after_failure(number, None, None, now_ms());
            }
        }
        record.duration_ms = clock.elapsed().as_millis() as i64;
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivery client for loopback and a one-step retry schedule, for `attempt`.
    fn client_and_policy() -> (DeliveryClient, RetryPolicy) {
        let client = DeliveryClient::new(crate::outbound::Policy::AllowPrivate, Duration::from_secs(1), 1);
        let policy = RetryPolicy {
            schedule: vec![Duration::from_secs(5)],
        };
        (client, policy)
    }

    fn attempt<'a>(client: &'a DeliveryClient, policy: &'a RetryPolicy, standard_webhooks: bool) -> Attempt<'a> {
        Attempt {
            client,
            policy,
            node: "n",
            standard_webhooks,
        }
    }

    /// A first attempt's job for `event_key`, to `url`, with no secret of its webhook's own.
    fn job(event_key: &str, url: String) -> DeliveryJob {
        DeliveryJob {
            id: 1,
            event_key: event_key.into(),
            app_id: 1,
            subscription_key: "s".into(),
            url,
            body: bytes::Bytes::from_static(b"{}"),
            webhook_key: "w".into(),
            own_secret: false,
            attempts: 0,
            lease_until: i64::MAX,
            updated_at: 0,
            standing: crate::domain::delivery::Standing::Active,
            routes_seen: 0,
        }
    }

    #[tokio::test]
    async fn what_cannot_be_sent_is_a_failed_attempt_with_its_reason() {
        let (client, policy) = client_and_policy();
        let attempt = attempt(&client, &policy, true);
        let job = job("line\nbreak", "http://127.0.0.1:9/hook".into());
        // An eventKey that no header can carry, sent as the Standard Webhooks id.
        let url: Uri = job.url.parse().expect("uri");
        let r = attempt.run(&job, Ok("c2VjcmV0"), Ok(url)).await;
        assert!(
            r.error
                .as_deref()
                .is_some_and(|e| e.contains("webhook-id cannot carry")),
            "{r:?}"
        );
        assert!(matches!(r.outcome, Outcome::RetryAt(_)) && r.status_code.is_none());
        // A callback URL the address rules refuse.
        let r = attempt
            .run(&job, Ok("k"), Err("callbackUrl x: must use https".into()))
            .await;
        assert_eq!(r.error.as_deref(), Some("callbackUrl x: must use https"));
        assert!(matches!(r.outcome, Outcome::RetryAt(_)));
    }

    /// When the application's keys could not be read, the callback does not go out unsigned: nothing is sent,
    /// and the attempt fails with the reason and is retried.
    #[tokio::test]
    async fn a_callback_whose_keys_could_not_be_read_is_not_sent() {
        let (client, policy) = client_and_policy();
        let attempt = attempt(&client, &policy, false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let job = job("k", format!("http://{}/hook", listener.local_addr().expect("addr")));
        let url: Uri = job.url.parse().expect("uri");
        let r = attempt
            .run(&job, Err("the keys could not be read".into()), Ok(url.clone()))
            .await;
        assert_eq!(r.error.as_deref(), Some("the keys could not be read"));
        assert!(matches!(r.outcome, Outcome::RetryAt(_)) && r.status_code.is_none());
        let connected = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(connected.is_err(), "nothing connected to the receiver");
        // With a key the same attempt does connect.
        let both = async {
            tokio::join!(attempt.run(&job, Ok("k"), Ok(url)), async {
                drop(listener.accept().await.expect("accept"));
            })
        };
        tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the attempt connected to the receiver");
    }

    #[test]
    fn schedule_then_failed() {
        let p = RetryPolicy {
            schedule: vec![Duration::from_secs(5), Duration::from_secs(30)],
        };
        match p.after_failure(1, Some(500), None, 0) {
            Outcome::RetryAt(t) => assert!((4000..=6000).contains(&t), "{t}"),
            o => panic!("{o:?}"),
        }
        match p.after_failure(2, None, None, 0) {
            Outcome::RetryAt(t) => assert!((24000..=36000).contains(&t), "{t}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(p.after_failure(3, Some(500), None, 0), Outcome::Failed);
        assert_eq!(p.after_failure(1, Some(410), None, 0), Outcome::Gone);
        assert_eq!(
            p.after_failure(1, Some(429), Some(Duration::from_secs(7)), 0),
            Outcome::RetryAt(7000)
        );
        // Retry-After only counts on 429 and 503.
        assert_ne!(
            p.after_failure(1, Some(500), Some(Duration::from_secs(7)), 0),
            Outcome::RetryAt(7000)
        );
    }
}
