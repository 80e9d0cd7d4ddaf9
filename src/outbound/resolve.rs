//! Name resolution for callbacks: bounded in time and in threads, and under `Policy::Public` never handing back
//! an internal address.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{is_internal, Policy};

/// How long a name has to resolve (the validation GET's and every delivery's).
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Look-ups running at once. The system resolver blocks a thread for each and cannot be cancelled; a slow name
/// server holds at most this many threads, and further look-ups wait (within their timeout) rather than take more.
const DNS_AT_ONCE: usize = 32;

/// Resolves `host` with the system resolver (so `/etc/hosts` and `/etc/resolv.conf` apply), within
/// `DNS_TIMEOUT` and at most `DNS_AT_ONCE` at a time.
pub async fn lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    static AT_ONCE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DNS_AT_ONCE);
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, format!("resolving {host} timed out"));
    let host_port = format!("{host}:{port}");
    let lookup = async {
        let permit = AT_ONCE
            .acquire()
            .await
            .map_err(|_| std::io::Error::other("the resolver is closed"))?;
        // The permit goes with the blocking look-up, so a look-up abandoned at its timeout still counts until the
        // system resolver gives its thread back.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            std::net::ToSocketAddrs::to_socket_addrs(&host_port).map(Iterator::collect::<Vec<_>>)
        })
        .await
        .map_err(|e| std::io::Error::other(format!("resolving: {e}")))?
    };
    tokio::time::timeout(DNS_TIMEOUT, lookup)
        .await
        .map_err(|_| timed_out())?
}

/// Resolves a host name; under `Policy::Public` refuses to hand back internal addresses, so neither a callback
/// URL nor a DNS answer that changes after validation can reach inside the network.
async fn resolve(host: &str, policy: Policy) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = lookup(host, 0).await?;
    if policy == Policy::AllowPrivate {
        return Ok(addrs);
    }
    let public: Vec<SocketAddr> = addrs.iter().copied().filter(|a| !is_internal(a.ip())).collect();
    if public.is_empty() {
        let shown = addrs
            .first()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "nothing".into());
        return Err(std::io::Error::other(format!(
            "{host} resolves to internal address {shown}"
        )));
    }
    Ok(public)
}

/// The validation GET's resolver (reqwest).
#[derive(Debug, Clone, Copy)]
pub(super) struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let addrs = resolve(name.as_str(), Policy::Public).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The delivery client's resolver (hyper's connector), checked on every new connection.
#[derive(Debug, Clone, Copy)]
pub struct CallbackResolver(pub(super) Policy);

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for CallbackResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let policy = self.0;
        Box::pin(async move { resolve(name.as_str(), policy).await.map(Vec::into_iter) })
    }
}
