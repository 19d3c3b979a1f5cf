//! `certfleet-agent --config agent.toml [run | join ...]`: wires up and
//! calls [`certfleet_agent::run`], or joins the cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use certfleet_agent::config::{Config, Http01Mode};
use certfleet_agent::identity::{Identity, IdentityError, join};
use certfleet_agent::{Listeners, run};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

/// certfleet's per-node agent.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the agent's config file.
    #[arg(long, global = true, default_value = "/etc/certfleet/agent.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default). The node must have joined.
    Run,
    /// Join the cluster with the token `certfleet node add` printed.
    Join {
        /// The coordinator's enrollment address, host:port.
        #[arg(long)]
        coordinator: String,
        /// The one-time join token.
        #[arg(long)]
        token: String,
        /// The cluster CA pin, sha256:<hex>.
        #[arg(long)]
        ca_pin: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    certfleet_proto::init_process();
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
    match args.command.unwrap_or(Command::Run) {
        Command::Join {
            coordinator,
            token,
            ca_pin,
        } => runtime.block_on(async {
            match join(&config.state_dir, &config.node, &coordinator, &token, &ca_pin).await {
                Ok(joined) => {
                    println!(
                        "joined as node {}; identity in {} (certificate valid until {}, renewed automatically)",
                        joined.node,
                        joined.dir.display(),
                        joined.not_after
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("certfleet-agent: join failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Run => {
            let identity = match Identity::load(&config.state_dir, &config.node) {
                Ok(identity) => Arc::new(identity),
                Err(e @ IdentityError::NotJoined(_)) => {
                    eprintln!("certfleet-agent: {e}");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("certfleet-agent: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config, identity)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("certfleet-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(config: Config, identity: Arc<Identity>) -> anyhow::Result<()> {
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
    run(
        config,
        identity,
        Listeners { grpc, http01 },
        shutdown_signal(),
    )
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
