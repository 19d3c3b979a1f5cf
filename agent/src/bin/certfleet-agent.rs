//! `certfleet-agent --config agent.toml`: wires up and calls
//! [`certfleet_agent::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use certfleet_agent::config::{Config, Http01Mode};
use certfleet_agent::{Listeners, run};
use clap::Parser;
use tokio::net::TcpListener;

/// certfleet's per-node agent.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the agent's config file.
    #[arg(long, default_value = "/etc/certfleet/agent.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CERTFLEET_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("certfleet-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certfleet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), node = %config.node, "certfleet-agent starting");
    let grpc = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding grpc.listen {}", config.grpc_listen))?;
    let http01 = match &config.http01.mode {
        Http01Mode::Standalone { listen } => Some(
            TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding http01.listen {listen}"))?,
        ),
        Http01Mode::Webroot { .. } => None,
    };
    run(config, Listeners { grpc, http01 }, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
