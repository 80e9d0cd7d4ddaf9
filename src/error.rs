//! The one error type of the service and its GoTo-style body:
//! `{"errorCode": "...", "description": "...", "incident": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidCallbackUrl(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request did not arrive in full within `--request-timeout`.
    #[error("{0}")]
    RequestTimeout(String),
    /// Past `--rate-limit`: 429 with `Retry-After`.
    #[error("{0}")]
    TooManyRequests(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// From the SQLite connection that carries the delivery hot path.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Internal(String),
    /// A setting the service cannot start with (found at start-up, never in answer to a request).
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Internal(format!("migrating the database: {e}"))
    }
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error_code: String,
    pub description: String,
    pub incident: String,
}

impl Error {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Error::BadRequest(msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Error::NotFound(msg.into())
    }

    /// The error to give each request of a group commit that failed with `self`: a database that is
    /// unreachable or overloaded stays a 503, anything else a 500, with the cause in the log.
    pub fn for_each_of_a_group(&self) -> Self {
        match self.parts().0 {
            StatusCode::SERVICE_UNAVAILABLE => Error::Unavailable(format!("group commit failed: {self}")),
            _ => Error::Internal(format!("group commit failed: {self}")),
        }
    }

    /// SQLite answered SQLITE_BUSY: another connection held the write lock past the busy timeout.
    pub fn is_busy(&self) -> bool {
        match self {
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => e.code == rusqlite::ErrorCode::DatabaseBusy,
            Error::Database(sqlx::Error::Database(d)) => d.code().as_deref() == Some("5"),
            _ => false,
        }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            Error::InvalidCallbackUrl(_) => (StatusCode::BAD_REQUEST, "InvalidCallbackUrl"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "InvalidToken"),
            Error::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType"),
            Error::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            Error::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            Error::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
            Error::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
            // The connection could not be made or broke mid-conversation (a TLS negotiation cut short reads as
            // a protocol error): the database is away, not the request wrong.
            Error::Database(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed,
            ) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::CannotOpen
                ) =>
            {
                (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
            }
            Error::Database(_) | Error::Sqlite(_) | Error::Internal(_) | Error::Config(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "InternalError")
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let incident = uuid::Uuid::new_v4().to_string();
        let description = if status.is_server_error() {
            // Internal detail goes to the log under the incident id, never to the client.
            tracing::error!(%incident, error = %self, "request failed");
            // Never the driver's text: the same words for every 503, and for every 500.
            match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "the service is unavailable for a moment (its database); try again".to_string()
                }
                _ => "internal error; quote the incident id when reporting it".to_string(),
            }
        } else {
            tracing::info!(%incident, status = status.as_u16(), error = %self, "request refused");
            self.to_string()
        };
        let body = ErrorBody {
            error_code: code.to_string(),
            description,
            incident,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_database_is_unavailable_and_retried_not_an_internal_error() {
        // SQLITE_BUSY (5) from the hot-path connection: the writer retries it, and a group that still fails
        // answers 503 with a retryable message rather than a 500.
        let busy = Error::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(5), None));
        assert!(busy.is_busy());
        assert_eq!(busy.parts().0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(matches!(busy.for_each_of_a_group(), Error::Unavailable(_)));

        let constraint = Error::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(19), None));
        assert!(!constraint.is_busy());
        assert_eq!(constraint.parts().0, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(matches!(constraint.for_each_of_a_group(), Error::Internal(_)));
    }
}
