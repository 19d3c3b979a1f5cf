//! `certfleet`: the admin's command-line tool. It talks to the
//! coordinator's admin API on its Unix socket; everything it shows comes
//! from there.
//!
//! Exit codes: 0 ok (also when the reader of its output closed the pipe
//! early, see [`output`]), 1 the operation failed, 2 usage or config
//! error. Errors carry their causes and, where one is known, a hint
//! ([`socket`] for the admin socket; the coordinator adds its own).
#![forbid(unsafe_code)]

mod certbot;
mod output;
mod render;
mod snippet;
mod socket;

use std::path::PathBuf;
use std::process::ExitCode;

use certfleet_proto::cause_chain;
use certfleet_proto::pb;
use certfleet_proto::pb::admin_client::AdminClient;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tonic::transport::Channel;

use crate::output::{errln, outln};
use crate::socket::{AdminSocket, ConfigFile, Origin};

/// Drive a certfleet coordinator.
#[derive(Parser)]
#[command(name = "certfleet", version)]
struct Cli {
    /// The coordinator's admin socket [default: admin_socket from the
    /// coordinator's config, else /run/certfleet/admin.sock].
    #[arg(long, global = true, env = "CERTFLEET_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The coordinator's config, read only for its admin_socket [default:
    /// /etc/certfleet/coordinator.toml, if it exists].
    #[arg(long, global = true, env = "CERTFLEET_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON (one object per line for streams).
    #[arg(long, global = true)]
    json: bool,
    /// Show every step of every node, with full fingerprints, instead of
    /// a counter per stage and only what needs your eye.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Obtain a new version of a certificate from the CA, showing each step.
    Issue {
        /// The certificate's name as configured in [[certificates]].
        certificate: String,
        /// Order even when the rate-limit guard refuses.
        #[arg(long)]
        force: bool,
        /// Run the whole order against acme.staging_directory with its own
        /// account; store and distribute nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Renew the certificates that are due (all configured ones, or those
    /// named), then do what each one's after_issue says.
    Renew {
        /// Certificates' names (default: every configured one).
        certificates: Vec<String>,
        /// Renew even when not due, and order past the rate-limit guard.
        #[arg(long)]
        force: bool,
        /// Run the orders against acme.staging_directory; store nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// What ran on a certificate, when, by whom and how it ended.
    History {
        /// The certificate's name.
        certificate: String,
        /// Show at most this many operations, newest first.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Revoke a stored version at the CA.
    Revoke {
        /// The certificate's name.
        certificate: String,
        /// The version to revoke (default: the live one).
        #[arg(long)]
        version: Option<u32>,
        /// Why: unspecified, keyCompromise, superseded, cessationOfOperation, ...
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove a certificate from the store; files on nodes stay unless
    /// --from-nodes.
    Delete {
        /// The certificate's name.
        certificate: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Also remove the installed files from every node serving it.
        #[arg(long)]
        from_nodes: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Show or change the ACME account.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Bring a certbot lineage in as version 1 of a configured certificate.
    Import {
        /// certbot's config directory (holding live/, archive/, renewal/).
        #[arg(long, value_name = "DIR")]
        certbot: PathBuf,
        /// The lineage to import (default: the only one in DIR).
        #[arg(long, value_name = "NAME")]
        lineage: Option<String>,
        /// The configured certificate to import into (default: the one
        /// whose names are exactly the lineage's domains).
        #[arg(long)]
        certificate: Option<String>,
    },
    /// List the certificates in the store: names, serial, expiry, days left.
    Certificates,
    /// Approval requests: every pending one, then the latest decided ones.
    Approvals {
        /// How many decided requests to show.
        #[arg(long, default_value_t = 10)]
        recent: u32,
    },
    /// Approve a pending request and run the step it holds back
    /// (distribute, rollout or restart), showing each step.
    Approve {
        /// The request's id, as `certfleet approvals` shows it.
        id: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Reject a pending request: nothing is distributed or restarted; the
    /// version stays stored.
    Reject {
        /// The request's id, as `certfleet approvals` shows it.
        id: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// The mail outbox: what waits to be sent and why, then what was sent.
    Outbox,
    /// Send a stored version to every node serving it (or the ones named).
    Distribute {
        /// The certificate's name as configured in [[certificates]].
        certificate: String,
        /// The version to send (default: the live one).
        #[arg(long)]
        version: Option<u32>,
        /// Only these nodes (comma-separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Restart the certificate's services node by node, verifying each
    /// serves the live version; a failing node is rolled back and the
    /// rollout halts.
    Restart {
        /// The certificate's name.
        certificate: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Distribute, then restart.
    Rollout {
        /// The certificate's name.
        certificate: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Per node: version and fingerprint on disk, what each endpoint serves, days left.
    Status {
        /// The certificate's name.
        certificate: String,
    },
    /// Register or remove nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// List the registered nodes: state, certificate expiry, last contact.
    Nodes,
    /// Print the nginx or apache2 config for port 80 that answers HTTP-01
    /// for a node's agent (from its webroot, or by proxying to its
    /// responder) and redirects every other request to HTTPS. Needs no
    /// coordinator; on a node, `certfleet-agent snippet` reads the agent's
    /// config instead of flags.
    Snippet(snippet::Args),
    /// Completions and man pages (hidden; `deploy/assets.sh` runs them).
    #[command(flatten)]
    Docs(certfleet_proto::cli_docs::Docs),
}

#[derive(Subcommand)]
enum AccountCommand {
    /// The account's URL, contacts, status and key thumbprint.
    Show,
    /// Replace the account's contacts.
    Update {
        /// A contact, e.g. mailto:ops@example.org (repeat for several).
        #[arg(long = "contact", required = true)]
        contacts: Vec<String>,
    },
    /// Replace the account's key; the new credentials are stored atomically.
    Rollover,
}

/// What an operation does when another one on the same certificate runs.
#[derive(clap::Args)]
struct Wait {
    /// If another issue, distribute, restart or rollout of the certificate
    /// is running, wait for it to finish instead of failing as busy.
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Register a node and print a one-time join token for it.
    Add {
        /// The node's name (a-z 0-9 -).
        name: String,
        /// The agent's gRPC address, ip:port (not needed with --transport ssh).
        #[arg(long, default_value = "")]
        agent: String,
        /// The node's sshd, user@host[:port], for --transport ssh or auto.
        #[arg(long, default_value = "")]
        ssh: String,
        /// How the coordinator reaches the node: agent, ssh, or auto (the
        /// agent, and SSH when the agent is unreachable). Default: ssh when
        /// only --ssh is given, else agent.
        #[arg(long, default_value = "")]
        transport: String,
        /// The IP the CA reaches the node on for HTTP-01 (default: the agent's).
        #[arg(long, default_value = "")]
        http01: String,
        /// How long the join token stays valid, in seconds (default: the coordinator's).
        #[arg(long, default_value_t = 0)]
        token_ttl: u32,
        /// The agent's config path on the node, for the printed join command.
        #[arg(long, default_value = "/etc/certfleet/agent.toml")]
        agent_config: String,
    },
    /// Change how the coordinator reaches a node.
    Set {
        /// The node's name.
        name: String,
        /// agent, ssh or auto.
        #[arg(long, default_value = "")]
        transport: String,
        /// The node's sshd, user@host[:port].
        #[arg(long, default_value = "")]
        ssh: String,
    },
    /// Show a node's SSH host key fingerprint and, once confirmed, record
    /// it in certfleet's known_hosts.
    TrustHost {
        /// The node's name.
        name: String,
        /// Record without asking (the fingerprint shown is trusted as is).
        #[arg(long)]
        yes: bool,
        /// Record only this key, SHA256:..., without asking.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Remove a node: its certificate is refused from now on.
    Remove {
        /// The node's name.
        name: String,
    },
}

/// What ended the command, mapped onto the exit code.
pub(crate) enum Outcome {
    Ok,
    Failed,
    Usage,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(&cli, &matches) {
        Outcome::Ok => ExitCode::SUCCESS,
        Outcome::Failed => ExitCode::FAILURE,
        Outcome::Usage => ExitCode::from(2),
    }
}

/// Finds the admin socket, connects and runs the command.
fn run(cli: &Cli, matches: &ArgMatches) -> Outcome {
    if let Command::Snippet(args) = &cli.command {
        return snippet::run(args, cli.config.as_deref(), cli.json);
    }
    if let Command::Docs(docs) = &cli.command {
        return match docs.run(Cli::command()) {
            Ok(()) => Outcome::Ok,
            Err(e) => {
                errln!("certfleet: {e}");
                Outcome::Failed
            }
        };
    }
    render::set_verbose(cli.verbose);
    let socket = match admin_socket(cli, matches) {
        Ok(socket) => socket,
        Err(e) => {
            errln!("certfleet: {e}");
            return Outcome::Usage;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        match socket::connect(&socket).await {
            Ok(client) => dispatch(client, &cli.command, cli.json).await,
            Err(e) => {
                errln!("certfleet: {e}");
                Outcome::Failed
            }
        }
    })
}

/// Runs one command against the coordinator.
async fn dispatch(client: AdminClient<Channel>, command: &Command, json: bool) -> Outcome {
    match command {
        Command::Issue {
            certificate,
            force,
            dry_run,
            wait,
        } => {
            let request = pb::IssueRequest {
                certificate: certificate.clone(),
                wait: wait.wait,
                force: *force,
                dry_run: *dry_run,
            };
            issue(client, request, json).await
        }
        Command::History { certificate, limit } => history(client, certificate, *limit, json).await,
        Command::Renew {
            certificates,
            force,
            dry_run,
            wait,
        } => {
            let request = pb::RenewCertificatesRequest {
                certificates: certificates.clone(),
                force: *force,
                dry_run: *dry_run,
                wait: wait.wait,
            };
            renew(client, request, json).await
        }
        Command::Import {
            certbot,
            lineage,
            certificate,
        } => {
            import(
                client,
                certbot,
                lineage.as_deref(),
                certificate.as_deref(),
                json,
            )
            .await
        }
        Command::Revoke {
            certificate,
            version,
            reason,
        } => {
            let request = pb::RevokeRequest {
                certificate: certificate.clone(),
                version: version.unwrap_or(0),
                reason: reason.clone().unwrap_or_default(),
            };
            revoke(client, request, json).await
        }
        Command::Delete {
            certificate,
            yes,
            from_nodes,
            wait,
        } => {
            if !*yes && !confirm_delete(certificate, *from_nodes) {
                return Outcome::Usage;
            }
            let request = pb::DeleteRequest {
                certificate: certificate.clone(),
                from_nodes: *from_nodes,
                wait: wait.wait,
            };
            operation(client.clone().delete(request).await, json).await
        }
        Command::Account(command) => account(client, command, json).await,
        Command::Certificates => certificates(client, json).await,
        Command::Approvals { recent } => approvals(client, *recent, json).await,
        Command::Approve { id, comment } => {
            let request = pb::DecideApprovalRequest {
                id: id.clone(),
                comment: comment.clone(),
            };
            operation(client.clone().approve(request).await, json).await
        }
        Command::Reject { id, comment } => reject(client, id, comment, json).await,
        Command::Outbox => outbox(client, json).await,
        Command::Distribute {
            certificate,
            version,
            nodes,
            wait,
        } => distribute(client, certificate, *version, nodes, wait.wait, json).await,
        Command::Restart { certificate, wait } | Command::Rollout { certificate, wait } => {
            let rollout = matches!(command, Command::Rollout { .. });
            restart(client, certificate, wait.wait, rollout, json).await
        }
        Command::Status { certificate } => status(client, certificate, json).await,
        Command::Node(NodeCommand::Add {
            name,
            agent,
            ssh,
            transport,
            http01,
            token_ttl,
            agent_config,
        }) => {
            let request = pb::AddNodeRequest {
                name: name.clone(),
                agent: agent.clone(),
                http01: http01.clone(),
                token_ttl_seconds: *token_ttl,
                agent_config: agent_config.clone(),
                ssh: ssh.clone(),
                transport: transport.clone(),
            };
            node_add(client, request, json).await
        }
        Command::Node(NodeCommand::Set {
            name,
            transport,
            ssh,
        }) => {
            let request = pb::SetNodeRequest {
                name: name.clone(),
                transport: transport.clone(),
                ssh: ssh.clone(),
            };
            node_set(client, request, json).await
        }
        Command::Node(NodeCommand::TrustHost {
            name,
            yes,
            fingerprint,
        }) => node_trust_host(client, name, *yes, fingerprint.as_deref(), json).await,
        Command::Node(NodeCommand::Remove { name }) => node_remove(client, name, json).await,
        Command::Nodes => nodes(client, json).await,
        Command::Snippet(_) => unreachable!("run prints a snippet without the coordinator"),
        Command::Docs(_) => unreachable!("run prints completions and man pages itself"),
    }
}

/// `certfleet issue`.
async fn issue(mut client: AdminClient<Channel>, request: pb::IssueRequest, json: bool) -> Outcome {
    operation(client.issue(request).await, json).await
}

/// `certfleet import --certbot DIR`: reads the lineage here, as the admin,
/// and sends it; the coordinator checks and stores it.
async fn import(
    mut client: AdminClient<Channel>,
    dir: &std::path::Path,
    lineage: Option<&str>,
    certificate: Option<&str>,
    json: bool,
) -> Outcome {
    let read = match certbot::read_lineage(dir, lineage) {
        Ok(read) => read,
        Err(e) => {
            errln!("certfleet: {}", cause_chain::Chain(&e));
            return Outcome::Usage;
        }
    };
    let conf = certbot::conf_path(dir, &read.name);
    let domains_from = read.domains_from.describe(&conf);
    let request = pb::ImportRequest {
        certificate: certificate.unwrap_or_default().to_owned(),
        lineage: read.name.clone(),
        fullchain_pem: read.fullchain_pem,
        privkey_pem: read.privkey_pem,
        domains: read.domains,
    };
    answered(client.import(request).await, |r| {
        render::imported(&read.name, &domains_from, r.imported, json);
    })
}

/// `certfleet revoke`.
async fn revoke(
    mut client: AdminClient<Channel>,
    request: pb::RevokeRequest,
    json: bool,
) -> Outcome {
    let name = request.certificate.clone();
    let reason = request.reason.clone();
    answered(client.revoke(request).await, |r| {
        render::revoked(&name, &reason, &r, json);
    })
}

/// Asks on the terminal whether to delete `certificate`; `false` (after
/// saying why) when the answer is not yes, or when there is no terminal to
/// ask on: a script must say `--yes`.
fn confirm_delete(certificate: &str, from_nodes: bool) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        errln!(
            "certfleet delete {certificate}: not confirmed: standard input is not a terminal to ask on; pass --yes to delete without asking"
        );
        return false;
    }
    let nodes = if from_nodes {
        "and remove its files from every node serving it"
    } else {
        "(files on nodes stay; --from-nodes removes them)"
    };
    let mut stderr = std::io::stderr();
    let _ = write!(
        stderr,
        "Delete certificate {certificate} from the store {nodes}? Type yes to confirm: "
    );
    let _ = stderr.flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() || answer.trim() != "yes" {
        errln!("certfleet delete {certificate}: not confirmed; nothing was deleted");
        return false;
    }
    true
}

/// `certfleet account show|update|rollover`.
async fn account(
    mut client: AdminClient<Channel>,
    command: &AccountCommand,
    json: bool,
) -> Outcome {
    let (answer, done) = match command {
        AccountCommand::Show => (client.get_account(pb::GetAccountRequest {}).await, None),
        AccountCommand::Update { contacts } => {
            let request = pb::UpdateAccountRequest {
                contacts: contacts.clone(),
            };
            (
                client.update_account(request).await,
                Some("updated the contacts"),
            )
        }
        AccountCommand::Rollover => (
            client.rollover_account(pb::RolloverAccountRequest {}).await,
            Some("rolled the key over; the new credentials are stored"),
        ),
    };
    answered(answer, |r| render::account(&r, done, json))
}

/// `certfleet outbox`.
async fn outbox(mut client: AdminClient<Channel>, json: bool) -> Outcome {
    answered(client.outbox(pb::OutboxRequest {}).await, |r| {
        render::outbox(&r, json);
    })
}

/// `certfleet history`.
async fn history(
    mut client: AdminClient<Channel>,
    certificate: &str,
    limit: u32,
    json: bool,
) -> Outcome {
    let request = pb::HistoryRequest {
        certificate: certificate.to_owned(),
        limit,
    };
    answered(client.history(request).await, |r| {
        render::history(certificate, &r.operations, json);
    })
}

/// `certfleet renew`: one stream for every certificate, each part ending
/// with its own DONE or FAILED event. Exits 0 when none failed; else 1, or
/// 2 when every failure was a config error.
async fn renew(
    mut client: AdminClient<Channel>,
    request: pb::RenewCertificatesRequest,
    json: bool,
) -> Outcome {
    let mut stream = match client.renew(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return refused(&status),
    };
    let mut view = render::IssueView::new(json);
    let (mut failures, mut config_failures) = (0, 0);
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if event.stage() == pb::Stage::Failed {
                    failures += 1;
                    if matches!(failed(&event), Outcome::Usage) {
                        config_failures += 1;
                    }
                }
                view.event(&event);
            }
            Ok(None) => break,
            Err(status) => {
                view.finish();
                return refused(&status);
            }
        }
    }
    view.finish();
    match (failures, config_failures) {
        (0, _) => Outcome::Ok,
        (f, c) if f == c => Outcome::Usage,
        _ => Outcome::Failed,
    }
}

/// `certfleet approvals`.
async fn approvals(mut client: AdminClient<Channel>, recent: u32, json: bool) -> Outcome {
    let answer = client
        .list_approvals(pb::ListApprovalsRequest { recent })
        .await;
    answered(answer, |r| render::approvals(&r.approvals, json))
}

/// `certfleet reject`.
async fn reject(mut client: AdminClient<Channel>, id: &str, comment: &str, json: bool) -> Outcome {
    let request = pb::DecideApprovalRequest {
        id: id.to_owned(),
        comment: comment.to_owned(),
    };
    answered(client.reject(request).await, |r| {
        if let Some(a) = r.approval {
            render::rejected(&a, json);
        }
    })
}

/// `certfleet certificates`.
async fn certificates(mut client: AdminClient<Channel>, json: bool) -> Outcome {
    let answer = client
        .list_certificates(pb::ListCertificatesRequest {})
        .await;
    answered(answer, |r| render::certificates(&r.certificates, json))
}

/// `certfleet distribute`.
async fn distribute(
    mut client: AdminClient<Channel>,
    certificate: &str,
    version: Option<u32>,
    nodes: &[String],
    wait: bool,
    json: bool,
) -> Outcome {
    let request = pb::DistributeRequest {
        certificate: certificate.to_owned(),
        version: version.unwrap_or(0),
        nodes: nodes.to_vec(),
        wait,
    };
    operation(client.distribute(request).await, json).await
}

/// `certfleet restart`, or `certfleet rollout` (distribute first) when
/// `rollout`: both send the same request.
async fn restart(
    mut client: AdminClient<Channel>,
    certificate: &str,
    wait: bool,
    rollout: bool,
    json: bool,
) -> Outcome {
    let request = pb::RestartRequest {
        certificate: certificate.to_owned(),
        wait,
    };
    let started = if rollout {
        client.rollout(request).await
    } else {
        client.restart(request).await
    };
    operation(started, json).await
}

/// `certfleet status`.
async fn status(mut client: AdminClient<Channel>, certificate: &str, json: bool) -> Outcome {
    let request = pb::StatusRequest {
        certificate: certificate.to_owned(),
    };
    match client.status(request).await {
        Ok(r) => render::status(&r.into_inner(), json),
        Err(status) => refused(&status),
    }
}

/// `certfleet node add`.
async fn node_add(
    mut client: AdminClient<Channel>,
    request: pb::AddNodeRequest,
    json: bool,
) -> Outcome {
    let name = request.name.clone();
    answered(client.add_node(request).await, |r| {
        render::node_added(&name, &r, json);
    })
}

/// `certfleet node set`.
async fn node_set(
    mut client: AdminClient<Channel>,
    request: pb::SetNodeRequest,
    json: bool,
) -> Outcome {
    answered(client.set_node(request).await, |r| {
        if let Some(node) = r.node {
            render::node_set(&node, json);
        }
    })
}

/// `certfleet node trust-host`: reads the key, shows its fingerprint, and
/// records it once the admin confirmed (on a terminal), said `--yes`, or
/// named the fingerprint. The coordinator records only a key the node
/// still presents with the confirmed fingerprint.
async fn node_trust_host(
    mut client: AdminClient<Channel>,
    name: &str,
    yes: bool,
    pinned: Option<&str>,
    json: bool,
) -> Outcome {
    let ask = |fingerprint: &str| pb::TrustHostRequest {
        name: name.to_owned(),
        fingerprint: fingerprint.to_owned(),
    };
    let wanted = match pinned {
        Some(f) => f.to_owned(),
        None => {
            let shown = match client.trust_host(ask("")).await {
                Ok(r) => r.into_inner(),
                Err(status) => return refused(&status),
            };
            render::host_keys(name, &shown, json);
            let Some(first) = shown.keys.first() else {
                return Outcome::Failed;
            };
            if !yes && !confirm_host_key(name, &shown.host, &first.fingerprint) {
                return Outcome::Usage;
            }
            first.fingerprint.clone()
        }
    };
    answered(client.trust_host(ask(&wanted)).await, |r| {
        render::host_trusted(name, &r, &wanted, json);
    })
}

/// Asks on the terminal whether the key with `fingerprint` is `name`'s.
fn confirm_host_key(name: &str, host: &str, fingerprint: &str) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        errln!(
            "certfleet node trust-host {name}: not recorded: standard input is not a terminal to ask on; check the fingerprint, then pass --fingerprint {fingerprint} (or --yes)"
        );
        return false;
    }
    let mut stderr = std::io::stderr();
    let _ = write!(
        stderr,
        "Is {fingerprint} the host key of {name} ({host})? Compare it with `ssh-keygen -lf` on the node's console. Type yes to trust it: "
    );
    let _ = stderr.flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    line.trim() == "yes"
}

/// `certfleet node remove`.
async fn node_remove(mut client: AdminClient<Channel>, name: &str, json: bool) -> Outcome {
    let request = pb::RemoveNodeRequest {
        name: name.to_owned(),
    };
    answered(client.remove_node(request).await, |_| {
        if json {
            outln!("{}", serde_json::json!({ "removed": name }));
        } else {
            outln!("removed node {name}: its certificate is refused from now on");
        }
    })
}

/// `certfleet nodes`.
async fn nodes(mut client: AdminClient<Channel>, json: bool) -> Outcome {
    answered(client.list_nodes(pb::ListNodesRequest {}).await, |r| {
        render::nodes(&r.nodes, json);
    })
}

/// The admin socket the options, the environment or the coordinator's
/// config name (see [`socket`]).
fn admin_socket(cli: &Cli, matches: &ArgMatches) -> Result<AdminSocket, socket::ConfigError> {
    let from_env = |id: &str| matches.value_source(id) == Some(ValueSource::EnvVariable);
    let given = cli.socket.clone().map(|path| {
        let origin = if from_env("socket") {
            Origin::Env
        } else {
            Origin::Flag
        };
        (path, origin)
    });
    let config = match &cli.config {
        Some(path) => ConfigFile::Named {
            path: path.clone(),
            by: if from_env("config") {
                "CERTFLEET_CONFIG"
            } else {
                "--config"
            },
        },
        None => ConfigFile::Usual(socket::DEFAULT_CONFIG.into()),
    };
    socket::locate(given, &config)
}

/// Shows a unary call's answer with `show`, or why the coordinator
/// refused the request.
fn answered<T>(answer: Result<tonic::Response<T>, tonic::Status>, show: impl FnOnce(T)) -> Outcome {
    match answer {
        Ok(r) => {
            show(r.into_inner());
            Outcome::Ok
        }
        Err(status) => refused(&status),
    }
}

/// Maps a refusal of the request itself to an exit code.
fn refused(status: &tonic::Status) -> Outcome {
    errln!("certfleet: {}", cause_chain::status(status));
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            Outcome::Usage
        }
        _ => Outcome::Failed,
    }
}

/// Follows a started operation (issue, distribute, restart, rollout), or
/// reports why the coordinator refused to start it.
async fn operation(
    started: Result<tonic::Response<tonic::Streaming<pb::IssueEvent>>, tonic::Status>,
    json: bool,
) -> Outcome {
    match started {
        Ok(r) => follow(r.into_inner(), json).await,
        Err(status) => refused(&status),
    }
}

/// Shows an operation's event stream until its DONE or FAILED event.
async fn follow(mut stream: tonic::Streaming<pb::IssueEvent>, json: bool) -> Outcome {
    let mut view = render::IssueView::new(json);
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                let outcome = match event.stage() {
                    pb::Stage::Done => Some(Outcome::Ok),
                    pb::Stage::Failed => Some(failed(&event)),
                    _ => None,
                };
                view.event(&event);
                if let Some(outcome) = outcome {
                    return outcome;
                }
            }
            Ok(None) => {
                view.finish();
                errln!("certfleet: the coordinator closed the stream before the operation ended");
                return Outcome::Failed;
            }
            Err(status) => {
                view.finish();
                return refused(&status);
            }
        }
    }
}

/// The exit code for an operation's FAILED event: a config error (a
/// certificate naming a node that is not registered, an unknown version)
/// is 2, like every config error; anything else is 1.
fn failed(event: &pb::IssueEvent) -> Outcome {
    match &event.failure {
        Some(f) if f.kind == "config" => Outcome::Usage,
        _ => Outcome::Failed,
    }
}
