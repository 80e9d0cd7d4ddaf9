//! Delivery's vocabulary: an event to publish, a job to attempt, how an attempt ended, leases, and where a
//! delivery's subscription stands. The engine and the store both speak it; neither owns it.

use bytes::Bytes;

use super::EventName;

/// An event accepted for publishing: its key, owner and the exact bytes subscribers receive.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_key: String,
    pub organizer_key: i64,
    pub event_name: EventName,
    pub body: Bytes,
}

/// What publishing one event did.
#[derive(Debug, Clone)]
pub struct PublishOutcome {
    pub event_key: String,
    pub deliveries: i64,
    /// True when the eventKey was already published: nothing new was created.
    pub duplicate: bool,
    /// Deliveries created and leased to this node, ready to attempt.
    pub jobs: Vec<DeliveryJob>,
}

/// A lease on deliveries: who holds them and until when.
#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: String,
    pub until: i64,
}

/// Everything the dispatcher needs to attempt one delivery.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    pub id: i64,
    pub event_key: String,
    pub app_id: i64,
    pub webhook_key: String,
    pub subscription_key: String,
    /// The callback URL as the subscription and webhook said when the job was read.
    pub url: String,
    pub body: Bytes,
    /// The webhook has a secret key of its own, which signs instead of the application's (read, opened, when
    /// needed: secrets are stored sealed and never travel with jobs).
    pub own_secret: bool,
    /// Attempts made before this one.
    pub attempts: i64,
    /// This node's lease on the delivery ends then (ms); an attempt that could outlive it is not started.
    pub lease_until: i64,
    /// The delivery's `updated_at` when this job was read from it (or created with it). An operator's retry or
    /// redeliver always moves it, so an attempt's result settles the delivery only if it is unchanged.
    pub updated_at: i64,
    /// Where its subscription and webhook stood when the job was read.
    pub standing: Standing,
    /// The engine's count of subscription and webhook changes when the job was read (see `Engine::current`):
    /// a job read before a change is checked again before it is sent.
    pub routes_seen: u64,
}

/// Where a delivery's subscription and webhook stand: only an ACTIVE subscription of an ACTIVE webhook is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Active,
    /// The subscription or its webhook is INACTIVE: the delivery waits, paused, until both are ACTIVE again.
    Inactive,
    /// The subscription or its webhook was deleted: the delivery is cancelled.
    Gone(Cancel),
}

impl Standing {
    /// From the states a LEFT JOIN of the webhook and the subscription found (`None`: no such row).
    pub fn of(webhook_state: Option<&str>, subscription_state: Option<&str>) -> Self {
        match (webhook_state, subscription_state) {
            (None, _) => Standing::Gone(Cancel::WebhookDeleted),
            (_, None) => Standing::Gone(Cancel::SubscriptionDeleted),
            (Some("ACTIVE"), Some("ACTIVE")) => Standing::Active,
            _ => Standing::Inactive,
        }
    }
}

/// Why a delivery was cancelled: a final state of its own, never attempted again, never counted as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    SubscriptionDeleted,
    WebhookDeleted,
}

impl Cancel {
    pub fn reason(self) -> &'static str {
        match self {
            Cancel::SubscriptionDeleted => "subscription deleted",
            Cancel::WebhookDeleted => "webhook deleted",
        }
    }
}

/// A subscription's route as it stands now: where its deliveries go and what signs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub standing: Standing,
    pub url: Option<String>,
    /// The webhook has a secret key of its own.
    pub own_secret: bool,
}

/// How an attempt ended and what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    RetryAt(i64),
    Failed,
    /// 410 Gone: the delivery fails and the subscription is deactivated.
    Gone,
    /// Not attempted: the subscription or its webhook is INACTIVE. The delivery waits until both are ACTIVE.
    Paused,
    /// Not attempted: the subscription or its webhook was deleted.
    Cancelled(Cancel),
}

impl Outcome {
    /// False for a delivery that was not sent (paused or cancelled): no attempt is logged or counted.
    pub fn attempted(self) -> bool {
        !matches!(self, Outcome::Paused | Outcome::Cancelled(_))
    }

    /// The delivery's state after this outcome and when it is due next (`now` where nothing is due).
    pub fn settles_as(self, now: i64) -> (&'static str, i64) {
        match self {
            Outcome::Delivered => ("delivered", now),
            Outcome::RetryAt(at) => ("pending", at),
            Outcome::Failed | Outcome::Gone => ("failed", now),
            Outcome::Paused => ("paused", now),
            Outcome::Cancelled(_) => ("cancelled", now),
        }
    }

    /// Starts (or keeps running) the subscription's failure clock, which deactivates it after `--disable-after`.
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::RetryAt(_) | Outcome::Failed)
    }
}

/// The states of a delivery, as stored and listed.
pub const DELIVERY_STATES: [&str; 5] = ["pending", "delivered", "failed", "paused", "cancelled"];

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub subscription_key: String,
    pub number: i64,
    pub node: String,
    pub started_at: i64,
    /// The job's `updated_at`: the delivery as this attempt found it.
    pub job_updated_at: i64,
    pub duration_ms: i64,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
    pub outcome: Outcome,
}

/// The waiting deliveries, as `/metrics` shows them.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueStats {
    pub waiting: i64,
    pub oldest_waiting_created_at: Option<i64>,
}

/// Which deliveries an operator asks to attempt again.
#[derive(Debug, Clone, Copy)]
pub enum RetryTarget<'a> {
    Delivery(i64),
    Event(&'a str),
    FailedOfSubscription(&'a str),
}
