//! Replays of real integrations' call sequences, with their exact bodies and headers.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{Backend, Receiver, TestApp};

crate::on_both!(
    pipedream_lifecycle,
    drupal_sync_with_a_php_client,
    prismatic_teardown,
    the_real_services_rate_limit_when_asked_for
);

/// Pipedream (components/gotowebinar): create, wait, activate, subscribe; teardown deletes the webhook first and
/// then the subscription the cascade already removed.
async fn pipedream_lifecycle(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let h = |req: reqwest::RequestBuilder| {
        req.bearer_auth(&app.token)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
    };
    let res = h(app.http.post(app.api("/webhooks")))
        .body(json!([{"callbackUrl": rx.url, "eventName": "registrant.added", "eventVersion": "1.0.0", "product": "g2w"}]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let k = v["_embedded"]["webhooks"][0]["webhookKey"]
        .as_str()
        .unwrap()
        .to_string();
    let res = h(app.http.put(app.api("/webhooks")))
        .body(json!([{"webhookKey": k, "state": "ACTIVE"}]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = h(app.http.post(app.api("/userSubscriptions")))
        .body(json!([{"callbackUrl": rx.url, "webhookKey": k, "userSubscriptionState": "ACTIVE"}]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let s = v["_embedded"]["userSubscriptions"][0]["userSubscriptionKey"]
        .as_str()
        .unwrap()
        .to_string();

    // An event reaches the callback, with eventKey to de-duplicate on.
    app.publish(
        json!({"eventName": "registrant.added", "webinarKey": 1, "registrantKey": 2, "webinarCreatorKey": 1001}),
    )
    .await;
    let got = rx.wait_for(1, std::time::Duration::from_secs(5)).await;
    assert!(got[0].json()["eventKey"].is_string());

    let res = h(app.http.delete(app.api("/webhooks")))
        .body(json!([k]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let res = h(app.http.delete(app.api("/userSubscriptions")))
        .body(json!([s]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        202,
        "the cascade already removed it; teardown must still succeed"
    );
}

/// Drupal gotowebinar_sync: secret key with no body, per-event create, get, activate, subscribe with no callbackUrl.
/// Its PHP client sends JSON with no Content-Type and reads empty 204/202 answers that must not be labelled JSON.
async fn drupal_sync_with_a_php_client(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let php = |method: Method, path: &str, body: Option<Value>| {
        let mut req = app
            .http
            .request(method, app.api(path))
            .bearer_auth(&app.token)
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req.body(b.to_string()); // no Content-Type
        }
        req.send()
    };
    let res = php(Method::POST, "/webhooks/secretkey", None).await.unwrap();
    assert!(res.status().is_success());
    let secret = res.json::<Value>().await.unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    for event in ["registrant.added", "webinar.created", "webinar.changed"] {
        let res = php(
            Method::POST,
            "/webhooks",
            Some(json!([{"callbackUrl": rx.url, "eventName": event, "eventVersion": "1.0.0", "product": "g2w"}])),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200);
        let k = res.json::<Value>().await.unwrap()["_embedded"]["webhooks"][0]["webhookKey"]
            .as_str()
            .unwrap()
            .to_string();
        let res = php(Method::GET, &format!("/webhooks/{k}"), None).await.unwrap();
        assert_eq!(res.json::<Value>().await.unwrap()["webhookKey"], k.as_str());
        let res = php(
            Method::PUT,
            "/webhooks",
            Some(json!([{"state": "ACTIVE", "webhookKey": k}])),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 204);
        assert!(res.headers().get("content-type").is_none());
        let res = php(
            Method::POST,
            "/userSubscriptions",
            Some(json!([{"userSubscriptionState": "ACTIVE", "webhookKey": k}])),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200);
    }
    // Its receiver verifies the signature and parses times[0].startTime strictly.
    app.publish(json!({"eventName": "webinar.created", "webinarKey": 9, "organizerKey": 1001, "times": [{"startTime": "2020-08-25T20:00:00Z", "endTime": "2020-08-25T21:00:00Z"}]}))
        .await;
    let got = rx.wait_for(1, std::time::Duration::from_secs(5)).await;
    assert!(crate::support::signed_with(&got[0], &secret));
    assert_eq!(got[0].json()["times"][0]["startTime"], "2020-08-25T20:00:00Z");
}

/// Prismatic: vendor Accept header on every call; teardown lists both collections with ?product=g2w, matches the
/// exact callbackUrl string, and deletes the matches (often none).
async fn prismatic_teardown(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let url = format!("{}?instance=abc&flow=Flow%201", rx.url);
    let p = |method: Method, path: &str, body: Option<Value>| {
        let mut req = app
            .http
            .request(method, app.api(path))
            .bearer_auth(&app.token)
            .header("Accept", "application/vnd.citrix.g2wapi-v1.1+json");
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b.to_string());
        }
        req.send()
    };
    // Nothing to tear down yet: delete with [].
    assert_eq!(
        p(Method::DELETE, "/userSubscriptions", Some(json!([])))
            .await
            .unwrap()
            .status(),
        202
    );
    let res = p(
        Method::POST,
        "/webhooks",
        Some(
            json!([{"callbackUrl": url, "eventName": "registrant.joined", "eventVersion": "1.0.0", "product": "g2w"}]),
        ),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let k = res.json::<Value>().await.unwrap()["_embedded"]["webhooks"][0]["webhookKey"]
        .as_str()
        .unwrap()
        .to_string();
    p(
        Method::POST,
        "/userSubscriptions",
        Some(json!([{"webhookKey": k, "callbackUrl": url}])),
    )
    .await
    .unwrap();

    let hooks: Value = p(Method::GET, "/webhooks?product=g2w", None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subs: Value = p(Method::GET, "/userSubscriptions?product=g2w", None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hk: Vec<&str> = hooks["_embedded"]["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["callbackUrl"] == url.as_str())
        .map(|w| w["webhookKey"].as_str().unwrap())
        .collect();
    let sk: Vec<&str> = subs["_embedded"]["userSubscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["callbackUrl"] == url.as_str())
        .map(|s| s["userSubscriptionKey"].as_str().unwrap())
        .collect();
    assert_eq!((hk.len(), sk.len()), (1, 1), "matched on the exact callbackUrl string");
    assert_eq!(
        p(Method::DELETE, "/userSubscriptions", Some(json!(sk)))
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        p(Method::DELETE, "/webhooks", Some(json!(hk))).await.unwrap().status(),
        202
    );
    let hooks: Value = p(Method::GET, "/webhooks?product=g2w", None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hooks["_embedded"]["webhooks"], json!([]));
}

/// With `--rate-limit 1` a token's second request within a second gets 429 in the one error format with
/// `Retry-After`, as the real service answers past its limit; another token is served meanwhile, and the first
/// is served again a second later. The admin API is not limited. (The unit test in `http::limit` covers a
/// larger allowance.)
async fn the_real_services_rate_limit_when_asked_for(b: Backend) {
    let app = TestApp::on_with(b, |a| a.rate_limit = Some(1)).await;
    let list = |token: String| {
        let req = app.http.get(app.api("/webhooks")).bearer_auth(token);
        async move { req.send().await.unwrap() }
    };
    assert_eq!(list(app.token.clone()).await.status(), 200);
    let refused = list(app.token.clone()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errorCode"], "TooManyRequests");
    assert!(
        body["description"].as_str().unwrap().contains("at most 1 a second"),
        "{body}"
    );
    assert!(uuid::Uuid::parse_str(body["incident"].as_str().unwrap()).is_ok());
    let other = app.token_for("other", 7).await;
    assert_eq!(list(other).await.status(), 200);
    for _ in 0..3 {
        assert_eq!(app.admin(Method::GET, "/deliveries", None).await.status(), 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(list(app.token.clone()).await.status(), 200);
}
