//! `certfleet`: the admin's command-line tool. It talks to the
//! coordinator's admin API on its Unix socket; everything it shows comes
//! from there.
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 usage or config error.
#![forbid(unsafe_code)]

mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use certfleet_proto::pb;
use certfleet_proto::pb::admin_client::AdminClient;
use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Drive a certfleet coordinator.
#[derive(Parser)]
#[command(name = "certfleet", version)]
struct Cli {
    /// The coordinator's admin socket.
    #[arg(
        long,
        global = true,
        env = "CERTFLEET_SOCKET",
        default_value = "/run/certfleet/admin.sock"
    )]
    socket: PathBuf,
    /// Print machine-readable JSON (one object per line for streams).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Obtain a new version of a certificate from the CA, showing each step.
    Issue {
        /// The certificate's name as configured in [[certificates]].
        certificate: String,
    },
    /// List the certificates in the store: names, serial, expiry, days left.
    Certificates,
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
    },
    /// Restart the certificate's services node by node, verifying each
    /// serves the live version; a failing node is rolled back and the
    /// rollout halts.
    Restart {
        /// The certificate's name.
        certificate: String,
    },
    /// Distribute, then restart.
    Rollout {
        /// The certificate's name.
        certificate: String,
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
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Register a node and print a one-time join token for it.
    Add {
        /// The node's name (a-z 0-9 -).
        name: String,
        /// The agent's gRPC address, ip:port.
        #[arg(long)]
        agent: String,
        /// The IP the CA reaches the node on for HTTP-01 (default: the agent's).
        #[arg(long, default_value = "")]
        http01: String,
        /// How long the join token stays valid, in seconds (default: the coordinator's).
        #[arg(long, default_value_t = 0)]
        token_ttl: u32,
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
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async {
        let client = match connect(&cli.socket).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "certfleet: cannot reach the coordinator at {}: {e}",
                    cli.socket.display()
                );
                return Outcome::Failed;
            }
        };
        match &cli.command {
            Command::Issue { certificate } => {
                let request = pb::IssueRequest {
                    certificate: certificate.clone(),
                };
                match client.clone().issue(request).await {
                    Ok(r) => follow(r.into_inner(), cli.json).await,
                    Err(status) => refused(&status),
                }
            }
            Command::Restart { certificate } | Command::Rollout { certificate } => {
                let request = pb::RestartRequest {
                    certificate: certificate.clone(),
                };
                let call = if matches!(cli.command, Command::Rollout { .. }) {
                    client.clone().rollout(request).await
                } else {
                    client.clone().restart(request).await
                };
                match call {
                    Ok(r) => follow(r.into_inner(), cli.json).await,
                    Err(status) => refused(&status),
                }
            }
            Command::Status { certificate } => {
                let request = pb::StatusRequest {
                    certificate: certificate.clone(),
                };
                match client.clone().status(request).await {
                    Ok(r) => render::status(&r.into_inner(), cli.json),
                    Err(status) => refused(&status),
                }
            }
            Command::Distribute {
                certificate,
                version,
                nodes,
            } => {
                let request = pb::DistributeRequest {
                    certificate: certificate.clone(),
                    version: version.unwrap_or(0),
                    nodes: nodes.clone(),
                };
                match client.clone().distribute(request).await {
                    Ok(r) => follow(r.into_inner(), cli.json).await,
                    Err(status) => refused(&status),
                }
            }
            Command::Certificates => certificates(client, cli.json).await,
            Command::Node(NodeCommand::Add {
                name,
                agent,
                http01,
                token_ttl,
            }) => {
                let request = pb::AddNodeRequest {
                    name: name.clone(),
                    agent: agent.clone(),
                    http01: http01.clone(),
                    token_ttl_seconds: *token_ttl,
                };
                match client.clone().add_node(request).await {
                    Ok(r) => {
                        render::node_added(name, &r.into_inner(), cli.json);
                        Outcome::Ok
                    }
                    Err(status) => refused(&status),
                }
            }
            Command::Node(NodeCommand::Remove { name }) => {
                let request = pb::RemoveNodeRequest { name: name.clone() };
                match client.clone().remove_node(request).await {
                    Ok(_) => {
                        if cli.json {
                            println!("{}", serde_json::json!({ "removed": name }));
                        } else {
                            println!("removed node {name}: its certificate is refused from now on");
                        }
                        Outcome::Ok
                    }
                    Err(status) => refused(&status),
                }
            }
            Command::Nodes => match client.clone().list_nodes(pb::ListNodesRequest {}).await {
                Ok(r) => {
                    render::nodes(&r.into_inner().nodes, cli.json);
                    Outcome::Ok
                }
                Err(status) => refused(&status),
            },
        }
    });
    match outcome {
        Outcome::Ok => ExitCode::SUCCESS,
        Outcome::Failed => ExitCode::FAILURE,
        Outcome::Usage => ExitCode::from(2),
    }
}

async fn connect(
    socket: &std::path::Path,
) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    let socket = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::from_static("http://certfleet.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(certfleet_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(certfleet_proto::MAX_MESSAGE_BYTES))
}

/// Maps a refusal of the request itself to an exit code.
fn refused(status: &tonic::Status) -> Outcome {
    eprintln!("certfleet: {}", status.message());
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            Outcome::Usage
        }
        _ => Outcome::Failed,
    }
}

/// Shows an operation's event stream until its DONE or FAILED event.
async fn follow(mut stream: tonic::Streaming<pb::IssueEvent>, json: bool) -> Outcome {
    let mut view = render::IssueView::new(json);
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                let last = matches!(event.stage(), pb::Stage::Done | pb::Stage::Failed);
                let ok = event.stage() == pb::Stage::Done;
                view.event(&event);
                if last {
                    return if ok { Outcome::Ok } else { Outcome::Failed };
                }
            }
            Ok(None) => {
                view.finish();
                eprintln!(
                    "certfleet: the coordinator closed the stream before the operation ended"
                );
                return Outcome::Failed;
            }
            Err(status) => {
                view.finish();
                return refused(&status);
            }
        }
    }
}

async fn certificates(mut client: AdminClient<Channel>, json: bool) -> Outcome {
    match client
        .list_certificates(pb::ListCertificatesRequest {})
        .await
    {
        Ok(r) => {
            render::certificates(&r.into_inner().certificates, json);
            Outcome::Ok
        }
        Err(status) => refused(&status),
    }
}
