//! Storage: one trait, filled by SQLite (the embedded default) and PostgreSQL (several nodes, one database).
//! Every management query takes the caller's tenant, so no query can forget whose data it touches.

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::delivery::{
    AttemptRecord, Cancel, DeliveryJob, Lease, NewEvent, Outcome, PublishOutcome, QueueStats, RetryTarget, Route,
    Standing,
};
use crate::domain::{
    EventName, NewSubscription, NewWebhook, SecretKey, Subscription, SubscriptionChange, Tenant, Webhook, WebhookChange,
};
use crate::error::{Error, Result};
use crate::metrics::Histogram;
use sealed::Keyring;

mod common;
pub mod postgres;
pub mod rules;
pub mod sealed;
pub mod sqlite;

#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub state: Option<String>,
    pub webhook_key: Option<String>,
    pub subscription_key: Option<String>,
    pub event_name: Option<String>,
    pub event_key: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Return deliveries with an id below this one (cursor pagination, newest first).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// A delivery as stored (the admin API shows it as `http::admin::Delivery`).
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub id: i64,
    pub event_key: String,
    pub event_name: String,
    pub webhook_key: String,
    pub subscription_key: String,
    pub url: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// An attempt as stored.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub number: i64,
    pub node: String,
    pub started_at: i64,
    pub duration_ms: i64,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

/// What one pass of retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub deliveries: u64,
    pub attempts: u64,
    pub events: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The database answers.
    async fn ping(&self) -> Result<()>;

    // --- tenancy ---
    async fn ensure_app(&self, name: &str) -> Result<i64>;
    async fn insert_token(&self, token_hash: &str, tenant: Tenant) -> Result<()>;
    /// Revokes a token; false when no live token has that hash.
    async fn revoke_token(&self, token_hash: &str) -> Result<bool>;
    async fn find_token(&self, token_hash: &str) -> Result<Option<Tenant>>;
    /// Returns the stored value for `key`, storing `value` first if there is none.
    async fn meta_get_or_insert(&self, key: &str, value: &str) -> Result<String>;

    // --- secret keys ---
    async fn create_secret_key(&self, app_id: i64, value: &str, valid_from: i64) -> Result<SecretKey>;
    async fn secret_keys(&self, app_id: i64) -> Result<Vec<SecretKey>>;

    // --- webhooks (scoped to the application) ---
    /// Creates them all or none; Conflict when the application would have more than `max` webhooks.
    async fn create_webhooks(&self, app_id: i64, new: Vec<NewWebhook>, max: i64) -> Result<Vec<Webhook>>;
    async fn get_webhook(&self, app_id: i64, key: &str) -> Result<Option<Webhook>>;
    async fn list_webhooks(&self, app_id: i64) -> Result<Vec<Webhook>>;
    /// Applies every change or none; NotFound names the first key the application does not own.
    async fn update_webhooks(&self, app_id: i64, changes: Vec<WebhookChange>) -> Result<()>;
    /// Deletes the application's webhooks among `keys` and their subscriptions; other keys are ignored.
    async fn delete_webhooks(&self, app_id: i64, keys: &[String]) -> Result<()>;

    // --- user subscriptions (scoped to application and organizer) ---
    /// Creates them all or none; Conflict when the organizer would have more than `max` subscriptions in the
    /// application.
    async fn create_subscriptions(
        &self,
        tenant: Tenant,
        new: Vec<NewSubscription>,
        max: i64,
    ) -> Result<Vec<Subscription>>;
    async fn get_subscription(&self, tenant: Tenant, key: &str) -> Result<Option<Subscription>>;
    async fn list_subscriptions(&self, tenant: Tenant) -> Result<Vec<Subscription>>;
    async fn update_subscriptions(&self, tenant: Tenant, changes: Vec<SubscriptionChange>) -> Result<()>;
    /// Deletes the tenant's subscriptions among `keys`; returns how many went.
    async fn delete_subscriptions(&self, tenant: Tenant, keys: &[String]) -> Result<u64>;

    // --- delivery ---
    /// Commits events and their deliveries atomically (idempotent on eventKey) before answering.
    async fn publish(&self, events: Vec<NewEvent>, lease: Option<Lease>) -> Result<Vec<PublishOutcome>>;
    /// Leases up to `limit` due deliveries to `lease.owner`.
    async fn claim_due(&self, now: i64, lease: &Lease, limit: i64) -> Result<Vec<DeliveryJob>>;
    /// When the next pending delivery that no node holds (leased, or in this process's memory) comes due
    /// (None: nothing waits).
    async fn next_due(&self, now: i64) -> Result<Option<i64>>;
    /// Records attempts and their consequences in one transaction.
    async fn record_attempts(&self, results: Vec<AttemptRecord>, disable_after_ms: i64) -> Result<()>;
    /// Returns this node's leases to the pool (shutdown; on SQLite also start-up, where one node owns the file).
    async fn release_leases(&self, owner: Option<&str>) -> Result<u64>;
    async fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<DeliveryRow>>;
    async fn get_delivery(&self, id: i64) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>>;
    /// Makes matching deliveries pending and due now; returns how many. Deliveries whose subscription was
    /// deleted are left as they are (nothing to send them to).
    async fn retry_deliveries(&self, filter: RetryTarget<'_>) -> Result<u64>;
    /// A webhook's own secret key, opened (`None`: it has none; it signs with the application's).
    async fn webhook_secret(&self, webhook_key: &str) -> Result<Option<String>>;
    /// Seals the secrets stored before sealing with the newest key of the keyring, and with `every` also those
    /// sealed with an older key (`secrets rekey`); returns how many. Batched and resumable.
    async fn reseal_secrets(&self, every: bool) -> Result<u64>;
    /// Where a subscription's deliveries go now (the delivery's webhook key tells a deleted webhook from a
    /// deleted subscription).
    async fn route(&self, subscription_key: &str, webhook_key: &str) -> Result<Route>;
    async fn queue_stats(&self) -> Result<QueueStats>;
    /// Retention: removes up to `limit` deliveries that ended (delivered or failed) before `before` (ms), with
    /// their attempts, and the events published before `before` that no delivery refers to any more (those
    /// whose last deliveries go now, and up to `limit` that had none). Pending deliveries and their events stay,
    /// however old.
    async fn prune(&self, before: i64, limit: i64) -> Result<Pruned>;

    /// Hands the store the engine's signals: `work` whenever deliveries become available that no node holds
    /// (on PostgreSQL also those another node made available, through `LISTEN/NOTIFY`), `routes` after any change
    /// to subscriptions or webhooks and `keys` after an application's secret keys change (on any node).
    fn watch(&self, signals: Signals);

    /// How long the store's group commits of the delivery path take, for `/metrics`.
    fn commit_durations(&self) -> &Histogram;
}

