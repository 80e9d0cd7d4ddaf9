//! g2w-relay: the one-event-per-request scenario's second ceiling, started by g2w-bench.
//!
//! It does for each published event only the two HTTP exchanges g2w-webhooks does: it answers the publish
//! request (202, an answer of the same shape) and posts the event to the receiver through the server's own
//! delivery client, at most `--max-in-flight` at a time, as the delivery engine does. It stores nothing,
//! signs nothing and looks nothing up, so what it reaches is the most any server on the same HTTP stack could
//! deliver in that scenario on this machine; g2w-webhooks' gap to it is what durability and the rest cost.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{HeaderValue, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::{get, post};
use clap::Parser;
use g2w_webhooks::outbound::{DeliveryClient, Policy};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, Semaphore};

/// The server's allocator, so the relay pays for allocation what the server pays.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "g2w-relay",
    about = "Answer each publish and forward its events, with nothing between"
)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Where every event goes.
    #[arg(long)]
    target: Uri,
    /// Requests to the target at once.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
}

async fn publish(State(tx): State<mpsc::UnboundedSender<Bytes>>, body: Bytes) -> (StatusCode, HeaderMap, String) {
    let Ok(events) = serde_json::from_slice::<Vec<&RawValue>>(&body) else {
        return (StatusCode::BAD_REQUEST, HeaderMap::new(), String::new());
    };
    let mut answer = String::from(r#"{"events":["#);
    for (i, event) in events.iter().enumerate() {
        let _ = tx.send(Bytes::copy_from_slice(event.get().as_bytes()));
        if i > 0 {
            answer.push(',');
        }
        answer.push_str(&format!(
            r#"{{"eventKey":"{}","deliveries":1,"duplicate":false}}"#,
            uuid::Uuid::now_v7()
        ));
    }
    answer.push_str("]}");
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    (StatusCode::ACCEPTED, headers, answer)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let http = DeliveryClient::new(Policy::AllowPrivate, Duration::from_secs(30), args.max_in_flight);
    let permits = Arc::new(Semaphore::new(args.max_in_flight));
    let target = args.target.clone();
    tokio::spawn(async move {
        while let Some(body) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (http, target) = (http.clone(), target.clone());
            tokio::spawn(async move {
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                let _ = http.post(target, headers, body, 1024).await;
                drop(permit);
            });
        }
    });
    let app = axum::Router::new()
        .route("/admin/v1/events", post(publish))
        .route("/readyz", get(|| async { StatusCode::OK }))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
