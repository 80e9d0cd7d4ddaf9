//! Every class of bad input gets a 4xx in the one error format, naming the field and the problem.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{Backend, Receiver, TestApp};

crate::on_both!(
    bad_bodies_are_refused_with_the_field_named,
    unknown_paths_methods_and_keys,
    tolerant_of_real_client_habits,
    bad_events_are_refused_and_create_nothing
);

async fn expect_error(res: reqwest::Response, status: u16, needle: &str) {
    assert_eq!(res.status(), status);
    let v: Value = res.json().await.expect("error body is JSON");
    let d = v["description"].as_str().expect("description");
    assert!(d.contains(needle), "description {d:?} should mention {needle:?}");
    assert!(v["errorCode"].is_string());
    assert!(uuid::Uuid::parse_str(v["incident"].as_str().expect("incident")).is_ok());
}

async fn bad_bodies_are_refused_with_the_field_named(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let raw = |method: Method, path: &str, body: &str, ct: Option<&str>| {
        let mut req = app
            .http
            .request(method, app.api(path))
            .bearer_auth(&app.token)
            .body(body.to_string());
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    let json_ct = Some("application/json");
    expect_error(
        raw(Method::POST, "/webhooks", "{\"product\":", json_ct).await.unwrap(),
        400,
        "not valid JSON",
    )
    .await;
    let wrong_type =
        json!({"product": "g2w", "eventName": "webinar.created", "eventVersion": 1, "callbackUrl": rx.url});
    expect_error(
        app.call(Method::POST, "/webhooks", Some(wrong_type)).await,
        400,
        "eventVersion",
    )
    .await;
    let bad_enum =
        json!({"product": "g2w", "eventName": "webinar.deleted", "eventVersion": "1.0.0", "callbackUrl": rx.url});
    expect_error(
        app.call(Method::POST, "/webhooks", Some(bad_enum)).await,
        400,
        "eventName: unknown variant",
    )
    .await;
    let missing = json!({"product": "g2w", "eventName": "webinar.created", "eventVersion": "1.0.0"});
    expect_error(
        app.call(Method::POST, "/webhooks", Some(missing)).await,
        400,
        "callbackUrl",
    )
    .await;
    expect_error(
        app.call(Method::POST, "/webhooks", Some(json!([{"product": "g2m"}])))
            .await,
        400,
        "[0].product",
    )
    .await;
    expect_error(
        app.call(Method::POST, "/webhooks", Some(json!("text"))).await,
        400,
        "object or array",
    )
    .await;
    expect_error(app.call(Method::POST, "/webhooks", None).await, 400, "body is required").await;
    expect_error(
        app.call(Method::PUT, "/webhooks", Some(json!([{"webhookKey": "x"}])))
            .await,
        400,
        "webhookState",
    )
    .await;
    expect_error(
        app.call(
            Method::PUT,
            "/webhooks",
            Some(json!([{"webhookKey": uuid::Uuid::new_v4(), "webhookState": "ON"}])),
        )
        .await,
        400,
        "[0].webhookState",
    )
    .await;
    expect_error(
        app.call(Method::POST, "/userSubscriptions", Some(json!({"webhookKey": "x"})))
            .await,
        400,
        "callbackUrl",
    )
    .await;
    expect_error(
        app.call(Method::DELETE, "/userSubscriptions", Some(json!([1]))).await,
        400,
        "[0]",
    )
    .await;
    let too_big = format!("[\"{}\"]", "a".repeat(1024 * 1024 + 10));
    expect_error(
        raw(Method::DELETE, "/userSubscriptions", &too_big, json_ct)
            .await
            .unwrap(),
        413,
        "larger than",
    )
    .await;
    expect_error(
        raw(
            Method::POST,
            "/webhooks",
            "product=g2w",
            Some("application/x-www-form-urlencoded"),
        )
        .await
        .unwrap(),
        415,
        "Content-Type",
    )
    .await;
    expect_error(
        raw(Method::POST, "/webhooks", "<xml/>", Some("text/xml"))
            .await
            .unwrap(),
        415,
        "Content-Type",
    )
    .await;
}

async fn unknown_paths_methods_and_keys(b: Backend) {
    let app = TestApp::on(b).await;
    expect_error(app.call(Method::GET, "/nothing-here", None).await, 404, "/nothing-here").await;
    expect_error(app.call(Method::PATCH, "/webhooks", None).await, 405, "PATCH").await;
    expect_error(
        app.call(Method::GET, "/webhooks/not-a-uuid", None).await,
        404,
        "not-a-uuid",
    )
    .await;
    expect_error(
        app.call(
            Method::GET,
            &format!("/userSubscriptions/{}", uuid::Uuid::new_v4()),
            None,
        )
        .await,
        404,
        "not found",
    )
    .await;
    expect_error(app.admin(Method::GET, "/deliveries/abc", None).await, 404, "abc").await;
    expect_error(app.admin(Method::GET, "/deliveries?limit=0", None).await, 400, "limit").await;
    expect_error(
        app.admin(Method::GET, "/deliveries?state=lost", None).await,
        400,
        "state",
    )
    .await;
}

async fn tolerant_of_real_client_habits(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    // JSON with no Content-Type, a vendor Accept, unknown fields and query parameters.
    let body = json!([{"product": "g2w", "eventName": "webinar.created", "eventVersion": "1.0.0", "callbackUrl": rx.url, "extra": {"x": 1}}]);
    let res = app
        .http
        .post(app.api("/webhooks?productType=g2w&size=5&page=0&whatever=1"))
        .bearer_auth(&app.token)
        .header("accept", "application/vnd.citrix.g2wapi-v1.1+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = app
        .http
        .get(app.api("/userSubscriptions?product=g2w"))
        .bearer_auth(&app.token)
        .header("accept", "application/vnd.citrix.g2wapi-v1.1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

async fn bad_events_are_refused_and_create_nothing(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    app.subscribe("webinar.created", &rx.url).await;
    let ok = json!({"eventName": "webinar.created", "webinarKey": 1, "organizerKey": 1001});
    for (body, needle) in [
        (
            json!({"eventName": "webinar.deleted", "webinarKey": 1, "organizerKey": 1001}),
            "unknown event",
        ),
        (
            json!({"eventName": "webinar.created", "organizerKey": 1001}),
            "webinarKey",
        ),
        (
            json!({"eventName": "webinar.created", "webinarKey": "1", "organizerKey": 1001}),
            "webinarKey: expected an integer",
        ),
        (
            json!({"eventName": "webinar.created", "webinarKey": 1, "organizerKey": 1001, "eventKey": 5}),
            "eventKey",
        ),
        (json!([ok, {"eventName": 3}]), "[1].eventName"),
        (json!(vec![ok.clone(); 1001]), "limit is 1000"),
    ] {
        expect_error(app.admin(Method::POST, "/events", Some(body)).await, 400, needle).await;
    }
    // Raw JSON can name a field twice; the event is refused, not read with one of the two values.
    for (raw, needle) in [
        (
            r#"{"eventName":"webinar.created","webinarKey":1,"webinarKey":2,"organizerKey":1001}"#,
            "duplicate field `webinarKey`",
        ),
        (
            r#"{"eventName":"webinar.created","webinarKey":1,"organizerKey":1001,"eventKey":null}"#,
            "eventKey: expected a string",
        ),
    ] {
        let res = app
            .http
            .post(format!("{}/admin/v1/events", app.base))
            .bearer_auth(crate::support::ADMIN)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        expect_error(res, 400, needle).await;
    }
    let res = app
        .http
        .post(format!("{}/admin/v1/events", app.base))
        .bearer_auth("wrong")
        .json(&ok)
        .send()
        .await
        .unwrap();
    expect_error(res, 403, "admin token").await;
    assert!(app.deliveries("").await.is_empty(), "nothing was created");
    assert_eq!(rx.count(), 0);
}

/// Settings the service cannot use stop it at start with the setting named and nothing opened: a retention of
/// zero (it would remove deliveries as they finish), words that are not durations, a rate limit of zero.
#[test]
fn bad_settings_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    for (flag, value, says) in [
        ("--retention", "0s", "use `off` to keep everything"),
        ("--retention", "forever", "is not a duration"),
        ("--rate-limit", "0", "not in 1.."),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_g2w-webhooks"))
            .args(["serve", "--listen", "127.0.0.1:0", flag, value])
            .arg("--database-url")
            .arg(format!("sqlite://{}", db.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{flag} {value}: {stderr}"
        );
        assert!(!db.exists(), "{flag} {value}: the database was opened");
    }
}
