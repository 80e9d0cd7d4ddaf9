//! The server holds against slow and oversized input: slow headers close the connection, a slow request gets
//! 408, management arrays and callback URLs have a bound, and `--dev` does not serve beyond loopback unasked.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Backend, Receiver, TestApp};

crate::on_both!(
    a_client_sending_headers_a_byte_at_a_time_is_cut_off,
    a_request_whose_body_trickles_in_gets_408,
    management_arrays_and_urls_are_bounded,
    webhooks_and_subscriptions_per_tenant_are_capped,
    a_slow_destination_takes_only_its_own_slots,
);

/// Opens a connection and writes `bytes` one at a time, `gap` apart: see `trickle_on`.
async fn trickle(addr: &str, bytes: &[u8], gap: Duration, give_up: Duration) -> Vec<u8> {
    let conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    trickle_on(conn, bytes, gap, give_up).await
}

async fn a_client_sending_headers_a_byte_at_a_time_is_cut_off(b: Backend) {
    let app = TestApp::on_with(b, |a| a.header_timeout = Duration::from_millis(500)).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    trickle(&addr, head, Duration::from_millis(100), Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    // The server still serves everyone else.
    assert_eq!(
        app.http
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

async fn a_request_whose_body_trickles_in_gets_408(b: Backend) {
    let app = TestApp::on_with(b, |a| a.request_timeout = Duration::from_millis(700)).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let head = format!(
        "POST /admin/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n",
        crate::support::ADMIN
    );
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let answer = trickle_on(
        conn,
        b"[{\"eventName\":",
        Duration::from_millis(100),
        Duration::from_secs(10),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("RequestTimeout"), "{text}");
    assert!(app.deliveries("").await.is_empty(), "nothing half-published");
}

/// Writes `bytes` one at a time, `gap` apart, until the server answers or closes the connection; returns what it
/// answered (nothing if it closed). Fails the test if the server still waits after `give_up`.
async fn trickle_on(mut conn: tokio::net::TcpStream, bytes: &[u8], gap: Duration, give_up: Duration) -> Vec<u8> {
    let started = Instant::now();
    for b in bytes.iter().cycle() {
        assert!(started.elapsed() < give_up, "the server kept waiting for the body");
        if conn.write_all(&[*b]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(gap, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => return buf[..n].to_vec(),
            Err(_) => {}
        }
    }
    Vec::new()
}

async fn management_arrays_and_urls_are_bounded(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let hook = |i: usize| json!({"product": "g2w", "eventName": "webinar.created", "eventVersion": "1.0.0", "callbackUrl": format!("{}/{i}", rx.url)});
    let too_many: Vec<Value> = (0..101).map(hook).collect();
    let res = app.call(Method::POST, "/webhooks", Some(json!(too_many))).await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert!(body["description"].as_str().unwrap().contains("at most 100"), "{body}");
    assert!(app.get_json("/webhooks?product=g2w").await["_embedded"]["webhooks"]
        .as_array()
        .unwrap()
        .is_empty());
    let keys: Vec<String> = (0..101).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let res = app.call(Method::DELETE, "/webhooks", Some(json!(keys))).await;
    assert_eq!(res.status(), 400);
    let long = format!("{}/{}", rx.url, "a".repeat(2100));
    let res = app.call(Method::POST, "/webhooks", Some(json!([{"product": "g2w", "eventName": "webinar.created", "eventVersion": "1.0.0", "callbackUrl": long}]))).await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert!(body["description"].as_str().unwrap().contains("2048"), "{body}");
    // A hundred distinct URLs are checked at once, not one after the other.
    let slow = Receiver::start().await;
    slow.answer_get_after(Duration::from_millis(300));
    let hundred: Vec<Value> = (0..100)
        .map(|i| json!({"product": "g2w", "eventName": "webinar.created", "eventVersion": "1.0.0", "callbackUrl": format!("{}/{i}", slow.url)}))
        .collect();
    let started = Instant::now();
    let res = app.call(Method::POST, "/webhooks", Some(json!(hundred))).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "100 checks of 300 ms took {took:?}");
}

/// `--dev` on an address that is not loopback refuses to start unless `--dev-allow-remote` says so.
#[tokio::test]
async fn dev_mode_does_not_serve_beyond_loopback_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let args = g2w_webhooks::config::ServeArgs::for_database(&url);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let role = g2w_webhooks::Role::serve(&args);
    let stop = tokio_util::sync::CancellationToken::new();
    let err = g2w_webhooks::run(args, role, listener, stop)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("--dev-allow-remote"), "{err}");
}

async fn webhooks_and_subscriptions_per_tenant_are_capped(b: Backend) {
    let app = TestApp::on_with(b, |a| {
        a.max_webhooks_per_app = 2;
        a.max_subscriptions_per_organizer = 1;
    })
    .await;
    let rx = Receiver::start().await;
    let (wk, _) = app.subscribe("webinar.created", &rx.url).await;
    let res = app
        .call(Method::POST, "/userSubscriptions", Some(json!([{"webhookKey": wk}])))
        .await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["description"].as_str().unwrap().contains("most it may have, 1"),
        "{body}"
    );
    let hook = |i: usize| json!({"product": "g2w", "eventName": "webinar.changed", "eventVersion": "1.0.0", "callbackUrl": format!("{}/{i}", rx.url)});
    assert_eq!(
        app.call(Method::POST, "/webhooks", Some(json!([hook(1)])))
            .await
            .status(),
        200
    );
    let res = app.call(Method::POST, "/webhooks", Some(json!([hook(2)]))).await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["description"].as_str().unwrap().contains("most it may have, 2"),
        "{body}"
    );
    // Another application has room of its own.
    let other = app.token_for("app-b", 1001).await;
    let res = app
        .call_as(&other, Method::POST, "/webhooks", Some(json!([hook(3)])))
        .await;
    assert_eq!(res.status(), 200);
}

/// One slow destination takes at most its own slots (`--max-in-flight-per-destination`); its other deliveries
/// wait for them, and another destination's deliveries go out at once meanwhile.
async fn a_slow_destination_takes_only_its_own_slots(b: Backend) {
    let app = TestApp::on_with(b, |a| {
        a.max_in_flight = 8;
        a.max_in_flight_per_destination = 2;
    })
    .await;
    let (slow, fast) = (Receiver::start().await, Receiver::start().await);
    slow.respond(|_| (200, vec![], Duration::from_millis(1500)));
    app.subscribe("webinar.created", &slow.url).await;
    app.subscribe("webinar.changed", &fast.url).await;
    let events: Vec<Value> = (0..10)
        .map(|i| json!({"eventName": "webinar.created", "webinarKey": i, "organizerKey": 1001}))
        .collect();
    app.publish(json!(events)).await;
    slow.wait_for(2, Duration::from_secs(5)).await;
    let started = Instant::now();
    app.publish(json!({"eventName": "webinar.changed", "webinarKey": 99, "organizerKey": 1001}))
        .await;
    fast.wait_for(1, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the other destination waited {:?}",
        started.elapsed()
    );
    assert_eq!(slow.count(), 2, "two in flight to the slow destination, not eight");
    // All of them arrive in the end, two at a time, each with one attempt.
    slow.wait_for(10, Duration::from_secs(30)).await;
    crate::support::eventually("all delivered", Duration::from_secs(10), || async {
        app.deliveries("state=delivered&eventName=webinar.created").await.len() == 10
    })
    .await;
    for d in app.deliveries("eventName=webinar.created").await {
        assert_eq!(d["attempts"], 1, "{d}");
    }
}
