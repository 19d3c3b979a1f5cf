//! `certfleet-coordinator --config coordinator.toml [init [--force]]`:
//! wires up and calls [`certfleet_coordinator::run`], or makes the cluster
//! CA with `init`.

use std::path::PathBuf;
use std::process::ExitCode;

use certfleet_coordinator::config::Config;
use certfleet_coordinator::pki::{self, PkiError};
use certfleet_coordinator::{Listeners, SetupError, admin, build, run};
use certfleet_proto::cause_chain::Chain;
use certfleet_proto::logging::{self, LogFormat};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};

/// How this program names itself in messages.
const PROGRAM: &str = "certfleet-coordinator";

/// certfleet's coordinator daemon.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the coordinator's config file.
    #[arg(long, global = true, default_value = "/etc/certfleet/coordinator.toml")]
    config: PathBuf,
    /// How to write logs to stderr: text (coloured only on a terminal) or
    /// json (one object per line).
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        default_value = "text",
        value_parser = PossibleValuesParser::new(LogFormat::NAMES)
            .map(|name| name.parse::<LogFormat>().expect("one of LogFormat::NAMES")),
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator (the default).
    Run,
    /// Create the cluster CA and the coordinator's identity in the state dir.
    Init {
        /// Replace an existing CA (every node must then join again).
        #[arg(long)]
        force: bool,
        /// Accept the ACME CA's terms of service (read them first: the
        /// URL is in the CA's directory); same as `acme.agree_tos = true`.
        #[arg(long)]
        agree_tos: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    certfleet_proto::restrict_umask();
    logging::init(args.log_format);
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            logging::fatal(PROGRAM, &Chain(&e));
            return ExitCode::from(2);
        }
    };
    match args.command.unwrap_or(Command::Run) {
        Command::Init { force, agree_tos } => {
            if agree_tos && let Err(e) = certfleet_coordinator::acme::record_tos_agreement(&config)
            {
                eprintln!("certfleet-coordinator: {e}");
                return ExitCode::FAILURE;
            }
            init(&config, force, agree_tos)
        }
        Command::Run => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(serve(config))
        }
    }
}

fn init(config: &Config, force: bool, agree_tos: bool) -> ExitCode {
    match pki::init(&config.state_dir, force) {
        Ok(pin) => {
            println!(
                "created the cluster CA in {}",
                config.state_dir.join("ca").display()
            );
            println!("CA pin: {pin}");
            println!(
                "next: start the coordinator, then `certfleet node add <name> --agent <host:port>` for each node"
            );
            ExitCode::SUCCESS
        }
        // Run again only to accept the terms: the CA stays as it is.
        Err(PkiError::Exists(_)) if agree_tos && !force => {
            println!(
                "recorded that you accept the terms of service of {}; the cluster CA already exists and is kept",
                config.acme.directory
            );
            ExitCode::SUCCESS
        }
        Err(e @ PkiError::Exists(_)) => {
            eprintln!("certfleet-coordinator: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("certfleet-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "certfleet-coordinator starting"
    );
    let socket = config.admin_socket.clone();
    let enrollment_addr = config.enrollment.listen;
    let coordinator = match build(config) {
        Ok(c) => c,
        Err(e @ (SetupError::Acme(_) | SetupError::Pki(PkiError::Missing(_)))) => {
            logging::fatal(PROGRAM, &Chain(&e));
            return ExitCode::from(2);
        }
        Err(e) => {
            logging::fatal(PROGRAM, &Chain(&e));
            return ExitCode::FAILURE;
        }
    };
    // Enrollment first: once the admin socket answers, everything is up.
    let enrollment = match tokio::net::TcpListener::bind(enrollment_addr).await {
        Ok(l) => l,
        Err(e) => {
            logging::fatal(
                PROGRAM,
                &format_args!("binding enrollment.listen {enrollment_addr}: {e}"),
            );
            return ExitCode::FAILURE;
        }
    };
    let admin = match admin::bind_socket(&socket) {
        Ok(l) => l,
        Err(e) => {
            logging::fatal(
                PROGRAM,
                &format_args!("binding admin socket {}: {e}", socket.display()),
            );
            return ExitCode::FAILURE;
        }
    };
    match run(
        coordinator,
        Listeners { admin, enrollment },
        shutdown_signal(),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::fatal(PROGRAM, &Chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
