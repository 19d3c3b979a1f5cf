//! `certfleet-agent --config agent.toml [run | join ... | snippet ...]`:
//! wires up and calls [`certfleet_agent::run`], joins the cluster, or
//! prints a web-server config ([`certfleet_agent::snippet`]); `check`
//! says what `run` would do.
//!
//! Under systemd (`Type=notify`) it reports READY=1 once its listeners
//! serve, and on SIGHUP re-reads the config and applies its
//! `[[certificates]]` live (see [`reload_until`]).

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use certfleet_agent::config::{CertificateTargets, Config, Http01Mode};
use certfleet_agent::identity::{Identity, IdentityError, join};
use certfleet_agent::install::Installer;
use certfleet_agent::snippet::{Listen, Snippet, WebServer};
use certfleet_agent::{Listeners, run_with_installer};
use certfleet_proto::cause_chain::Chain;
use certfleet_proto::clock;
use certfleet_proto::logging::{self, LogArgs};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgGroup, Parser, Subcommand};
use tokio::net::TcpListener;

/// Most bytes read from a join token file or standard input. A token is one
/// short line; anything longer is not one.
const MAX_TOKEN_BYTES: u64 = 4096;

/// How this program names itself in messages.
const PROGRAM: &str = "certfleet-agent";

/// certfleet's per-node agent.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the agent's config file.
    #[arg(long, global = true, default_value = "/etc/certfleet/agent.toml")]
    config: PathBuf,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default). The node must have joined.
    Run,
    /// Join the cluster with the token `certfleet node add` printed.
    #[command(group(ArgGroup::new("token_source").required(true).args(["token", "token_file"])))]
    Join {
        /// The coordinator's enrollment address, host:port.
        #[arg(long)]
        coordinator: String,
        /// Read the one-time join token from this file, or from standard
        /// input if PATH is `-`.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// The one-time join token itself. Every local user can read it in
        /// the process list while the join runs: prefer --token-file.
        #[arg(long)]
        token: Option<String>,
        /// The cluster CA pin, sha256:<hex>.
        #[arg(long)]
        ca_pin: String,
    },
    /// Print the nginx or apache2 config for port 80 that answers HTTP-01
    /// the way this config does (from the webroot, or by proxying to
    /// http01.listen) and redirects every other request to HTTPS.
    Snippet {
        /// The web server: nginx or apache.
        #[arg(value_parser = PossibleValuesParser::new(WebServer::NAMES)
            .map(|name| name.parse::<WebServer>().expect("one of WebServer::NAMES")))]
        server: WebServer,
        /// The certificate, as named in this config's [[certificates]].
        certificate: String,
        /// The certificate's names (the sans of its [[certificates]] in the
        /// coordinator's config), which this config does not hold: repeat,
        /// or separate with commas.
        #[arg(
            long = "server-name",
            value_name = "NAME",
            value_delimiter = ',',
            required = true
        )]
        server_names: Vec<String>,
        /// Where the web server listens for plain HTTP: a port, or ip:port.
        #[arg(long, value_name = "PORT|ADDR", default_value = "80")]
        listen: Listen,
    },
    /// Validate the config as `run` would (keys, and the trust of every
    /// directory it writes into), say what it would do, and exit: 0 when
    /// `run` would start, 2 (with the reason) when it would not. Changes
    /// nothing.
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
                eprintln!("certfleet-agent: {e}");
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Some(Command::Snippet {
        server,
        certificate,
        server_names,
        listen,
    }) = args.command
    {
        let origin = args.config.display().to_string();
        return match Snippet::for_agent(
            &config,
            &origin,
            server,
            &certificate,
            server_names,
            listen,
        ) {
            Ok(snippet) => print_snippet(&snippet),
            Err(e) => {
                eprintln!("{PROGRAM}: {}", Chain(&e));
                ExitCode::from(2)
            }
        };
    }
    match args.command.unwrap_or(Command::Run) {
        Command::Join {
            coordinator,
            token_file,
            token,
            ca_pin,
        } => {
            let token = match join_token(token, token_file.as_deref()) {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("certfleet-agent: {e:#}");
                    return ExitCode::from(2);
                }
            };
            runtime.block_on(join_cluster(&config, &coordinator, &token, &ca_pin))
        }
        Command::Snippet { .. } => unreachable!("handled above"),
        Command::Check => check(&config, &args.config),
        Command::Docs(_) => unreachable!("handled before the config is read"),
        Command::Run => {
            let identity = match Identity::load(&config.state_dir, &config.node) {
                Ok(identity) => Arc::new(identity),
                Err(e @ IdentityError::NotJoined(_)) => {
                    logging::fatal(PROGRAM, &Chain(&e));
                    return ExitCode::from(2);
                }
                Err(e) => {
                    logging::fatal(PROGRAM, &Chain(&e));
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config, args.config, identity)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    logging::fatal(PROGRAM, &Chain(&*e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Prints `snippet` on standard output; a reader that closed the pipe
/// early is no failure.
fn print_snippet(snippet: &Snippet) -> ExitCode {
    use std::io::Write;
    match std::io::stdout()
        .lock()
        .write_all(snippet.render().as_bytes())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{PROGRAM}: writing to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn join_cluster(config: &Config, coordinator: &str, token: &str, ca_pin: &str) -> ExitCode {
    match join(&config.state_dir, &config.node, coordinator, token, ca_pin).await {
        Ok(joined) => {
            println!(
                "joined as node {}; identity in {} (certificate valid until {}, renewed automatically)",
                joined.node,
                joined.dir.display(),
                clock::rfc3339(joined.not_after)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("certfleet-agent: join failed: {}", Chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The join token, from `--token` (with a warning) or `--token-file`.
fn join_token(token: Option<String>, token_file: Option<&Path>) -> anyhow::Result<String> {
    match (token, token_file) {
        (Some(token), None) => {
            eprintln!(
                "certfleet-agent: warning: --token shows the join token to every local user in the process list while the join runs; use --token-file PATH, or --token-file - to read it from standard input"
            );
            Ok(token)
        }
        (None, Some(path)) if path == Path::new("-") => {
            let stdin = std::io::stdin();
            // From a terminal, the token is pasted: one line ends it.
            let one_line = stdin.is_terminal();
            if one_line {
                eprint!("join token (one line): ");
            }
            read_token(stdin.lock(), "standard input", one_line)
        }
        (None, Some(path)) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("opening --token-file {}", path.display()))?;
            read_token(
                std::io::BufReader::new(file),
                &format!("--token-file {}", path.display()),
                false,
            )
        }
        _ => unreachable!("clap requires exactly one of --token and --token-file"),
    }
}

/// Reads a join token of at most [`MAX_TOKEN_BYTES`] from `reader`
/// (`origin` names it in errors, which never show what was read): one line
/// if `one_line`, else everything. Surrounding whitespace is dropped.
fn read_token(reader: impl BufRead, origin: &str, one_line: bool) -> anyhow::Result<String> {
    let mut limited = reader.take(MAX_TOKEN_BYTES + 1);
    let mut raw = Vec::new();
    if one_line {
        limited.read_until(b'\n', &mut raw)
    } else {
        limited.read_to_end(&mut raw)
    }
    .with_context(|| format!("reading the join token from {origin}"))?;
    if raw.len() as u64 > MAX_TOKEN_BYTES {
        bail!(
            "{origin}: more than {MAX_TOKEN_BYTES} bytes; it must hold only the join token `certfleet node add` printed"
        );
    }
    let Ok(text) = std::str::from_utf8(&raw) else {
        bail!("{origin}: not text; it must hold only the join token `certfleet node add` printed");
    };
    let token = text.trim();
    if token.is_empty() {
        bail!("{origin}: no join token in it");
    }
    if token.contains(char::is_whitespace) {
        bail!(
            "{origin}: holds more than one word; it must hold only the join token `certfleet node add` printed"
        );
    }
    Ok(token.to_owned())
}

async fn serve(config: Config, path: PathBuf, identity: Arc<Identity>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Before anything else: SIGHUP's default action ends the process, and
    // `systemctl reload` may send it as soon as the process exists.
    let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
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
    // Finish any install a crash interrupted before serving anything.
    let installer = Arc::new(Installer::open(&config.state_dir, &config.certificates)?);
    let reloads = tokio::spawn(reload_until(
        hangups,
        path,
        config.clone(),
        Arc::clone(&installer),
    ));
    // `run_with_installer` first polls its shutdown future once every
    // listener serves: that is when the service is ready.
    let shutdown = async {
        notify(&[sd_notify::NotifyState::Ready]);
        shutdown_signal().await;
        notify(&[sd_notify::NotifyState::Stopping]);
    };
    let served = run_with_installer(
        config,
        identity,
        installer,
        Listeners { grpc, http01 },
        shutdown,
    )
    .await;
    reloads.abort();
    served
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

/// On each SIGHUP (`systemctl reload`): re-reads the config at `path` and
/// validates it as a start would (keys and directory trust). A config
/// that does not validate is refused and logged; the running one stays.
///
/// Applied live: `[[certificates]]`, each one's files and services (the
/// next install, restart and status use them). The rest (`node`,
/// `state_dir`, `[grpc]`, `[http01]`) is bound into listeners and the
/// identity at start: a change there is logged as needing a restart, and
/// the running values stay.
async fn reload_until(
    mut hangups: tokio::signal::unix::Signal,
    path: PathBuf,
    mut running: Config,
    installer: Arc<Installer>,
) {
    while hangups.recv().await.is_some() {
        notify(&[sd_notify::NotifyState::Reloading]);
        match Config::load(&path) {
            Err(e) => tracing::error!(
                config = %path.display(),
                error = %Chain(&e),
                "config reload refused: the running config stays"
            ),
            Ok(new) => reload(&path, &mut running, new, &installer).await,
        }
        notify(&[sd_notify::NotifyState::Ready]);
    }
}

/// Applies `new`'s certificates to `installer` and logs what was applied
/// and what needs a restart.
async fn reload(path: &Path, running: &mut Config, new: Config, installer: &Arc<Installer>) {
    let needs_restart = restart_only_changes(running, &new);
    let certificates = certificate_changes(&running.certificates, &new.certificates);
    if !certificates.is_empty() {
        let (installer, targets) = (Arc::clone(installer), new.certificates.clone());
        let replaced =
            tokio::task::spawn_blocking(move || installer.replace_targets(&targets)).await;
        match replaced {
            Ok(Ok(())) => running.certificates = new.certificates,
            Ok(Err(e)) => {
                tracing::error!(config = %path.display(), error = %Chain(&e), "config reload: applying [[certificates]] failed; the running certificates stay");
                return;
            }
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "config reload: applying [[certificates]] failed; the running certificates stay");
                return;
            }
        }
    }
    let applied = if certificates.is_empty() {
        "nothing changed".to_owned()
    } else {
        certificates.join(", ")
    };
    if needs_restart.is_empty() {
        tracing::info!(config = %path.display(), applied = %applied, "config reloaded");
    } else {
        tracing::warn!(
            config = %path.display(),
            applied = %applied,
            needs_restart = %needs_restart.join(", "),
            "config reloaded; run `systemctl restart certfleet-agent` to apply the rest"
        );
    }
}

/// The keys that changed between `old` and `new` that only a restart applies.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let http01 = |c: &Config| (c.http01.mode.clone(), c.http01.token_ttl, c.http01.limits);
    [
        ("node", old.node != new.node),
        ("state_dir", old.state_dir != new.state_dir),
        ("grpc.listen", old.grpc_listen != new.grpc_listen),
        ("[http01]", http01(old) != http01(new)),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// What changed in `[[certificates]]`, one phrase per certificate:
/// `web added`, `mail removed`, `db changed`.
fn certificate_changes(old: &[CertificateTargets], new: &[CertificateTargets]) -> Vec<String> {
    let find = |list: &[CertificateTargets], name: &str| list.iter().position(|c| c.name == name);
    let mut changes = Vec::new();
    for c in new {
        match find(old, &c.name) {
            None => changes.push(format!("certificate {} added", c.name)),
            Some(i) if old[i] != *c => changes.push(format!("certificate {} changed", c.name)),
            Some(_) => {}
        }
    }
    for c in old {
        if find(new, &c.name).is_none() {
            changes.push(format!("certificate {} removed", c.name));
        }
    }
    changes
}

/// `check`: the config was loaded and its tree checked as `run` does (by
/// the caller); then the node's identity, which `run` needs too. Prints
/// what `run` would do; reads, changes nothing.
fn check(config: &Config, path: &Path) -> ExitCode {
    println!(
        "config {}: valid (keys, and the owner and mode of every directory it writes into)",
        path.display()
    );
    println!("node: {}", config.node);
    println!("state: {}", config.state_dir.display());
    println!("listens:");
    println!(
        "  gRPC: {} (mutual TLS; only the coordinator may call)",
        config.grpc_listen
    );
    match &config.http01.mode {
        Http01Mode::Standalone { listen } => println!(
            "  HTTP-01: standalone responder on {listen} (at most {} connections)",
            config.http01.limits.max_connections
        ),
        Http01Mode::Webroot { webroot } => println!(
            "  HTTP-01: none; token files under {}/.well-known/acme-challenge/, served by the web server",
            webroot.display()
        ),
    }
    println!(
        "  tokens live {}s unless the coordinator says",
        config.http01.token_ttl.as_secs()
    );
    println!("certificates: {}", config.certificates.len());
    for c in &config.certificates {
        println!("  {}:", c.name);
        for f in &c.files {
            println!(
                "    {} -> {} ({}:{} {:04o})",
                f.content.name(),
                f.path.display(),
                f.owner,
                f.group,
                f.mode
            );
        }
        for s in &c.services {
            if let Some(check) = &s.check {
                println!("    service {}: check `{}`", s.name, check.join(" "));
            }
            println!(
                "    service {}: restart `{}` (within {}s)",
                s.name,
                s.restart.join(" "),
                s.timeout.as_secs()
            );
            for e in &s.verify {
                println!(
                    "    service {}: must then serve the new certificate on {} (SNI {})",
                    s.name, e.address, e.sni
                );
            }
        }
    }
    match Identity::load(&config.state_dir, &config.node) {
        Ok(identity) => {
            drop(identity);
            println!("identity: joined; run would start");
            ExitCode::SUCCESS
        }
        Err(e @ IdentityError::NotJoined(_)) => {
            eprintln!("{PROGRAM}: {}", Chain(&e));
            eprintln!("{PROGRAM}: run would not start (exit 2)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{PROGRAM}: {}", Chain(&e));
            eprintln!("{PROGRAM}: run would not start (exit 1)");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_read_trimmed_and_bounded() {
        let read = |input: &[u8], one_line| read_token(input, "standard input", one_line);
        assert_eq!(read(b"  abc.DEF-_1\n\n", false).unwrap(), "abc.DEF-_1");
        assert_eq!(read(b"abc.def\nrest", true).unwrap(), "abc.def");
        let err = |input: &[u8]| format!("{:#}", read(input, false).unwrap_err());
        let too_long = vec![b'a'; MAX_TOKEN_BYTES as usize + 1];
        assert!(err(&too_long).contains("more than 4096 bytes"));
        assert_eq!(
            read(&too_long[1..], false).unwrap().len(),
            MAX_TOKEN_BYTES as usize
        );
        assert!(err(b" \n").contains("no join token"));
        let two = err(b"abc.SECRET1\nabc.SECRET2\n");
        assert!(two.contains("more than one word"), "{two}");
        assert!(!two.contains("SECRET"), "an error shows the token: {two}");
        assert!(err(b"\xff\xfe").contains("not text"));
    }

    #[test]
    fn a_token_file_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("join-token");
        let e = format!("{:#}", join_token(None, Some(&missing)).unwrap_err());
        assert!(
            e.contains("--token-file") && e.contains("join-token"),
            "{e}"
        );
        std::fs::write(&missing, "id.secret\n").unwrap();
        assert_eq!(join_token(None, Some(&missing)).unwrap(), "id.secret");
        let e = format!("{:#}", join_token(None, Some(dir.path())).unwrap_err());
        assert!(e.contains("reading the join token"), "{e}");
    }
}
