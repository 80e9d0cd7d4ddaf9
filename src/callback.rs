//! Callback URLs: the address rules, an HTTP client that cannot be steered to internal addresses, and the
//! validation GET that every new or changed callback URL must pass.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use crate::error::Error;

/// What callback URLs may point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Production: https only, public addresses only.
    Public,
    /// Dev mode: http and private addresses allowed.
    AllowPrivate,
}

/// True for addresses a callback must never reach outside dev mode.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (CGNAT)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 can map to internal IPv4
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0)
            // IPv4-compatible
        }
    }
}

/// Parses a callback URL and applies the scheme and literal-address rules. Names are checked when resolved.
pub fn check_url(raw: &str, policy: Policy) -> Result<Url, Error> {
    let bad = |why: String| Error::InvalidCallbackUrl(format!("callbackUrl {raw}: {why}"));
    let url = Url::parse(raw).map_err(|e| bad(format!("not an absolute URL ({e})")))?;
    match (url.scheme(), policy) {
        ("https", _) | ("http", Policy::AllowPrivate) => {}
        ("http", Policy::Public) => return Err(bad("must use https".into())),
        (other, _) => return Err(bad(format!("scheme `{other}` is not http(s)"))),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials".into()));
    }
    let host = url.host().ok_or_else(|| bad("has no host".into()))?;
    if policy == Policy::Public {
        let ip = match host {
            url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            url::Host::Domain(_) => None,
        };
        if let Some(ip) = ip.filter(|ip| is_internal(*ip)) {
            return Err(bad(format!(
                "address {ip} is internal (loopback, private, link-local or reserved)"
            )));
        }
    }
    Ok(url)
}

/// Resolves names and refuses to hand back internal addresses, so neither a callback URL nor a DNS answer that
/// changes after validation can reach inside the network.
#[derive(Debug, Clone, Copy)]
struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addrs.iter().copied().filter(|a| !is_internal(a.ip())).collect();
            if public.is_empty() {
                let shown = addrs
                    .first()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_else(|| "nothing".into());
                return Err(format!("{host} resolves to internal address {shown}").into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

/// Builds the HTTP client for validation GETs and deliveries: no redirects, keep-alive pools per origin.
pub fn client(policy: Policy, timeout: Duration, max_idle_per_host: usize) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("g2w-webhooks/", env!("CARGO_PKG_VERSION")))
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
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| Error::InvalidCallbackUrl(format!("callbackUrl {raw}: cannot resolve {host}: {e}")))?
                .collect();
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

/// The innermost error message, which says what actually happened (refused, reset, DNS...).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
        ] {
            let ip: IpAddr = ip.parse().expect("valid ip");
            assert!(is_internal(ip), "{ip} should be internal");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            let ip: IpAddr = ip.parse().expect("valid ip");
            assert!(!is_internal(ip), "{ip} should be public");
        }
    }

    #[test]
    fn url_rules() {
        assert!(check_url("https://example.com/hook?a=1", Policy::Public).is_ok());
        assert!(check_url("http://example.com/hook", Policy::Public).is_err());
        assert!(check_url("http://127.0.0.1:9/hook", Policy::AllowPrivate).is_ok());
        assert!(check_url("https://[::ffff:127.0.0.1]/", Policy::Public).is_err());
        assert!(check_url("/relative", Policy::AllowPrivate).is_err());
        assert!(check_url("ftp://example.com/", Policy::AllowPrivate).is_err());
    }
}
