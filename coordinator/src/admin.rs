//! The admin API (`certfleet.v1.Admin`) on a Unix socket, which the
//! `certfleet` CLI talks to.
//!
//! An order keeps running if the client hangs up: abandoning it half-way
//! would leave tokens placed and an authorization pending for nothing.
//!
//! Issue, distribute, restart and rollout each take the certificate's
//! operation lock first ([`stream_operation`]): a second one is refused as
//! busy, naming the first, or waits for it when the request says `wait`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::identity::check_node_name;
use certfleet_proto::pb;
use certfleet_proto::pb::admin_server::{Admin, AdminServer};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::db::{DbError, NodeRecord, now};
use crate::distribute::{DistributeError, Distributed, distribute};
use crate::fleet::{Fleet, Holder, Operation, OperationGuard, OperationLocks};
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
    service: AdminService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(
            AdminServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// The admin API's handlers.
pub struct AdminService {
    fleet: Arc<Fleet>,
    issuer: Arc<Issuer>,
    /// The cluster CA's pin, printed with join tokens.
    ca_pin: String,
}

/// Where the agent's config lives on the node, as printed in the join
/// command; only characters that need no shell quoting.
fn agent_config_path(given: &str) -> Result<String, Status> {
    if given.is_empty() {
        return Ok(DEFAULT_AGENT_CONFIG.to_owned());
    }
    let plain = given
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b));
    if !given.starts_with('/') || !plain || given.split('/').any(|c| c == "..") {
        return Err(Status::invalid_argument(format!(
            "--agent-config {given:?}: must be an absolute path of letters, digits and / . _ - +"
        )));
    }
    Ok(given.to_owned())
}

/// The agent's config path the join command names unless told otherwise.
pub const DEFAULT_AGENT_CONFIG: &str = "/etc/certfleet/agent.toml";

/// The calling process's uid, from the socket's SO_PEERCRED.
fn caller_uid<T>(request: &Request<T>) -> Option<u32> {
    request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
}

impl AdminService {
    pub fn new(fleet: Arc<Fleet>, issuer: Arc<Issuer>, ca_pin: String) -> Self {
        Self {
            fleet,
            issuer,
            ca_pin,
        }
    }

    /// Refuses an unknown certificate before any work, as a usage error.
    fn known(&self, name: &str) -> Result<(), Status> {
        self.fleet
            .spec(name)
            .map(|_| ())
            .map_err(|e| Status::not_found(e.to_string()))
    }

