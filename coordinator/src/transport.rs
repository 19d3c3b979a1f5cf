//! How the coordinator reaches a node.
//!
//! [`Transport`] is what the issuance flow needs from a node; [`GrpcAgent`]
//! implements it over the agent's gRPC service. [`agent_channel`] is the one
//! place the coordinator→agent channel is built: mutual TLS, presenting the
//! coordinator's identity and accepting only a certificate from the cluster
//! CA that names the node meant, whatever address it was reached on.

use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::challenge::{Http01Response, Token};
use certfleet_proto::identity::{ExpectIdentity, LiveIdentity, client_config, node_identity};
use certfleet_proto::pb;
use certfleet_proto::pb::agent_client::AgentClient;
use rustls::pki_types::CertificateDer;
use tonic::transport::Channel;

use crate::config::Node;

/// Why a call to a node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A status's message with the chain of errors behind it: for a refused
/// TLS handshake the reason ("certificate expired") is only in the sources.
fn describe(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

impl From<tonic::Status> for TransportError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unavailable => Self::Unreachable(describe(&status)),
            code => Self::Refused {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// What the issuance flow asks of a node.
#[tonic::async_trait]
pub trait Transport: Send + Sync {
    /// Serves every response in `batch` for `ttl`, in one call.
    async fn place_tokens(
        &self,
        batch: &[Http01Response],
        ttl: Duration,
    ) -> Result<(), TransportError>;
    /// Stops serving `tokens`; returns how many were being served.
    async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError>;
    /// Installs a certificate version into the node's own targets.
    async fn install_certificate(
        &self,
        bundle: &BundleToInstall,
    ) -> Result<NodeInstall, TransportError>;
    /// Restarts the node's services for `certificate` and verifies they
    /// serve `expected` (a leaf SHA-256).
    async fn restart_services(
        &self,
        certificate: &str,
        expected: &str,
        keep_going: bool,
    ) -> Result<RestartReport, TransportError>;
    /// Reinstalls the version before the node's current one.
    async fn rollback_certificate(&self, certificate: &str) -> Result<NodeInstall, TransportError>;
    /// What the node has installed and, with `probe`, what its services
    /// serve (a TLS handshake per endpoint).
    async fn certificate_status(
        &self,
        certificate: &str,
        probe: bool,
    ) -> Result<NodeCertificate, TransportError>;
}

/// What one endpoint served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedReport {
    pub service: String,
    pub address: String,
    /// The served leaf's SHA-256, or why the probe failed.
    pub result: Result<String, String>,
}

/// One service's outcome on a node.
#[derive(Debug, Clone)]
pub struct ServiceReport {
    pub service: String,
    pub step: String,
    pub ok: bool,
    pub detail: String,
    pub served: Vec<ServedReport>,
}

/// A node's answer to a restart.
#[derive(Debug, Clone)]
pub struct RestartReport {
    pub ok: bool,
    pub services: Vec<ServiceReport>,
}

/// What a node has for a certificate.
#[derive(Debug, Clone)]
pub struct NodeCertificate {
    pub version: u32,
    pub leaf_sha256: String,
    pub intact: bool,
    /// Why not intact, naming the target by path.
    pub problem: String,
    pub not_after: i64,
    pub served: Vec<ServedReport>,
}

fn served_from_pb(s: pb::ServedEndpoint) -> ServedReport {
    let (service, address, result) = s.into_probe();
    ServedReport {
        service,
        address,
        result,
    }
}

fn install_from_pb(r: pb::InstallCertificateResponse) -> NodeInstall {
    NodeInstall {
        version: r.version,
        leaf_sha256: r.leaf_sha256,
        changed: r.changed,
    }
}

/// A certificate version as sent to nodes. Its Debug never shows the key.
pub struct BundleToInstall {
    pub certificate: String,
    pub version: u32,
    pub fullchain_pem: String,
    pub key_pem: String,
    pub names: Vec<String>,
}

impl std::fmt::Debug for BundleToInstall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleToInstall")
            .field("certificate", &self.certificate)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What a node reports after an install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInstall {
    pub version: u32,
    /// SHA-256 of the installed leaf, lowercase hex.
    pub leaf_sha256: String,
    /// False when the node already had exactly this.
    pub changed: bool,
}

/// What the coordinator presents and trusts on every agent connection.
#[derive(Clone)]
pub struct ClusterTrust {
    pub ca: CertificateDer<'static>,
    pub identity: Arc<LiveIdentity>,
}

/// Builds the channel to one agent. Lazy: nothing connects until the first
/// call, so a node that is down delays nobody until it is needed.
pub fn agent_channel(node: &Node, trust: &ClusterTrust) -> Result<Channel, rustls::Error> {
    let expected = node_identity(&node.name);
    let verifier = ExpectIdentity::new(&trust.ca, expected.clone())?;
    let config = client_config(Arc::new(verifier), Some(Arc::clone(&trust.identity)))?;
    Ok(certfleet_proto::tls::channel(
        node.agent,
        Arc::new(config),
        &expected,
    ))
}

/// A node reached through its agent's gRPC service.
#[derive(Clone)]
pub struct GrpcAgent {
    client: AgentClient<Channel>,
}

impl GrpcAgent {
    pub fn new(node: &Node, trust: &ClusterTrust) -> Result<Self, rustls::Error> {
        let client = AgentClient::new(agent_channel(node, trust)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { client })
    }
}

#[tonic::async_trait]
impl Transport for GrpcAgent {
    async fn place_tokens(
        &self,
        batch: &[Http01Response],
        ttl: Duration,
    ) -> Result<(), TransportError> {
        let request = pb::PlaceTokensRequest {
            tokens: batch.iter().map(pb::Http01Token::from).collect(),
            ttl_seconds: ttl.as_secs().try_into().unwrap_or(u32::MAX),
        };
        self.client.clone().place_tokens(request).await?;
        Ok(())
    }

    async fn install_certificate(
        &self,
        bundle: &BundleToInstall,
    ) -> Result<NodeInstall, TransportError> {
        let request = pb::InstallCertificateRequest {
            certificate: bundle.certificate.clone(),
            version: bundle.version,
            fullchain_pem: bundle.fullchain_pem.clone(),
            key_pem: bundle.key_pem.clone(),
            names: bundle.names.clone(),
        };
        let r = self
            .client
            .clone()
            .install_certificate(request)
            .await?
            .into_inner();
        Ok(install_from_pb(r))
    }

    async fn restart_services(
        &self,
        certificate: &str,
        expected: &str,
        keep_going: bool,
    ) -> Result<RestartReport, TransportError> {
        let request = pb::RestartServicesRequest {
            certificate: certificate.to_owned(),
            expected_leaf_sha256: expected.to_owned(),
            keep_going,
        };
        let r = self
            .client
            .clone()
            .restart_services(request)
            .await?
            .into_inner();
        Ok(RestartReport {
            ok: r.ok,
            services: r
                .services
                .into_iter()
                .map(|s| ServiceReport {
                    service: s.service,
                    step: s.step,
                    ok: s.ok,
                    detail: s.detail,
                    served: s.served.into_iter().map(served_from_pb).collect(),
                })
                .collect(),
        })
    }

    async fn rollback_certificate(&self, certificate: &str) -> Result<NodeInstall, TransportError> {
        let request = pb::RollbackCertificateRequest {
            certificate: certificate.to_owned(),
        };
        Ok(install_from_pb(
            self.client
                .clone()
                .rollback_certificate(request)
                .await?
                .into_inner(),
        ))
    }

    async fn certificate_status(
        &self,
        certificate: &str,
        probe: bool,
    ) -> Result<NodeCertificate, TransportError> {
        let request = pb::GetCertificateRequest {
            certificate: certificate.to_owned(),
            probe_services: probe,
        };
        let r = self
            .client
            .clone()
            .get_certificate(request)
            .await?
            .into_inner();
        Ok(NodeCertificate {
            version: r.version,
            leaf_sha256: r.leaf_sha256,
            intact: r.intact,
            problem: r.problem,
            not_after: r.not_after_unix,
            served: r.served.into_iter().map(served_from_pb).collect(),
        })
    }

    async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError> {
        let request = pb::RemoveTokensRequest {
            tokens: tokens.iter().map(Token::to_string).collect(),
        };
        Ok(self
            .client
            .clone()
            .remove_tokens(request)
            .await?
            .into_inner()
            .removed)
    }
}
