//! How the coordinator reaches a node.
//!
//! [`Transport`] is what the flows need from a node; [`GrpcAgent`]
//! implements it over the agent's gRPC service, and the unit tests' fake
//! (`fake::FakeNodes`) in memory. [`Connect`] makes a node's transport for
//! the fleet: [`ClusterTrust`] connects over gRPC. [`agent_channel`] is the
//! one place the coordinator→agent channel is built: mutual TLS, presenting
//! the coordinator's identity and accepting only a certificate from the
//! cluster CA that names the node meant, whatever address it was reached on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::challenge::{Http01Response, Token};
use certfleet_proto::identity::{ExpectIdentity, LiveIdentity, client_config, node_identity};
use certfleet_proto::pb;
use certfleet_proto::pb::agent_client::AgentClient;
use rustls::pki_types::CertificateDer;
use tonic::transport::Channel;

use crate::config::Node;
use crate::error::ErrorKind;
use crate::rollout::NODE_RESTART_TIMEOUT;

/// Deadline of every call but a restart: the agent answers these from its
/// own state (tokens, installs, status and its probes, reinstalling the
/// previous version) and cuts them itself at its `service::REQUEST_TIMEOUT`.
/// This is a little longer, so that the agent's answer, which says what took
/// too long, arrives first.
pub const CALL_DEADLINE: Duration = Duration::from_secs(40);

/// Deadline of `RestartServices`.
///
/// The coordinator never sees a node's services, so it cannot derive this
/// from their `timeout_secs`. The agent bounds each service's check, restart
/// and verify by that service's `timeout_secs` itself, so a restart ends by
/// three times the sum of them (plus a few seconds of probes) however it
/// fails. This deadline is only the ceiling above that, for an agent that
/// stopped answering: [`NODE_RESTART_TIMEOUT`], which holds the DataONE
/// example's worst case (apache2 30 s, postgresql 60 s, tomcat9 120 s: about
/// 11 minutes) with room to spare.
pub const RESTART_DEADLINE: Duration = NODE_RESTART_TIMEOUT;

/// One call's deadline, from the moment it is made.
///
/// It travels as `grpc-timeout`, which the agent's server honours: when it
/// passes, the agent drops the call and kills any command still running,
/// even if this side's giving up never reaches it (a lost connection).
/// tonic's channel enforces the same deadline on this side.
struct Deadline {
    limit: Duration,
    started: Instant,
}

impl Deadline {
    fn start(limit: Duration) -> Self {
        Self {
            limit,
            started: Instant::now(),
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.limit);
        request
    }

    /// The call's answer. tonic reports a `grpc-timeout` that expired, on
    /// either side, as CANCELLED; once the deadline has passed, that is a
    /// [`TransportError::Timeout`].
    fn answer<T>(
        &self,
        result: Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, TransportError> {
        match result {
            Ok(response) => Ok(response.into_inner()),
            Err(status)
                if status.code() == tonic::Code::Cancelled
                    && self.started.elapsed() >= self.limit =>
            {
                Err(TransportError::Timeout(self.limit))
            }
            Err(status) => Err(status.into()),
        }
    }
}

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

impl TransportError {
    /// Whatever went wrong on the way, it is the node that failed.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Node
    }
}

/// A status's message with the chain of errors behind it, in words: for a
/// refused TLS handshake the reason ("certificate expired") is only in the
/// sources, and for a connection the system's reason ("connection refused").
/// The caller names the node and its address.
fn describe(status: &tonic::Status) -> String {
    certfleet_proto::cause_chain::status(status)
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
    /// Removes the files the node installed for `certificate` (those
    /// still as it wrote them) and forgets its versions there.
    async fn remove_certificate(&self, certificate: &str) -> Result<NodeRemoval, TransportError>;
}

/// What a node removed for a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRemoval {
    /// The version that was installed; 0 when none was.
    pub version: u32,
    /// The target paths removed.
    pub removed: Vec<String>,
    /// Targets left in place (changed since the install), each with why.
    pub kept: Vec<String>,
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

/// Why a node's transport could not be set up.
pub type ConnectError = Box<dyn std::error::Error + Send + Sync>;

/// Makes the transport to a node. The fleet calls it once per node and
/// address, and reuses what it returns.
pub trait Connect: Send + Sync {
    fn connect(&self, node: &Node) -> Result<Arc<dyn Transport>, ConnectError>;
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
    /// One TLS config for every agent: one verifier and one session cache,
    /// not one per node (at 1,000 agents those were most of the
    /// coordinator's memory). Each connection is opened with its node's
    /// identity as the server name, and the verifier expects that one.
    client: Arc<rustls::ClientConfig>,
}

