//! g2w-webhooks: the GoToWebinar Webhooks API (management) and a durable, signed delivery engine.

use std::sync::Arc;

use anyhow::Context;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod outbound;
pub mod signing;
pub mod store;

use config::ServeArgs;
use delivery::attempt::RetryPolicy;
use delivery::{Engine, Settings};
use domain::Tenant;
use store::DynStore;

/// The dev application's name and organizer.
pub const DEV_APP: &str = "dev";
pub const DEV_ORGANIZER: i64 = 1000;

/// Issues a new bearer token for an application (created if new) and organizer; only its hash is stored.
pub async fn issue_token(store: &DynStore, app: &str, organizer_key: i64) -> error::Result<String> {
    let app_id = store.ensure_app(app).await?;
    let token = domain::token::new_token();
    store
        .insert_token(&domain::token::hash(&token), Tenant { app_id, organizer_key })
        .await?;
    Ok(token)
}

/// Which parts a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and workers (`serve`).
    All,
    /// API only (`serve --no-worker`).
    Api,
    /// Workers only (`worker`), with health and metrics.
    Worker,
}

impl Role {
    /// What `serve` runs: API and workers, or the API alone with `--no-worker`.
    pub fn serve(args: &ServeArgs) -> Self {
        if args.no_worker {
            Role::Api
        } else {
            Role::All
        }
    }
}

/// Tokens of dev mode, derived from a seed stored in the database so every restart prints the same ones.
#[derive(Debug, Clone)]
pub struct DevTokens {
    pub bearer: String,
    pub admin: String,
}

pub async fn dev_tokens(store: &DynStore) -> anyhow::Result<DevTokens> {
    let fresh: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let seed = store.meta_get_or_insert("dev_seed", &fresh).await?;
    let derive = |label: &str| {
        let mut m = Hmac::<Sha256>::new_from_slice(seed.as_bytes()).expect("HMAC accepts any key length");
        m.update(label.as_bytes());
        m.finalize().into_bytes()[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let bearer = format!("g2wdev_{}", derive("organizer-token"));
    let app_id = store.ensure_app(DEV_APP).await?;
    store
        .insert_token(
            &domain::token::hash(&bearer),
            Tenant {
                app_id,
                organizer_key: DEV_ORGANIZER,
            },
        )
        .await?;
    Ok(DevTokens {
        bearer,
        admin: format!("g2wadmin_{}", derive("admin-token")),
    })
}

/// Runs a node until `shutdown` is cancelled: serves HTTP on `listener` and, unless `role` is `Api`, delivers.
/// Returns after in-flight attempts have finished (within the grace period) and leases were released.
pub async fn run(
    args: ServeArgs,
    role: Role,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = args
        .db
        .open(args.db_pool, args.sqlite_synchronous)
        .await
        .context("opening the database")?;
    // Secrets stored before sealing are sealed now (a key the keyring lacks stops the start, naming it).
    let sealed = store.reseal_secrets(false).await.context("sealing stored secrets")?;
    if sealed > 0 {
        tracing::info!(sealed, "sealed secrets that were stored in the clear");
    }
    if args.db.database_url.starts_with("sqlite:") {
        // One process owns a SQLite file: whatever a previous run left leased was in flight when it stopped.
        let resumed = store.release_leases(None).await?;
        if resumed > 0 {
            tracing::info!(
                resumed,
                "resuming deliveries that were in flight when the last run stopped"
            );
        }
    }
    let policy = if args.dev {
        outbound::Policy::AllowPrivate
    } else {
        outbound::Policy::Public
    };
    let mut admin_token = args.admin_token.clone().filter(|t| !t.is_empty());
    let addr = listener.local_addr()?;
    if args.dev && http::serve::beyond_loopback(addr) {
        if !args.dev_allow_remote {
            anyhow::bail!(
                "--dev on {addr}, which is not loopback, would let anyone who reaches it use private callback \
                 URLs and the printed tokens; listen on 127.0.0.1, or add --dev-allow-remote to mean it"
            );
        }
        tracing::warn!(%addr, "dev mode on an address beyond this machine (--dev-allow-remote): private callback URLs are allowed and the dev tokens work from anywhere that reaches it");
    }
    if args.dev {
        let dev = dev_tokens(&store).await?;
        let admin = admin_token.get_or_insert(dev.admin).clone();
        print_dev_banner(&listener, &dev.bearer, &admin);
    }
    let node_id = format!("node-{}", &uuid::Uuid::new_v4().to_string()[..8]);
    let settings = Settings {
        node_id,
        workers: role != Role::Api,
        max_in_flight: args.max_in_flight.max(1),
        max_in_flight_per_destination: args.max_in_flight_per_destination.max(1),
        retry: RetryPolicy {
            schedule: args.retry_schedule.0.clone(),
        },
        attempt_timeout: args.attempt_timeout,
        disable_after: args.disable_after,
        standard_webhooks: args.standard_webhooks,
        lease: args.lease,
        poll_interval: args.poll_interval,
        shutdown_grace: args.shutdown_grace,
        client: outbound::DeliveryClient::new(policy, args.attempt_timeout, args.max_in_flight.max(1)),
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let (engine, rx) = Engine::new(store.clone(), settings, metrics);
    let workers = (role != Role::Api).then(|| engine.start(rx, shutdown.child_token()));
    if let (Some(retention), true) = (args.retention.0, role != Role::Api) {
        tokio::spawn(delivery::retention::run(
            store.clone(),
            retention,
            engine.metrics.clone(),
            shutdown.child_token(),
        ));
    }
    let state = http::AppState {
        store,
        engine,
        policy,
        check_client: outbound::client(policy, args.callback_check_timeout, 4),
        check_timeout: args.callback_check_timeout,
        limits: http::Limits {
            webhooks_per_app: args.max_webhooks_per_app,
            subscriptions_per_organizer: args.max_subscriptions_per_organizer,
        },
        admin_token_hash: admin_token.as_deref().map(domain::token::digest),
        rate_limit: args.rate_limit.map(|n| Arc::new(http::limit::RateLimit::new(n))),
    };
    let app = match role {
        Role::Worker => http::ops_app(state),
        _ => http::app(state),
    };
    let app = http::serve::with_request_timeout(app, args.request_timeout);
    tracing::info!(%addr, ?role, "listening");
    http::serve::serve(listener, app, args.header_timeout, shutdown.clone()).await;
    if let Some(w) = workers {
        w.await?;
    }
    tracing::info!("stopped");
    Ok(())
}

fn print_dev_banner(listener: &TcpListener, bearer: &str, admin: &str) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!(
        "\ng2w-webhooks is running in dev mode (http:// and private callback URLs allowed)\n\
         \n  API          http://{addr}{base}\
         \n  bearer token {bearer}   (application \"{DEV_APP}\", organizerKey {DEV_ORGANIZER})\
         \n  admin token  {admin}\
         \n\n  export G2W_TOKEN={bearer} G2W_ADMIN_TOKEN={admin}\
         \n  curl -s -H \"Authorization: Bearer $G2W_TOKEN\" \"http://{addr}{base}/webhooks?product=g2w\"\n",
        base = http::API_BASE
    );
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
