#![cfg(feature = "axum")]
//! The axum extractor admits verified deliveries only.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use g2w_webhook_verify::axum::VerifiedEvent;
use g2w_webhook_verify::{sign, Verifier};
use tower::ServiceExt;

async fn handler(VerifiedEvent(event): VerifiedEvent) -> String {
    event.name().to_string()
}

fn app() -> Router {
    Router::new()
        .route("/", post(handler))
        .with_state(Verifier::new("secret"))
}

fn request(signature: &str, body: &'static str) -> Request<Body> {
    Request::post("/")
        .header("X-Webhook-Signature-Timestamp", "2030-01-01T00:00:00.000Z")
        .header("X-Webhook-Signature", signature)
        .body(Body::from(body))
        .expect("request")
}

const BODY: &str = r#"{"eventName":"webinar.created","webinarKey":1,"organizerKey":2}"#;

#[tokio::test]
async fn verified_deliveries_reach_the_handler() {
    let sig = sign("secret", "2030-01-01T00:00:00.000Z", BODY.as_bytes());
    let res = app().oneshot(request(&sig, BODY)).await.expect("response");
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_signatures_get_401() {
    let sig = sign("other", "2030-01-01T00:00:00.000Z", BODY.as_bytes());
    let res = app().oneshot(request(&sig, BODY)).await.expect("response");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}
