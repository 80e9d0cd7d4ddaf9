//! Callback URLs: the validation GET and the address rules outside dev mode.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{Backend, Receiver, TestApp};

crate::on_both!(
    the_validation_get_must_answer_200,
    internal_addresses_are_refused_outside_dev_mode
);

async fn create(app: &TestApp, url: &str) -> (u16, String) {
    let res = app
        .call(
            Method::POST,
            "/webhooks",
            Some(
                json!({"product": "g2w", "eventName": "webinar.created", "eventVersion": "1.0.0", "callbackUrl": url}),
            ),
        )
        .await;
    let status = res.status().as_u16();
    let v: Value = res.json().await.unwrap();
    (status, v["description"].as_str().unwrap_or_default().to_string())
}

async fn the_validation_get_must_answer_200(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    assert_eq!(create(&app, &rx.url).await.0, 201);

    rx.answer_get(500);
    let url = format!("{}/other", rx.url);
    let (status, desc) = create(&app, &url).await;
    assert_eq!(status, 400);
    assert!(desc.contains(&url) && desc.contains("answered 500"), "{desc}");

    // A port where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("http://127.0.0.1:{port}/hook");
    let (status, desc) = create(&app, &url).await;
    assert_eq!(status, 400);
    assert!(desc.contains(&url) && desc.contains("could not connect"), "{desc}");

    // Changing a callback URL is checked too.
    rx.answer_get(200);
    let (wk, sk) = app.subscribe("registrant.added", &rx.url).await;
    let res = app
        .call(
            Method::PUT,
            "/webhooks",
            Some(json!([{"webhookKey": wk, "callbackUrl": url}])),
        )
        .await;
    assert_eq!(res.status(), 400);
    let res = app
        .call(
            Method::PUT,
            &format!("/userSubscriptions/{sk}"),
            Some(json!({"callbackUrl": url})),
        )
        .await;
    assert_eq!(res.status(), 400);
}

async fn internal_addresses_are_refused_outside_dev_mode(b: Backend) {
    let app = TestApp::on_with(b, |a| a.dev = false).await;
    for (url, needle) in [
        ("http://example.com/hook", "https"),
        ("https://127.0.0.1/hook", "127.0.0.1"),
        ("https://10.0.0.8/hook", "internal"),
        ("https://169.254.169.254/latest/meta-data", "internal"),
        ("https://[::1]/hook", "::1"),
        ("https://[fd00::1]/hook", "internal"),
        ("https://[::ffff:127.0.0.1]/hook", "internal"),
        ("https://[::ffff:192.168.0.1]/hook", "internal"),
        ("https://localhost/hook", "resolves to internal address"),
        ("https://0.0.0.0/hook", "internal"),
        ("not a url", "absolute URL"),
    ] {
        let (status, desc) = create(&app, url).await;
        assert_eq!(status, 400, "{url}");
        assert!(desc.contains(needle), "{url}: {desc}");
        assert!(desc.contains(url), "the error names the URL: {desc}");
    }
}
