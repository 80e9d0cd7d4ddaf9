//! Test support: a server on a real socket over a fresh database, and a receiver that records callbacks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use g2w_webhooks::config::ServeArgs;
use g2w_webhooks::store::{self, DynStore};
use g2w_webhooks::{run, Role};
use reqwest::{Method, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "test-admin-token";
/// The keyring PostgreSQL test servers seal secrets with (SQLite ones use the key file beside their database).
pub const TEST_KEYS: &str = "test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The keyring of a test database: `TEST_KEYS`.
pub fn test_keyring() -> std::sync::Arc<g2w_webhooks::store::sealed::Keyring> {
    std::sync::Arc::new(g2w_webhooks::store::sealed::Keyring::parse(TEST_KEYS).expect("test keys"))
}

pub struct TestApp {
    pub base: String,
    pub token: String,
    pub store: DynStore,
    pub http: reqwest::Client,
    pub db_url: String,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dir: Option<tempfile::TempDir>,
}

/// The database a test runs on. PostgreSQL tests run when `TEST_DATABASE_URL` is set, each in a schema of its own.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

impl Backend {
    /// PostgreSQL when `TEST_DATABASE_URL` is set. Under CI (`CI` set) it must be: a PostgreSQL test fails
    /// rather than pass having run nothing.
    pub fn postgres() -> Option<Backend> {
        let url = std::env::var("TEST_DATABASE_URL").ok().filter(|u| !u.is_empty());
        if url.is_none() && std::env::var_os("CI").is_some() {
            panic!("CI is set and TEST_DATABASE_URL is not: the PostgreSQL tests must run in CI");
        }
        url.map(Backend::Postgres)
    }

    /// A fresh, empty database URL for one test.
    pub async fn fresh_url(&self, dir: &std::path::Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}", dir.join("test.db").display()),
            Backend::Postgres(base) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs();
                let schema = format!("t_{now}_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(base).await.expect("connect to TEST_DATABASE_URL");
                drop_old_schemas(&pool, now).await;
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&pool)
                    .await
                    .expect("create schema");
                pool.close().await;
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}options[search_path]={schema}")
            }
        }
    }
}

/// Test schemas outlive their tests (a test's database stays for a look after a failure); once per test process,
/// those of runs over an hour old go, with those named before schemas carried their creation time.
async fn drop_old_schemas(pool: &sqlx::PgPool, now: u64) {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname ~ '^t_([0-9]+_)?[0-9a-f]{32}$'")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    for name in names {
        let created = name.split('_').nth(1).and_then(|t| t.parse::<u64>().ok());
        if created.is_none_or(|t| t + 3600 < now) {
            // Another test process may be dropping it too.
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(pool)
                .await;
        }
    }
}

/// Runs each named `async fn(Backend)` as two tests, on SQLite and on PostgreSQL; the PostgreSQL one prints a
/// skip line when `TEST_DATABASE_URL` is unset.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name($crate::support::Backend::Sqlite).await
                }

                #[tokio::test]
                async fn postgres() {
                    match $crate::support::Backend::postgres() {
                        Some(b) => super::$name(b).await,
                        None => eprintln!("SKIPPED {}::postgres: set TEST_DATABASE_URL to run it", stringify!($name)),
                    }
                }
            }
        )*
    };
}

impl TestApp {
    pub async fn on(backend: Backend) -> Self {
        Self::on_with(backend, |_| {}).await
    }

    pub async fn on_with(backend: Backend, configure: impl FnOnce(&mut ServeArgs)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let db_url = backend.fresh_url(dir.path()).await;
        Self::start(db_url, dir, configure).await
    }

    /// A node on a database URL prepared by the caller.
    pub async fn start_on_url(db_url: String, dir: tempfile::TempDir) -> Self {
        Self::start(db_url, dir, |_| {}).await
    }

    /// Another node on the same database (PostgreSQL scale-out).
    pub async fn join(&self, configure: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::start(self.db_url.clone(), tempfile::tempdir().expect("temp dir"), configure).await
    }

