//! Every operation of the contract, in its contract form and its real GoTo form.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{Backend, Receiver, TestApp};

crate::on_both!(
    contract_forms_of_every_operation,
    real_goto_forms,
    secret_key_bodies_and_rotation_fields,
    a_webhook_says_which_key_signs_it_and_keeps_its_own
);

fn hook_body(url: &str, event: &str) -> Value {
    json!({"product": "g2w", "eventName": event, "eventVersion": "1.0.0", "callbackUrl": url})
}

async fn contract_forms_of_every_operation(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;

    // createWebhookSecretKey: 201 with secretKey (and the real fields).
    let res = app.call(Method::POST, "/webhooks/secretkey", None).await;
    assert_eq!(res.status(), 201);
    let key: Value = res.json().await.unwrap();
    assert!(uuid::Uuid::parse_str(key["secretKey"].as_str().unwrap()).is_ok());
    assert_eq!(key["value"], key["secretKey"]);
    assert!(key["validFrom"].is_string() && key["id"].is_i64());

    // createWebhook: 201, INACTIVE, UUID key, callbackUrl byte for byte.
    let url = format!("{}?token=a%20b&x=1", rx.url);
    let res = app
        .call(Method::POST, "/webhooks", Some(hook_body(&url, "webinar.created")))
        .await;
    assert_eq!(res.status(), 201);
    let hook: Value = res.json().await.unwrap();
    let wk = hook["webhookKey"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&wk).is_ok());
    assert_eq!(hook["webhookState"], "INACTIVE");
    assert_eq!(hook["state"], "INACTIVE");
    assert_eq!(hook["callbackUrl"], url.as_str());
    assert_eq!(hook["product"], "g2w");
    assert_eq!(hook["eventName"], "webinar.created");
    assert_eq!(hook["signing"], "APPLICATION_SECRET_KEY");
    assert!(
        hook.as_object().unwrap().values().all(|v| !v.is_null()),
        "no null fields: {hook}"
    );

    // getWebhook
    let res = app.call(Method::GET, &format!("/webhooks/{wk}"), None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["webhookKey"], wk.as_str());

    // updateWebhooks: 204 with no body and no JSON content type.
    let res = app
        .call(
            Method::PUT,
            "/webhooks",
            Some(json!([{"webhookKey": wk, "webhookState": "ACTIVE"}])),
        )
        .await;
    assert_eq!(res.status(), 204);
    assert!(res.headers().get("content-type").is_none());
    assert!(res.bytes().await.unwrap().is_empty());
    let hook: Value = app.get_json(&format!("/webhooks/{wk}")).await;
    assert_eq!(hook["webhookState"], "ACTIVE");

    // createUserSubscription: 201, ACTIVE by default.
    let res = app
        .call(
            Method::POST,
            "/userSubscriptions",
            Some(json!({"webhookKey": wk, "callbackUrl": url})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let sub: Value = res.json().await.unwrap();
    let sk = sub["subscriptionKey"].as_str().unwrap().to_string();
    assert_eq!(sub["userSubscriptionKey"], sk.as_str());
    assert_eq!(sub["userSubscriptionState"], "ACTIVE");
    assert_eq!(sub["activationState"], "ACTIVE");
    assert_eq!(sub["webhookKey"], wk.as_str());
    assert_eq!(sub["callbackUrl"], url.as_str());
    assert_eq!(sub["userKey"], "1001");
    for f in ["eventName", "eventVersion", "product", "createTime"] {
        assert!(sub[f].is_string(), "{f} in {sub}");
    }

    // getUserSubscription, listUserSubscriptions (plain array)
    let res = app.call(Method::GET, &format!("/userSubscriptions/{sk}"), None).await;
    assert_eq!(res.status(), 200);
    let list: Value = app.get_json("/userSubscriptions").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["subscriptionKey"], sk.as_str());

    // updateUserSubscription: 204; activationState follows the current states on every read.
    let res = app
        .call(
            Method::PUT,
            &format!("/userSubscriptions/{sk}"),
            Some(json!({"userSubscriptionState": "INACTIVE"})),
        )
        .await;
    assert_eq!(res.status(), 204);
    let sub: Value = app.get_json(&format!("/userSubscriptions/{sk}")).await;
    assert_eq!(sub["userSubscriptionState"], "INACTIVE");
    assert_eq!(sub["activationState"], "INACTIVE");
    app.call(
        Method::PUT,
        &format!("/userSubscriptions/{sk}"),
        Some(json!({"userSubscriptionState": "ACTIVE"})),
    )
    .await;
    app.call(
        Method::PUT,
        "/webhooks",
        Some(json!([{"webhookKey": wk, "webhookState": "INACTIVE"}])),
    )
    .await;
    let sub: Value = app.get_json(&format!("/userSubscriptions/{sk}")).await;
    assert_eq!(sub["userSubscriptionState"], "ACTIVE");
    assert_eq!(
        sub["activationState"], "INACTIVE",
        "derived from the webhook's state now"
    );

    // deleteUserSubscription: 204, then 404.
    let res = app
        .call(Method::DELETE, &format!("/userSubscriptions/{sk}"), None)
        .await;
    assert_eq!(res.status(), 204);
    assert!(res.headers().get("content-type").is_none());
    let res = app.call(Method::GET, &format!("/userSubscriptions/{sk}"), None).await;
    assert_eq!(res.status(), 404);
    let res = app
        .call(Method::DELETE, &format!("/userSubscriptions/{sk}"), None)
        .await;
    assert_eq!(res.status(), 404);
}

