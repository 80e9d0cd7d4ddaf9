//! What an attempt checks just before it is sent: that its subscription and webhook still stand, where they
//! point now, and that the address rules allow the URL. Without a query on the hot path: jobs carry what was
//! read with them, and are read again only after a change to subscriptions or webhooks (counted here, on this
//! node directly and from other nodes through the store's notifications).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::Uri;

use crate::domain::delivery::{DeliveryJob, Route};
use crate::error::Result;
use crate::outbound::{check_url, Policy};
use crate::store::DynStore;

/// Most routes or parsed URLs kept; past it the cache starts over.
const CACHE_LIMIT: usize = 10_000;

/// Subscriptions' routes as read after the latest change.
pub(crate) struct Routes {
    /// Changes to subscriptions and webhooks seen so far. Starts at 1: a job never stamped is always checked.
    version: AtomicU64,
    /// Routes read again since a change, each with the version it was read under.
    read: Mutex<HashMap<String, (u64, Arc<Route>)>>,
    /// Held while a route is read, so the jobs of one subscription wait for one read.
    loading: tokio::sync::Mutex<()>,
}

impl Default for Routes {
    fn default() -> Self {
        Self {
            version: AtomicU64::new(1),
            read: Mutex::default(),
            loading: tokio::sync::Mutex::new(()),
        }
    }
}

impl Routes {
    /// The version to stamp on jobs about to be read from the store (read before the store reads them).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Subscriptions or webhooks changed: every job read before now is checked again before it is sent.
    pub fn changed(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        self.read.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// The job's route now: `None` when nothing changed since the job was read (what it carries is current).
    pub async fn now(&self, store: &DynStore, job: &DeliveryJob) -> Result<Option<Arc<Route>>> {
        if job.routes_seen == self.version() {
            return Ok(None);
        }
        if let Some(route) = self.cached(&job.subscription_key) {
            return Ok(Some(route));
        }
        let _one_read = self.loading.lock().await;
        if let Some(route) = self.cached(&job.subscription_key) {
            return Ok(Some(route));
        }
        // Read before the query: a change committed during it makes the route stale at once.
        let version = self.version();
        let route = Arc::new(store.route(&job.subscription_key, &job.webhook_key).await?);
        let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        if read.len() >= CACHE_LIMIT {
            read.clear();
        }
        read.insert(job.subscription_key.clone(), (version, route.clone()));
        Ok(Some(route))
    }

    fn cached(&self, subscription_key: &str) -> Option<Arc<Route>> {
        let version = self.version();
        let read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        read.get(subscription_key)
            .filter(|(v, _)| *v == version)
            .map(|(_, r)| r.clone())
    }
}

/// Callback URLs as request targets, checked against the address rules when first seen: a URL stored while
/// the server ran with `--dev` (or by an older version) is not sent to without it. A name is checked again
/// when it is resolved, on every new connection.
pub(crate) struct Targets {
    policy: Policy,
    parsed: Mutex<HashMap<String, std::result::Result<Uri, String>>>,
}

impl Targets {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            parsed: Mutex::default(),
        }
    }

    /// The URL as a request target, or why it may not be sent to.
    pub fn get(&self, url: &str) -> std::result::Result<Uri, String> {
        let mut parsed = self.parsed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = parsed.get(url) {
            return t.clone();
        }
        let target = check_url(url, self.policy)
            .map_err(|e| e.to_string())
            .and_then(|u| Uri::try_from(u.as_str()).map_err(|e| format!("callbackUrl {url}: {e}")));
        if parsed.len() >= CACHE_LIMIT {
            parsed.clear();
        }
        parsed.insert(url.to_string(), target.clone());
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_stored_under_dev_mode_are_refused_without_it() {
        let public = Targets::new(Policy::Public);
        for url in [
            "http://example.com/hook",
            "https://127.0.0.1/hook",
            "https://[::1]:8443/hook",
            "https://10.0.0.7/",
        ] {
            let why = public.get(url).expect_err(url);
            assert!(
                why.contains("must use https") || why.contains("is internal"),
                "{url}: {why}"
            );
        }
        assert_eq!(
            public
                .get("https://example.com/hook?a=1")
                .expect("public https")
                .to_string(),
            "https://example.com/hook?a=1"
        );
        let dev = Targets::new(Policy::AllowPrivate);
        assert!(dev.get("http://127.0.0.1:9/hook").is_ok());
        assert!(dev.get("not a url").is_err());
    }
}
