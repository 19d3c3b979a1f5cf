//! `certfleet-coordinator --config coordinator.toml [run | init [--force] |
//! check]`: wires up and calls [`certfleet_coordinator::run`], makes the
//! cluster CA with `init`, or says what `run` would do with `check`.
//!
//! Under systemd (`Type=notify`) it reports READY=1 once the admin socket
//! and enrollment listen and recovery has started, and on SIGHUP re-reads
//! the config and applies what operations read as they start, such as
//! `[[certificates]]` (see [`reload_until`]).

/// jemalloc, so that memory freed after an operation goes back to the
/// kernel (see [`return_freed_memory`]).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use certfleet_coordinator::config::Config;
use certfleet_coordinator::fleet::{Fleet, Reloaded};
use certfleet_coordinator::pki::{self, PkiError};
use certfleet_coordinator::{Listeners, SetupError, admin, build, run};
use certfleet_proto::cause_chain::Chain;
use certfleet_proto::logging::{self, LogArgs};
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
    #[command(flatten)]
    log: LogArgs,
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
    /// Validate the config as `run` would, say what it would do, and exit:
    /// 0 when `run` would start, 2 (with the reason) when it would not.
    /// Changes nothing.
    Check,
    /// Completions and man pages (hidden; `deploy/assets.sh` runs them).
    #[command(flatten)]
    Docs(certfleet_proto::cli_docs::Docs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before the config is read: packaging runs this without one.
    if let Some(Command::Docs(docs)) = &args.command {
        return match docs.run(<Args as clap::CommandFactory>::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("certfleet-coordinator: {e}");
                ExitCode::FAILURE
            }
        };
    }
    certfleet_proto::restrict_umask();
    logging::init(args.log.log_format);
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
            return_freed_memory();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(serve(config, args.config))
        }
        Command::Check => check(&config, &args.config),
        Command::Docs(_) => unreachable!("handled before the config is read"),
    }
}

/// Has jemalloc hand pages freed for 10 s back to the kernel from a
/// background thread, also while the coordinator idles between
/// operations. An operation over 1,000 agents holds a connection to each
/// (about 55 KiB of buffers apiece); once they close (`placement.
/// idle_connection_secs`), glibc's allocator kept the freed pages, so an
/// idle coordinator stayed at its peak, about 80 MiB.
fn return_freed_memory() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "memory freed after an operation is returned to the system only when the coordinator next allocates");
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
            let staging = config
                .acme
                .staging_directory
                .as_ref()
                .map(|s| format!(" and of {s}"))
                .unwrap_or_default();
            println!(
                "recorded that you accept the terms of service of {}{staging}; the cluster CA already exists and is kept",
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

async fn serve(config: Config, path: PathBuf) -> ExitCode {
    // Before anything else: SIGHUP's default action ends the process, and
    // `systemctl reload` may send it as soon as the process exists.
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            logging::fatal(PROGRAM, &format_args!("installing the SIGHUP handler: {e}"));
            return ExitCode::FAILURE;
        }
    };
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
    let optional = match certfleet_coordinator::bind_optional(&coordinator).await {
        Ok(l) => l,
        Err(e) => {
            logging::fatal(PROGRAM, &e);
            return ExitCode::FAILURE;
        }
    };
    let reloads = tokio::spawn(reload_until(hangups, path, Arc::clone(&coordinator.fleet)));
    // `run` first polls its shutdown future once every listener serves
    // and recovery has started: that is when the service is ready.
    let shutdown = async {
        notify(&[sd_notify::NotifyState::Ready]);
        shutdown_signal().await;
        notify(&[sd_notify::NotifyState::Stopping]);
    };
    let listeners = Listeners {
        admin,
        enrollment,
        optional,
    };
    let served = run(coordinator, listeners, shutdown).await;
    reloads.abort();
    match served {
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

/// Tells systemd about a state change; outside systemd (no
/// `NOTIFY_SOCKET`) this does nothing. A failure is logged, not fatal:
/// systemd then times the start out, which names the problem better.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "telling systemd (NOTIFY_SOCKET) the service state");
    }
}

/// On each SIGHUP (`systemctl reload`): re-reads and validates the config
/// at `path` as a start would, and puts it in force ([`Fleet::reload`]).
///
/// What operations read as they start is applied: `[[certificates]]` (an
/// added certificate can be issued at once, a removed one is no longer
/// renewed), `[placement]`, `[renewal]`'s policy, `[approval]` and
/// `[recovery]`. An operation already running finishes with the config it
/// started with. What is bound at start (the state directory, the admin
/// socket, `[acme]`'s account, the listeners of `[enrollment]`, `[web]` and
/// `[metrics]`, `[mail]`'s SMTP client, `[ssh]`, whether renewal runs at
/// all) keeps its running value and is logged as needing a restart. A
/// config that does not validate is refused and logged; the running one
/// stays.
async fn reload_until(mut hangups: tokio::signal::unix::Signal, path: PathBuf, fleet: Arc<Fleet>) {
    while hangups.recv().await.is_some() {
        notify(&[sd_notify::NotifyState::Reloading]);
        match Config::load(&path) {
            Err(e) => tracing::error!(
                config = %path.display(),
                error = %Chain(&e),
                "config reload refused: the running config stays"
            ),
            Ok(new) => log_reloaded(&path, &fleet.reload(new)),
        }
        notify(&[sd_notify::NotifyState::Ready]);
    }
}