    fn restart_or_rollout(
        &self,
        request: Request<pb::RestartRequest>,
        operation: Operation,
    ) -> Result<Response<EventStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            &operation.to_string(),
            &format!("certificate {:?}", r.certificate),
        );
        self.known(&r.certificate)?;
        let fleet = Arc::clone(&self.fleet);
        let holder = Holder::new(operation, &r.certificate, uid);
        Ok(Response::new(stream_operation(
            self.fleet.locks().clone(),
            holder,
            r.wait,
            move |op, progress| async move {
                let result = if operation == Operation::Rollout {
                    rollout::rollout(&fleet, &op, &progress).await
                } else {
                    rollout::restart(&fleet, &op, &progress).await
                };
                restarted_to_pb(op.certificate(), result)
            },
        )))
    }

    /// Writes who asked for what to the audit log. Never a secret: callers
    /// pass names and ids only.
    fn audit(&self, uid: Option<u32>, action: &str, detail: &str) {
        tracing::info!(uid, action, detail, "admin request");
        if let Err(e) = self.fleet.db().audit(uid, action, detail, now()) {
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
        self.restart_or_rollout(request, Operation::Restart)
    }

    async fn rollout(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<Self::RolloutStream>, Status> {
        self.restart_or_rollout(request, Operation::Rollout)
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let name = request.into_inner().certificate;
        self.known(&name)?;
        let (live, nodes) = rollout::status(&self.fleet, &name)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let last_rollout = self
            .fleet
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
        self.known(&r.certificate)?;
        let fleet = Arc::clone(&self.fleet);
        let holder = Holder::new(Operation::Distribute, &r.certificate, uid);
        Ok(Response::new(stream_operation(
            self.fleet.locks().clone(),
            holder,
            r.wait,
            move |op, progress| async move {
                let version = (r.version > 0).then_some(r.version);
                let result = distribute(&fleet, &op, version, &r.nodes, &progress).await;
                distributed_to_pb(&r.certificate, result)
            },
        )))
    }

    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<Self::IssueStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(uid, "issue", &format!("certificate {:?}", r.certificate));
        self.known(&r.certificate)?;
        let issuer = Arc::clone(&self.issuer);
        let holder = Holder::new(Operation::Issue, &r.certificate, uid);
        Ok(Response::new(stream_operation(
            self.fleet.locks().clone(),
            holder,
            r.wait,
            move |op, progress| async move {
                match issuer.issue(&op, &progress).await {
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
            .fleet
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
        check_node_name(&r.name).map_err(Status::invalid_argument)?;
        let agent_config = agent_config_path(&r.agent_config)?;
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
        let enrollment = &self.fleet.config().enrollment;
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
        self.fleet
            .db()
            .add_node(&record, &id, &secret, expires, now())
            .map_err(|e| match e {
                DbError::Active(_) => Status::failed_precondition(e.to_string()),
                e => Status::internal(e.to_string()),
            })?;
        self.fleet.forget_node(&r.name);
        self.audit(
            uid,
            "node add",
            &format!("node {} agent {agent} token id {id}", r.name),
        );
        let token = format!("{id}.{secret}");
        let ca_pin = self.ca_pin.clone();
        Ok(Response::new(pb::AddNodeResponse {
            // The token goes to the command's standard input, never into
            // its arguments: every local user can read a process's argv.
            join_command: format!(
                "certfleet-agent --config {agent_config} join --coordinator {} --ca-pin {ca_pin} --token-file -",
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
        self.fleet.db().remove(&name).map_err(|e| match e {
            DbError::UnknownNode(_) => Status::not_found(e.to_string()),
            e => Status::internal(e.to_string()),
        })?;
        self.fleet.forget_node(&name);
        self.audit(uid, "node remove", &format!("node {name}"));
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .fleet
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

type EventSender = mpsc::Sender<Result<pb::IssueEvent, Status>>;

/// Runs `operation` in its own task once it holds the certificate's lock
/// for `holder`, and streams its progress, then the event it ends with.
///
/// Once started, the operation keeps running if the client hangs up. While
/// another operation holds the lock, this one fails as busy, or with `wait`
/// waits for it (a client that hangs up while waiting cancels it). One that
/// panics ends with a FAILED event like any other failure; the lock and any
/// rollout record it held are released as the panic unwinds.
fn stream_operation<F, Fut>(
    locks: OperationLocks,
    holder: Holder,
    wait: bool,
    operation: F,
) -> EventStream
where
    F: FnOnce(OperationGuard, Progress) -> Fut + Send + 'static,
    Fut: Future<Output = pb::IssueEvent> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let Some(op) = lock(&locks, holder, wait, &tx).await else {
            return;
        };
        let what = op.holder().clone();
        let (progress, mut events) = Progress::channel();
        let task = tokio::spawn(operation(op, progress));
        while let Some(event) = events.recv().await {
            // A client that hung up does not stop the operation.
            let _ = tx.send(Ok(event_to_pb(event))).await;
        }
        let last = task.await.unwrap_or_else(|e| ended_abnormally(&what, e));
        let _ = tx.send(Ok(last)).await;
    });
    ReceiverStream::new(rx)
}

/// Takes the certificate's lock for `holder`, waiting for it with `wait`.
/// `None` when the operation must not run; `tx` has been told why.
async fn lock(
    locks: &OperationLocks,
    holder: Holder,
    wait: bool,
    tx: &EventSender,
) -> Option<OperationGuard> {
    if !wait {
        return match locks.try_acquire(holder) {
            Ok(op) => Some(op),
            Err(busy) => {
                let event = failure_event("busy", String::new(), busy.to_string());
                let _ = tx.send(Ok(event)).await;
                None
            }
        };
    }
    let waiting = |current: &Holder| {
        // A fresh stream has room for these few lines.
        let _ = tx.try_send(Ok(pb::IssueEvent {
            stage: pb::Stage::Waiting.into(),
            ok: true,
            message: format!("waiting for {current}"),
            ..Default::default()
        }));
    };
    let (operation, certificate) = (holder.operation, holder.certificate.clone());
    tokio::select! {
        op = locks.acquire(holder, waiting) => Some(op),
        () = tx.closed() => {
            tracing::info!(%operation, certificate, "client hung up while waiting; not started");
            None
        }
    }
}

/// The last event of an operation whose task panicked or was cancelled.
fn ended_abnormally(what: &Holder, error: tokio::task::JoinError) -> pb::IssueEvent {
    let how = if error.is_panic() {
        let payload = error.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        format!("panicked ({message})")
    } else {
        "was cancelled".to_owned()
    };
    let (operation, certificate) = (what.operation, &what.certificate);
    tracing::error!(%operation, certificate, how, "operation ended abnormally");
    failure_event(
        "internal",
        String::new(),
        format!(
            "internal error: the {operation} of {certificate} {how}; it was stopped, and a rollout it started is recorded as failed. This is a bug: the coordinator's log has the details"
        ),
    )
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
                DistributeError::Fleet(e) => (e.kind(), String::new()),
                DistributeError::NoVersion { .. } | DistributeError::NotIssued(_) => {
                    ("config", String::new())
                }
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
                RolloutError::Store(_) | RolloutError::Registry(_) => ("store", String::new()),
                RolloutError::Fleet(e) => (e.kind(), String::new()),
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
        IssueError::Fleet(e) => e.kind(),
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
        IssueError::Store(_) | IssueError::NotStored(_) => "store",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_command_names_only_a_plain_absolute_agent_config() {
        assert_eq!(agent_config_path("").unwrap(), DEFAULT_AGENT_CONFIG);
        assert_eq!(
            agent_config_path("/srv/certfleet/agent-2.toml").unwrap(),
            "/srv/certfleet/agent-2.toml"
        );
        for bad in [
            "agent.toml",
            "/etc/a b.toml",
            "/etc/$(id).toml",
            "/etc/../x.toml",
        ] {
            let err = agent_config_path(bad).unwrap_err();
            assert!(err.message().contains("--agent-config"), "{bad}: {err:?}");
        }
    }

    /// 2024-01-01T14:02:11Z.
    const STARTED: i64 = 1_704_117_731;

    fn holder(operation: Operation) -> Holder {
        Holder {
            operation,
            certificate: "cn".into(),
            started: STARTED,
            uid: Some(1000),
        }
    }

    /// An operation that ends DONE and says it ran.
    fn done(
        ran: Arc<std::sync::atomic::AtomicBool>,
    ) -> impl FnOnce(OperationGuard, Progress) -> futures::future::Ready<pb::IssueEvent> {
        move |_op, _progress| {
            ran.store(true, std::sync::atomic::Ordering::SeqCst);
            futures::future::ready(pb::IssueEvent {
                stage: pb::Stage::Done.into(),
                ..Default::default()
            })
        }
    }

    async fn events(stream: EventStream) -> Vec<pb::IssueEvent> {
        use tokio_stream::StreamExt;
        stream.map(|e| e.unwrap()).collect().await
    }

    #[tokio::test]
    async fn a_second_operation_on_a_certificate_fails_as_busy() {
        let locks = OperationLocks::default();
        let _rollout = locks.try_acquire(holder(Operation::Rollout)).unwrap();
        let ran = Arc::default();
        let stream = stream_operation(
            locks.clone(),
            holder(Operation::Issue),
            false,
            done(Arc::clone(&ran)),
        );
        let events = events(stream).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].stage(), pb::Stage::Failed);
        let failure = events[0].failure.as_ref().unwrap();
        assert_eq!(failure.kind, "busy");
        assert_eq!(
            failure.message,
            "busy: rollout of cn (started 14:02:11 UTC by uid 1000) is running"
        );
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn with_wait_it_says_what_it_waits_for_and_runs_after() {
        use tokio_stream::StreamExt;
        let locks = OperationLocks::default();
        let rollout = locks.try_acquire(holder(Operation::Rollout)).unwrap();
        let ran = Arc::default();
        let mut stream = stream_operation(
            locks.clone(),
            holder(Operation::Issue),
            true,
            done(Arc::clone(&ran)),
        );
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.stage(), pb::Stage::Waiting);
        assert_eq!(
            first.message,
            "waiting for rollout of cn (started 14:02:11 UTC by uid 1000)"
        );
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        drop(rollout);
        let rest = events(stream).await;
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(rest[0].stage(), pb::Stage::Done);
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        // It released the lock when it ended.
        locks.try_acquire(holder(Operation::Restart)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_hangs_up_while_waiting_cancels_the_operation() {
        use tokio_stream::StreamExt;
        let locks = OperationLocks::default();
        let rollout = locks.try_acquire(holder(Operation::Rollout)).unwrap();
        let ran = Arc::default();
        let mut stream = stream_operation(
            locks.clone(),
            holder(Operation::Issue),
            true,
            done(Arc::clone(&ran)),
        );
        assert_eq!(
            stream.next().await.unwrap().unwrap().stage(),
            pb::Stage::Waiting
        );
        drop(stream);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        drop(rollout);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        locks.try_acquire(holder(Operation::Restart)).unwrap();
    }

    #[tokio::test]
    async fn a_panicking_operation_ends_as_a_failure_and_frees_the_certificate() {
        let locks = OperationLocks::default();
        fn bug() -> pb::IssueEvent {
            panic!("index out of bounds: the len is 3 but the index is 4")
        }
        let stream = stream_operation(
            locks.clone(),
            holder(Operation::Restart),
            false,
            |_op, progress| async move {
                progress.step(Stage::Restart, "restarting");
                bug()
            },
        );
        let events = events(stream).await;
        assert_eq!(events.len(), 2, "{events:?}");
        let last = events.last().unwrap();
        assert_eq!(last.stage(), pb::Stage::Failed);
        let failure = last.failure.as_ref().unwrap();
        assert_eq!(failure.kind, "internal");
        assert!(
            failure.message.starts_with(
                "internal error: the restart of cn panicked (index out of bounds: the len is 3 but the index is 4)"
            ),
            "{}",
            failure.message
        );
        locks.try_acquire(holder(Operation::Rollout)).unwrap();
    }
}
