//! The agent's gRPC service (`certfleet.v1.Agent`).
//!
//! Every request is untrusted: its tokens pass the shared checks in
//! `certfleet_proto::challenge` before anything happens, and a refusal says
//! which entry was wrong and why. [`serve`] is the one place the agent's gRPC
//! server is set up (limits and mTLS).
//!
//! Time limits are per call, not per server. Every call that waits on
//! something other than the node's services (token files, installs, status
//! and its probes) is cut at [`REQUEST_TIMEOUT`] by [`bounded`]. `RestartServices` has no such cut: it
//! takes as long as the node's services need, and each of its steps is
//! bounded by that service's `timeout_secs` (see `services`). The server
//! also honours the caller's `grpc-timeout`, and the coordinator sends one
//! on every call: when it passes, the handler is dropped, and a command in
//! flight is killed with its process group.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::challenge::{InvalidChallenge, parse_place_request, parse_token_list};
use certfleet_proto::pb;
use certfleet_proto::pb::agent_server::{Agent, AgentServer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::error::to_status;
use crate::install::{InstallError, Installed, Installer};
use crate::services;
use crate::tokens::Tokens;

/// Longest a call that does not run the node's services (everything but
/// `RestartServices`) may take before the agent gives up on it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most calls one connection may have in flight at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;

pub struct AgentService {
    node: String,
    mode: &'static str,
    tokens: Arc<Tokens>,
    installer: Arc<Installer>,
}

impl AgentService {
    pub fn new(
        node: String,
        mode: &'static str,
        tokens: Arc<Tokens>,
        installer: Arc<Installer>,
    ) -> Self {
        Self {
            node,
            mode,
            tokens,
            installer,
        }
    }
}

/// Most names an install request may say the leaf must cover (Let's
/// Encrypt's limit per certificate).
pub const MAX_NAMES: usize = 100;

fn install_status(e: InstallError) -> Status {
    warn!(error = %e, "install refused or failed");
    to_status(e.kind(), e.to_string())
}

fn served_to_pb(s: services::Served) -> pb::ServedEndpoint {
    pb::ServedEndpoint::from_probe(s.service, s.address, s.result)
}

fn installed_to_pb(installed: Installed) -> pb::InstallCertificateResponse {
    pb::InstallCertificateResponse {
        version: installed.version,
        leaf_sha256: installed.leaf_sha256,
        changed: installed.changed,
        files: installed
            .files
            .into_iter()
            .map(|f| pb::InstalledFile {
                path: f.target.path.display().to_string(),
                content: f.target.content.name().to_owned(),
                sha256: f.sha256,
                owner: f.target.owner,
                group: f.target.group,
                mode: f.target.mode,
            })
            .collect(),
    }
}

/// Serves the agent's gRPC service on `incoming` until `shutdown` completes.
pub async fn serve<S, IO, E>(
    incoming: S,
    service: AgentService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    S: Stream<Item = Result<IO, E>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // No `.timeout(...)`: one limit for every call would cut restarts that
    // the services' own `timeout_secs` allow. See the module docs.
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(MAX_CONCURRENT_REQUESTS)
        .add_service(
            AgentServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Runs a call's `work` within [`REQUEST_TIMEOUT`]. Blocking work
/// (installs) goes on in its thread after the cut; the caller is told.
async fn bounded<T>(
    call: &'static str,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            warn!(call, timeout = ?REQUEST_TIMEOUT, "call timed out");
            Err(Status::deadline_exceeded(format!(
                "{call} did not finish within {REQUEST_TIMEOUT:?} on the agent"
            )))
        })
}

fn invalid(err: InvalidChallenge) -> Status {
    warn!(error = %err, "refused request");
    Status::invalid_argument(err.to_string())
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn place_tokens(
        &self,
        request: Request<pb::PlaceTokensRequest>,
    ) -> Result<Response<pb::PlaceTokensResponse>, Status> {
        bounded("PlaceTokens", async {
            let request = request.into_inner();
            let batch = parse_place_request(request.tokens).map_err(invalid)?;
            let ttl =
                (request.ttl_seconds > 0).then(|| Duration::from_secs(request.ttl_seconds.into()));
            let placed = self
                .tokens
                .place(batch, ttl)
                .await
                .map_err(|e| to_status(e.kind(), e.to_string()))?;
            info!(placed, "placed tokens");
            crate::metrics::AGENT.placed(placed);
            Ok(Response::new(pb::PlaceTokensResponse {
                placed: placed as u32,
            }))
        })
        .await
    }

    async fn remove_tokens(
        &self,
        request: Request<pb::RemoveTokensRequest>,
    ) -> Result<Response<pb::RemoveTokensResponse>, Status> {
        bounded("RemoveTokens", async {
            let tokens = parse_token_list(&request.into_inner().tokens).map_err(invalid)?;
            let removed = self.tokens.remove(&tokens).await;
            info!(removed, "removed tokens");
            Ok(Response::new(pb::RemoveTokensResponse {
                removed: removed as u32,
            }))
        })
        .await
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self
            .tokens
            .list()
            .into_iter()
            .map(|(token, left)| pb::PlacedToken {
                token: token.to_string(),
                expires_in_seconds: left.as_secs().try_into().unwrap_or(u32::MAX),
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn install_certificate(
        &self,
        request: Request<pb::InstallCertificateRequest>,
    ) -> Result<Response<pb::InstallCertificateResponse>, Status> {
        bounded("InstallCertificate", async {
            let r = request.into_inner();
            if r.names.len() > MAX_NAMES {
                return Err(Status::invalid_argument(format!(
                    "{} names; at most {MAX_NAMES} are allowed",
                    r.names.len()
                )));
            }
            let installer = Arc::clone(&self.installer);
            let installed = tokio::task::spawn_blocking(move || {
                installer.install(
                    &r.certificate,
                    r.version,
                    &r.fullchain_pem,
                    &r.key_pem,
                    &r.names,
                )
            })
            .await
            .map_err(|e| Status::internal(format!("install task: {e}")))?
            .map_err(install_status)?;
            crate::metrics::AGENT.installed(installed.changed);
            Ok(Response::new(installed_to_pb(installed)))
        })
        .await
    }

    async fn get_certificate(
        &self,
        request: Request<pb::GetCertificateRequest>,
    ) -> Result<Response<pb::GetCertificateResponse>, Status> {
        bounded("GetCertificate", async {
            let r = request.into_inner();
            let name = r.certificate;
            let installer = Arc::clone(&self.installer);
            let targets = installer.targets(&name).map_err(install_status)?;
            // Probing is a TLS handshake per endpoint: only when asked.
            let services = if r.probe_services {
                targets.services.clone()
            } else {
                Vec::new()
            };
            let status = tokio::task::spawn_blocking(move || installer.status(&name))
                .await
                .map_err(|e| Status::internal(format!("status task: {e}")))?
                .map_err(install_status)?;
            let mut served = Vec::new();
            for service in &services {
                served.extend(
                    services::probe_all(service)
                        .await
                        .into_iter()
                        .map(served_to_pb),
                );
            }
            Ok(Response::new(pb::GetCertificateResponse {
                version: status.version,
                leaf_sha256: status.leaf_sha256,
                intact: status.intact,
                served,
                not_after_unix: status.not_after,
                problem: status.problem.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn restart_services(
        &self,
        request: Request<pb::RestartServicesRequest>,
    ) -> Result<Response<pb::RestartServicesResponse>, Status> {
        let r = request.into_inner();
        let expected = r.expected_leaf_sha256.to_ascii_lowercase();
        if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "expected_leaf_sha256 {:?} is not 64 hex digits",
                r.expected_leaf_sha256
            )));
        }
        let targets = self
            .installer
            .targets(&r.certificate)
            .map_err(install_status)?;
        // Not `bounded`: each step is bounded by its service's own
        // `timeout_secs`, and the caller's `grpc-timeout` bounds the whole.
        let (ok, outcomes) =
            services::restart_all(&targets.services, &expected, r.keep_going).await;
        crate::metrics::AGENT.restarted(ok);
        for o in &outcomes {
            info!(
                service = %o.service,
                step = o.step,
                ok = o.ok,
                detail = %o.detail,
                "service restart"
            );
        }
        Ok(Response::new(pb::RestartServicesResponse {
            ok,
            services: outcomes
                .into_iter()
                .map(|o| pb::ServiceOutcome {
                    service: o.service,
                    step: o.step.to_owned(),
                    ok: o.ok,
                    detail: o.detail,
                    served: o.served.into_iter().map(served_to_pb).collect(),
                })
                .collect(),
        }))
    }

    async fn rollback_certificate(
        &self,
        request: Request<pb::RollbackCertificateRequest>,
    ) -> Result<Response<pb::InstallCertificateResponse>, Status> {
        bounded("RollbackCertificate", async {
            let name = request.into_inner().certificate;
            let installer = Arc::clone(&self.installer);
            let installed = tokio::task::spawn_blocking(move || installer.rollback(&name))
                .await
                .map_err(|e| Status::internal(format!("rollback task: {e}")))?
                .map_err(install_status)?;
            Ok(Response::new(installed_to_pb(installed)))
        })
        .await
    }

    async fn remove_certificate(
        &self,
        request: Request<pb::RemoveCertificateRequest>,
    ) -> Result<Response<pb::RemoveCertificateResponse>, Status> {
        bounded("RemoveCertificate", async {
            let name = request.into_inner().certificate;
            let installer = Arc::clone(&self.installer);
            let removed = tokio::task::spawn_blocking(move || installer.remove(&name))
                .await
                .map_err(|e| Status::internal(format!("remove task: {e}")))?
                .map_err(install_status)?;
            Ok(Response::new(pb::RemoveCertificateResponse {
                version: removed.version,
                removed: removed.removed,
                kept: removed.kept,
            }))
        })
        .await
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(pb::GetStatusResponse {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            http01_mode: self.mode.to_owned(),
            tokens: self.tokens.len() as u32,
        }))
    }
}
