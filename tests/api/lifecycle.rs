//! Delivery follows what the tenant says now: nothing goes to a deleted or inactive subscription or webhook,
//! retries go to a changed callback URL and are signed with the key valid at the attempt, and the address rules
//! hold at attempt time. Each test waits for a state in the admin API, then holds a quiet window that would
//! have held at least two retries.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{signed_with, Backend, Receiver, TestApp};

crate::on_both!(
    a_deleted_subscription_gets_nothing_more,
    a_deleted_webhook_gets_nothing_more,
    an_inactive_subscription_pauses_its_deliveries_until_it_is_active,
    an_inactive_webhook_pauses_its_deliveries_until_it_is_active,
    retries_go_to_a_changed_callback_url,
    retries_are_signed_with_the_key_valid_at_the_attempt,
    urls_stored_in_dev_mode_are_not_sent_to_without_it,
);

const SECS: Duration = Duration::from_secs(10);
/// Retries every 150 ms: the quiet window below holds at least two.
const RETRIES: &str = "150ms,150ms,150ms,150ms,150ms,150ms,150ms,150ms,150ms,150ms";
const QUIET: Duration = Duration::from_millis(600);

async fn app_retrying(b: Backend) -> TestApp {
    TestApp::on_with(b, |a| {
        a.retry_schedule = g2w_webhooks::config::parse_schedule(RETRIES).unwrap();
    })
    .await
}

fn webinar(n: i64) -> Value {
    json!({"eventName": "webinar.created", "webinarKey": n, "organizerKey": 1001})
}

/// Publishes one event and waits for its first failed attempt; returns the delivery's id.
async fn failing_delivery(app: &TestApp, rx: &Receiver, n: i64) -> i64 {
    let before = rx.count();
    let published = app.publish(webinar(n)).await;
    let event_key = published["events"][0]["eventKey"].as_str().unwrap().to_string();
    rx.wait_for(before + 1, SECS).await;
    let found = app.deliveries(&format!("eventKey={event_key}")).await;
    found[0]["id"].as_i64().unwrap()
}

async fn a_deleted_subscription_gets_nothing_more(b: Backend) {
    let app = app_retrying(b).await;
    let rx = Receiver::start().await;
    rx.respond(|_| (500, vec![], Duration::ZERO));
    let (_, sk) = app.subscribe("webinar.created", &rx.url).await;
    let id = failing_delivery(&app, &rx, 1).await;
    let res = app
        .call(Method::DELETE, &format!("/userSubscriptions/{sk}"), None)
        .await;
    assert_eq!(res.status(), 204);
    let d = app.wait_state(id, "cancelled").await;
    assert_eq!(d["lastError"], "subscription deleted");
    let sent = rx.count();
    rx.stays_at(sent, QUIET).await;
    let d = app.delivery(id).await;
    assert_eq!(d["state"], "cancelled", "final");
    assert_eq!(
        d["attemptLog"].as_array().unwrap().len(),
        sent,
        "no attempt logged after the deletion"
    );
    let listed = app.deliveries("state=cancelled").await;
    assert_eq!(listed.len(), 1);

    // Nothing to send it to: retry and redeliver say so.
    let res = app.admin(Method::POST, &format!("/deliveries/{id}/retry"), None).await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["description"].as_str().unwrap().contains("subscription deleted"),
        "{body}"
    );
    let event_key = d["eventKey"].as_str().unwrap();
    let res = app
        .admin(Method::POST, &format!("/events/{event_key}/redeliver"), None)
        .await;
    assert_eq!(res.status(), 409);
    rx.stays_at(sent, Duration::from_millis(200)).await;
}

async fn a_deleted_webhook_gets_nothing_more(b: Backend) {
    let app = app_retrying(b).await;
    let rx = Receiver::start().await;
    rx.respond(|_| (500, vec![], Duration::ZERO));
    let (wk, _) = app.subscribe("webinar.created", &rx.url).await;
    let id = failing_delivery(&app, &rx, 1).await;
    let res = app.call(Method::DELETE, "/webhooks", Some(json!([wk]))).await;
    assert_eq!(res.status(), 202);
    let d = app.wait_state(id, "cancelled").await;
    assert_eq!(d["lastError"], "webhook deleted");
    let sent = rx.count();
    rx.stays_at(sent, QUIET).await;
    assert_eq!(app.delivery(id).await["state"], "cancelled");
}

async fn an_inactive_subscription_pauses_its_deliveries_until_it_is_active(b: Backend) {
    let app = app_retrying(b).await;
    let rx = Receiver::start().await;
    rx.respond(|_| (500, vec![], Duration::ZERO));
    let (_, sk) = app.subscribe("webinar.created", &rx.url).await;
    let id = failing_delivery(&app, &rx, 1).await;
    let state = |s: &str| json!({"userSubscriptionState": s});
    let res = app
        .call(
            Method::PUT,
            &format!("/userSubscriptions/{sk}"),
            Some(state("INACTIVE")),
        )
        .await;
    assert_eq!(res.status(), 204);
    app.wait_state(id, "paused").await;
    let sent = rx.count();
    rx.stays_at(sent, QUIET).await;
    // Waiting, not lost: activated again, it is sent (and the receiver has recovered).
    rx.respond(|_| (200, vec![], Duration::ZERO));
    let res = app
        .call(Method::PUT, &format!("/userSubscriptions/{sk}"), Some(state("ACTIVE")))
        .await;
    assert_eq!(res.status(), 204);
    app.wait_state(id, "delivered").await;
    assert_eq!(rx.count(), sent + 1);
    // The failures before the pause did not deactivate it meanwhile.
    assert_eq!(app.subscription(&sk).await["userSubscriptionState"], "ACTIVE");
}

