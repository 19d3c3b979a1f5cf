//! The admin API (`certfleet.v1.Admin`) on a Unix socket, which the
//! `certfleet` CLI talks to.
//!
//! An order keeps running if the client hangs up: abandoning it half-way
//! would leave tokens placed and an authorization pending for nothing.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::pb;
use certfleet_proto::pb::admin_server::{Admin, AdminServer};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::issue::{Failed, IssueError, Issued, Issuer};
use crate::progress::{Event, Progress, Stage};
use crate::store::Stored;

/// Mode of the admin socket: the owner and the `certfleet` group may call.
pub const SOCKET_MODE: u32 = 0o660;
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

#[tonic::async_trait]
impl Admin for AdminService {
    type IssueStream = ReceiverStream<Result<pb::IssueEvent, Status>>;

    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<Self::IssueStream>, Status> {
        let name = request.into_inner().certificate;
        if self.issuer.config().certificate(&name).is_none() {
            return Err(Status::not_found(
                IssueError::UnknownCertificate(name).to_string(),
            ));
        }
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let issuer = Arc::clone(&self.issuer);
        tokio::spawn(async move {
            let (progress, mut events) = Progress::channel();
            let order = tokio::spawn(async move { issuer.issue(&name, &progress).await });
            while let Some(event) = events.recv().await {
                // A client that hung up does not stop the order.
                let _ = tx.send(Ok(event_to_pb(event))).await;
            }
            let last = match order.await {
                Ok(Ok(issued)) => done_to_pb(&issued),
                Ok(Err(failed)) => failed_to_pb(&failed),
                Err(panic) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("order task failed: {panic}"))))
                        .await;
                    return;
                }
            };
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
        IssueError::Store(_) => "store",
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
