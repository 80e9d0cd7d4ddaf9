//! The admin API (`/admin/v1`, admin token): publishing events and seeing and repairing deliveries.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{Admin, QueryMap, RawJson};
use super::AppState;
use crate::domain::delivery::{RetryTarget, Standing, DELIVERY_STATES};
use crate::domain::event::parse_batch;
use crate::domain::parse_time;
use crate::error::{Error, ErrorBody, Result};
use crate::store::{AttemptRow, DeliveryFilter, DeliveryRow};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(publish_events))
        .routes(routes!(redeliver_event))
        .routes(routes!(list_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(retry_delivery))
        .routes(routes!(retry_failed))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    events: Vec<PublishedEvent>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedEvent {
    event_key: String,
    /// Deliveries the event created (for a repeated eventKey: those it created the first time).
    deliveries: i64,
    /// True when this eventKey was already published; nothing new was created.
    duplicate: bool,
}

/// Publish one event or an array of up to 1,000. Answers after the events and their deliveries are committed.
#[utoipa::path(post, path = "/events", operation_id = "publishEvents", tag = "Admin",
    request_body(content = Object, description = "One event object (the payload subscribers receive) or an array"),
    responses((status = 202, body = Published), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn publish_events(
    State(state): State<AppState>,
    _: Admin,
    RawJson(body): RawJson,
) -> Result<(StatusCode, Json<Published>)> {
    let events = parse_batch(&body)?;
    let outcomes = state.engine.publish(events).await?;
    let events = outcomes
        .into_iter()
        .map(|o| PublishedEvent {
            event_key: o.event_key,
            deliveries: o.deliveries,
            duplicate: o.duplicate,
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(Published { events })))
}

/// A delivery: where it goes and how far it got. Times are milliseconds since the Unix epoch.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    id: i64,
    event_key: String,
    event_name: String,
    webhook_key: String,
    subscription_key: String,
    url: String,
    /// pending, delivered, failed, paused or cancelled.
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_status: Option<i64>,
    /// The last attempt's error, or why the delivery is paused or cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl From<DeliveryRow> for Delivery {
    fn from(d: DeliveryRow) -> Self {
        Self {
            id: d.id,
            event_key: d.event_key,
            event_name: d.event_name,
            webhook_key: d.webhook_key,
            subscription_key: d.subscription_key,
            url: d.url,
            state: d.state,
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at,
            last_status: d.last_status,
            last_error: d.last_error,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

/// One attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    number: i64,
    node: String,
    started_at: i64,
    duration_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_excerpt: Option<String>,
}

impl From<AttemptRow> for Attempt {
    fn from(a: AttemptRow) -> Self {
        Self {
            number: a.number,
            node: a.node,
            started_at: a.started_at,
            duration_ms: a.duration_ms,
            status_code: a.status_code,
            error: a.error,
            response_excerpt: a.response_excerpt,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    deliveries: Vec<Delivery>,
    /// Pass as `cursor` to get the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

fn time_param(q: &QueryMap, name: &str) -> Result<Option<i64>> {
    q.get(name)
        .map(|v| parse_time(v).ok_or_else(|| Error::bad_request(format!("{name}: `{v}` is not an ISO-8601 date-time"))))
        .transpose()
}

/// List deliveries, newest first, with filters and cursor pagination.
#[utoipa::path(get, path = "/deliveries", operation_id = "listDeliveries", tag = "Admin",
    params(("state" = Option<String>, Query, description = "pending, delivered, failed, paused or cancelled"),
           ("webhookKey" = Option<String>, Query), ("subscriptionKey" = Option<String>, Query),
           ("eventName" = Option<String>, Query), ("eventKey" = Option<String>, Query),
           ("since" = Option<String>, Query, description = "created at or after (ISO-8601)"),
           ("until" = Option<String>, Query, description = "created before (ISO-8601)"),
           ("limit" = Option<i64>, Query, description = "1 to 1000, default 100"),
           ("cursor" = Option<String>, Query)),
    responses((status = 200, body = DeliveryPage), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_deliveries(State(state): State<AppState>, _: Admin, q: QueryMap) -> Result<Json<DeliveryPage>> {
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| Error::bad_request(format!("limit: `{v}` is not a number from 1 to 1000")))?,
    };
    if let Some(s) = q.get("state") {
        if !DELIVERY_STATES.contains(&s) {
            return Err(Error::bad_request(format!(
                "state: `{s}` is not one of {}",
                DELIVERY_STATES.join(", ")
            )));
        }
    }
    let before_id = q
        .get("cursor")
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| Error::bad_request(format!("cursor: `{c}` is not a cursor from this API")))
        })
        .transpose()?;
    let filter = DeliveryFilter {
        state: q.get("state").map(str::to_string),
        webhook_key: q.get("webhookKey").map(str::to_string),
        subscription_key: q.get("subscriptionKey").map(str::to_string),
        event_name: q.get("eventName").map(str::to_string),
        event_key: q.get("eventKey").map(str::to_string),
        since: time_param(&q, "since")?,
        until: time_param(&q, "until")?,
        before_id,
        limit,
    };
    let deliveries = state.store.list_deliveries(&filter).await?;
    let next_cursor = (deliveries.len() as i64 == limit)
        .then(|| deliveries.last().map(|d| d.id.to_string()))
        .flatten();
    Ok(Json(DeliveryPage {
        deliveries: deliveries.into_iter().map(Delivery::from).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryDetail {
    #[serde(flatten)]
    delivery: Delivery,
    attempt_log: Vec<Attempt>,
}

/// One delivery with every attempt.
#[utoipa::path(get, path = "/deliveries/{id}", operation_id = "getDelivery", tag = "Admin",
    params(("id" = i64, Path)),
    responses((status = 200, body = DeliveryDetail), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_delivery(State(state): State<AppState>, _: Admin, Path(id): Path<String>) -> Result<Json<DeliveryDetail>> {
    let found = match id.parse::<i64>() {
        Ok(n) => state.store.get_delivery(n).await?,
        Err(_) => None,
    };
    let (delivery, attempt_log) = found.ok_or_else(|| Error::not_found(format!("delivery {id} not found")))?;
    Ok(Json(DeliveryDetail {
        delivery: delivery.into(),
        attempt_log: attempt_log.into_iter().map(Attempt::from).collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Retried {
    /// Deliveries scheduled to be attempted now.
    retried: u64,
}

async fn retry(state: &AppState, target: RetryTarget<'_>, what: String) -> Result<(StatusCode, Json<Retried>)> {
    if let RetryTarget::Delivery(id) = target {
        let (d, _) = state
            .store
            .get_delivery(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("{what} not found")))?;
        match state.store.route(&d.subscription_key, &d.webhook_key).await?.standing {
            Standing::Active => {}
            Standing::Inactive => {
                return Err(Error::Conflict(format!(
                    "{what} waits for subscription {} and its webhook to be ACTIVE again; it is sent then",
                    d.subscription_key
                )))
            }
            Standing::Gone(why) => {
                return Err(Error::Conflict(format!(
                    "{what} cannot be sent again: {}",
                    why.reason()
                )))
            }
        }
    }
    let n = state.store.retry_deliveries(target).await?;
    if n == 0 {
        if let RetryTarget::Event(key) = target {
            let filter = DeliveryFilter {
                event_key: Some(key.to_string()),
                limit: 1,
                ..DeliveryFilter::default()
            };
            if state.store.list_deliveries(&filter).await?.is_empty() {
                return Err(Error::not_found(format!("{what} not found")));
            }
            return Err(Error::Conflict(format!(
                "{what} cannot be sent again: every one belongs to a deleted subscription or webhook"
            )));
        }
    }
    state.engine.kick();
    Ok((StatusCode::ACCEPTED, Json(Retried { retried: n })))
}

/// Attempt one delivery again now, whatever its state.
#[utoipa::path(post, path = "/deliveries/{id}/retry", operation_id = "retryDelivery", tag = "Admin",
    params(("id" = i64, Path)),
    responses((status = 202, body = Retried), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "Its subscription or webhook was deleted, or is INACTIVE", body = ErrorBody)))]
async fn retry_delivery(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Retried>)> {
    let n = id
        .parse::<i64>()
        .map_err(|_| Error::not_found(format!("delivery {id} not found")))?;
    retry(&state, RetryTarget::Delivery(n), format!("delivery {id}")).await
}

/// Deliver every delivery of an event again.
#[utoipa::path(post, path = "/events/{eventKey}/redeliver", operation_id = "redeliverEvent", tag = "Admin",
    params(("eventKey" = String, Path)),
    responses((status = 202, body = Retried), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "Every delivery's subscription was deleted", body = ErrorBody)))]
async fn redeliver_event(
    State(state): State<AppState>,
    _: Admin,
    Path(key): Path<String>,
) -> Result<(StatusCode, Json<Retried>)> {
    retry(&state, RetryTarget::Event(&key), format!("deliveries of event {key}")).await
}

/// Attempt every failed delivery of a subscription again now.
#[utoipa::path(post, path = "/subscriptions/{subscriptionKey}/retry-failed", operation_id = "retryFailedDeliveries",
    tag = "Admin", params(("subscriptionKey" = String, Path)),
    responses((status = 202, body = Retried), (status = 403, body = ErrorBody)))]
async fn retry_failed(
    State(state): State<AppState>,
    _: Admin,
    Path(key): Path<String>,
) -> Result<(StatusCode, Json<Retried>)> {
    retry(
        &state,
        RetryTarget::FailedOfSubscription(&key),
        format!("subscription {key}"),
    )
    .await
}
