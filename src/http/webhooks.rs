//! Webhooks and the application's secret keys: the contract's operations and the real GoTo forms.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{one_or_many, parse, Auth, JsonBody};
use super::{validate_callbacks, AppState};
use crate::domain::{
    format_ms, is_key, new_key, now_ms, parse_time, EventName, NewWebhook, Product, State as HookState, Webhook,
    WebhookChange,
};
use crate::error::{Error, ErrorBody, Result};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, update_webhooks, list_webhooks, delete_webhooks))
        .routes(routes!(get_webhook))
        .routes(routes!(create_secret_key))
}

/// A webhook as the API shows it: the contract's fields plus the real service's `state`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDto {
    webhook_key: String,
    product: Product,
    event_name: EventName,
    event_version: String,
    callback_url: String,
    webhook_state: HookState,
    /// The real GoTo API's name for `webhookState`.
    state: HookState,
    create_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_key: Option<String>,
    /// What signs its deliveries: `WEBHOOK_SECRET_KEY` (its own) or `APPLICATION_SECRET_KEY` (the application's
    /// newest key valid now; the application's first webhook creates one if it has none). Nothing is unsigned.
    signing: &'static str,
}

impl WebhookDto {
    fn new(w: Webhook) -> Self {
        let signing = match &w.secret_key {
            Some(_) => "WEBHOOK_SECRET_KEY",
            None => "APPLICATION_SECRET_KEY",
        };
        Self {
            webhook_key: w.key,
            product: Product::G2w,
            event_name: w.event_name,
            event_version: w.event_version,
            callback_url: w.callback_url,
            webhook_state: w.state,
            state: w.state,
            create_time: format_ms(w.created_at),
            secret_key: w.secret_key,
            signing,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    #[serde(rename = "_embedded")]
    embedded: EmbeddedWebhooks,
}

#[derive(Debug, Serialize, ToSchema)]
struct EmbeddedWebhooks {
    webhooks: Vec<WebhookDto>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookCreate {
    /// Checked by deserialization: only `g2w` is accepted.
    #[allow(dead_code)]
    product: Product,
    event_name: EventName,
    event_version: String,
    callback_url: String,
    #[serde(default)]
    secret_key: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookUpdate {
    webhook_key: String,
    #[serde(default)]
    webhook_state: Option<HookState>,
    /// The real GoTo API's name for `webhookState`.
    #[serde(default)]
    state: Option<HookState>,
    #[serde(default)]
    callback_url: Option<String>,
}

fn dtos(hooks: Vec<Webhook>) -> Vec<WebhookDto> {
    hooks.into_iter().map(WebhookDto::new).collect()
}

fn list(webhooks: Vec<WebhookDto>) -> WebhookList {
    WebhookList {
        embedded: EmbeddedWebhooks { webhooks },
    }
}

/// Create a webhook (INACTIVE). An object answers 201 with the webhook; an array (the real GoTo form) answers 200
/// with `_embedded.webhooks`.
#[utoipa::path(post, path = "/webhooks", operation_id = "createWebhook", tag = "Webhooks",
    request_body = WebhookCreate,
    responses(
        (status = 201, description = "Webhook created in INACTIVE state.", body = WebhookDto),
        (status = 200, description = "Array form: webhooks created in INACTIVE state.", body = WebhookList),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
    ))]
async fn create_webhook(State(state): State<AppState>, Auth(t): Auth, body: JsonBody) -> Result<Response> {
    let (items, is_array): (Vec<WebhookCreate>, bool) = one_or_many(body.required()?)?;
    validate_callbacks(&state, items.iter().map(|i| i.callback_url.as_str())).await?;
    let new = items
        .into_iter()
        .map(|i| NewWebhook {
            event_name: i.event_name,
            event_version: i.event_version,
            callback_url: i.callback_url,
            secret_key: i.secret_key,
        })
        .collect();
    let created = dtos(
        state
            .store
            .create_webhooks(t.app_id, new, state.limits.webhooks_per_app)
            .await?,
    );
    if is_array {
        Ok((StatusCode::OK, Json(list(created))).into_response())
    } else {
        let one = created
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("no webhook created".into()))?;
        Ok((StatusCode::CREATED, Json(one)).into_response())
    }
}

/// Activate, deactivate or re-point webhooks. Accepts `webhookState` or the real API's `state`.
#[utoipa::path(put, path = "/webhooks", operation_id = "updateWebhooks", tag = "Webhooks",
    request_body = Vec<WebhookUpdate>,
    responses(
        (status = 204, description = "Webhooks updated."),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ))]