    async fn start(db_url: String, dir: tempfile::TempDir, configure: impl FnOnce(&mut ServeArgs)) -> Self {
        let mut args = ServeArgs::for_database(&db_url);
        args.admin_token = Some(ADMIN.into());
        if !db_url.starts_with("sqlite:") {
            args.db.secrets_keys = Some(TEST_KEYS.into());
        }
        args.retry_schedule = g2w_webhooks::config::parse_schedule("20ms,20ms,20ms").expect("schedule");
        args.attempt_timeout = Duration::from_secs(2);
        args.poll_interval = Duration::from_millis(50);
        configure(&mut args);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let role = Role::serve(&args);
        let handle = tokio::spawn(run(args, role, listener, shutdown.clone()));
        let http = reqwest::Client::new();
        let base = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "server did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The server's own keyring: the key file beside a SQLite database, TEST_KEYS on PostgreSQL.
        let spec = (!db_url.starts_with("sqlite:")).then_some(TEST_KEYS);
        let ring = std::sync::Arc::new(store::keyring_for(&db_url, spec).expect("keyring"));
        let store = store::connect(&db_url, 2, g2w_webhooks::config::Durability::Normal, ring)
            .await
            .expect("store");
        let token = g2w_webhooks::issue_token(&store, "app-a", 1001).await.expect("token");
        Self {
            base,
            token,
            store,
            http,
            db_url,
            shutdown,
            handle: Some(handle),
            dir: Some(dir),
        }
    }

    pub async fn token_for(&self, app: &str, organizer: i64) -> String {
        g2w_webhooks::issue_token(&self.store, app, organizer)
            .await
            .expect("token")
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/G2W/rest/v2{path}", self.base)
    }

