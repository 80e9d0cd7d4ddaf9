//! Tenants see only their own data; tokens are checked on every call.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{Backend, Receiver, TestApp};

crate::on_both!(
    applications_and_organizers_are_isolated,
    missing_unknown_and_revoked_tokens_get_403,
    tokens_are_stored_only_as_hashes
);

async fn applications_and_organizers_are_isolated(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let a1 = app.token.clone();
    let a2 = app.token_for("app-a", 2002).await; // same application, another organizer
    let b1 = app.token_for("app-b", 1001).await; // another application, same organizer number

    let (wk, sk) = app.subscribe("webinar.created", &rx.url).await;

    // Another application: the webhook does not exist for it.
    assert_eq!(
        app.call_as(&b1, Method::GET, &format!("/webhooks/{wk}"), None)
            .await
            .status(),
        404
    );
    let v: Value = app
        .call_as(&b1, Method::GET, "/webhooks?product=g2w", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["_embedded"]["webhooks"].as_array().unwrap().len(), 0);
    let res = app
        .call_as(
            &b1,
            Method::PUT,
            "/webhooks",
            Some(json!([{"webhookKey": wk, "state": "INACTIVE"}])),
        )
        .await;
    assert_eq!(res.status(), 404);
    let res = app
        .call_as(
            &b1,
            Method::POST,
            "/userSubscriptions",
            Some(json!({"webhookKey": wk, "callbackUrl": rx.url})),
        )
        .await;
    assert_eq!(
        res.status(),
        404,
        "a subscription may reference only its own application's webhooks"
    );
    assert_eq!(
        app.call_as(&b1, Method::DELETE, "/webhooks", Some(json!([wk])))
            .await
            .status(),
        202
    );
    assert_eq!(
        app.call_as(&a1, Method::GET, &format!("/webhooks/{wk}"), None)
            .await
            .status(),
        200,
        "untouched"
    );

    // Another organizer of the same application sees the webhook but not the subscription.
    assert_eq!(
        app.call_as(&a2, Method::GET, &format!("/webhooks/{wk}"), None)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.call_as(&a2, Method::GET, &format!("/userSubscriptions/{sk}"), None)
            .await
            .status(),
        404
    );
    let v: Value = app
        .call_as(&a2, Method::GET, "/userSubscriptions", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!([]));
    assert_eq!(
        app.call_as(
            &a2,
            Method::PUT,
            &format!("/userSubscriptions/{sk}"),
            Some(json!({"userSubscriptionState": "INACTIVE"}))
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.call_as(&a2, Method::DELETE, &format!("/userSubscriptions/{sk}"), None)
            .await
            .status(),
        404
    );
    assert_eq!(
        app.call_as(&a2, Method::DELETE, "/userSubscriptions", Some(json!([sk])))
            .await
            .status(),
        202
    );
    let v: Value = app
        .call_as(&a1, Method::GET, &format!("/userSubscriptions/{sk}"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["userSubscriptionState"], "ACTIVE",
        "another organizer's bulk delete touched nothing"
    );

    // Events of organizer 2002 do not reach organizer 1001's subscription.
    let out = app
        .publish(json!({"eventName": "webinar.created", "webinarKey": 1, "organizerKey": 2002}))
        .await;
    assert_eq!(out["events"][0]["deliveries"], 0);
}

async fn missing_unknown_and_revoked_tokens_get_403(b: Backend) {
    let app = TestApp::on(b).await;
    let res = app.http.get(app.api("/webhooks?product=g2w")).send().await.unwrap();
    assert_eq!(res.status(), 403);
    let v: Value = res.json().await.unwrap();
    assert!(v["errorCode"].is_string() && v["description"].is_string() && v["incident"].is_string());
    assert_eq!(
        app.call_as("nope", Method::GET, "/userSubscriptions", None)
            .await
            .status(),
        403
    );

    let token = app.token_for("app-c", 7).await;
    assert_eq!(
        app.call_as(&token, Method::GET, "/userSubscriptions", None)
            .await
            .status(),
        200
    );
    assert!(app
        .store
        .revoke_token(&g2w_webhooks::domain::token::hash(&token))
        .await
        .unwrap());
    assert_eq!(
        app.call_as(&token, Method::GET, "/userSubscriptions", None)
            .await
            .status(),
        403
    );

    // The admin API wants the admin token, not an organizer's.
    let res = app
        .http
        .post(format!("{}/admin/v1/events", app.base))
        .bearer_auth(&app.token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}

async fn tokens_are_stored_only_as_hashes(b: Backend) {
    let app = TestApp::on(b).await;
    let hash = g2w_webhooks::domain::token::hash(&app.token);
    if let Some(path) = app.db_url.strip_prefix("sqlite://") {
        let raw = std::fs::read(path).unwrap();
        let wal = std::fs::read(format!("{path}-wal")).unwrap_or_default();
        for bytes in [raw, wal] {
            assert!(
                !bytes.windows(app.token.len()).any(|w| w == app.token.as_bytes()),
                "raw token found on disk"
            );
        }
    } else {
        let pool = sqlx::PgPool::connect(&app.db_url).await.unwrap();
        let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM tokens")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(stored.contains(&hash));
        assert!(!stored.iter().any(|t| t.contains(&app.token)));
    }
    assert!(app.store.find_token(&hash).await.unwrap().is_some());
}