async fn update_webhooks(State(state): State<AppState>, Auth(t): Auth, body: JsonBody) -> Result<StatusCode> {
    let (items, _): (Vec<WebhookUpdate>, _) = one_or_many(body.required()?)?;
    let mut changes = Vec::with_capacity(items.len());
    for (i, u) in items.into_iter().enumerate() {
        let new_state = u.webhook_state.or(u.state);
        if new_state.is_none() && u.callback_url.is_none() {
            return Err(Error::bad_request(format!(
                "[{i}].webhookState: missing field `webhookState`"
            )));
        }
        if !is_key(&u.webhook_key) {
            return Err(Error::not_found(format!("webhookKey {} not found", u.webhook_key)));
        }
        changes.push(WebhookChange {
            key: u.webhook_key,
            state: new_state,
            callback_url: u.callback_url,
        });
    }
    for c in &changes {
        if state.store.get_webhook(t.app_id, &c.key).await?.is_none() {
            return Err(Error::not_found(format!("webhookKey {} not found", c.key)));
        }
    }
    validate_callbacks(&state, changes.iter().filter_map(|c| c.callback_url.as_deref())).await?;
    state.store.update_webhooks(t.app_id, changes).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List the application's webhooks (real GoTo: `GET /webhooks?product=g2w`).
#[utoipa::path(get, path = "/webhooks", operation_id = "listWebhooks", tag = "Webhooks",
    params(("product" = Option<String>, Query, description = "g2w; accepted and ignored"),
           ("productType" = Option<String>, Query, description = "alias of product")),
    responses((status = 200, body = WebhookList), (status = 403, body = ErrorBody)))]
async fn list_webhooks(State(state): State<AppState>, Auth(t): Auth) -> Result<Json<WebhookList>> {
    let hooks = state.store.list_webhooks(t.app_id).await?;
    Ok(Json(list(dtos(hooks))))
}

/// Delete webhooks by key, with their user subscriptions (real GoTo form). Keys not found are ignored.
#[utoipa::path(delete, path = "/webhooks", operation_id = "deleteWebhooks", tag = "Webhooks",
    request_body = Vec<String>,
    responses((status = 202, description = "Deleted."), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn delete_webhooks(State(state): State<AppState>, Auth(t): Auth, body: JsonBody) -> Result<StatusCode> {
    let keys = keys_of(body, "webhookKey")?;
    state.store.delete_webhooks(t.app_id, &keys).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Reads the keys of a bulk delete: `["k1", "k2"]`, or objects carrying the key; no body means none.
pub fn keys_of(body: JsonBody, field: &str) -> Result<Vec<String>> {
    let Some(value) = body.0 else {
        return Ok(Vec::new());
    };
    let items = match value {
        serde_json::Value::Array(items) => items,
        other => vec![other],
    };
    super::extract::at_most_max_items(items.len())?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Object(mut o) => match o.remove(field).or_else(|| o.remove("subscriptionKey")) {
                Some(serde_json::Value::String(s)) => Ok(s),
                _ => Err(Error::bad_request(format!("[{i}].{field}: missing field `{field}`"))),
            },
            other => Err(Error::bad_request(format!(
                "[{i}]: expected a key string, found {}",
                super::extract::kind(&other)
            ))),
        })
        .collect()
}

/// Get one webhook.
#[utoipa::path(get, path = "/webhooks/{webhookKey}", operation_id = "getWebhook", tag = "Webhooks",
    params(("webhookKey" = String, Path)),
    responses((status = 200, description = "Webhook record.", body = WebhookDto),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_webhook(
    State(state): State<AppState>,
    Auth(t): Auth,
    Path(key): Path<String>,
) -> Result<Json<WebhookDto>> {
    let hook = match is_key(&key) {
        true => state.store.get_webhook(t.app_id, &key).await?,
        false => None,
    }
    .ok_or_else(|| Error::not_found(format!("webhookKey {key} not found")))?;
    Ok(Json(WebhookDto::new(hook)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyCreate {
    /// When the key starts signing (ISO-8601); now when absent.
    #[serde(default)]
    valid_from: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyDto {
    secret_key: String,
    /// The real GoTo API's name for `secretKey`.
    value: String,
    valid_from: String,
    id: i64,
}

/// Create the application's new secret key. It signs deliveries from its `validFrom` on (rotation).
#[utoipa::path(post, path = "/webhooks/secretkey", operation_id = "createWebhookSecretKey", tag = "Webhooks",
    request_body(content = Option<SecretKeyCreate>, description = "Optional"),
    responses((status = 201, description = "Secret key created.", body = SecretKeyDto),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_secret_key(State(state): State<AppState>, Auth(t): Auth, body: JsonBody) -> Result<Response> {
    let valid_from = match body.0 {
        None => now_ms(),
        Some(v) => {
            let req: SecretKeyCreate = parse(v, "")?;
            match req.valid_from {
                None => now_ms(),
                Some(s) => parse_time(&s).ok_or_else(|| {
                    Error::bad_request(format!(
                        "validFrom: `{s}` is not an ISO-8601 date-time like 2019-07-01T22:00:00Z"
                    ))
                })?,
            }
        }
    };
    let key = state.store.create_secret_key(t.app_id, &new_key(), valid_from).await?;
    let dto = SecretKeyDto {
        secret_key: key.value.clone(),
        value: key.value,
        valid_from: format_ms(key.valid_from),
        id: key.id,
    };
    Ok((StatusCode::CREATED, Json(dto)).into_response())
}
