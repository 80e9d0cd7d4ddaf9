//! Domain vocabulary: event names, states, tenants, and the records the store hands back.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub mod delivery;
pub mod event;
pub mod token;

/// The four GoToWebinar events a webhook can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventName {
    #[serde(rename = "registrant.added")]
    RegistrantAdded,
    #[serde(rename = "registrant.joined")]
    RegistrantJoined,
    #[serde(rename = "webinar.created")]
    WebinarCreated,
    #[serde(rename = "webinar.changed")]
    WebinarChanged,
}

impl EventName {
    pub const ALL: [EventName; 4] = [
        EventName::RegistrantAdded,
        EventName::RegistrantJoined,
        EventName::WebinarCreated,
        EventName::WebinarChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventName::RegistrantAdded => "registrant.added",
            EventName::RegistrantJoined => "registrant.joined",
            EventName::WebinarCreated => "webinar.created",
            EventName::WebinarChanged => "webinar.changed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// The field of the payload that names the organizer who owns the event.
    pub fn organizer_field(self) -> &'static str {
        match self {
            EventName::RegistrantAdded | EventName::RegistrantJoined => "webinarCreatorKey",
            EventName::WebinarCreated | EventName::WebinarChanged => "organizerKey",
        }
    }

    /// Integer keys an event of this type must carry.
    pub fn required_keys(self) -> &'static [&'static str] {
        match self {
            EventName::RegistrantAdded | EventName::RegistrantJoined => {
                &["webinarCreatorKey", "webinarKey", "registrantKey"]
            }
            EventName::WebinarCreated | EventName::WebinarChanged => &["organizerKey", "webinarKey"],
        }
    }
}

/// The product a webhook belongs to; GoToWebinar is the only one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Product {
    #[serde(rename = "g2w")]
    G2w,
}

/// State of a webhook or a user subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Active,
    Inactive,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "ACTIVE",
            State::Inactive => "INACTIVE",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "ACTIVE" {
            State::Active
        } else {
            State::Inactive
        }
    }
}

/// Who is calling: the application (OAuth client) and the organizer the token was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant {
    pub app_id: i64,
    pub organizer_key: i64,
}

#[derive(Debug, Clone)]
pub struct SecretKey {
    pub id: i64,
    pub value: String,
    pub valid_from: i64,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub key: String,
    pub event_name: EventName,
    pub event_version: String,
    pub callback_url: String,
    pub state: State,
    pub secret_key: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub event_name: EventName,
    pub event_version: String,
    pub callback_url: String,
    pub secret_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct WebhookChange {
    pub key: String,
    pub state: Option<State>,
    pub callback_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub key: String,
    pub organizer_key: i64,
    pub webhook_key: String,
    /// The subscription's own callback URL, when it has one.
    pub callback_url: Option<String>,
    pub state: State,
    pub inactive_reason: Option<String>,
    pub created_at: i64,
    pub webhook: Webhook,
}

impl Subscription {
    /// Where deliveries go: the subscription's URL, else its webhook's.
    pub fn effective_callback_url(&self) -> &str {
        self.callback_url.as_deref().unwrap_or(&self.webhook.callback_url)
    }

    /// ACTIVE only when both the webhook and the subscription are, derived on every read.
    pub fn activation_state(&self) -> State {
        if self.state == State::Active && self.webhook.state == State::Active {
            State::Active
        } else {
            State::Inactive
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub webhook_key: String,
    pub callback_url: Option<String>,
    pub state: State,
}

#[derive(Debug, Clone)]
pub struct SubscriptionChange {
    pub key: String,
    pub state: Option<State>,
    pub callback_url: Option<String>,
}

/// Milliseconds since the Unix epoch, the one time unit of the store.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// ISO-8601 UTC with milliseconds, as GoTo formats times.
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn parse_time(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Keys in paths are UUIDs; anything else cannot name a record.
pub fn is_key(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}
