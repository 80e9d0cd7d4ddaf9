//! Everything that leaves the service for a callback URL: the address rules (here), the resolver that holds them
//! on every connection (`resolve`), the client that sends deliveries (`client`), and the validation GET that
//! every new or changed callback URL must pass (`validate`).

use std::net::IpAddr;

use reqwest::Url;

use crate::error::Error;

mod client;
mod resolve;
mod validate;

pub use client::{Answer, DeliveryClient, SendError};
pub use resolve::{lookup, DNS_TIMEOUT};
pub use validate::{client, validate};

/// Longest callback URL, in bytes (what browsers and most proxies take).
pub const MAX_URL: usize = 2048;

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
    if raw.len() > MAX_URL {
        return Err(Error::InvalidCallbackUrl(format!(
            "callbackUrl: {} bytes; at most {MAX_URL}",
            raw.len()
        )));
    }
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

/// What both clients say they are.
pub(crate) const USER_AGENT_VALUE: &str = concat!("g2w-webhooks/", env!("CARGO_PKG_VERSION"));

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
