//! The receiver every scenario sends to (it records each event's arrival), and the ceiling: the same receiver
//! driven directly by the server's own delivery client.

use super::*;

/// What the receiver saw.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) count: AtomicU64,
    /// Arrival of each webinarKey (the publisher numbers events), for latency and completeness.
    pub(super) arrivals: Mutex<HashMap<i64, Instant>>,
    pub(super) last: Mutex<Option<Instant>>,
    pub(super) fail_every_third: AtomicBool,
    pub(super) record_arrivals: AtomicBool,
    /// Callbacks answered 2xx for an event that had already arrived (at-least-once allows them; a healthy
    /// receiver should see none).
    pub(super) duplicates: AtomicU64,
}

#[derive(serde::Deserialize)]
pub(super) struct KeyOnly {
    #[serde(rename = "webinarKey")]
    pub(super) webinar_key: i64,
}

pub(super) async fn receive(State(seen): State<Arc<Seen>>, method: Method, body: Bytes) -> StatusCode {
    if method == Method::GET {
        return StatusCode::OK;
    }
    let n = seen.count.fetch_add(1, Ordering::Relaxed);
    if seen.fail_every_third.load(Ordering::Relaxed) && n % 3 == 2 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let now = Instant::now();
    if seen.record_arrivals.load(Ordering::Relaxed) {
        if let Ok(k) = serde_json::from_slice::<KeyOnly>(&body) {
            match seen.arrivals.lock().expect("lock").entry(k.webinar_key) {
                Entry::Vacant(v) => {
                    v.insert(now);
                }
                Entry::Occupied(_) => {
                    seen.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    *seen.last.lock().expect("lock") = Some(now);
    StatusCode::OK
}

pub(super) async fn start_receiver(seen: Arc<Seen>) -> anyhow::Result<String> {
    let app = axum::Router::new().fallback(receive).with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}/hook"))
}

/// A receiver that records every event's arrival, and its URL.
pub(super) async fn recording_receiver() -> anyhow::Result<(Arc<Seen>, String)> {
    let seen = Arc::new(Seen::default());
    seen.record_arrivals.store(true, Ordering::Relaxed);
    let url = start_receiver(seen.clone()).await?;
    Ok((seen, url))
}

pub(super) fn client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .build()
        .expect("client")
}

/// Headers of a JSON request body.
pub(super) fn json_headers() -> axum::http::HeaderMap {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
}

/// The ceiling: the receiver driven directly by the server's own delivery client (`outbound::DeliveryClient`,
/// the same connection pool, TLS stack and request path) at the same concurrency. The ceiling's requests per
/// second, and the CPU time per request it took (client and receiver together). The receiver does for each
/// request what it does in the scenarios (it records every event's arrival), and the bodies are events with
/// distinct keys, made before the clock starts.
pub(super) async fn ceiling(url: &str, requests: u64, concurrency: usize) -> anyhow::Result<(f64, f64)> {
    let http = DeliveryClient::new(Policy::AllowPrivate, Duration::from_secs(30), concurrency);
    let uri: axum::http::Uri = url.parse()?;
    let bodies: Arc<Vec<Bytes>> = Arc::new((0..requests as i64).map(|k| Bytes::from(event(k, 1))).collect());
    let cpu = cpu_secs("self");
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, uri, bodies, next) = (http.clone(), uri.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i as usize) else { break };
                let _ = http.post(uri.clone(), json_headers(), body.clone(), 1024).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok((
        requests as f64 / start.elapsed().as_secs_f64(),
        (cpu_secs("self") - cpu) / requests as f64 * 1e6,
    ))
}

/// The ceiling against a receiver of its own: requests per second, and CPU per request in us.
pub(super) async fn fresh_ceiling(requests: u64, concurrency: usize) -> anyhow::Result<(f64, f64)> {
    let (_, url) = recording_receiver().await?;
    ceiling(&url, requests, concurrency).await
}
