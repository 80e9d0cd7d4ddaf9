//! SIGKILL while deliveries are in flight: after a restart on the same database every acknowledged event arrives.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{eventually, Receiver};

const BIN: &str = env!("CARGO_BIN_EXE_g2w-webhooks");

fn start(db: &str, port: u16) -> Child {
    Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--database-url",
            db,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--admin-token",
            "crash-admin",
            "--retry-schedule",
            "50ms,50ms,100ms,200ms,500ms,1s",
        ])
        .args(["--max-in-flight", "32", "--poll-interval", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server")
}

async fn ready(http: &reqwest::Client, base: &str) {
    eventually("server ready", Duration::from_secs(15), || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
}

#[tokio::test]
async fn sigkill_mid_delivery_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("crash.db").display());
    let out = Command::new(BIN)
        .args([
            "token",
            "create",
            "--app",
            "crash",
            "--organizer",
            "42",
            "--database-url",
            &db,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let rx = Receiver::start().await;
    // Slow answers keep many attempts in flight when the process dies.
    rx.respond(|_| (200, vec![], Duration::from_millis(100)));
    let port = crate::support::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut server = start(&db, port);
    ready(&http, &base).await;

    let api = format!("{base}/G2W/rest/v2");
    crate::support::subscribe_over_http(&http, &api, &token, "webinar.created", &rx.url).await;

    let mut acknowledged = HashSet::new();
    for batch in 0..4 {
        let events: Vec<Value> = (0..100)
            .map(|i| json!({"eventName": "webinar.created", "webinarKey": batch * 100 + i, "organizerKey": 42}))
            .collect();
        let res = http
            .post(format!("{base}/admin/v1/events"))
            .bearer_auth("crash-admin")
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        let v: Value = res.json().await.unwrap();
        for e in v["events"].as_array().unwrap() {
            assert_eq!(e["deliveries"], 1);
            acknowledged.insert(e["eventKey"].as_str().unwrap().to_string());
        }
    }
    // Let some deliveries complete and others be in flight, then kill without warning.
    eventually("some deliveries", Duration::from_secs(10), || async {
        rx.count() >= 40
    })
    .await;
    server.kill().expect("SIGKILL");
    server.wait().unwrap();
    let before_restart = rx.count();
    assert!(before_restart < acknowledged.len(), "the kill happened mid-delivery");

    let mut server = start(&db, port);
    ready(&http, &base).await;
    eventually("every acknowledged event", Duration::from_secs(60), || async {
        let seen: HashSet<String> = rx
            .received()
            .iter()
            .map(|r| r.json()["eventKey"].as_str().unwrap().to_string())
            .collect();
        acknowledged.is_subset(&seen)
    })
    .await;
    let total = rx.count();
    let duplicates = total - acknowledged.len();
    assert!(
        duplicates <= 2 * 32,
        "duplicates ({duplicates}) are bounded by the attempts sent and not yet recorded at the kill"
    );
    server.kill().ok();
    server.wait().ok();
}