/// `/readyz`'s write: one small row rewritten, committed.
pub(crate) const PROVE_WRITES: &str =
    "INSERT INTO meta (key, value) VALUES ('ready_at', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// A committed change the engine must hear of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Changed {
    /// An application's secret keys.
    Keys(i64),
    /// Subscriptions or webhooks (state, callback URL, deletion); `resumed` paused deliveries are due now.
    Routes { resumed: u64 },
}

/// Wakes a node's scheduler.
pub type WorkSignal = Arc<dyn Fn() + Send + Sync>;

/// What the store tells the engine.
#[derive(Clone)]
pub struct Signals {
    pub work: WorkSignal,
    pub routes: WorkSignal,
    /// An application's keys changed (`None`: any application's, or unknown which).
    pub keys: Arc<dyn Fn(Option<i64>) + Send + Sync>,
}

/// Where a store keeps the engine's signals once it has them (a store may serve before an engine watches it).
#[derive(Default)]
pub(crate) struct SignalSlot(std::sync::OnceLock<Signals>);

impl SignalSlot {
    pub(crate) fn set(&self, signals: Signals) {
        let _ = self.0.set(signals);
    }

    pub(crate) fn work(&self) {
        self.tell(|s| (s.work)());
    }

    pub(crate) fn routes(&self) {
        self.tell(|s| (s.routes)());
    }

    pub(crate) fn keys(&self, app_id: Option<i64>) {
        self.tell(|s| (s.keys)(app_id));
    }

    fn tell(&self, signal: impl FnOnce(&Signals)) {
        if let Some(s) = self.0.get() {
            signal(s);
        }
    }
}

pub type DynStore = Arc<dyn Store>;

/// Hands an operation to a group-commit task and waits for its answer (sent on the operation's own `reply`).
async fn ask<Op, T>(
    tasks: &tokio::sync::mpsc::Sender<Op>,
    op: Op,
    reply: tokio::sync::oneshot::Receiver<Result<T>>,
) -> Result<T> {
    let stopped = || Error::Unavailable("the database writer has stopped".into());
    tasks.send(op).await.map_err(|_| stopped())?;
    reply.await.map_err(|_| stopped())?
}

/// Opens the store the URL names, creating and migrating it.
pub async fn connect(
    url: &str,
    pool_size: u32,
    durability: crate::config::Durability,
    ring: Arc<Keyring>,
) -> Result<DynStore> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(
            sqlite::SqliteStore::open(url, pool_size, durability, ring).await?,
        ))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PgStore::open(url, pool_size, ring).await?))
    } else {
        Err(Error::Config(format!(
            "unsupported database URL `{}`: use sqlite://FILE or postgres://...",
            url.split(':').next().unwrap_or_default()
        )))
    }
}

/// The keyring a database's secrets are sealed with: `spec` (`--secrets-keys`) when given; else, for SQLite, the
/// key file beside the database (`FILE.secrets`, made on first start); PostgreSQL, shared by nodes that share no
/// file, needs `spec`.
pub fn keyring_for(url: &str, spec: Option<&str>) -> Result<Keyring> {
    if let Some(spec) = spec.filter(|s| !s.trim().is_empty()) {
        return Keyring::parse(spec);
    }
    if url.starts_with("sqlite:") {
        let path = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
            .get_filename()
            .to_path_buf();
        let mut file = path.into_os_string();
        file.push(".secrets");
        return Keyring::from_file(std::path::Path::new(&file));
    }
    Err(Error::Config(
        "PostgreSQL needs --secrets-keys (G2W_SECRETS_KEYS): ID:BASE64 of 32 random bytes, the same on every node; \
         `g2w-webhooks secrets new-key` prints one"
            .into(),
    ))
}
