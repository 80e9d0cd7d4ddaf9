//! Scale-out on PostgreSQL: several nodes on one database share the work, survive a node's death and the
//! database going away for a while. These tests need PostgreSQL (TEST_DATABASE_URL) and skip without it.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{eventually, Backend, Proxy, Receiver, TestApp};

fn postgres(test: &str) -> Option<String> {
    match Backend::postgres() {
        Some(Backend::Postgres(url)) => Some(url),
        _ => {
            eprintln!("SKIPPED cluster::{test}: set TEST_DATABASE_URL to run it");
            None
        }
    }
}

fn events(from: i64, n: i64) -> Value {
    json!((from..from + n)
        .map(|i| json!({"eventName": "webinar.created", "webinarKey": i, "organizerKey": 1001}))
        .collect::<Vec<_>>())
}

/// No delivery was attempted by two nodes at overlapping times, according to the attempt log.
async fn assert_no_overlapping_attempts(db_url: &str) {
    let pool = sqlx::PgPool::connect(db_url).await.unwrap();
    let rows: Vec<(i64, String, i64, i64)> = sqlx::query_as(
        "SELECT delivery_id, node, started_at, duration_ms FROM attempts ORDER BY delivery_id, started_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut by_delivery: HashMap<i64, Vec<(String, i64, i64)>> = HashMap::new();
    for (id, node, start, dur) in rows {
        by_delivery.entry(id).or_default().push((node, start, start + dur));
    }
    for (id, attempts) in by_delivery {
        for w in attempts.windows(2) {
            assert!(
                w[0].0 == w[1].0 || w[1].1 >= w[0].2,
                "delivery {id} was attempted by {} and {} at once",
                w[0].0,
                w[1].0
            );
        }
    }
}

#[tokio::test]
async fn two_nodes_share_ten_thousand_events() {
    let Some(url) = postgres("two_nodes_share_ten_thousand_events") else {
        return;
    };
    let a = TestApp::on(Backend::Postgres(url)).await;
    let b = a.join(|_| {}).await;
    let rx = Receiver::start().await;
    a.subscribe("webinar.created", &rx.url).await;
    let mut acknowledged = HashSet::new();
    for batch in 0..20 {
        let node = if batch % 2 == 0 { &a } else { &b };
        let out = node.publish(events(batch * 500, 500)).await;
        for e in out["events"].as_array().unwrap() {
            assert_eq!(e["deliveries"], 1);
            acknowledged.insert(e["eventKey"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(acknowledged.len(), 10_000);
    eventually("10,000 callbacks", Duration::from_secs(120), || async {
        rx.count() >= 10_000
    })
    .await;
    let seen: HashSet<String> = rx
        .received()
        .iter()
        .map(|r| r.json()["eventKey"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, acknowledged);
    assert_no_overlapping_attempts(&a.db_url).await;
}

const BIN: &str = env!("CARGO_BIN_EXE_g2w-webhooks");

fn node(db: &str, port: u16) -> Child {
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
            "cluster-admin",
            "--lease",
            "3s",
            "--attempt-timeout",
            "1s",
        ])
        .args([
            "--max-in-flight",
            "32",
            "--poll-interval",
            "200ms",
            "--retry-schedule",
            "100ms,200ms,500ms,1s",
        ])
        .env("G2W_SECRETS_KEYS", crate::support::TEST_KEYS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a node")
}

#[tokio::test]
async fn a_node_killed_mid_run_loses_nothing() {
    let Some(url) = postgres("a_node_killed_mid_run_loses_nothing") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Backend::Postgres(url).fresh_url(dir.path()).await;
    let http = reqwest::Client::new();
    let rx = Receiver::start().await;
    rx.respond(|_| (200, vec![], Duration::from_millis(20)));
    let ports = [crate::support::free_port(), crate::support::free_port()];
    let mut nodes: Vec<Child> = ports.iter().map(|p| node(&db, *p)).collect();
    for p in ports {
        eventually("node ready", Duration::from_secs(20), || async {
            http.get(format!("http://127.0.0.1:{p}/readyz"))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
        .await;
    }
    let store = g2w_webhooks::store::connect(
        &db,
        2,
        g2w_webhooks::config::Durability::Full,
        crate::support::test_keyring(),
    )
    .await
    .unwrap();
    let token = g2w_webhooks::issue_token(&store, "cluster", 1001).await.unwrap();
    let api = format!("http://127.0.0.1:{}/G2W/rest/v2", ports[0]);
    crate::support::subscribe_over_http(&http, &api, &token, "webinar.created", &rx.url).await;

    let mut acknowledged = HashSet::new();
    for batch in 0..10 {
        let port = ports[batch % 2];
        let res = http
            .post(format!("http://127.0.0.1:{port}/admin/v1/events"))
            .bearer_auth("cluster-admin")
            .json(&events(batch as i64 * 200, 200))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        for e in res.json::<Value>().await.unwrap()["events"].as_array().unwrap() {
            acknowledged.insert(e["eventKey"].as_str().unwrap().to_string());
        }
    }
    eventually("some deliveries", Duration::from_secs(20), || async {
        rx.count() >= 100
    })
    .await;
    nodes[0].kill().expect("SIGKILL");
    nodes[0].wait().unwrap();
    eventually("every acknowledged event", Duration::from_secs(120), || async {
        let seen: HashSet<String> = rx
            .received()
            .iter()
            .map(|r| r.json()["eventKey"].as_str().unwrap().to_string())
            .collect();
        acknowledged.is_subset(&seen)
    })
    .await;
    let duplicates = rx.count() - acknowledged.len();
    assert!(
        duplicates <= 2 * 32,
        "duplicates ({duplicates}) bounded by the attempts sent and not yet recorded at the kill"
    );
    assert_no_overlapping_attempts(&db).await;
    nodes[1].kill().ok();
    nodes[1].wait().ok();
}

#[tokio::test]
async fn a_node_recovers_when_its_database_returns() {
    let Some(url) = postgres("a_node_recovers_when_its_database_returns") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Backend::Postgres(url.clone()).fresh_url(dir.path()).await;
    let target = {
        let u = reqwest::Url::parse(&url).unwrap();
        format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432))
    };
    let proxy = Proxy::start(target.clone()).await;
    let proxied = db.replacen(&target, &format!("127.0.0.1:{}", proxy.port), 1);
    let app = TestApp::start_on_url(proxied, dir).await;
    let rx = Receiver::start().await;
    app.subscribe("webinar.created", &rx.url).await;
    app.publish(events(0, 50)).await;
    rx.wait_for(50, Duration::from_secs(10)).await;

    proxy.down();
    eventually("readyz 503", Duration::from_secs(10), || async {
        app.http
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .map(|r| r.status() == 503)
            .unwrap_or(false)
    })
    .await;
    let res = app.admin(Method::POST, "/events", Some(events(50, 1))).await;
    assert_eq!(
        res.status(),
        503,
        "publishing while the database is away is refused, not half-done"
    );
    // The answers say what to do, never the driver's words.
    let ready = app.http.get(format!("{}/readyz", app.base)).send().await.unwrap();
    for body in [res.json::<Value>().await.unwrap(), ready.json::<Value>().await.unwrap()] {
        assert_eq!(
            body["description"], "the service is unavailable for a moment (its database); try again",
            "{body}"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.up();
    eventually("readyz 200", Duration::from_secs(20), || async {
        app.http
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    app.publish(events(100, 50)).await;
    rx.wait_for(100, Duration::from_secs(20)).await;
    let keys: HashSet<i64> = rx
        .received()
        .iter()
        .map(|r| r.json()["webinarKey"].as_i64().unwrap())
        .collect();
    assert!((0..50).chain(100..150).all(|k| keys.contains(&k)));
}

/// An operator asks one node to retry a delivery while another node's attempt of it waits for the receiver: the
/// delivery is not taken beside that attempt, and once the attempt ends it is sent again at once (its node tells
/// the others), not at a worker's next poll.
#[tokio::test]
async fn a_retry_asked_of_another_node_mid_attempt_follows_that_attempt() {
    let Some(url) = postgres("a_retry_asked_of_another_node_mid_attempt_follows_that_attempt") else {
        return;
    };
    let slow_poll = |a: &mut g2w_webhooks::config::ServeArgs| a.poll_interval = Duration::from_secs(60);
    let a = TestApp::on_with(Backend::Postgres(url), slow_poll).await;
    let b = a.join(slow_poll).await;
    let rx = Receiver::start().await;
    rx.answer_first_after(Duration::from_millis(800));
    a.subscribe("webinar.created", &rx.url).await;
    a.publish(events(1, 1)).await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    let id = b.deliveries("limit=1").await[0]["id"].as_i64().unwrap();
    assert_eq!(
        b.admin(Method::POST, &format!("/deliveries/{id}/retry"), None)
            .await
            .status(),
        202
    );
    let got = rx.wait_for(2, Duration::from_secs(10)).await;
    let apart = got[1].at.duration_since(got[0].at);
    assert!(
        apart >= Duration::from_millis(800) && apart < Duration::from_secs(5),
        "sent again once the first attempt ended, well before a poll: {apart:?} apart"
    );
    eventually("both attempts logged", Duration::from_secs(10), || async {
        a.delivery(id).await["attemptLog"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let mut numbers: Vec<i64> = a.delivery(id).await["attemptLog"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["number"].as_i64().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2]);
    assert_no_overlapping_attempts(&a.db_url).await;
}

/// Retention on several nodes: while one node holds the schema's retention lock, another's pass stands aside
/// (two passes splitting one event's deliveries would each leave the event behind); then it prunes.
#[tokio::test]
async fn one_node_at_a_time_prunes() {
    let Some(base) = postgres("one_node_at_a_time_prunes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Postgres(base).fresh_url(dir.path()).await;
    let app = TestApp::start_on_url(url.clone(), dir).await;
    let rx = Receiver::start().await;
    app.subscribe("webinar.created", &rx.url).await;
    app.publish(events(1, 3)).await;
    rx.wait_for(3, Duration::from_secs(10)).await;
    eventually("all delivered", Duration::from_secs(10), || async {
        app.deliveries("state=delivered").await.len() == 3
    })
    .await;

    let store = g2w_webhooks::store::connect(
        &url,
        2,
        g2w_webhooks::config::Durability::Full,
        crate::support::test_keyring(),
    )
    .await
    .unwrap();
    let later = g2w_webhooks::domain::now_ms() + 1000;
    let other = sqlx::PgPool::connect(&url).await.unwrap();
    let mut held = other.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .bind(g2w_webhooks::store::postgres::RETENTION_LOCK)
        .execute(&mut *held)
        .await
        .unwrap();
    assert_eq!(store.prune(later, 1000).await.unwrap().deliveries, 0);
    held.commit().await.unwrap();
    // The node's own retention check (once a minute) may hold the lock for a moment too.
    let mut pruned = (0, 0, 0);
    for _ in 0..100 {
        let p = store.prune(later, 1000).await.unwrap();
        pruned = (pruned.0 + p.deliveries, pruned.1 + p.attempts, pruned.2 + p.events);
        if pruned.0 == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pruned, (3, 3, 3));
    assert!(app.deliveries("").await.is_empty());
}

/// A claim writes its leases in place: the deliveries table leaves each row room on its page for the leased
/// version, so claiming a backlog adds no index entries (a HOT update). Packed to 70%, a claim of the
/// consecutive rows of a page found room for fewer than half of them.
#[tokio::test]
async fn claims_lease_deliveries_in_place() {
    let Some(url) = postgres("claims_lease_deliveries_in_place") else {
        return;
    };
    const EVENTS: i64 = 1_000;
    // A node without workers commits every delivery unleased; the worker that joins claims them all.
    let publisher = TestApp::on_with(Backend::Postgres(url), |a| a.no_worker = true).await;
    let rx = Receiver::start().await;
    publisher.subscribe("webinar.created", &rx.url).await;
    publisher.publish(events(0, EVENTS)).await;
    let worker = publisher.join(|_| {}).await;
    rx.wait_for(EVENTS as usize, Duration::from_secs(60)).await;

    // Each delivery is updated twice: its claim (the lease) and its result (a new state, never in place).
    let pool = sqlx::PgPool::connect(&publisher.db_url).await.unwrap();
    let updates = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'deliveries'::regclass",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    eventually("the updates counted", Duration::from_secs(30), || async {
        updates().await.0 >= 2 * EVENTS
    })
    .await;
    let (all, in_place) = updates().await;
    assert!(
        in_place * 5 >= EVENTS * 4,
        "{in_place} of {all} updates in place, for {EVENTS} claims"
    );
    worker.stop().await;
    publisher.stop().await;
}

/// With `sslmode=require` in the URL, PostgreSQL connections are encrypted (CI runs the PostgreSQL tests once
/// that way); without it they are plain where the server allows.
#[tokio::test]
async fn postgres_connections_use_tls_when_the_url_asks() {
    let Some(url) = postgres("postgres_connections_use_tls_when_the_url_asks") else {
        return;
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let pool = sqlx::PgPool::connect(&format!("{url}{sep}sslmode=require"))
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "sslmode=require gave a connection without TLS");
    // The service itself opens its store over TLS the same way.
    let dir = tempfile::tempdir().unwrap();
    let db = Backend::Postgres(format!("{url}{sep}sslmode=require"))
        .fresh_url(dir.path())
        .await;
    let app = TestApp::start_on_url(db, dir).await;
    assert_eq!(
        app.http
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
