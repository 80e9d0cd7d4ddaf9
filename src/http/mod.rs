//! The HTTP surface: the GoTo management API under `/G2W/rest/v2`, the admin API under `/admin/v1`, and the
//! operational endpoints (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::delivery::Engine;
use crate::domain::now_ms;
use crate::error::{Error, Result};
use crate::outbound::{self, Policy};
use crate::store::DynStore;

pub mod admin;
pub mod extract;
pub mod limit;
pub mod serve;
pub mod subscriptions;
pub mod webhooks;

/// How much one tenant may create.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub webhooks_per_app: i64,
    pub subscriptions_per_organizer: i64,
}

/// The contract's base path.
pub const API_BASE: &str = "/G2W/rest/v2";
pub const ADMIN_BASE: &str = "/admin/v1";

#[derive(Clone)]
pub struct AppState {
    pub store: DynStore,
    pub engine: Arc<Engine>,
    pub policy: Policy,
    /// Client for callback validation GETs.
    pub check_client: reqwest::Client,
    /// How long one validation GET may take.
    pub check_timeout: std::time::Duration,
    pub limits: Limits,
    /// SHA-256 of the admin token; None disables the admin API. (Inline: the state is cloned per request.)
    pub admin_token_hash: Option<[u8; 32]>,
    /// GoTo's per-token request limit, when `--rate-limit` is set.
    pub rate_limit: Option<Arc<limit::RateLimit>>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "g2w-webhooks", description = "GoToWebinar Webhooks API: management (the GoTo contract and its real-service forms) and the admin API that publishes events and repairs deliveries."),
    tags((name = "Webhooks"), (name = "User Subscriptions"), (name = "Admin")),
    components(schemas(crate::error::ErrorBody))
)]
struct ApiDoc;

/// The router and its OpenAPI document, built from the same route table so they cannot drift.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let mut doc = ApiDoc::openapi();
    doc.servers = Some(vec![utoipa::openapi::server::Server::new(API_BASE)]);
    OpenApiRouter::with_openapi(doc)
        .nest(API_BASE, webhooks::router().merge(subscriptions::router()))
        .nest(ADMIN_BASE, admin::router())
        .split_for_parts()
}

pub fn app(state: AppState) -> Router {
    let (api, doc) = routes();
    let doc = Arc::new(doc);
    api.route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(move || async move { Json(doc.as_ref().clone()) }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(extract::MAX_BODY))
        .with_state(state)
}

/// A worker node's surface: health and metrics only.
pub fn ops_app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(uri: Uri) -> Error {
    Error::not_found(format!("no resource at {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Error {
    Error::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str> {
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Ok("ready"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the database does not answer");
            Err(Error::Unavailable("the database does not answer".into()))
        }
        Err(_) => Err(Error::Unavailable("the database does not answer within 2 s".into())),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let stats = match state.store.queue_stats().await {
        Ok(stats) => Some(stats),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: reading the waiting deliveries failed");
            state
                .engine
                .metrics
                .queue_read_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }
    };
    let body = state
        .engine
        .metrics
        .render(stats, state.store.commit_durations(), now_ms());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

/// Validation GETs of one request running at once.
const CHECKS_AT_ONCE: usize = 8;

/// Runs the address rules and the validation GET on each distinct callback URL: the rules first, for all of
/// them, then the GETs, `CHECKS_AT_ONCE` at a time, under one deadline (three check timeouts) for the lot. The
/// error is the first URL's, in order, that failed.
pub async fn validate_callbacks<'a>(state: &AppState, urls: impl Iterator<Item = &'a str>) -> Result<()> {
    let distinct: BTreeSet<&str> = urls.collect();
    for url in &distinct {
        outbound::check_url(url, state.policy)?;
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(CHECKS_AT_ONCE));
    let mut checks = tokio::task::JoinSet::new();
    for (i, url) in distinct.iter().enumerate() {
        let (client, url, policy, slots) = (state.check_client.clone(), url.to_string(), state.policy, slots.clone());
        checks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            (i, outbound::validate(&client, &url, policy).await)
        });
    }
    let deadline = state.check_timeout * 3;
    let mut failed: Option<(usize, Error)> = None;
    let all = async {
        while let Some(done) = checks.join_next().await {
            if let Ok((i, Err(e))) = done {
                if failed.as_ref().is_none_or(|(first, _)| i < *first) {
                    failed = Some((i, e));
                }
            }
        }
    };
    if tokio::time::timeout(deadline, all).await.is_err() {
        return Err(Error::InvalidCallbackUrl(format!(
            "callbackUrl: the validation GETs of this request did not all answer within {} s",
            deadline.as_secs()
        )));
    }
    failed.map_or(Ok(()), |(_, e)| Err(e))
}