async fn an_inactive_webhook_pauses_its_deliveries_until_it_is_active(b: Backend) {
    let app = app_retrying(b).await;
    let rx = Receiver::start().await;
    rx.respond(|_| (500, vec![], Duration::ZERO));
    let (wk, _) = app.subscribe("webinar.created", &rx.url).await;
    let id = failing_delivery(&app, &rx, 1).await;
    let state = |s: &str| json!([{"webhookKey": wk, "state": s}]);
    assert_eq!(
        app.call(Method::PUT, "/webhooks", Some(state("INACTIVE")))
            .await
            .status(),
        204
    );
    app.wait_state(id, "paused").await;
    let sent = rx.count();
    rx.stays_at(sent, QUIET).await;
    // A paused delivery does not hold up others: a second subscription's events go out meanwhile.
    let other = Receiver::start().await;
    app.subscribe("webinar.changed", &other.url).await;
    app.publish(json!({"eventName": "webinar.changed", "webinarKey": 2, "organizerKey": 1001}))
        .await;
    other.wait_for(1, SECS).await;
    rx.respond(|_| (200, vec![], Duration::ZERO));
    assert_eq!(
        app.call(Method::PUT, "/webhooks", Some(state("ACTIVE"))).await.status(),
        204
    );
    app.wait_state(id, "delivered").await;
    assert_eq!(rx.count(), sent + 1);
}

async fn retries_go_to_a_changed_callback_url(b: Backend) {
    let app = app_retrying(b).await;
    let (old, new, newest) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    old.respond(|_| (500, vec![], Duration::ZERO));
    let (wk, sk) = app.subscribe("webinar.created", &old.url).await;
    let id = failing_delivery(&app, &old, 1).await;
    // The webhook's URL changes: the retries go to the new one.
    let change = json!([{"webhookKey": wk, "callbackUrl": new.url}]);
    assert_eq!(app.call(Method::PUT, "/webhooks", Some(change)).await.status(), 204);
    let d = app.wait_state(id, "delivered").await;
    assert_eq!(d["url"], new.url.as_str());
    assert_eq!(new.count(), 1);
    let sent = old.count();
    old.stays_at(sent, QUIET).await;

    // The subscription's own URL changes: its retries go there.
    new.respond(|_| (500, vec![], Duration::ZERO));
    let id = failing_delivery(&app, &new, 2).await;
    let change = json!({"callbackUrl": newest.url});
    let res = app
        .call(Method::PUT, &format!("/userSubscriptions/{sk}"), Some(change))
        .await;
    assert_eq!(res.status(), 204);
    app.wait_state(id, "delivered").await;
    assert_eq!(newest.count(), 1);
    let sent = new.count();
    new.stays_at(sent, QUIET).await;
}

async fn retries_are_signed_with_the_key_valid_at_the_attempt(b: Backend) {
    let app = app_retrying(b).await;
    let rx = Receiver::start().await;
    rx.respond(|_| (500, vec![], Duration::ZERO));
    app.subscribe("webinar.created", &rx.url).await;
    let first = app.new_secret_key(None).await;
    let id = failing_delivery(&app, &rx, 1).await;
    assert!(signed_with(&rx.received()[0], &first));
    let second = app.new_secret_key(None).await;
    // The attempt that succeeds comes after the rotation: it carries the new key.
    let rotated_at = rx.count();
    rx.respond(move |n| (if n > rotated_at { 200 } else { 500 }, vec![], Duration::ZERO));
    app.wait_state(id, "delivered").await;
    let got = rx.received();
    assert!(
        signed_with(got.last().unwrap(), &second),
        "the retry after the rotation is signed with the new key"
    );
}

async fn urls_stored_in_dev_mode_are_not_sent_to_without_it(b: Backend) {
    let app = TestApp::on_with(b, |a| {
        a.retry_schedule = g2w_webhooks::config::parse_schedule("500ms,100ms,100ms,100ms").unwrap();
    })
    .await;
    let rx = Receiver::start().await;
    rx.respond(|_| (500, vec![], Duration::ZERO));
    app.subscribe("webinar.created", &rx.url).await;
    let id = failing_delivery(&app, &rx, 1).await;
    // The same database, served without --dev: the stored http:// loopback URL is refused at the attempt.
    let (url, dir) = app.stop_keeping_data().await;
    let app = TestApp::start_on_url_with(url, dir, |a| {
        a.dev = false;
        a.retry_schedule = g2w_webhooks::config::parse_schedule("500ms,100ms,100ms,100ms").unwrap();
    })
    .await;
    crate::support::eventually("refused attempts", SECS, || async {
        app.delivery(id).await["attemptLog"]
            .as_array()
            .is_some_and(|a| a.len() >= 3)
    })
    .await;
    let d = app.delivery(id).await;
    let log = d["attemptLog"].as_array().unwrap();
    assert!(log[1]["error"].as_str().unwrap().contains("must use https"), "{d}");
    assert!(log[1].get("statusCode").is_none());
    assert_eq!(rx.count(), 1, "only the attempt made in dev mode reached the receiver");
}
