//! User subscriptions: an organizer subscribing to one of the application's webhooks.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{one_or_many, parse, Auth, JsonBody, QueryMap};
use super::webhooks::keys_of;
use super::{validate_callbacks, AppState};
use crate::domain::{
    format_ms, is_key, EventName, NewSubscription, Product, State as SubState, Subscription, SubscriptionChange,
};
use crate::error::{Error, ErrorBody, Result};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(
            list_subscriptions,
            create_subscription,
            update_subscriptions,
            delete_subscriptions
        ))
        .routes(routes!(get_subscription, update_subscription, delete_subscription))
}

/// A user subscription: the contract's fields plus the real service's.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionDto {
    subscription_key: String,
    /// The real GoTo API's name for `subscriptionKey`.
    user_subscription_key: String,
    /// The organizer key.
    user_key: String,
    webhook_key: String,
    callback_url: String,
    user_subscription_state: SubState,
    /// ACTIVE only when both the webhook and the subscription are ACTIVE.
    activation_state: SubState,
    event_name: EventName,
    event_version: String,
    product: Product,
    create_time: String,
    /// Why the service deactivated the subscription, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    inactive_reason: Option<String>,
}

impl From<Subscription> for SubscriptionDto {
    fn from(s: Subscription) -> Self {
        Self {
            callback_url: s.effective_callback_url().to_string(),
            activation_state: s.activation_state(),
            subscription_key: s.key.clone(),
            user_subscription_key: s.key,
            user_key: s.organizer_key.to_string(),
            webhook_key: s.webhook_key,
            user_subscription_state: s.state,
            event_name: s.webhook.event_name,
            event_version: s.webhook.event_version,
            product: Product::G2w,
            create_time: format_ms(s.created_at),
            inactive_reason: s.inactive_reason,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    #[serde(rename = "_embedded")]
    embedded: EmbeddedSubscriptions,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct EmbeddedSubscriptions {
    user_subscriptions: Vec<SubscriptionDto>,
}

fn embedded(subs: Vec<Subscription>) -> SubscriptionList {
    SubscriptionList {
        embedded: EmbeddedSubscriptions {
            user_subscriptions: subs.into_iter().map(Into::into).collect(),
        },
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionCreate {
    webhook_key: String,
    /// Required by the object form; the array form falls back to the webhook's URL.
    #[serde(default)]
    callback_url: Option<String>,
    #[serde(default)]
    user_subscription_state: Option<SubState>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionUpdate {
    #[serde(default)]
    callback_url: Option<String>,
    #[serde(default)]
    user_subscription_state: Option<SubState>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionBulkUpdate {
    #[serde(default)]
    user_subscription_key: Option<String>,
    #[serde(default)]
    subscription_key: Option<String>,
    #[serde(default)]
    callback_url: Option<String>,
    #[serde(default)]
    user_subscription_state: Option<SubState>,
}

/// List the organizer's subscriptions: the contract's plain array, or `_embedded` when `product` (or
/// `productType`) is given, as real clients send.
#[utoipa::path(get, path = "/userSubscriptions", operation_id = "listUserSubscriptions", tag = "User Subscriptions",
    params(("product" = Option<String>, Query, description = "g2w: answer the real `_embedded` form"),
           ("productType" = Option<String>, Query, description = "alias of product")),
    responses((status = 200, description = "User subscriptions.", body = Vec<SubscriptionDto>),
              (status = 403, body = ErrorBody)))]
async fn list_subscriptions(State(state): State<AppState>, Auth(t): Auth, q: QueryMap) -> Result<Response> {
    let subs = state.store.list_subscriptions(t).await?;
    if q.get("product").is_some() || q.get("productType").is_some() {
        return Ok(Json(embedded(subs)).into_response());
    }
    let plain: Vec<SubscriptionDto> = subs.into_iter().map(Into::into).collect();
    Ok(Json(plain).into_response())
}

/// Subscribe the organizer to a webhook. An object answers 201; an array (real GoTo form) answers 200 with
/// `_embedded.userSubscriptions`.
#[utoipa::path(post, path = "/userSubscriptions", operation_id = "createUserSubscription", tag = "User Subscriptions",
    request_body = SubscriptionCreate,
    responses((status = 201, description = "User subscription created.", body = SubscriptionDto),
              (status = 200, description = "Array form.", body = SubscriptionList),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn create_subscription(State(state): State<AppState>, Auth(t): Auth, body: JsonBody) -> Result<Response> {
    let (items, is_array): (Vec<SubscriptionCreate>, bool) = one_or_many(body.required()?)?;
    if !is_array && items.iter().any(|i| i.callback_url.is_none()) {
        return Err(Error::bad_request("callbackUrl: missing field `callbackUrl`"));
    }
    for i in &items {
        if !is_key(&i.webhook_key) || state.store.get_webhook(t.app_id, &i.webhook_key).await?.is_none() {
            return Err(Error::not_found(format!("webhookKey {} not found", i.webhook_key)));
        }
    }
    validate_callbacks(&state, items.iter().filter_map(|i| i.callback_url.as_deref())).await?;
    let new = items
        .into_iter()
        .map(|i| NewSubscription {
            webhook_key: i.webhook_key,
            callback_url: i.callback_url,
            state: i.user_subscription_state.unwrap_or(SubState::Active),
        })
        .collect();
    let created = state
        .store
        .create_subscriptions(t, new, state.limits.subscriptions_per_organizer)
        .await?;
    if is_array {
        return Ok((StatusCode::OK, Json(embedded(created))).into_response());
    }
    let one = created
        .into_iter()
        .next()
        .ok_or_else(|| Error::Internal("no subscription created".into()))?;
    Ok((StatusCode::CREATED, Json(SubscriptionDto::from(one))).into_response())
}

/// Update subscriptions in bulk (real GoTo form): `[{"userSubscriptionKey", "userSubscriptionState", "callbackUrl"}]`.
#[utoipa::path(put, path = "/userSubscriptions", operation_id = "updateUserSubscriptions", tag = "User Subscriptions",
    request_body = Vec<SubscriptionBulkUpdate>,
    responses((status = 204, description = "Updated."), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_subscriptions(State(state): State<AppState>, Auth(t): Auth, body: JsonBody) -> Result<StatusCode> {
    let (items, _): (Vec<SubscriptionBulkUpdate>, _) = one_or_many(body.required()?)?;
    let mut changes = Vec::with_capacity(items.len());
    for (i, u) in items.into_iter().enumerate() {
        let key = u.user_subscription_key.or(u.subscription_key).ok_or_else(|| {
            Error::bad_request(format!(
                "[{i}].userSubscriptionKey: missing field `userSubscriptionKey`"
            ))
        })?;
        changes.push(SubscriptionChange {
            key,
            state: u.user_subscription_state,
            callback_url: u.callback_url,
        });
    }
    apply_changes(&state, t, changes).await
}

async fn apply_changes(
    state: &AppState,
    t: crate::domain::Tenant,
    changes: Vec<SubscriptionChange>,
) -> Result<StatusCode> {
    for c in &changes {
        if !is_key(&c.key) || state.store.get_subscription(t, &c.key).await?.is_none() {
            return Err(Error::not_found(format!("userSubscriptionKey {} not found", c.key)));
        }
    }
    validate_callbacks(state, changes.iter().filter_map(|c| c.callback_url.as_deref())).await?;
    state.store.update_subscriptions(t, changes).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Delete subscriptions in bulk (real GoTo form). Keys already gone, and an empty array, answer 202 too.
#[utoipa::path(delete, path = "/userSubscriptions", operation_id = "deleteUserSubscriptions", tag = "User Subscriptions",
    request_body = Vec<String>,
    responses((status = 202, description = "Deleted."), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn delete_subscriptions(State(state): State<AppState>, Auth(t): Auth, body: JsonBody) -> Result<StatusCode> {
    let keys = keys_of(body, "userSubscriptionKey")?;
    state.store.delete_subscriptions(t, &keys).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn find(state: &AppState, t: crate::domain::Tenant, key: &str) -> Result<Subscription> {
    let found = match is_key(key) {
        true => state.store.get_subscription(t, key).await?,
        false => None,
    };
    found.ok_or_else(|| Error::not_found(format!("subscriptionKey {key} not found")))
}

/// Get one user subscription.
#[utoipa::path(get, path = "/userSubscriptions/{subscriptionKey}", operation_id = "getUserSubscription",
    tag = "User Subscriptions", params(("subscriptionKey" = String, Path)),
    responses((status = 200, description = "User subscription.", body = SubscriptionDto),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_subscription(
    State(state): State<AppState>,
    Auth(t): Auth,
    Path(key): Path<String>,
) -> Result<Json<SubscriptionDto>> {
    Ok(Json(find(&state, t, &key).await?.into()))
}

/// Update one user subscription.
#[utoipa::path(put, path = "/userSubscriptions/{subscriptionKey}", operation_id = "updateUserSubscription",
    tag = "User Subscriptions", params(("subscriptionKey" = String, Path)), request_body = SubscriptionUpdate,
    responses((status = 204, description = "Updated."), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_subscription(
    State(state): State<AppState>,
    Auth(t): Auth,
    Path(key): Path<String>,
    body: JsonBody,
) -> Result<StatusCode> {
    let u: SubscriptionUpdate = parse(body.required()?, "")?;
    find(&state, t, &key).await?;
    let change = SubscriptionChange {
        key,
        state: u.user_subscription_state,
        callback_url: u.callback_url,
    };
    apply_changes(&state, t, vec![change]).await
}

/// Delete one user subscription.
#[utoipa::path(delete, path = "/userSubscriptions/{subscriptionKey}", operation_id = "deleteUserSubscription",
    tag = "User Subscriptions", params(("subscriptionKey" = String, Path)),
    responses((status = 204, description = "Deleted."), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_subscription(
    State(state): State<AppState>,
    Auth(t): Auth,
    Path(key): Path<String>,
) -> Result<StatusCode> {
    find(&state, t, &key).await?;
    state.store.delete_subscriptions(t, &[key]).await?;
    Ok(StatusCode::NO_CONTENT)
}
