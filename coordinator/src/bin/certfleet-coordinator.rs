//! `certfleet-coordinator --config coordinator.toml`: wires up and calls
//! [`certfleet_coordinator::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use certfleet_coordinator::config::Config;
use certfleet_coordinator::{SetupError, admin, build, run};
use clap::Parser;

/// certfleet's coordinator daemon.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the coordinator's config file.
    #[arg(long, default_value = "/etc/certfleet/coordinator.toml")]
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
            eprintln!("certfleet-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            "certfleet-coordinator starting"
        );
        let socket = config.admin_socket.clone();
        let issuer = match build(config) {
            Ok(issuer) => issuer,
            Err(e @ SetupError::Acme(_)) => {
                eprintln!("certfleet-coordinator: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("certfleet-coordinator: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match admin::bind_socket(&socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "certfleet-coordinator: binding admin socket {}: {e}",
                    socket.display()
                );
                return ExitCode::FAILURE;
            }
        };
        match run(issuer, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("certfleet-coordinator: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