impl ClusterTrust {
    pub fn new(
        ca: CertificateDer<'static>,
        identity: Arc<LiveIdentity>,
    ) -> Result<Self, rustls::Error> {
        let verifier = ExpectIdentity::by_server_name(&ca)?;
        let client = client_config(Arc::new(verifier), Some(Arc::clone(&identity)))?;
        Ok(Self {
            ca,
            identity,
            client: Arc::new(client),
        })
    }
}

/// Builds the channel to one agent. Lazy: nothing connects until the first
/// call, so a node that is down delays nobody until it is needed.
pub fn agent_channel(node: &Node, trust: &ClusterTrust) -> Channel {
    certfleet_proto::tls::channel(
        node.agent,
        Arc::clone(&trust.client),
        &node_identity(&node.name),
    )
}

/// Nodes are reached through their agents, over mutual TLS.
impl Connect for ClusterTrust {
    fn connect(&self, node: &Node) -> Result<Arc<dyn Transport>, ConnectError> {
        Ok(Arc::new(GrpcAgent::new(node, self)))
    }
}

/// A node reached through its agent's gRPC service.
#[derive(Clone)]
pub struct GrpcAgent {
    client: AgentClient<Channel>,
}

impl GrpcAgent {
    pub fn new(node: &Node, trust: &ClusterTrust) -> Self {
        let client = AgentClient::new(agent_channel(node, trust))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Self { client }
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
        let deadline = Deadline::start(CALL_DEADLINE);
        let answer = self
            .client
            .clone()
            .place_tokens(deadline.request(request))
            .await;
        deadline.answer(answer)?;
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
        let deadline = Deadline::start(CALL_DEADLINE);
        let answer = self
            .client
            .clone()
            .install_certificate(deadline.request(request))
            .await;
        Ok(install_from_pb(deadline.answer(answer)?))
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
        let deadline = Deadline::start(RESTART_DEADLINE);
        let answer = self
            .client
            .clone()
            .restart_services(deadline.request(request))
            .await;
        let r = deadline.answer(answer)?;
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
        let deadline = Deadline::start(CALL_DEADLINE);
        let answer = self
            .client
            .clone()
            .rollback_certificate(deadline.request(request))
            .await;
        Ok(install_from_pb(deadline.answer(answer)?))
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
        let deadline = Deadline::start(CALL_DEADLINE);
        let answer = self
            .client
            .clone()
            .get_certificate(deadline.request(request))
            .await;
        let r = deadline.answer(answer)?;
        Ok(NodeCertificate {
            version: r.version,
            leaf_sha256: r.leaf_sha256,
            intact: r.intact,
            problem: r.problem,
            not_after: r.not_after_unix,
            served: r.served.into_iter().map(served_from_pb).collect(),
        })
    }

    async fn remove_certificate(&self, certificate: &str) -> Result<NodeRemoval, TransportError> {
        let request = pb::RemoveCertificateRequest {
            certificate: certificate.to_owned(),
        };
        let deadline = Deadline::start(CALL_DEADLINE);
        let answer = self
            .client
            .clone()
            .remove_certificate(deadline.request(request))
            .await;
        let r = deadline.answer(answer)?;
        Ok(NodeRemoval {
            version: r.version,
            removed: r.removed,
            kept: r.kept,
        })
    }

    async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError> {
        let request = pb::RemoveTokensRequest {
            tokens: tokens.iter().map(Token::to_string).collect(),
        };
        let deadline = Deadline::start(CALL_DEADLINE);
        let answer = self
            .client
            .clone()
            .remove_tokens(deadline.request(request))
            .await;
        Ok(deadline.answer(answer)?.removed)
    }
}

