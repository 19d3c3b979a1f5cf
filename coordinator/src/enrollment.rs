//! The enrollment service (`certfleet.v1.Enrollment`): nodes join with a
//! one-time token and renew over mutual TLS.
//!
//! It listens on TCP with the coordinator's certificate. A client
//! certificate is optional at the TLS layer (a joining node has none yet)
//! but, when present, must come from the cluster CA; `Renew` then requires
//! it, and requires that the node it names is still active, so a removed
//! node's certificate is refused from then on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::identity::{OnlyIdentity, Peer, peer_of, server_config};
use certfleet_proto::pb;
use certfleet_proto::pb::enrollment_server::{Enrollment, EnrollmentServer};
use certfleet_proto::tls;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::db::{Db, JoinRefusal, now};
use crate::pki::{ClusterCa, PkiError};
use crate::transport::ClusterTrust;

/// Longest join token accepted, in characters.
pub const MAX_JOIN_TOKEN_LEN: usize = 128;
/// Longest any enrollment call may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest enrollment message (a CSR), in bytes.
pub const MAX_ENROLLMENT_MESSAGE: usize = 64 * 1024;

pub struct EnrollmentService {
    db: Arc<Db>,
    ca: Arc<ClusterCa>,
    validity: Duration,
}

impl EnrollmentService {
    pub fn new(db: Arc<Db>, ca: Arc<ClusterCa>, validity: Duration) -> Self {
        Self { db, ca, validity }
    }

    fn sign(&self, node: &str, csr_der: &[u8]) -> Result<String, Status> {
        let cert = self
            .ca
            .sign_node(node, csr_der, self.validity)
            .map_err(|e| match e {
                PkiError::Csr(_) => Status::invalid_argument(e.to_string()),
                e => Status::internal(e.to_string()),
            })?;
        self.db
            .activate(node, &cert.serial, cert.not_after, now())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(cert.pem)
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        let token = &request.token;
        if token.len() > MAX_JOIN_TOKEN_LEN
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(Status::invalid_argument(JoinRefusal::Malformed.to_string()));
        }
        // The CSR is checked before the token is used up, so a bad CSR does
        // not burn the admin's token.
        ClusterCa::check_csr(&request.csr_der)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let node = match self.db.consume_token(token, now()).map_err(internal)? {
            Ok(node) => node,
            Err(refusal) => {
                warn!(%refusal, "join refused");
                return Err(Status::permission_denied(refusal.to_string()));
            }
        };
        let certificate_pem = self.sign(&node, &request.csr_der)?;
        info!(%node, "node joined");
        let _ = self
            .db
            .audit(None, "join", &format!("node {node} joined"), now());
        Ok(Response::new(pb::JoinResponse {
            node,
            certificate_pem,
            ca_pem: self.ca.ca_pem.clone(),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|leaf| peer_of(leaf)));
        let Some(Peer::Node(node)) = peer else {
            return Err(Status::unauthenticated(
                "renewal needs the node's current certificate as the TLS client certificate",
            ));
        };
        let record = self.db.node(&node).map_err(internal)?;
        match record.as_ref().map(|r| r.state.as_str()) {
            Some("active") => {}
            Some(state) => {
                warn!(%node, state, "renewal refused");
                return Err(Status::permission_denied(format!(
                    "node {node} is {state}; its certificate is no longer accepted"
                )));
            }
            None => {
                return Err(Status::permission_denied(format!(
                    "node {node} is not registered"
                )));
            }
        }
        let certificate_pem = self.sign(&node, &request.into_inner().csr_der)?;
        info!(%node, "node certificate renewed");
        Ok(Response::new(pb::RenewResponse { certificate_pem }))
    }
}

/// Serves enrollment on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    service: EnrollmentService,
    trust: &ClusterTrust,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let clients = OnlyIdentity::new(&trust.ca, None, true).expect("the cluster CA is a valid root");
    let config = server_config(Arc::clone(&trust.identity), Arc::new(clients))
        .expect("the coordinator identity is a valid server certificate");
    tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .add_service(
            EnrollmentServer::new(service)
                .max_decoding_message_size(MAX_ENROLLMENT_MESSAGE)
                .max_encoding_message_size(MAX_ENROLLMENT_MESSAGE),
        )
        .serve_with_incoming_shutdown(tls::incoming(listener, Arc::new(config)), shutdown)
        .await
}
