//! The node's identity in the cluster: joining, loading, renewing.
//!
//! The key is made here and never leaves the node. `join` proves the
//! coordinator is the one the admin meant (its chain carries a CA matching
//! the pin given with the token), sends a CSR with the one-time token, and
//! keeps what comes back under `<state>/identity/`:
//!
//! - `node.pem`: the node's key and certificate in one file (0600), so a
//!   renewal swaps both at once and a crash never pairs a key with the wrong
//!   certificate;
//! - `ca.pem`: the cluster CA; `coordinator`: the enrollment address.
//!
//! The daemon renews the certificate over mutual TLS when two thirds of its
//! life has passed, and swaps it in without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_proto::identity::{
    COORDINATOR_IDENTITY, ExpectIdentity, LiveIdentity, Peer, PinnedCoordinator, ca_pin,
    client_config, node_identity, peer_of, renewal_due_in,
};
use certfleet_proto::pb::enrollment_client::EnrollmentClient;
use certfleet_proto::{cause_chain, fsio, pb, pem};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tracing::{info, warn};

/// How long a join or renewal call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delays after a failed renewal stay between these.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "this node has not joined the cluster ({0} missing): run `certfleet-agent join` with the command `certfleet node add` printed"
    )]
    NotJoined(PathBuf),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("coordinator address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("the coordinator refused: {0}")]
    Refused(String),
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the coordinator's answer is not acceptable: {0}")]
    Answer(String),
    #[error("generating the node key: {0}")]
    Key(String),
}

struct Paths {
    dir: PathBuf,
    node: PathBuf,
    ca: PathBuf,
    coordinator: PathBuf,
}

fn paths(state_dir: &Path) -> Paths {
    let dir = state_dir.join("identity");
    Paths {
        node: dir.join("node.pem"),
        ca: dir.join("ca.pem"),
        coordinator: dir.join("coordinator"),
        dir,
    }
}

