//! Callback URLs: the address rules, HTTP clients that cannot be steered to internal addresses (one sends
//! deliveries, one the validation GET that every new or changed callback URL must pass).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, USER_AGENT};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use crate::error::Error;

/// What callback URLs may point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Production: https only, public addresses only.
    Public,
    /// Dev mode: http and private addresses allowed.
    AllowPrivate,
}

/// True for addresses a callback must never reach outside dev mode.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (CGNAT)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 can map to internal IPv4
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0)
            // IPv4-compatible
        }
    }
}

/// Parses a callback URL and applies the scheme and literal-address rules. Names are checked when resolved.
pub fn check_url(raw: &str, policy: Policy) -> Result<Url, Error> {
    let bad = |why: String| Error::InvalidCallbackUrl(format!("callbackUrl {raw}: {why}"));
    let url = Url::parse(raw).map_err(|e| bad(format!("not an absolute URL ({e})")))?;
    match (url.scheme(), policy) {
        ("https", _) | ("http", Policy::AllowPrivate) => {}
        ("http", Policy::Public) => return Err(bad("must use https".into())),
        (other, _) => return Err(bad(format!("scheme `{other}` is not http(s)"))),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials".into()));
    }
    let host = url.host().ok_or_else(|| bad("has no host".into()))?;
    if policy == Policy::Public {
        let ip = match host {
            url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            url::Host::Domain(_) => None,
        };
        if let Some(ip) = ip.filter(|ip| is_internal(*ip)) {
            return Err(bad(format!(
                "address {ip} is internal (loopback, private, link-local or reserved)"
            )));
        }
    }
    Ok(url)
}

/// How long a name has to resolve (the validation GET's and every delivery's).
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Look-ups running at once. The system resolver blocks a thread for each and cannot be cancelled; a slow name
/// server holds at most this many threads, and further look-ups wait (within their timeout) rather than take more.
const DNS_AT_ONCE: usize = 32;

/// Resolves `host` with the system resolver (so `/etc/hosts` and `/etc/resolv.conf` apply), within
/// `DNS_TIMEOUT` and at most `DNS_AT_ONCE` at a time.
pub async fn lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    static AT_ONCE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DNS_AT_ONCE);
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, format!("resolving {host} timed out"));
    let host_port = format!("{host}:{port}");
    let lookup = async {
        let permit = AT_ONCE
            .acquire()
            .await
            .map_err(|_| std::io::Error::other("the resolver is closed"))?;
        // The permit goes with the blocking look-up, so a look-up abandoned at its timeout still counts until the
        // system resolver gives its thread back.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            std::net::ToSocketAddrs::to_socket_addrs(&host_port).map(Iterator::collect::<Vec<_>>)
        })
        .await
        .map_err(|e| std::io::Error::other(format!("resolving: {e}")))?
    };
    tokio::time::timeout(DNS_TIMEOUT, lookup)
        .await
        .map_err(|_| timed_out())?
}

/// Resolves a host name; under `Policy::Public` refuses to hand back internal addresses, so neither a callback
/// URL nor a DNS answer that changes after validation can reach inside the network.
async fn resolve(host: &str, policy: Policy) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = lookup(host, 0).await?;
    if policy == Policy::AllowPrivate {
        return Ok(addrs);
    }
    let public: Vec<SocketAddr> = addrs.iter().copied().filter(|a| !is_internal(a.ip())).collect();
    if public.is_empty() {
        let shown = addrs
            .first()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "nothing".into());
        return Err(std::io::Error::other(format!(
            "{host} resolves to internal address {shown}"
        )));
    }
    Ok(public)
}

/// The validation GET's resolver (reqwest).
#[derive(Debug, Clone, Copy)]
struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let addrs = resolve(name.as_str(), Policy::Public).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The delivery client's resolver (hyper's connector), checked on every new connection.
#[derive(Debug, Clone, Copy)]
pub struct CallbackResolver(Policy);

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for CallbackResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let policy = self.0;
        Box::pin(async move { resolve(name.as_str(), policy).await.map(Vec::into_iter) })
    }
}

/// What both clients say they are.
const USER_AGENT_VALUE: &str = concat!("g2w-webhooks/", env!("CARGO_PKG_VERSION"));

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

/// Builds the HTTP client for validation GETs: no redirects, keep-alive pools per origin.
pub fn client(policy: Policy, timeout: Duration, max_idle_per_host: usize) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .user_agent(USER_AGENT_VALUE)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true);
    if policy == Policy::Public {
        b = b.dns_resolver(Arc::new(PublicOnlyResolver));
    }
    // Building fails only when the TLS backend cannot initialise, which is a broken install.
    b.build().expect("the HTTP client builds")
}

/// Checks a callback URL: address rules, then a GET that must answer 200 in time.
pub async fn validate(client: &reqwest::Client, raw: &str, policy: Policy) -> Result<(), Error> {
    let url = check_url(raw, policy)?;
    if policy == Policy::Public {
        if let Some(url::Host::Domain(host)) = url.host() {
            let port = url.port_or_known_default().unwrap_or(443);
            let addrs: Vec<SocketAddr> = lookup(host, port)
                .await
                .map_err(|e| Error::InvalidCallbackUrl(format!("callbackUrl {raw}: cannot resolve {host}: {e}")))?;
            if let Some(a) = addrs.iter().find(|a| is_internal(a.ip())) {
                return Err(Error::InvalidCallbackUrl(format!(
                    "callbackUrl {raw}: {host} resolves to internal address {}",
                    a.ip()
                )));
            }
        }
    }
    let res = client.get(url).send().await.map_err(|e| {
        let what = if e.is_timeout() {
            "did not answer the validation GET in time".to_string()
        } else if e.is_connect() {
            format!("the validation GET could not connect ({})", root_cause(&e))
        } else {
            format!("the validation GET failed ({})", root_cause(&e))
        };
        Error::InvalidCallbackUrl(format!("callbackUrl {raw}: {what}"))
    })?;
    if res.status() != reqwest::StatusCode::OK {
        return Err(Error::InvalidCallbackUrl(format!(
            "callbackUrl {raw}: the validation GET answered {}, expected 200",
            res.status().as_u16()
        )));
    }
    Ok(())
}

/// The innermost error message, which says what actually happened (refused, reset, DNS...).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
        ] {
            let ip: IpAddr = ip.parse().expect("valid ip");
            assert!(is_internal(ip), "{ip} should be internal");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            let ip: IpAddr = ip.parse().expect("valid ip");
            assert!(!is_internal(ip), "{ip} should be public");
        }
    }

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

    #[test]
    fn url_rules() {
        assert!(check_url("https://example.com/hook?a=1", Policy::Public).is_ok());
        assert!(check_url("http://example.com/hook", Policy::Public).is_err());
        assert!(check_url("http://127.0.0.1:9/hook", Policy::AllowPrivate).is_ok());
        assert!(check_url("https://[::ffff:127.0.0.1]/", Policy::Public).is_err());
        assert!(check_url("/relative", Policy::AllowPrivate).is_err());
        assert!(check_url("ftp://example.com/", Policy::AllowPrivate).is_err());
    }
}
