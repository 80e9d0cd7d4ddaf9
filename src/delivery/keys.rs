//! The applications' secret keys as this node last read them: which key signs an attempt, without a read per
//! attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::domain::{now_ms, SecretKey};
use crate::error::Result;
use crate::store::DynStore;

/// How long the application's secret keys are cached before being read again.
const KEY_CACHE_TTL: Duration = Duration::from_secs(1);
/// How long other attempts go on with an application's previous keys while one attempt reads them again;
/// past it (that read failed or was abandoned) the next attempt reads them.
const KEY_REFRESH_WAIT: Duration = Duration::from_secs(5);

/// An application's secret keys as last read.
struct CachedKeys {
    read_at: Instant,
    keys: Arc<Vec<SecretKey>>,
    /// Since when one attempt has been reading them again.
    refreshing: Option<Instant>,
}

/// What the cache holds for an application.
enum Cached {
    Usable(Arc<Vec<SecretKey>>),
    /// Due to be read again, by the caller that was told so; usable meanwhile if that read fails.
    Stale(Arc<Vec<SecretKey>>),
    Missing,
}

/// Most webhooks' own keys kept; past it the cache starts over.
const WEBHOOK_CACHE: usize = 10_000;

/// The applications' keys as last read, and the webhooks' own (which never change).
#[derive(Default)]
pub(crate) struct Keys {
    cache: Mutex<HashMap<i64, CachedKeys>>,
    webhooks: Mutex<HashMap<String, Arc<String>>>,
    /// Held while an application's keys are read for the first time, so its attempts wait for one read.
    loading: tokio::sync::Mutex<()>,
}

impl Keys {
    /// A webhook's own secret key, opened, read once (it cannot change; a deleted webhook's deliveries are
    /// cancelled before they get here).
    pub async fn webhook(&self, store: &DynStore, webhook_key: &str) -> Result<Option<String>> {
        if let Some(k) = self
            .webhooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(webhook_key)
        {
            return Ok(Some(k.as_ref().clone()));
        }
        let Some(secret) = store.webhook_secret(webhook_key).await? else {
            return Ok(None);
        };
        let mut cache = self.webhooks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= WEBHOOK_CACHE {
            cache.clear();
        }
        cache.insert(webhook_key.to_string(), Arc::new(secret.clone()));
        Ok(Some(secret))
    }

    /// Forgets the cached keys of an application (`None`: of every application) after its keys changed.
    pub fn changed(&self, app_id: Option<i64>) {
        let mut keys = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match app_id {
            Some(app_id) => {
                keys.remove(&app_id);
            }
            None => keys.clear(),
        }
    }

    /// The application's newest secret key whose validFrom has passed; `None` when it has none. An error means
    /// its keys could not be read and none are cached. Either way the callback does not go out unsigned.
    ///
    /// Keys are read again once a second (a key created on another node is used within about that). Then one
    /// attempt reads them while the others go on with the keys it replaces, rather than every attempt in flight
    /// reading them at once; if that read fails they go on with those keys, and an attempt tries again after
    /// `KEY_REFRESH_WAIT`. An application seen for the first time (or whose keys changed on this node) has its
    /// attempts wait for one read.
    pub async fn current(&self, store: &DynStore, app_id: i64) -> Result<Option<String>> {
        let keys = match self.cached(app_id) {
            Cached::Usable(keys) => keys,
            Cached::Stale(keys) => self.read(store, app_id).await.unwrap_or(keys),
            Cached::Missing => {
                let _one_read = self.loading.lock().await;
                match self.cached(app_id) {
                    // Read by the attempt this one waited for.
                    Cached::Usable(keys) => keys,
                    _ => self.read(store, app_id).await?,
                }
            }
        };
        let now = now_ms();
        Ok(keys
            .iter()
            .filter(|k| k.valid_from <= now)
            .max_by_key(|k| (k.valid_from, k.id))
            .map(|k| k.value.clone()))
    }

    /// The application's cached keys, as usable, due to be read again by this caller (now marked as being read),
    /// or missing.
    fn cached(&self, app_id: i64) -> Cached {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match cache.get_mut(&app_id) {
            None => Cached::Missing,
            Some(c) if c.read_at.elapsed() < KEY_CACHE_TTL => Cached::Usable(c.keys.clone()),
            Some(c) if c.refreshing.is_some_and(|since| since.elapsed() < KEY_REFRESH_WAIT) => {
                Cached::Usable(c.keys.clone())
            }
            Some(c) => {
                c.refreshing = Some(Instant::now());
                Cached::Stale(c.keys.clone())
            }
        }
    }

    /// Reads the application's keys from the store into the cache.
    async fn read(&self, store: &DynStore, app_id: i64) -> Result<Arc<Vec<SecretKey>>> {
        let fresh = match store.secret_keys(app_id).await {
            Ok(keys) => Arc::new(keys),
            Err(e) => {
                tracing::warn!(app_id, error = %e, "reading the application's secret keys failed");
                return Err(e);
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.insert(
            app_id,
            CachedKeys {
                read_at: Instant::now(),
                keys: fresh.clone(),
                refreshing: None,
            },
        );
        Ok(fresh)
    }
}