/// Nodes in memory for unit tests: each records every call it gets and
/// fails where the test says, so the flows' logic is tested without root,
/// a CA or any process.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use certfleet_proto::bundle::Bundle;
    use certfleet_proto::challenge::{Http01Response, Token};

    use super::{
        Connect, ConnectError, NodeCertificate, NodeInstall, NodeRemoval, RestartReport,
        ServedReport, ServiceReport, Transport, TransportError,
    };
    use crate::config::Node;

    /// A call a fake node got.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Call {
        PlaceTokens(usize),
        RemoveTokens(usize),
        Install(u32),
        Restart { expected: String, keep_going: bool },
        Rollback,
        Status { probe: bool },
        Remove,
    }

    /// How a fake node fails.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Fail {
        /// Every call: the agent cannot be reached.
        Unreachable,
        /// Installs are refused.
        Install,
        /// It reports the version before its newest installed (as a node
        /// that was never distributed to).
        Stale,
        /// A restart onto its newest version fails at the check step; a
        /// restart with `keep_going` (a rollback's) works.
        Restart,
        /// A restart panics, as a bug in the coordinator would.
        Panic,
        /// Reinstalling the previous version is refused.
        Rollback,
    }

    #[derive(Debug, Default)]
    struct FakeNode {
        /// (version, leaf SHA-256) installed, oldest first; the last is current.
        versions: Vec<(u32, String)>,
        calls: Vec<Call>,
        fails: Vec<Fail>,
        /// How long its placements, removals and installs take.
        delay: Duration,
    }

    impl FakeNode {
        fn current(&self) -> (u32, String) {
            self.versions.last().cloned().unwrap_or_default()
        }

        fn fails(&self, fail: Fail) -> bool {
            self.fails.contains(&fail)
        }
    }

    /// Every fake node, by name; also the [`Connect`] that hands them out.
    #[derive(Clone, Default)]
    pub(crate) struct FakeNodes(Arc<Mutex<HashMap<String, FakeNode>>>);

    impl FakeNodes {
        /// Forgets every node, then gives each of `names` `versions`
        /// installed in order, and no failure.
        pub(crate) fn reset(&self, names: &[String], versions: &[(u32, String)]) {
            let mut nodes = self.0.lock().unwrap();
            nodes.clear();
            for name in names {
                nodes.insert(
                    name.clone(),
                    FakeNode {
                        versions: versions.to_vec(),
                        ..FakeNode::default()
                    },
                );
            }
        }

        /// Makes `node` fail as `fail` says, as well as any way it
        /// already fails.
        pub(crate) fn fail(&self, node: &str, fail: Fail) {
            let mut nodes = self.0.lock().unwrap();
            nodes.entry(node.to_owned()).or_default().fails.push(fail);
        }

        /// Makes `node` take `delay` to place or remove tokens, install or
        /// remove a certificate, report its status or restart, as a slow or
        /// distant node would.
        pub(crate) fn delay(&self, node: &str, delay: Duration) {
            let mut nodes = self.0.lock().unwrap();
            nodes.entry(node.to_owned()).or_default().delay = delay;
        }

        /// Waits out `node`'s delay, outside the lock.
        async fn wait(&self, node: &str) {
            let delay = self.0.lock().unwrap().get(node).map(|n| n.delay);
            if let Some(delay) = delay.filter(|d| !d.is_zero()) {
                tokio::time::sleep(delay).await;
            }
        }

        /// The calls `node` got, in order.
        pub(crate) fn calls(&self, node: &str) -> Vec<Call> {
            self.0
                .lock()
                .unwrap()
                .get(node)
                .map(|n| n.calls.clone())
                .unwrap_or_default()
        }

        /// The (version, leaf SHA-256) `node` has installed.
        pub(crate) fn installed(&self, node: &str) -> (u32, String) {
            self.0
                .lock()
                .unwrap()
                .get(node)
                .map(FakeNode::current)
                .unwrap_or_default()
        }

        /// Records `call` on `node`, then answers with `f` unless the
        /// node is unreachable.
        fn call<T>(
            &self,
            node: &str,
            call: Call,
            f: impl FnOnce(&mut FakeNode) -> Result<T, TransportError>,
        ) -> Result<T, TransportError> {
            let mut nodes = self.0.lock().unwrap();
            let n = nodes.entry(node.to_owned()).or_default();
            n.calls.push(call);
            if n.fails(Fail::Unreachable) {
                return Err(TransportError::Unreachable(format!(
                    "node {node}: connection refused"
                )));
            }
            f(n)
        }
    }

    impl Connect for FakeNodes {
        fn connect(&self, node: &Node) -> Result<Arc<dyn Transport>, ConnectError> {
            Ok(Arc::new(FakeTransport {
                node: node.name.clone(),
                nodes: self.clone(),
            }))
        }
    }

    /// One fake node's transport.
    struct FakeTransport {
        node: String,
        nodes: FakeNodes,
    }

    fn refused(code: tonic::Code, message: &str) -> TransportError {
        TransportError::Refused {
            code,
            message: message.to_owned(),
        }
    }

    #[tonic::async_trait]
    impl Transport for FakeTransport {
        async fn place_tokens(
            &self,
            batch: &[Http01Response],
            _ttl: Duration,
        ) -> Result<(), TransportError> {
            self.nodes.wait(&self.node).await;
            self.nodes
                .call(&self.node, Call::PlaceTokens(batch.len()), |_| Ok(()))
        }

        async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError> {
            let n = tokens.len();
            self.nodes.wait(&self.node).await;
            self.nodes
                .call(&self.node, Call::RemoveTokens(n), |_| Ok(n as u32))
        }

        async fn install_certificate(
            &self,
            bundle: &super::BundleToInstall,
        ) -> Result<NodeInstall, TransportError> {
            let leaf = Bundle::parse(&bundle.fullchain_pem, None, &[])
                .map_err(|e| refused(tonic::Code::InvalidArgument, &e.to_string()))?
                .leaf_sha256_hex();
            let version = bundle.version;
            self.nodes.wait(&self.node).await;
            self.nodes.call(&self.node, Call::Install(version), |n| {
                if n.fails(Fail::Install) {
                    return Err(refused(
                        tonic::Code::PermissionDenied,
                        "target /etc/ssl/private/cn.key: permission denied",
                    ));
                }
                let changed = n.current() != (version, leaf.clone());
                if changed {
                    n.versions.push((version, leaf.clone()));
                }
                Ok(NodeInstall {
                    version,
                    leaf_sha256: leaf,
                    changed,
                })
            })
        }

        async fn restart_services(
            &self,
            _certificate: &str,
            expected: &str,
            keep_going: bool,
        ) -> Result<RestartReport, TransportError> {
            self.nodes.wait(&self.node).await;
            let call = Call::Restart {
                expected: expected.to_owned(),
                keep_going,
            };
            let (panics, fails, (_, serves)) = self.nodes.call(&self.node, call, |n| {
                Ok((n.fails(Fail::Panic), n.fails(Fail::Restart), n.current()))
            })?;
            // Outside the lock, so the fake stays usable after the panic.
            if panics {
                panic!("fake node {}: restart panicked", self.node);
            }
            if fails && !keep_going {
                return Ok(RestartReport {
                    ok: false,
                    services: vec![ServiceReport {
                        service: "web".into(),
                        step: "check".into(),
                        ok: false,
                        detail: "web.conf:1: unknown directive \"bogus\"".into(),
                        served: Vec::new(),
                    }],
                });
            }
            let ok = serves == expected;
            Ok(RestartReport {
                ok,
                services: vec![ServiceReport {
                    service: "web".into(),
                    step: "verify".into(),
                    ok,
                    detail: format!("serves {serves}"),
                    served: vec![ServedReport {
                        service: "web".into(),
                        address: format!("{}:443", self.node),
                        result: Ok(serves),
                    }],
                }],
            })
        }

        async fn rollback_certificate(
            &self,
            _certificate: &str,
        ) -> Result<NodeInstall, TransportError> {
            self.nodes.call(&self.node, Call::Rollback, |n| {
                if n.fails(Fail::Rollback) || n.versions.len() < 2 {
                    return Err(refused(
                        tonic::Code::FailedPrecondition,
                        "no earlier version to roll back to",
                    ));
                }
                n.versions.pop();
                let (version, leaf_sha256) = n.current();
                Ok(NodeInstall {
                    version,
                    leaf_sha256,
                    changed: true,
                })
            })
        }

        async fn certificate_status(
            &self,
            _certificate: &str,
            probe: bool,
        ) -> Result<NodeCertificate, TransportError> {
            self.nodes.wait(&self.node).await;
            let node = self.node.clone();
            self.nodes.call(&self.node, Call::Status { probe }, |n| {
                let (version, leaf) = match n.versions.len() {
                    len if n.fails(Fail::Stale) && len >= 2 => n.versions[len - 2].clone(),
                    _ => n.current(),
                };
                let served = if probe {
                    vec![ServedReport {
                        service: "web".into(),
                        address: format!("{node}:443"),
                        result: Ok(leaf.clone()),
                    }]
                } else {
                    Vec::new()
                };
                Ok(NodeCertificate {
                    version,
                    leaf_sha256: leaf,
                    intact: true,
                    problem: String::new(),
                    not_after: 0,
                    served,
                })
            })
        }

        async fn remove_certificate(
            &self,
            certificate: &str,
        ) -> Result<NodeRemoval, TransportError> {
            let certificate = certificate.to_owned();
            self.nodes.wait(&self.node).await;
            self.nodes.call(&self.node, Call::Remove, |n| {
                let (version, _) = n.current();
                n.versions.clear();
                Ok(NodeRemoval {
                    version,
                    removed: if version == 0 {
                        Vec::new()
                    } else {
                        vec![format!("/etc/ssl/{certificate}.pem")]
                    },
                    kept: Vec::new(),
                })
            })
        }
    }
}
