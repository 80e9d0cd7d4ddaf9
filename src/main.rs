//! The `g2w-webhooks` binary: parse the command line, set up logging, run a subcommand.

use clap::Parser;
use g2w_webhooks::config::{Cli, Command, LogFormat};
use g2w_webhooks::{cli, run, shutdown_signal, Role};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// jemalloc: about 7% less server CPU per delivery in batches and 15-20% with one event per publish request than
/// glibc's allocator, for 8-9 MiB more peak memory (docs/BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let result = match args.command {
        Command::Serve(s) => {
            let role = Role::serve(&s);
            serve(s, role).await
        }
        Command::Worker(s) => serve(s, Role::Worker).await,
        other => cli::run(other).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: g2w_webhooks::config::ServeArgs, role: Role) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight work");
        trigger.cancel();
    });
    run(args, role, listener, shutdown).await
}
