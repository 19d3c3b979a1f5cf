//! The admin API (`certfleet.v1.Admin`) on a Unix socket, which the
//! `certfleet` CLI talks to.
//!
//! An order keeps running if the client hangs up: abandoning it half-way
//! would leave tokens placed and an authorization pending for nothing.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::identity::is_valid_node_name;
use certfleet_proto::pb;
use certfleet_proto::pb::admin_server::{Admin, AdminServer};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::db::{DbError, NodeRecord, now};
use crate::distribute::{DistributeError, Distributed, distribute};
use crate::issue::{Failed, IssueError, Issued, Issuer};
use crate::progress::{Event, Progress, Stage};
use crate::rollout::{self, Restarted, RolloutError};
use crate::store::Stored;

/// Mode of the admin socket: the owner and the `certfleet` group may call.
pub const SOCKET_MODE: u32 = 0o660;
/// The group whose members may use the admin socket.
pub const ADMIN_GROUP: &str = "certfleet";
/// Random bytes in a join token's id and secret (the secret: 192 bits).
const TOKEN_ID_BYTES: usize = 8;
const TOKEN_SECRET_BYTES: usize = 24;

/// Events buffered for a slow client before the order waits on it.
const EVENT_BUFFER: usize = 256;

/// Binds the admin socket at `path`, replacing a stale socket left by a
/// previous run (but never a file of another kind), with [`SOCKET_MODE`].
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    // Members of the `certfleet` group may administer, where the group exists.
    if let Ok(Some(group)) = nix::unistd::Group::from_name(ADMIN_GROUP) {
        nix::unistd::chown(path, None, Some(group.gid)).map_err(std::io::Error::from)?;
    }
    Ok(listener)
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    issuer: Arc<Issuer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(
            AdminServer::new(AdminService { issuer })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

struct AdminService {
    issuer: Arc<Issuer>,
}

/// The calling process's uid, from the socket's SO_PEERCRED.
fn caller_uid<T>(request: &Request<T>) -> Option<u32> {
    request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
}

impl AdminService {
    /// Refuses an unknown certificate before any work, as a usage error.
    fn known(&self, name: &str) -> Result<(), Status> {
        match self.issuer.config().certificate(name) {
            Some(_) => Ok(()),
            None => Err(Status::not_found(
                IssueError::UnknownCertificate(name.to_owned()).to_string(),
            )),
        }
    }

    fn restart_or_rollout(
        &self,
        request: Request<pb::RestartRequest>,
        with_distribute: bool,
    ) -> Result<Response<EventStream>, Status> {
        let uid = caller_uid(&request);
        let name = request.into_inner().certificate;
        let action = if with_distribute {
            "rollout"
        } else {
            "restart"
        };
        self.audit(uid, action, &format!("certificate {name:?}"));
        self.known(&name)?;
        let issuer = Arc::clone(&self.issuer);
        Ok(Response::new(stream_operation(
            move |progress| async move {
                let result = if with_distribute {
                    rollout::rollout(&issuer, &name, &progress).await
                } else {
                    rollout::restart(&issuer, &name, &progress).await
                };
                restarted_to_pb(&name, result)
            },
        )))
    }

    /// Writes who asked for what to the audit log. Never a secret: callers
    /// pass names and ids only.
    fn audit(&self, uid: Option<u32>, action: &str, detail: &str) {
        tracing::info!(uid, action, detail, "admin request");
        if let Err(e) = self.issuer.db().audit(uid, action, detail, now()) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }
}

fn random_b64(bytes: usize) -> String {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    crate::pki::random(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

#[tonic::async_trait]
impl Admin for AdminService {
    type IssueStream = EventStream;
    type DistributeStream = EventStream;
    type RestartStream = EventStream;
    type RolloutStream = EventStream;

    async fn restart(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<Self::RestartStream>, Status> {
        self.restart_or_rollout(request, false)
    }

    async fn rollout(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<Self::RolloutStream>, Status> {
        self.restart_or_rollout(request, true)
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let name = request.into_inner().certificate;
        self.known(&name)?;
        let (live, nodes) = rollout::status(&self.issuer, &name)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let last_rollout = self
            .issuer
            .db()
            .last_rollout(&name)
            .map_err(|e| Status::internal(e.to_string()))?
            .unwrap_or_default();
        let now = now();
        let (live_version, live_sha256) = live.unwrap_or_default();
        Ok(Response::new(pb::StatusResponse {
            live_version,
            live_sha256,
            last_rollout,
            nodes: nodes
                .into_iter()
                .map(|n| match n.result {
                    Ok(c) => pb::NodeCertificateStatus {
                        node: n.node,
                        version: c.version,
                        leaf_sha256: c.leaf_sha256,
                        intact: c.intact,
                        days_left: if c.not_after == 0 {
                            0
                        } else {
                            (c.not_after - now).div_euclid(86_400)
                        },
                        served: c
                            .served
                            .into_iter()
                            .map(|s| pb::ServedEndpoint::from_probe(s.service, s.address, s.result))
                            .collect(),
                        error: String::new(),
                        problem: c.problem,
                    },
                    Err(e) => pb::NodeCertificateStatus {
                        node: n.node,
                        error: e,
                        ..Default::default()
                    },
                })
                .collect(),
        }))
    }

    async fn distribute(
        &self,
        request: Request<pb::DistributeRequest>,
    ) -> Result<Response<Self::DistributeStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "distribute",
            &format!(
                "certificate {:?} version {} nodes {:?}",
                r.certificate, r.version, r.nodes
            ),
        );
        if self.issuer.config().certificate(&r.certificate).is_none() {
            return Err(Status::not_found(
                IssueError::UnknownCertificate(r.certificate).to_string(),
            ));
        }
        let issuer = Arc::clone(&self.issuer);
        Ok(Response::new(stream_operation(
            move |progress| async move {
                let version = (r.version > 0).then_some(r.version);
                let result =
                    distribute(&issuer, &r.certificate, version, &r.nodes, &progress).await;
                distributed_to_pb(&r.certificate, result)
            },
        )))
    }

    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<Self::IssueStream>, Status> {
        let uid = caller_uid(&request);
        let name = request.into_inner().certificate;
        self.audit(uid, "issue", &format!("certificate {name:?}"));
        if self.issuer.config().certificate(&name).is_none() {
            return Err(Status::not_found(
                IssueError::UnknownCertificate(name).to_string(),
            ));
        }
        let issuer = Arc::clone(&self.issuer);
        Ok(Response::new(stream_operation(
            move |progress| async move {
                match issuer.issue(&name, &progress).await {
                    Ok(issued) => done_to_pb(&issued),
                    Err(failed) => failed_to_pb(&failed),
                }
            },
        )))
    }

    async fn list_certificates(
        &self,
        _request: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let stored = self
            .issuer
            .store()
            .list()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListCertificatesResponse {
            certificates: stored.iter().map(stored_to_pb).collect(),
        }))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeResponse>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        if !is_valid_node_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "node name {:?}: must be 1-63 characters of a-z 0-9 and '-', not starting or ending with '-'",
                r.name
            )));
        }
        let agent: SocketAddr = r.agent.parse().map_err(|e| {
            Status::invalid_argument(format!(
                "--agent {:?}: not an address like 10.0.0.2:7443: {e}",
                r.agent
            ))
        })?;
        let http01: IpAddr = if r.http01.is_empty() {
            agent.ip()
        } else {
            r.http01.parse().map_err(|e| {
                Status::invalid_argument(format!("--http01 {:?}: not an IP address: {e}", r.http01))
            })?
        };
        let enrollment = &self.issuer.config().enrollment;
        let ttl = match r.token_ttl_seconds {
            0 => enrollment.join_token_ttl,
            s => std::time::Duration::from_secs(s.into()),
        };
        let (id, secret) = (random_b64(TOKEN_ID_BYTES), random_b64(TOKEN_SECRET_BYTES));
        let expires = now() + ttl.as_secs() as i64;
        let record = NodeRecord {
            name: r.name.clone(),
            agent: agent.to_string(),
            http01: http01.to_string(),
            state: "pending".into(),
            cert_not_after: 0,
            last_contact: 0,
        };
        self.issuer
            .db()
            .add_node(&record, &id, &secret, expires, now())
            .map_err(|e| match e {
                DbError::Active(_) => Status::failed_precondition(e.to_string()),
                e => Status::internal(e.to_string()),
            })?;
        self.issuer.forget_node(&r.name);
        self.audit(
            uid,
            "node add",
            &format!("node {} agent {agent} token id {id}", r.name),
        );
        let token = format!("{id}.{secret}");
        let ca_pin = self.issuer.ca_pin().to_owned();
        Ok(Response::new(pb::AddNodeResponse {
            // The token goes to the command's standard input, never into
            // its arguments: every local user can read a process's argv.
            join_command: format!(
                "certfleet-agent --config /etc/certfleet/agent.toml join --coordinator {} --ca-pin {ca_pin} --token-file -",
                enrollment.advertise
            ),
            token,
            ca_pin,
            expires_unix: expires,
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let uid = caller_uid(&request);
        let name = request.into_inner().name;
        self.issuer.db().remove(&name).map_err(|e| match e {
            DbError::UnknownNode(_) => Status::not_found(e.to_string()),
            e => Status::internal(e.to_string()),
        })?;
        self.issuer.forget_node(&name);
        self.audit(uid, "node remove", &format!("node {name}"));
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .issuer
            .db()
            .nodes()
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|n| pb::NodeInfo {
                name: n.name,
                agent: n.agent,
                state: n.state,
                cert_not_after_unix: n.cert_not_after,
                last_contact_unix: n.last_contact,
                http01: n.http01,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }
}

/// A stream of an operation's events, ending with its DONE or FAILED event.
type EventStream = ReceiverStream<Result<pb::IssueEvent, Status>>;

/// Runs `operation` in its own task (it keeps running if the client hangs
/// up) and streams its progress, then the event it ends with.
fn stream_operation<F, Fut>(operation: F) -> EventStream
where
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: Future<Output = pb::IssueEvent> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let (progress, mut events) = Progress::channel();
        let task = tokio::spawn(operation(progress));
        while let Some(event) = events.recv().await {
            // A client that hung up does not stop the operation.
            let _ = tx.send(Ok(event_to_pb(event))).await;
        }
        let last = task
            .await
            .map_err(|e| Status::internal(format!("operation task failed: {e}")));
        let _ = tx.send(last).await;
    });
    ReceiverStream::new(rx)
}

