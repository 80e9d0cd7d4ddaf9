//! The receiver's side: `listen --subscribe --forward-to` and `verify`, run as a user would run them.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{eventually, signed_with, Backend, Receiver, TestApp};

const BIN: &str = env!("CARGO_BIN_EXE_g2w-webhooks");

#[tokio::test]
async fn listen_subscribes_verifies_forwards_byte_for_byte_and_tidies_up() {
    let app = TestApp::on(Backend::Sqlite).await;
    let endpoint = Receiver::start().await; // the user's own endpoint
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("listen.out");
    let mut listen = Command::new(BIN)
        .args([
            "listen",
            "--port",
            &port.to_string(),
            "--subscribe",
            "--server",
            &app.base,
            "--secret",
            "s3cret",
        ])
        .args(["--forward-to", &endpoint.url, "--token", &app.token])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let hooks = || async {
        let v: Value = app.get_json("/webhooks?product=g2w").await;
        v["_embedded"]["webhooks"].as_array().map_or(0, Vec::len)
    };
    let active = || async {
        let v: Value = app.get_json("/userSubscriptions").await;
        v.as_array()
            .map_or(0, |a| a.iter().filter(|s| s["activationState"] == "ACTIVE").count())
    };
    eventually("four active subscriptions", Duration::from_secs(10), || async {
        active().await == 4
    })
    .await;
    assert_eq!(hooks().await, 4);

    let out_json = app
        .publish(
            json!({"eventName": "registrant.added", "webinarKey": 1, "registrantKey": 2, "webinarCreatorKey": 1001,
                        "firstName": "Ada", "lastName": "Lovelace", "email": "ada@example.com"}),
        )
        .await;
    assert_eq!(out_json["events"][0]["deliveries"], 1);
    let got = endpoint.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        signed_with(&got[0], "s3cret"),
        "the original signature still holds at the forwarded endpoint"
    );
    let delivered = app.deliveries("").await;
    assert_eq!(delivered.len(), 1);
    eventually("printed", Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        text.contains("registrant.added") && text.contains("[signature ok]") && text.contains("forwarded")
    })
    .await;
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("Ada Lovelace <ada@example.com>"), "{text}");
    assert_eq!(got[0].json()["email"], "ada@example.com");

    // SIGTERM: the webhooks (and their subscriptions) are removed.
    Command::new("kill")
        .args(["-TERM", &listen.id().to_string()])
        .status()
        .unwrap();
    // The server runs on this test's runtime: wait for the exit without blocking it.
    eventually("listen exits", Duration::from_secs(10), || {
        let exited = listen.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    eventually("webhooks removed", Duration::from_secs(5), || async {
        hooks().await == 0
    })
    .await;
}

#[test]
fn verify_checks_a_captured_delivery() {
    let body = r#"{"eventName":"registrant.joined","eventVersion":"1.0.0","product":"g2w","eventKey":"7fc43482-b239-45e2-a8f8-3ca2f1fbada8"}"#;
    let run = |body: &str| {
        let mut child = Command::new(BIN)
            .args([
                "verify",
                "--secret",
                "f1679e36-17fe-48fa-93da-44195fd9e293",
                "--timestamp",
                "2019-04-04T05:47:04.517Z",
            ])
            .args(["--signature", "Ojq+1Ngu6hwhaxMz1MKghhg8SaUE9O7U7qtYZE0/vEI=", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let ok = run(body);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("signature ok"));
    let bad = run(&body.replace("joined", "added"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not match"));
}
