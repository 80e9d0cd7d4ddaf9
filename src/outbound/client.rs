//! The client that sends deliveries.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, USER_AGENT};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::resolve::CallbackResolver;
use super::{root_cause, Policy, USER_AGENT_VALUE};

type Connector = hyper_rustls::HttpsConnector<HttpConnector<CallbackResolver>>;

/// The client that sends deliveries: hyper's pooled client with rustls, no redirects, keep-alive per origin,
/// and the resolver above. (Built on hyper directly: a delivery is one POST whose answer is read only for its
/// status, Retry-After and a short excerpt, and reqwest's per-request layers cost about a quarter of the
/// delivery's client-side CPU here.)
#[derive(Clone)]
pub struct DeliveryClient {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    timeout: Duration,
    policy: Policy,
}

/// A callback's answer: its status and headers, and the first bytes of its body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub excerpt: Vec<u8>,
}

/// Why a callback gave no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// No answer within the attempt timeout.
    Timeout,
    /// The connection could not be made (refused, reset, DNS, TLS handshake...).
    Connect(String),
    /// Anything else, by its innermost cause.
    Other(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("timed out"),
            Self::Connect(why) => write!(f, "connection failed: {why}"),
            Self::Other(why) => f.write_str(why),
        }
    }
}

impl std::fmt::Debug for DeliveryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DeliveryClient {
    pub fn new(policy: Policy, timeout: Duration, max_idle_per_host: usize) -> Self {
        let mut http = HttpConnector::new_with_resolver(CallbackResolver(policy));
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout.min(Duration::from_secs(5))));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            // Fails only when the crypto provider supports none of rustls' safe protocol versions.
            .expect("the TLS configuration builds")
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Self {
            client,
            timeout,
            policy,
        }
    }

    /// What the callback URLs it sends to may point at.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// POSTs `body` with `headers` and reads at most `limit` bytes of the answer's body; the attempt timeout
    /// bounds the whole exchange, and a body cut short by it does not change the answer.
    pub async fn post(&self, uri: Uri, mut headers: HeaderMap, body: Bytes, limit: usize) -> Result<Answer, SendError> {
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let res = match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_) => return Err(SendError::Timeout),
            Ok(Err(e)) if e.is_connect() => return Err(SendError::Connect(root_cause(&e))),
            Ok(Err(e)) => return Err(SendError::Other(root_cause(&e))),
            Ok(Ok(res)) => res,
        };
        let (parts, mut body) = res.into_parts();
        let mut excerpt = Vec::new();
        while excerpt.len() < limit {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        excerpt.extend_from_slice(&data[..data.len().min(limit - excerpt.len())]);
                    }
                }
                _ => break,
            }
        }
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            excerpt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;

    /// A one-connection HTTP server on loopback that answers every request with `answer`.
    async fn answering(answer: &'static [u8]) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_delivery_client_reads_status_headers_and_an_excerpt() {
        let addr =
            answering(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 10\r\n\r\n0123456789")
                .await;
        let client = DeliveryClient::new(Policy::AllowPrivate, Duration::from_secs(5), 4);
        let uri: Uri = format!("http://{addr}/hook").parse().expect("uri");
        let answer = client
            .post(uri, HeaderMap::new(), Bytes::from_static(b"{}"), 4)
            .await
            .expect("an answer");
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers["retry-after"], "7");
        assert_eq!(answer.excerpt, b"0123", "at most the limit is kept");
    }

    #[tokio::test]
    async fn the_delivery_client_refuses_names_that_resolve_inward_outside_dev_mode() {
        let addr = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let uri: Uri = format!("http://localhost:{}/hook", addr.port()).parse().expect("uri");
        let public = DeliveryClient::new(Policy::Public, Duration::from_secs(5), 4);
        match public.post(uri.clone(), HeaderMap::new(), Bytes::new(), 0).await {
            Err(SendError::Connect(why)) => assert!(why.contains("resolves to internal address"), "{why}"),
            other => panic!("expected a refused connection, got {other:?}"),
        }
        let dev = DeliveryClient::new(Policy::AllowPrivate, Duration::from_secs(5), 4);
        let answer = dev
            .post(uri, HeaderMap::new(), Bytes::new(), 0)
            .await
            .expect("dev mode reaches it");
        assert_eq!(answer.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_delivery_client_speaks_tls_to_https_urls_and_times_out() {
        // A server that answers in plain HTTP: the TLS handshake an https URL starts cannot succeed.
        let addr = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let client = DeliveryClient::new(Policy::AllowPrivate, Duration::from_secs(5), 4);
        let uri: Uri = format!("https://{addr}/hook").parse().expect("uri");
        assert!(matches!(
            client.post(uri, HeaderMap::new(), Bytes::new(), 0).await,
            Err(SendError::Connect(_))
        ));
        // A server that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let uri: Uri = format!("http://{}/hook", silent.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        let quick = DeliveryClient::new(Policy::AllowPrivate, Duration::from_millis(200), 4);
        assert_eq!(
            quick.post(uri, HeaderMap::new(), Bytes::new(), 0).await.unwrap_err(),
            SendError::Timeout
        );
    }
}