fn distributed_to_pb(name: &str, result: Result<Distributed, DistributeError>) -> pb::IssueEvent {
    match result {
        Ok(d) => {
            let changed = d.nodes.iter().filter(|(_, i)| i.changed).count();
            pb::IssueEvent {
                stage: pb::Stage::Done.into(),
                ok: true,
                message: format!(
                    "{name} version {} is on all {} nodes ({changed} changed, {} already had it)",
                    d.version,
                    d.nodes.len(),
                    d.nodes.len() - changed
                ),
                ..Default::default()
            }
        }
        Err(e) => {
            let (kind, node) = match &e {
                DistributeError::Nodes { failed, .. } => ("node", node_list(failed)),
                DistributeError::NotServing(n) => ("config", n.clone()),
                DistributeError::Setup(_)
                | DistributeError::NoVersion { .. }
                | DistributeError::NotIssued(_) => ("config", String::new()),
                DistributeError::Store(_) => ("store", String::new()),
            };
            failure_event(kind, node, e.to_string())
        }
    }
}

/// The last event of an operation that failed.
fn failure_event(kind: &str, node: String, message: String) -> pb::IssueEvent {
    pb::IssueEvent {
        stage: pb::Stage::Failed.into(),
        node: node.clone(),
        ok: false,
        message: message.clone(),
        failure: Some(pb::Failure {
            kind: kind.into(),
            message,
            node,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Node names joined for the `node` field of a failure.
fn node_list(failed: &[(String, String)]) -> String {
    failed
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn restarted_to_pb(name: &str, result: Result<Restarted, RolloutError>) -> pb::IssueEvent {
    match result {
        Ok(r) => pb::IssueEvent {
            stage: pb::Stage::Done.into(),
            ok: true,
            message: format!(
                "{name} version {} is served by all {} nodes: {}",
                r.version,
                r.nodes.len(),
                r.nodes.join(", ")
            ),
            ..Default::default()
        },
        Err(e) => {
            let (kind, node) = match &e {
                RolloutError::Halted { node, .. } => ("rollout", node.clone()),
                RolloutError::Distribute(DistributeError::Nodes { failed, .. }) => {
                    ("node", node_list(failed))
                }
                RolloutError::Store(_) => ("store", String::new()),
                _ => ("config", String::new()),
            };
            failure_event(kind, node, e.to_string())
        }
    }
}

fn stage_to_pb(stage: Stage) -> pb::Stage {
    match stage {
        Stage::Order => pb::Stage::Order,
        Stage::Placement => pb::Stage::Placement,
        Stage::SelfCheck => pb::Stage::SelfCheck,
        Stage::Validation => pb::Stage::Validation,
        Stage::Finalize => pb::Stage::Finalize,
        Stage::Store => pb::Stage::Store,
        Stage::Cleanup => pb::Stage::Cleanup,
        Stage::Distribute => pb::Stage::Distribute,
        Stage::Restart => pb::Stage::Restart,
        Stage::Rollback => pb::Stage::Rollback,
    }
}

fn event_to_pb(event: Event) -> pb::IssueEvent {
    pb::IssueEvent {
        stage: stage_to_pb(event.stage).into(),
        node: event.node.unwrap_or_default(),
        ok: event.ok,
        message: event.message,
        issued: None,
        failure: None,
    }
}

fn stored_to_pb(stored: &Stored) -> pb::Certificate {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let bundle = &stored.bundle;
    pb::Certificate {
        name: stored.name.clone(),
        version: stored.version,
        sans: bundle.sans.clone(),
        serial: bundle.serial.clone(),
        not_after_unix: bundle.not_after,
        days_left: (bundle.not_after - now).div_euclid(86_400),
        sha256: bundle.leaf_sha256_hex(),
        live_dir: stored.live_dir.display().to_string(),
        order_url: String::new(),
        timings: None,
    }
}

fn done_to_pb(issued: &Issued) -> pb::IssueEvent {
    let t = &issued.timings;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let mut certificate = stored_to_pb(&issued.stored);
    certificate.order_url = issued.order_url.clone();
    certificate.timings = Some(pb::Timings {
        total_ms: ms(t.total),
        ca_ms: ms(t.ca),
        placement_ms: ms(t.placement),
        cleanup_ms: ms(t.cleanup),
    });
    pb::IssueEvent {
        stage: pb::Stage::Done.into(),
        node: String::new(),
        ok: true,
        message: format!(
            "issued {} version {} ({} ms)",
            issued.stored.name,
            issued.stored.version,
            ms(t.total)
        ),
        issued: Some(certificate),
        failure: None,
    }
}

fn failed_to_pb(failed: &Failed) -> pb::IssueEvent {
    let error = &failed.error;
    let kind = match error {
        IssueError::UnknownCertificate(_) => "config",
        IssueError::Busy(_) => "busy",
        IssueError::Nodes {
            stage: Stage::SelfCheck,
            ..
        } => "self_check",
        IssueError::Nodes { .. } => "node",
        IssueError::Acme { .. } | IssueError::Setup(_) => "acme",
        IssueError::Authorization { .. }
        | IssueError::NoHttp01(_)
        | IssueError::BadToken { .. } => "acme",
        IssueError::Certificate(_) => "certificate",
        IssueError::Key(_) => "internal",
        IssueError::Store(_) | IssueError::Registry(_) => "store",
        IssueError::UnknownNode { .. }
        | IssueError::NodeNotActive { .. }
        | IssueError::NoNodes(_)
        | IssueError::NodeAddress { .. } => "config",
        IssueError::Tls { .. } => "internal",
    };
    let node = match error {
        IssueError::Nodes { errors, .. } => errors
            .iter()
            .map(|e| e.node().to_owned())
            .collect::<Vec<_>>()
            .join(","),
        _ => String::new(),
    };
    let problem = error.problem();
    pb::IssueEvent {
        stage: pb::Stage::Failed.into(),
        node: node.clone(),
        ok: false,
        message: error.to_string(),
        issued: None,
        failure: Some(pb::Failure {
            kind: kind.to_owned(),
            message: error.to_string(),
            node,
            acme_type: problem.and_then(|p| p.r#type.clone()).unwrap_or_default(),
            acme_detail: problem.and_then(|p| p.detail.clone()).unwrap_or_default(),
            order_url: failed.order_url.clone().unwrap_or_default(),
        }),
    }
}