/// One line: which changed sections were applied, which need a restart.
fn log_reloaded(path: &Path, reloaded: &Reloaded) {
    let listed = |sections: &[&str]| match sections {
        [] => "nothing".to_owned(),
        _ => sections.join(", "),
    };
    let (applied, needs_restart) = (listed(&reloaded.applied), listed(&reloaded.needs_restart));
    if reloaded.needs_restart.is_empty() && reloaded.applied.is_empty() {
        tracing::info!(config = %path.display(), "config reloaded: valid, nothing changed");
    } else if reloaded.needs_restart.is_empty() {
        tracing::info!(config = %path.display(), %applied, %needs_restart, "config reloaded");
    } else {
        tracing::warn!(
            config = %path.display(),
            %applied,
            %needs_restart,
            "config reloaded; what needs_restart names keeps its running value until `systemctl restart certfleet-coordinator`"
        );
    }
}

/// `check`: the config at `path` loaded as `run` loads it (done by the
/// caller), then what `run` needs besides, without side effects: the
/// cluster CA `init` makes, and the ACME client's trust roots. Prints what
/// `run` would do.
fn check(config: &Config, path: &Path) -> ExitCode {
    println!("config {}: valid", path.display());
    print_summary(config);
    let mut problems = Vec::new();
    if !config.state_dir.join("ca").exists() {
        problems.push(format!(
            "no cluster CA in {}: run `certfleet-coordinator --config {} init` first",
            config.state_dir.join("ca").display(),
            path.display()
        ));
    }
    if let Err(e) = certfleet_coordinator::acme::AcmeAccount::new(&config.acme, &config.state_dir) {
        problems.push(Chain(&e).to_string());
    }
    if problems.is_empty() {
        println!("run would start");
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("{PROGRAM}: {p}");
    }
    eprintln!("{PROGRAM}: run would not start");
    ExitCode::from(2)
}

fn print_summary(c: &Config) {
    let secs = |d: std::time::Duration| format!("{}s", d.as_secs());
    println!("state: {}", c.state_dir.display());
    println!("listens:");
    println!(
        "  admin API: unix socket {} (mode 0660, group certfleet)",
        c.admin_socket.display()
    );
    println!(
        "  enrollment: {} (advertised as {}; node certificates live {}, join tokens {})",
        c.enrollment.listen,
        c.enrollment.advertise,
        secs(c.enrollment.agent_cert_validity),
        secs(c.enrollment.join_token_ttl)
    );
    match &c.web {
        Some(w) => println!(
            "  approval page: https://{} (links start {})",
            w.listen, w.base_url
        ),
        None => println!("  approval page: off (no [web])"),
    }
    println!(
        "ACME: {} (terms {}accepted; validation on port {} / tls {}; CA timeout {})",
        c.acme.directory,
        if c.acme.agree_tos { "" } else { "not yet " },
        c.acme.validation_port,
        c.acme.validation_tls_port,
        secs(c.acme.ca_timeout)
    );
    println!(
        "placement: {} nodes at once, {} per node, tokens live {}",
        c.placement.concurrency,
        secs(c.placement.node_timeout),
        secs(c.placement.token_ttl)
    );
    if c.renewal.enabled {
        println!(
            "renewal: automatic, when {:.0}% of a certificate's life is left (up to {} earlier)",
            c.renewal.policy.share_left * 100.0,
            secs(c.renewal.policy.max_jitter)
        );
    } else {
        println!("renewal: off (renew by hand with `certfleet renew`)");
    }
    println!("certificates: {}", c.certificates.len());
    for cert in &c.certificates {
        let nodes = match &cert.nodes {
            Some(nodes) => nodes.join(", "),
            None => "every active registered node".to_owned(),
        };
        println!(
            "  {}: {} ({} key); nodes: {nodes}; after issue: {}, {} at a time",
            cert.name,
            cert.sans.join(", "),
            format!("{:?}", cert.key).to_lowercase(),
            format!("{:?}", cert.after_issue).to_lowercase(),
            cert.restart_batch
        );
    }
    match &c.mail {
        Some(m) => println!(
            "mail: via {} from {} to {} ({} days before expiry)",
            m.server,
            m.from,
            m.admins.join(", "),
            m.expiry_warning_days
        ),
        None => println!("mail: off (no [mail])"),
    }
}
