//! The HTTP server: hyper's connection builder with a header read timeout, a whole-request timeout around every
//! handler, and a graceful shutdown. (`axum::serve` sets neither timeout: a client sending one byte a second
//! would hold its connection for ever.)

use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// How long a shutdown waits for requests in progress.
const DRAIN: Duration = Duration::from_secs(10);

/// Answers 408 when a request (its body included) takes longer than `limit` to be answered.
pub fn with_request_timeout(app: Router, limit: Duration) -> Router {
    app.layer(axum::middleware::from_fn(move |req: Request, next: Next| async move {
        match tokio::time::timeout(limit, next.run(req)).await {
            Ok(response) => response,
            Err(_) => Error::RequestTimeout(format!(
                "the request was not received and answered within {} s (--request-timeout)",
                limit.as_secs_f64()
            ))
            .into_response(),
        }
    }))
}

/// Serves `app` on `listener` until `shutdown`, then waits (at most `DRAIN`) for requests in progress.
/// A connection whose request headers do not arrive within `header_timeout` is closed.
pub async fn serve(listener: TcpListener, app: Router, header_timeout: Duration, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Answers go out as soon as they are written: no Nagle delay on keep-alive connections.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
        }
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in progress after {} s; closing them", DRAIN.as_secs());
    }
}

/// True when an address serves beyond this machine, where `--dev` (private callback URLs, printed tokens) must
/// not run unless asked for with `--dev-allow-remote`.
pub fn beyond_loopback(addr: std::net::SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_counts_as_local() {
        assert!(!beyond_loopback("127.0.0.1:8080".parse().expect("addr")));
        assert!(!beyond_loopback("[::1]:8080".parse().expect("addr")));
        assert!(beyond_loopback("0.0.0.0:8080".parse().expect("addr")));
        assert!(beyond_loopback("10.1.2.3:8080".parse().expect("addr")));
    }
}