    /// A JSON request with the default token.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Response {
        self.call_as(&self.token, method, path, body).await
    }

    pub async fn call_as(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> Response {
        let mut req = self.http.request(method, self.api(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("request")
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Response {
        let mut req = self
            .http
            .request(method, format!("{}/admin/v1{path}", self.base))
            .bearer_auth(ADMIN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("request")
    }

    /// Creates an ACTIVE webhook and an ACTIVE subscription of the default tenant; returns (webhookKey, subscriptionKey).
    pub async fn subscribe(&self, event: &str, url: &str) -> (String, String) {
        let res = self
            .call(Method::POST, "/webhooks", Some(serde_json::json!([{"product": "g2w", "eventName": event, "eventVersion": "1.0.0", "callbackUrl": url}])))
            .await;
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
        let body: Value = res.json().await.expect("json");
        let wk = body["_embedded"]["webhooks"][0]["webhookKey"]
            .as_str()
            .expect("key")
            .to_string();
        let res = self
            .call(
                Method::PUT,
                "/webhooks",
                Some(serde_json::json!([{"webhookKey": wk, "state": "ACTIVE"}])),
            )
            .await;
        assert_eq!(res.status(), 204);
        let res = self
            .call(
                Method::POST,
                "/userSubscriptions",
                Some(serde_json::json!([{"webhookKey": wk}])),
            )
            .await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.expect("json");
        let sk = body["_embedded"]["userSubscriptions"][0]["userSubscriptionKey"]
            .as_str()
            .expect("key")
            .to_string();
        (wk, sk)
    }

    pub async fn publish(&self, events: Value) -> Value {
        let res = self.admin(Method::POST, "/events", Some(events)).await;
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap_or_default());
        res.json().await.expect("json")
    }

    /// A new application secret key (`POST /webhooks/secretkey`, optionally with a body); its value.
    pub async fn new_secret_key(&self, body: Option<Value>) -> String {
        let v: Value = self
            .call(Method::POST, "/webhooks/secretkey", body)
            .await
            .json()
            .await
            .expect("json");
        v["value"].as_str().expect("value").to_string()
    }

    /// The JSON answer to a GET with the default token.
    pub async fn get_json(&self, path: &str) -> Value {
        self.call(Method::GET, path, None).await.json().await.expect("json")
    }

    /// A user subscription of the default tenant, as `GET /userSubscriptions/{key}` answers it.
    pub async fn subscription(&self, key: &str) -> Value {
        let res = self.call(Method::GET, &format!("/userSubscriptions/{key}"), None).await;
        assert_eq!(res.status(), 200);
        res.json().await.expect("json")
    }

    /// The id of the newest delivery, once there is one.
    pub async fn newest_delivery_id(&self) -> i64 {
        eventually("a delivery", Duration::from_secs(10), || async {
            !self.deliveries("").await.is_empty()
        })
        .await;
        self.deliveries("").await[0]["id"].as_i64().expect("id")
    }

    /// Waits until delivery `id` is in `state`; returns it.
    pub async fn wait_state(&self, id: i64, state: &str) -> Value {
        eventually(state, Duration::from_secs(10), || async {
            self.delivery(id).await["state"] == state
        })
        .await;
        self.delivery(id).await
    }

    pub async fn delivery(&self, id: i64) -> Value {
        self.admin(Method::GET, &format!("/deliveries/{id}"), None)
            .await
            .json()
            .await
            .expect("json")
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let res = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics");
        res.text().await.expect("metrics text")
    }

    pub async fn deliveries(&self, query: &str) -> Vec<Value> {
        let v: Value = self
            .admin(Method::GET, &format!("/deliveries?{query}"), None)
            .await
            .json()
            .await
            .expect("json");
        v["deliveries"].as_array().cloned().unwrap_or_default()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("join").expect("clean stop");
        }
    }

    /// Stops the node and hands back its database (URL and the directory holding a SQLite file), for a node
    /// started on it later.
    pub async fn stop_keeping_data(mut self) -> (String, tempfile::TempDir) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("join").expect("clean stop");
        }
        (self.db_url.clone(), self.dir.take().expect("the node's directory"))
    }

    /// A node on a database URL prepared by the caller, configured.
    pub async fn start_on_url_with(
        db_url: String,
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut ServeArgs),
    ) -> Self {
        Self::start(db_url, dir, configure).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` until it holds or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A callback as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
}

/// What the receiver answers to the n-th POST (0-based): status, extra headers, delay.
pub type Behaviour = Arc<dyn Fn(usize) -> (u16, Vec<(&'static str, String)>, Duration) + Send + Sync>;

#[derive(Clone)]
struct ReceiverState {
    received: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    get_status: Arc<Mutex<u16>>,
    get_delay: Arc<Mutex<Duration>>,
}

pub struct Receiver {
    pub url: String,
    pub addr: SocketAddr,
    state: ReceiverState,
    shutdown: CancellationToken,
}

impl Receiver {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> Self {
        let state = ReceiverState {
            received: Arc::default(),
            behaviour: Arc::new(Mutex::new(Arc::new(|_| (200, vec![], Duration::ZERO)))),
            get_status: Arc::new(Mutex::new(200)),
            get_delay: Arc::new(Mutex::new(Duration::ZERO)),
        };
        let app = axum::Router::new().fallback(any(handle)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Self {
            url: format!("http://{addr}/hook"),
            addr,
            state,
            shutdown,
        }
    }

    pub fn respond(&self, b: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, Duration) + Send + Sync + 'static) {
        *self.state.behaviour.lock().expect("lock") = Arc::new(b);
    }

    /// Answers 200 to every callback; the first answer comes only after `wait`.
    pub fn answer_first_after(&self, wait: Duration) {
        self.respond(move |n| (200, vec![], if n == 0 { wait } else { Duration::ZERO }));
    }

    /// Answers the validation GET only after `wait`.
    pub fn answer_get_after(&self, wait: Duration) {
        *self.state.get_delay.lock().expect("lock") = wait;
    }

    pub fn answer_get(&self, status: u16) {
        *self.state.get_status.lock().expect("lock") = status;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.state.received.lock().expect("lock").len()
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        eventually(&format!("{n} callbacks"), timeout, || async { self.count() >= n }).await;
        self.received()
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// After the state that should stop callbacks was observed: asserts that no more than `n` arrive within
    /// `window` (chosen to hold at least two retries).
    pub async fn stays_at(&self, n: usize, window: Duration) {
        let deadline = Instant::now() + window;
        while Instant::now() < deadline {
            assert!(
                self.count() <= n,
                "a callback arrived after it should have stopped: {} > {n}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.count(), n, "callbacks arrived after they should have stopped");
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn handle(
    State(s): State<ReceiverState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    if method == axum::http::Method::GET {
        let status = *s.get_status.lock().expect("lock");
        let wait = *s.get_delay.lock().expect("lock");
        tokio::time::sleep(wait).await;
        return StatusCode::from_u16(status).unwrap_or(StatusCode::OK).into_response();
    }
    let n = {
        let mut r = s.received.lock().expect("lock");
        r.push(Received {
            path_and_query: uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            headers,
            body,
            at: Instant::now(),
        });
        r.len() - 1
    };
    let behaviour = s.behaviour.lock().expect("lock").clone();
    let (status, extra, delay) = behaviour(n);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut res = (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), "ok").into_response();
    for (k, v) in extra {
        res.headers_mut().insert(k, v.parse().expect("header value"));
    }
    res
}

/// HMAC-SHA256 written out from its definition (RFC 2104), independent of the service's signing code.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(message).finalize();
    Sha256::new().chain_update(&opad).chain_update(inner).finalize().into()
}

/// The GoTo signature a receiver expects, computed independently.
pub fn expected_signature(key: &str, timestamp: &str, body: &[u8]) -> String {
    use base64::Engine;
    let mut msg = timestamp.as_bytes().to_vec();
    msg.push(b':');
    msg.extend_from_slice(body);
    base64::engine::general_purpose::STANDARD.encode(hmac_sha256(key.as_bytes(), &msg))
}

/// Checks a received callback's signature against `key` the way a receiver would.
pub fn signed_with(r: &Received, key: &str) -> bool {
    match (
        r.header("x-webhook-signature"),
        r.header("x-webhook-signature-timestamp"),
    ) {
        (Some(sig), Some(ts)) => expected_signature(key, &ts, &r.body) == sig,
        _ => false,
    }
}

/// A TCP proxy whose link can be cut and restored, to take a database away from a node for a while.
pub struct Proxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (u, c) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !u.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().expect("lock").push(task.abort_handle());
            }
        });
        Self { port, up, conns }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Creates, activates and subscribes a webhook through the API of a node run as a separate process.
pub async fn subscribe_over_http(http: &reqwest::Client, api: &str, token: &str, event: &str, url: &str) {
    let res = http
        .post(format!("{api}/webhooks"))
        .bearer_auth(token)
        .json(&serde_json::json!([{"product": "g2w", "eventName": event, "eventVersion": "1.0.0", "callbackUrl": url}]))
        .send()
        .await
        .expect("create webhook");
    let body: Value = res.json().await.expect("json");
    let wk = body["_embedded"]["webhooks"][0]["webhookKey"]
        .as_str()
        .expect("webhook key")
        .to_string();
    let res = http
        .put(format!("{api}/webhooks"))
        .bearer_auth(token)
        .json(&serde_json::json!([{"webhookKey": wk, "state": "ACTIVE"}]))
        .send()
        .await
        .expect("activate");
    assert_eq!(res.status(), 204);
    let res = http
        .post(format!("{api}/userSubscriptions"))
        .bearer_auth(token)
        .json(&serde_json::json!([{"webhookKey": wk}]))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(res.status(), 200);
}

/// A port nothing listens on right now, for a server started as a separate process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
