//! Extractors whose rejections are our error type: a tolerant JSON body, the caller's tenant, the admin token.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::AppState;
use crate::domain::Tenant;
use crate::error::Error;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// A JSON body read leniently, as real clients send it: no Content-Type is read as JSON; only a present,
/// non-JSON Content-Type is refused. `None` when the body is empty.
pub struct JsonBody(pub Option<Value>);

fn is_json_type(ct: &str) -> bool {
    let mime = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    mime == "application/json" || mime == "text/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// The raw bytes of a JSON body, after the same Content-Type and size checks as `JsonBody`.
pub struct RawJson(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawJson {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default();
            if !ct.trim().is_empty() && !is_json_type(ct) {
                return Err(Error::UnsupportedMediaType(format!(
                    "Content-Type `{ct}` is not supported; send application/json"
                )));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge(format!("the request body is larger than {MAX_BODY} bytes"))
            } else {
                Error::bad_request(format!("the request body could not be read: {e}"))
            }
        })?;
        Ok(RawJson(bytes))
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawJson(bytes) = RawJson::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(None));
        }
        serde_json::from_slice(&bytes)
            .map(|v| JsonBody(Some(v)))
            .map_err(|e| Error::bad_request(format!("the body is not valid JSON: {e}")))
    }
}

impl JsonBody {
    pub fn required(self) -> Result<Value, Error> {
        self.0.ok_or_else(|| Error::bad_request("a JSON body is required"))
    }
}

/// Deserializes `value` into `T`, naming the field and the problem on failure (`[0].eventName: unknown variant`).
pub fn parse<T: DeserializeOwned>(value: Value, at: &str) -> Result<T, Error> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (at.is_empty(), path == ".") {
            (true, true) => "body".to_string(),
            (true, false) => path,
            (false, true) => at.to_string(),
            (false, false) => format!("{at}.{path}"),
        };
        Error::bad_request(format!("{field}: {}", e.into_inner()))
    })
}

/// Most items one management request may carry (create, update or delete).
pub const MAX_ITEMS: usize = 100;

/// Refuses an array of more than `MAX_ITEMS`.
pub fn at_most_max_items(len: usize) -> Result<(), Error> {
    if len > MAX_ITEMS {
        return Err(Error::bad_request(format!(
            "body: {len} items; a request carries at most {MAX_ITEMS}"
        )));
    }
    Ok(())
}

/// A body that is one object or an array of them (at most `MAX_ITEMS`); `true` when it was an array.
pub fn one_or_many<T: DeserializeOwned>(value: Value) -> Result<(Vec<T>, bool), Error> {
    match value {
        Value::Array(items) => {
            at_most_max_items(items.len())?;
            let parsed = items
                .into_iter()
                .enumerate()
                .map(|(i, v)| parse(v, &format!("[{i}]")))
                .collect::<Result<_, _>>()?;
            Ok((parsed, true))
        }
        Value::Object(_) => Ok((vec![parse(value, "")?], false)),
        other => Err(Error::bad_request(format!(
            "body: expected a JSON object or array, found {}",
            kind(&other)
        ))),
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The tenant of the bearer token. A missing, unknown or revoked token gets 403, as the real service answers.
pub struct Auth(pub Tenant);

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(|| Error::Forbidden("a bearer token is required".into()))?;
        let hash = crate::domain::token::hash(token);
        let tenant = state
            .store
            .find_token(&hash)
            .await?
            .ok_or_else(|| Error::Forbidden("invalid token passed".into()))?;
        if let Some(limit) = &state.rate_limit {
            limit.take(&hash, std::time::Instant::now())?;
        }
        Ok(Auth(tenant))
    }
}

/// The caller presented the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.admin_token_hash else {
            return Err(Error::Forbidden(
                "the admin API is disabled: start the server with --admin-token".into(),
            ));
        };
        let token = bearer(parts).ok_or_else(|| Error::Forbidden("the admin token is required".into()))?;
        if crate::domain::token::matches(token, expected) {
            Ok(Admin)
        } else {
            Err(Error::Forbidden("invalid admin token".into()))
        }
    }
}

/// Query parameters, parsed leniently: unknown ones are ignored and nothing here can fail.
pub struct QueryMap(pub Vec<(String, String)>);

impl QueryMap {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or_default();
        Ok(QueryMap(
            url::form_urlencoded::parse(q.as_bytes()).into_owned().collect(),
        ))
    }
}
