//! An axum extractor: the handler runs only for deliveries whose signature holds.
//!
//! ```
//! use axum::{routing::post, Router};
//! use g2w_webhook_verify::{axum::VerifiedEvent, Event, Verifier};
//!
//! async fn receive(VerifiedEvent(event): VerifiedEvent) -> &'static str {
//!     if let Event::RegistrantAdded(r) = event {
//!         println!("{} registered", r.email.unwrap_or_default());
//!     }
//!     "ok"
//! }
//!
//! let app: Router = Router::new().route("/webhooks", post(receive)).with_state(Verifier::new("secret"));
//! ```

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::{Event, Verifier, VerifyError};

/// A delivery whose signature was verified with the state's [`Verifier`], parsed into an [`Event`].
/// A bad signature answers 401; a body that is not an event answers 400.
#[derive(Debug, Clone)]
pub struct VerifiedEvent(pub Event);

/// Why a delivery was refused.
#[derive(Debug)]
pub enum Rejection {
    Unverified(VerifyError),
    NotAnEvent(String),
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::Unverified(e) => (StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
            Rejection::NotAnEvent(e) => (StatusCode::BAD_REQUEST, e).into_response(),
        }
    }
}

impl<S> FromRequest<S> for VerifiedEvent
where
    S: Send + Sync,
    Verifier: FromRef<S>,
{
    type Rejection = Rejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Verifier::from_ref(state);
        let headers = req.headers().clone();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| Rejection::NotAnEvent(e.to_string()))?;
        verifier
            .verify_headers(|name| headers.get(name).and_then(|v| v.to_str().ok()), &body)
            .map_err(Rejection::Unverified)?;
        Event::parse(&body)
            .map(VerifiedEvent)
            .map_err(|e| Rejection::NotAnEvent(e.to_string()))
    }
}
