//! `certfleet-agent --config agent.toml [run | join ...]`: wires up and
//! calls [`certfleet_agent::run`], or joins the cluster.

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use certfleet_agent::config::{Config, Http01Mode};
use certfleet_agent::identity::{Identity, IdentityError, join};
use certfleet_agent::{Listeners, run};
use certfleet_proto::cause_chain::Chain;
use certfleet_proto::clock;
use certfleet_proto::logging::{self, LogFormat};
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
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
            match runtime.block_on(serve(config, identity)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    logging::fatal(PROGRAM, &Chain(&*e));
                    ExitCode::FAILURE
                }
            }
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
