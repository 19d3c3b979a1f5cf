//! The cluster's private CA and the coordinator's own identity.
//!
//! Public CAs no longer issue client-auth certificates, and a private CA
//! keeps the cluster's identities to itself. `certfleet-coordinator init`
//! makes both under `<state>/ca/` and `<state>/identity/` (keys 0600); the
//! daemon only loads them.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::sync::Arc;

use certfleet_proto::clock;
use certfleet_proto::fsio::{create_private_dir, write_atomic};
use certfleet_proto::identity::{
    COORDINATOR_IDENTITY, LiveIdentity, ca_pin, node_identity, provider, renewal_due_in,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

/// How long the cluster CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long the coordinator's own certificate is valid.
pub const COORDINATOR_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest CSR accepted, in bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Certificates are valid from slightly in the past, for clock skew.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "the cluster CA already exists in {0}; pass --force to replace it (every node must then join again)"
    )]
    Exists(PathBuf),
    #[error("no cluster CA in {0}: run `certfleet-coordinator init` first")]
    Missing(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("CSR refused: {0}")]
    Csr(String),
    #[error("signing: {0}")]
    Sign(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn sign_err(e: rcgen::Error) -> PkiError {
    PkiError::Sign(e.to_string())
}

struct Paths {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn paths(state_dir: &Path) -> Paths {
    Paths {
        ca_cert: state_dir.join("ca/ca.pem"),
        ca_key: state_dir.join("ca/ca.key"),
        cert: state_dir.join("identity/coordinator.pem"),
        key: state_dir.join("identity/coordinator.key"),
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    random(&mut bytes);
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// Fills `out` from the system's secure random source (via the one crypto
/// provider certfleet uses).
pub fn random(out: &mut [u8]) {
    provider()
        .secure_random
        .fill(out)
        .expect("system randomness");
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    // Short-lived test certificates must not be mostly in the past.
    params.not_before = (now - BACKDATE.min(lifetime / 10)).into();
    params.not_after = (now + lifetime).into();
}

/// Creates the cluster CA and the coordinator's identity. Refuses to
/// overwrite an existing CA unless `force`.
pub fn init(state_dir: &Path, force: bool) -> Result<String, PkiError> {
    let p = paths(state_dir);
    if p.ca_cert.exists() && !force {
        return Err(PkiError::Exists(p.ca_cert));
    }
    for dir in [state_dir.join("ca"), state_dir.join("identity")] {
        create_private_dir(&dir).map_err(io(&dir))?;
    }
    let ca_key = KeyPair::generate().map_err(sign_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(sign_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "certfleet cluster CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    validity(&mut params, CA_VALIDITY);
    let ca = params.self_signed(&ca_key).map_err(sign_err)?;
    // The key first: a crash between the two leaves no CA cert without its key.
    write_atomic(&p.ca_key, ca_key.serialize_pem().as_bytes(), 0o600).map_err(io(&p.ca_key))?;
    write_atomic(&p.ca_cert, ca.pem().as_bytes(), 0o644).map_err(io(&p.ca_cert))?;
    let issuer = Issuer::new(params, ca_key);
    write_coordinator_identity(&p, &issuer, COORDINATOR_VALIDITY)?;
    Ok(ca_pin(ca.der()).expect("a certificate rcgen just made parses"))
}

fn write_coordinator_identity(
    p: &Paths,
    issuer: &Issuer<'_, KeyPair>,
    lifetime: Duration,
) -> Result<(), PkiError> {
    let key = KeyPair::generate().map_err(sign_err)?;
    let mut params =
        CertificateParams::new(vec![COORDINATOR_IDENTITY.to_owned()]).map_err(sign_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, COORDINATOR_IDENTITY);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(random_serial());
    validity(&mut params, lifetime);
    let cert = params.signed_by(&key, issuer).map_err(sign_err)?;
    write_atomic(&p.key, key.serialize_pem().as_bytes(), 0o600).map_err(io(&p.key))?;
    write_atomic(&p.cert, cert.pem().as_bytes(), 0o644).map_err(io(&p.cert))?;
    Ok(())
}

/// A certificate issued to a node.
#[derive(Debug, Clone)]
pub struct NodeCertificate {
    pub pem: String,
    pub serial: String,
    pub not_after: i64,
}

/// The loaded CA, able to sign node certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    paths: Paths,
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    pub pin: String,
    /// The coordinator's certificate chain (leaf, CA) and key, PEM.
    pub identity_pem: String,
    pub identity_key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Loads the CA from `state_dir`, and renews the coordinator's identity
    /// first if it is due, or if it outlives `identity_lifetime` (the
    /// config asks for shorter-lived identities now).
    pub fn load(state_dir: &Path, identity_lifetime: Duration) -> Result<Self, PkiError> {
        let p = paths(state_dir);
        if !p.ca_cert.exists() {
            return Err(PkiError::Missing(state_dir.to_owned()));
        }
        let read = |path: &Path| std::fs::read_to_string(path).map_err(io(path));
        let ca_pem = read(&p.ca_cert)?;
        let invalid = |path: &Path, reason: String| PkiError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let ca_key =
            KeyPair::from_pem(&read(&p.ca_key)?).map_err(|e| invalid(&p.ca_key, e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .map_err(|e| invalid(&p.ca_cert, e.to_string()))?;
        use rustls::pki_types::pem::PemObject;
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| invalid(&p.ca_cert, e.to_string()))?;
        let pin = ca_pin(&ca_der).ok_or_else(|| invalid(&p.ca_cert, "does not parse".into()))?;
        let mut this = Self {
            issuer,
            paths: paths(state_dir),
            ca_der,
            ca_pem,
            pin,
            identity_pem: String::new(),
            identity_key_pem: String::new(),
        };
        // Key and certificate are two files: a crash between their writes
        // leaves a pair that does not match, which is re-issued too.
        let pair_matches = || {
            let cert = std::fs::read_to_string(&p.cert).ok()?;
            let key = std::fs::read_to_string(&p.key).ok()?;
            certfleet_proto::bundle::Bundle::parse(&cert, Some(&key), &[]).ok()
        };
        if identity_needs_renewal(&p.cert, identity_lifetime) || pair_matches().is_none() {
            write_coordinator_identity(&p, &this.issuer, identity_lifetime)?;
        }
        this.identity_pem = format!("{}{}", read(&p.cert)?, this.ca_pem);
        this.identity_key_pem = read(&p.key)?;
        Ok(this)
    }

    /// Checks that `csr_der` is a CSR whose signature verifies.
    pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
        parse_csr(csr_der).map(|_| ())
    }

    /// Signs a certificate for `node` on the public key of `csr_der`. The
    /// CSR's signature must verify; its requested names are ignored: the
    /// coordinator decides who the node is.
    pub fn sign_node(
        &self,
        node: &str,
        csr_der: &[u8],
        lifetime: Duration,
    ) -> Result<NodeCertificate, PkiError> {
        let csr = parse_csr(csr_der)?;
        let mut params = CertificateParams::new(vec![node_identity(node)]).map_err(sign_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_identity(node));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        validity(&mut params, lifetime);
        let not_after = params.not_after.unix_timestamp();
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(sign_err)?;
        Ok(NodeCertificate {
            pem: cert.pem(),
            serial: certfleet_proto::bundle::hex(serial.as_ref()),
            not_after,
        })
    }
}

fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_der.len() > MAX_CSR_BYTES {
        return Err(PkiError::Csr(format!(
            "{} bytes; at most {MAX_CSR_BYTES} are allowed",
            csr_der.len()
        )));
    }
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der.to_vec()))
        .map_err(|e| PkiError::Csr(e.to_string()))
}

/// The coordinator's certificate is re-signed when a third of its life is left.
/// Whether the coordinator's certificate at `cert_path` is missing, past
/// two thirds of its life, or valid for longer than `lifetime` from now.
fn identity_needs_renewal(cert_path: &Path, lifetime: Duration) -> bool {
    let Ok(pem) = std::fs::read_to_string(cert_path) else {
        return true;
    };
    match renewal_due_in(&pem) {
        None => true,
        Some(due) => {
            due.is_zero()
                || certfleet_proto::bundle::Bundle::parse(&pem, None, &[])
                    .is_ok_and(|b| b.not_after > clock::now() + lifetime.as_secs() as i64 + 60)
        }
    }
}

/// Retry delays after a failed renewal of the coordinator's identity.
const RENEW_RETRY: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(300);

impl ClusterCa {
    /// Issues the coordinator a new certificate on a new key, valid for
    /// `lifetime`, writes it to the state directory, and returns
    /// (chain PEM, key PEM).
    pub fn renew_identity(&self, lifetime: Duration) -> Result<(String, String), PkiError> {
        write_coordinator_identity(&self.paths, &self.issuer, lifetime)?;
        let read = |path: &Path| std::fs::read_to_string(path).map_err(io(path));
        Ok((
            format!("{}{}", read(&self.paths.cert)?, self.ca_pem),
            read(&self.paths.key)?,
        ))
    }
}

/// Keeps the coordinator's own identity fresh while it runs: renews it at
/// two thirds of its life and swaps it into `live`, which every agent
/// connection and the enrollment listener present, so a coordinator that
/// runs for longer than its certificate lives still reaches every agent.
/// A failure is logged and retried with backoff until `stop`.
pub async fn renew_identity_until(
    ca: Arc<ClusterCa>,
    live: Arc<LiveIdentity>,
    lifetime: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut chain = ca.identity_pem.clone();
    let mut retry = *RENEW_RETRY.start();
    loop {
        let wait = renewal_due_in(&chain).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
        let renewed = ca.renew_identity(lifetime).and_then(|(c, k)| {
            live.replace(&c, &k).map_err(|e| PkiError::Invalid {
                path: ca.paths.cert.clone(),
                reason: e.to_string(),
            })?;
            Ok(c)
        });
        match renewed {
            Ok(c) => {
                chain = c;
                retry = *RENEW_RETRY.start();
                tracing::info!(valid_for = ?lifetime, "renewed the coordinator's identity");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry, "renewing the coordinator's identity failed");
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(*RENEW_RETRY.end());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use certfleet_proto::identity::{Peer, peer_of};

    #[test]
    fn a_key_and_certificate_that_do_not_match_are_reissued_at_load() {
        let state = tempfile::tempdir().unwrap();
        init(state.path(), false).unwrap();
        // A crash between the two writes: a new key beside the old certificate.
        let stray = KeyPair::generate().unwrap();
        std::fs::write(
            state.path().join("identity/coordinator.key"),
            stray.serialize_pem(),
        )
        .unwrap();
        let ca = ClusterCa::load(state.path(), COORDINATOR_VALIDITY).unwrap();
        certfleet_proto::bundle::Bundle::parse(&ca.identity_pem, Some(&ca.identity_key_pem), &[])
            .expect("a matching pair after load");
    }

    #[test]
    fn init_refuses_to_overwrite_and_signs_nodes_on_their_own_key() {
        let state = tempfile::tempdir().unwrap();
        let pin = init(state.path(), false).unwrap();
        assert!(matches!(
            init(state.path(), false),
            Err(PkiError::Exists(_))
        ));
        let ca = ClusterCa::load(state.path(), COORDINATOR_VALIDITY).unwrap();
        assert_eq!(ca.pin, pin);
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca/ca.key", "identity/coordinator.key"] {
            let mode = std::fs::metadata(state.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let node_key = KeyPair::generate().unwrap();
        // The CSR asks to be the coordinator; the certificate says otherwise.
        let csr = CertificateParams::new(vec![COORDINATOR_IDENTITY.to_owned()])
            .unwrap()
            .serialize_request(&node_key)
            .unwrap();
        let cert = ca
            .sign_node("cn-unm-1", csr.der(), Duration::from_secs(3600))
            .unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(cert.pem.as_bytes()).unwrap();
        assert_eq!(peer_of(&der), Some(Peer::Node("cn-unm-1".into())));
        assert!(
            ca.sign_node("x", b"garbage", Duration::from_secs(60))
                .is_err()
        );
        let forced = init(state.path(), true).unwrap();
        assert_ne!(forced, pin);
    }
}
