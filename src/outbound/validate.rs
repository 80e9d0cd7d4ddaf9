//! The validation GET: a new or changed callback URL must answer it with 200.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::resolve::{lookup, PublicOnlyResolver};
use super::{check_url, is_internal, root_cause, Policy, USER_AGENT_VALUE};
use crate::error::Error;

/// Builds the HTTP client for validation GETs: no redirects, keep-alive pools per origin.
pub fn client(policy: Policy, timeout: Duration, max_idle_per_host: usize) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .user_agent(USER_AGENT_VALUE)
        // The GET goes where deliveries go (they use no proxy), and is checked by the same resolver: an
        // HTTP_PROXY in the environment must not carry it elsewhere.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true);
    if policy == Policy::Public {
        b = b.dns_resolver(Arc::new(PublicOnlyResolver));
    }
    // Building fails only when the TLS backend cannot initialise, which is a broken install.
    b.build().expect("the HTTP client builds")
}

/// Checks a callback URL: address rules, then a GET that must answer 200 in time.
pub async fn validate(client: &reqwest::Client, raw: &str, policy: Policy) -> Result<(), Error> {
    let url = check_url(raw, policy)?;
    if policy == Policy::Public {
        if let Some(url::Host::Domain(host)) = url.host() {
            let port = url.port_or_known_default().unwrap_or(443);
            let addrs: Vec<SocketAddr> = lookup(host, port)
                .await
                .map_err(|e| Error::InvalidCallbackUrl(format!("callbackUrl {raw}: cannot resolve {host}: {e}")))?;
            if let Some(a) = addrs.iter().find(|a| is_internal(a.ip())) {
                return Err(Error::InvalidCallbackUrl(format!(
                    "callbackUrl {raw}: {host} resolves to internal address {}",
                    a.ip()
                )));
            }
        }
    }
    let res = client.get(url).send().await.map_err(|e| {
        let what = if e.is_timeout() {
            "did not answer the validation GET in time".to_string()
        } else if e.is_connect() {
            format!("the validation GET could not connect ({})", root_cause(&e))
        } else {
            format!("the validation GET failed ({})", root_cause(&e))
        };
        Error::InvalidCallbackUrl(format!("callbackUrl {raw}: {what}"))
    })?;
    if res.status() != reqwest::StatusCode::OK {
        return Err(Error::InvalidCallbackUrl(format!(
            "callbackUrl {raw}: the validation GET answered {}, expected 200",
            res.status().as_u16()
        )));
    }
    Ok(())
}