/// A joined node's identity.
pub struct Identity {
    pub node: String,
    pub live: Arc<LiveIdentity>,
    pub ca: CertificateDer<'static>,
    /// The coordinator's enrollment address, `host:port`.
    pub coordinator: String,
    state_dir: PathBuf,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |e| IdentityError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

impl Identity {
    /// Loads the identity `join` saved, checking it is `node`'s.
    pub fn load(state_dir: &Path, node: &str) -> Result<Self, IdentityError> {
        let p = paths(state_dir);
        if !p.node.exists() {
            return Err(IdentityError::NotJoined(p.node));
        }
        let pem = std::fs::read_to_string(&p.node).map_err(file_err(&p.node))?;
        let ca_pem = std::fs::read_to_string(&p.ca).map_err(file_err(&p.ca))?;
        let coordinator = std::fs::read_to_string(&p.coordinator)
            .map_err(file_err(&p.coordinator))?
            .trim()
            .to_owned();
        let bad = |path: &Path, reason: String| IdentityError::File {
            path: path.to_owned(),
            reason,
        };
        let leaf = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| bad(&p.node, e.to_string()))?;
        if peer_of(&leaf) != Some(Peer::Node(node.to_owned())) {
            return Err(bad(
                &p.node,
                format!("the certificate is not node {node}'s (the config's `node`)"),
            ));
        }
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| bad(&p.ca, e.to_string()))?;
        let live = LiveIdentity::from_pem(&pem, &pem).map_err(|e| bad(&p.node, e.to_string()))?;
        Ok(Self {
            node: node.to_owned(),
            live: Arc::new(live),
            ca,
            coordinator,
            state_dir: state_dir.to_owned(),
        })
    }

    /// Renews the certificate at two thirds of its life, for ever; a failed
    /// attempt is logged and retried with backoff, never fatal.
    pub async fn renew_until(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut retry = MIN_RETRY;
        loop {
            let wait = match self.renewal_due_in() {
                Some(wait) => wait,
                None => Duration::ZERO,
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.renew().await {
                Ok(not_after) => {
                    info!(node = %self.node, not_after, "renewed the node certificate");
                    retry = MIN_RETRY;
                }
                Err(e) => {
                    warn!(node = %self.node, error = %e, retry_in = ?retry, "renewing the node certificate failed");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// Time until two thirds of the current certificate's life has passed.
    fn renewal_due_in(&self) -> Option<Duration> {
        let current = self.live.current();
        renewal_due_in(&pem::certificate(current.cert.first()?))
    }

    async fn renew(&self) -> Result<i64, IdentityError> {
        let (key_pem, csr_der) = new_key_and_csr(&self.node)?;
        let verifier = ExpectIdentity::new(&self.ca, COORDINATOR_IDENTITY.to_owned())
            .map_err(|e| IdentityError::Answer(e.to_string()))?;
        let config = client_config(Arc::new(verifier), Some(Arc::clone(&self.live)))
            .map_err(|e| IdentityError::Answer(e.to_string()))?;
        let addr = resolve(&self.coordinator).await?;
        let mut client = EnrollmentClient::new(certfleet_proto::tls::channel(
            addr,
            Arc::new(config),
            COORDINATOR_IDENTITY,
        ));
        let call = client.renew(pb::RenewRequest { csr_der });
        let response = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| IdentityError::Unreachable {
                addr: self.coordinator.clone(),
                reason: format!("no answer within {CALL_TIMEOUT:?}"),
            })?
            .map_err(|s| status_error(&self.coordinator, s))?
            .into_inner();
        let not_after = check_node_cert(&response.certificate_pem, &self.node)?;
        let pem = format!("{key_pem}{}", response.certificate_pem);
        let p = paths(&self.state_dir);
        write_private(&p.node, &pem)?;
        self.live
            .replace(&pem, &pem)
            .map_err(|e| IdentityError::Answer(e.to_string()))?;
        Ok(not_after)
    }
}

fn status_error(addr: &str, status: tonic::Status) -> IdentityError {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => IdentityError::Unreachable {
            addr: addr.to_owned(),
            reason: cause_chain::status(&status),
        },
        _ => IdentityError::Refused(status.message().to_owned()),
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, IdentityError> {
    let err = |reason: String| IdentityError::Address {
        addr: addr.to_owned(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(format!("{e} (expected host:port)")))?
        .next()
        .ok_or_else(|| err("resolves to no address".into()))
}

/// A fresh P-256 key and a CSR for it.
fn new_key_and_csr(node: &str) -> Result<(String, Vec<u8>), IdentityError> {
    let key_err = |e: rcgen::Error| IdentityError::Key(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(key_err)?;
    let csr = rcgen::CertificateParams::new(vec![node_identity(node)])
        .map_err(key_err)?
        .serialize_request(&key)
        .map_err(key_err)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Checks a certificate the coordinator sent is `node`'s; returns notAfter.
fn check_node_cert(pem: &str, node: &str) -> Result<i64, IdentityError> {
    let leaf = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| IdentityError::Answer(format!("certificate: {e}")))?;
    if peer_of(&leaf) != Some(Peer::Node(node.to_owned())) {
        return Err(IdentityError::Answer(format!(
            "the certificate does not name node {node}"
        )));
    }
    Bundle::parse(pem, None, &[])
        .map(|b| b.not_after)
        .map_err(|e| IdentityError::Answer(e.to_string()))
}

/// Writes an identity file (0600) atomically.
fn write_private(path: &Path, data: &str) -> Result<(), IdentityError> {
    fsio::write_atomic(path, data.as_bytes(), 0o600).map_err(file_err(path))
}

/// What `join` reports.
#[derive(Debug)]
pub struct Joined {
    pub node: String,
    pub not_after: i64,
    pub dir: PathBuf,
}

/// Joins the cluster: see the module docs.
pub async fn join(
    state_dir: &Path,
    node: &str,
    coordinator: &str,
    token: &str,
    pin: &str,
) -> Result<Joined, IdentityError> {
    if !pin.starts_with("sha256:") {
        return Err(IdentityError::Answer(format!(
            "--ca-pin {pin:?} must be sha256:<hex>, as `certfleet node add` prints it"
        )));
    }
    let (key_pem, csr_der) = new_key_and_csr(node)?;
    let config = client_config(Arc::new(PinnedCoordinator::new(pin.to_owned())), None)
        .map_err(|e| IdentityError::Answer(e.to_string()))?;
    let addr = resolve(coordinator).await?;
    let mut client = EnrollmentClient::new(certfleet_proto::tls::channel(
        addr,
        Arc::new(config),
        COORDINATOR_IDENTITY,
    ));
    let call = client.join(pb::JoinRequest {
        token: token.to_owned(),
        csr_der,
    });
    let response = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| IdentityError::Unreachable {
            addr: coordinator.to_owned(),
            reason: format!("no answer within {CALL_TIMEOUT:?}"),
        })?
        .map_err(|s| status_error(coordinator, s))?
        .into_inner();
    if response.node != node {
        return Err(IdentityError::Answer(format!(
            "the token was made for node {:?}, but this agent's config says node = {node:?}",
            response.node
        )));
    }
    let ca = CertificateDer::from_pem_slice(response.ca_pem.as_bytes())
        .map_err(|e| IdentityError::Answer(format!("CA: {e}")))?;
    if ca_pin(&ca).as_deref() != Some(pin) {
        return Err(IdentityError::Answer(
            "the CA sent does not match the pin".into(),
        ));
    }
    let not_after = check_node_cert(&response.certificate_pem, node)?;
    let p = paths(state_dir);
    std::fs::create_dir_all(&p.dir).map_err(file_err(&p.dir))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(file_err(&p.dir))?;
    }
    write_private(&p.ca, &response.ca_pem)?;
    write_private(&p.coordinator, coordinator)?;
    // Last: the identity exists only once everything it needs does.
    write_private(&p.node, &format!("{key_pem}{}", response.certificate_pem))?;
    Ok(Joined {
        node: node.to_owned(),
        not_after,
        dir: p.dir,
    })
}