async fn real_goto_forms(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;

    // Empty lists still carry _embedded.
    let v: Value = app.get_json("/webhooks?product=g2w").await;
    assert_eq!(v, json!({"_embedded": {"webhooks": []}}));
    let v: Value = app.get_json("/userSubscriptions?product=g2w").await;
    assert_eq!(v, json!({"_embedded": {"userSubscriptions": []}}));

    // POST /webhooks with an array: 200 _embedded.
    let res = app
        .call(
            Method::POST,
            "/webhooks?productType=g2w",
            Some(json!([
                hook_body(&rx.url, "registrant.added"),
                hook_body(&rx.url, "registrant.joined")
            ])),
        )
        .await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let hooks = v["_embedded"]["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2);
    assert_eq!(hooks[0]["state"], "INACTIVE");
    let k1 = hooks[0]["webhookKey"].as_str().unwrap().to_string();
    let k2 = hooks[1]["webhookKey"].as_str().unwrap().to_string();

    // The same event type and URL again is a conflict.
    let res = app
        .call(Method::POST, "/webhooks", Some(hook_body(&rx.url, "registrant.added")))
        .await;
    assert_eq!(res.status(), 409);

    // PUT with `state` and a new callbackUrl.
    let new_url = format!("{}/moved?v=2", rx.url);
    let res = app
        .call(
            Method::PUT,
            "/webhooks",
            Some(json!([{"webhookKey": k1, "state": "ACTIVE", "callbackUrl": new_url}])),
        )
        .await;
    assert_eq!(res.status(), 204);
    let h: Value = app.get_json(&format!("/webhooks/{k1}")).await;
    assert_eq!(h["state"], "ACTIVE");
    assert_eq!(h["callbackUrl"], new_url.as_str());

    // GET /webhooks?product=g2w lists them.
    let v: Value = app.get_json("/webhooks?product=g2w&page=0&size=200").await;
    assert_eq!(v["_embedded"]["webhooks"].as_array().unwrap().len(), 2);

    // POST /userSubscriptions with an array and no callbackUrl: the webhook's URL is used.
    let res = app
        .call(
            Method::POST,
            "/userSubscriptions",
            Some(json!([{"webhookKey": k1, "userSubscriptionState": "ACTIVE"}, {"webhookKey": k2}])),
        )
        .await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let subs = v["_embedded"]["userSubscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0]["callbackUrl"], new_url.as_str());
    assert_eq!(subs[0]["activationState"], "ACTIVE");
    assert_eq!(subs[1]["activationState"], "INACTIVE", "webhook k2 is still INACTIVE");
    let s1 = subs[0]["userSubscriptionKey"].as_str().unwrap().to_string();
    let s2 = subs[1]["userSubscriptionKey"].as_str().unwrap().to_string();

    // GET /userSubscriptions?product=g2w answers _embedded.
    let v: Value = app.get_json("/userSubscriptions?product=g2w").await;
    assert_eq!(v["_embedded"]["userSubscriptions"].as_array().unwrap().len(), 2);

    // PUT /userSubscriptions with an array: 204.
    let res = app
        .call(
            Method::PUT,
            "/userSubscriptions",
            Some(json!([{"userSubscriptionKey": s2, "userSubscriptionState": "INACTIVE"}])),
        )
        .await;
    assert_eq!(res.status(), 204);
    let v: Value = app.get_json(&format!("/userSubscriptions/{s2}")).await;
    assert_eq!(v["userSubscriptionState"], "INACTIVE");

    // DELETE /userSubscriptions with an array: 202, no body.
    let res = app.call(Method::DELETE, "/userSubscriptions", Some(json!([s2]))).await;
    assert_eq!(res.status(), 202);
    assert!(res.headers().get("content-type").is_none());

    // DELETE /webhooks with an array: 202 and the subscriptions go too.
    let res = app.call(Method::DELETE, "/webhooks", Some(json!([k1, k2]))).await;
    assert_eq!(res.status(), 202);
    assert_eq!(
        app.call(Method::GET, &format!("/userSubscriptions/{s1}"), None)
            .await
            .status(),
        404
    );
    assert_eq!(
        app.call(Method::GET, &format!("/webhooks/{k1}"), None).await.status(),
        404
    );
    // Deleting keys already gone, and an empty array, still answers 202.
    assert_eq!(
        app.call(Method::DELETE, "/userSubscriptions", Some(json!([s1])))
            .await
            .status(),
        202
    );
    assert_eq!(
        app.call(Method::DELETE, "/userSubscriptions", Some(json!([])))
            .await
            .status(),
        202
    );
}

async fn secret_key_bodies_and_rotation_fields(b: Backend) {
    let app = TestApp::on(b).await;
    for body in [None, Some(json!({}))] {
        let res = app.call(Method::POST, "/webhooks/secretkey", body).await;
        assert_eq!(res.status(), 201);
    }
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    let from = past.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let res = app
        .call(Method::POST, "/webhooks/secretkey", Some(json!({"validFrom": from})))
        .await;
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    assert!(v["validFrom"].as_str().unwrap().starts_with(&from[..19]));
    let res = app
        .call(
            Method::POST,
            "/webhooks/secretkey",
            Some(json!({"validFrom": "tomorrow"})),
        )
        .await;
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert!(v["description"].as_str().unwrap().contains("validFrom"));
}

async fn a_webhook_says_which_key_signs_it_and_keeps_its_own(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let h: Value = app
        .call(Method::POST, "/webhooks", Some(hook_body(&rx.url, "webinar.changed")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        h["signing"], "APPLICATION_SECRET_KEY",
        "the first webhook gives the application a key"
    );
    let app_id = app.store.ensure_app("app-a").await.unwrap();
    assert_eq!(app.store.secret_keys(app_id).await.unwrap().len(), 1);
    let mut body = hook_body(&rx.url, "webinar.created");
    body["secretKey"] = json!("my-own-secret");
    let h: Value = app
        .call(Method::POST, "/webhooks", Some(body))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(h["signing"], "WEBHOOK_SECRET_KEY");
    assert_eq!(h["secretKey"], "my-own-secret");
    assert_eq!(app.store.secret_keys(app_id).await.unwrap().len(), 1, "made once");
}
