//! Who is who in the cluster, and the TLS rules that enforce it.
//!
//! The coordinator runs a private CA. Every certificate it issues names its
//! holder by one DNS SAN: [`COORDINATOR_IDENTITY`] for the coordinator,
//! `<node>.node.certfleet.internal` ([`node_identity`]) for a node. Both
//! sides verify that name, not the address they dialled, so an agent can be
//! reached by any address and a node's certificate cannot stand in for the
//! coordinator's.
//!
//! - [`ExpectIdentity`] (client side): the server's chain leads to the
//!   cluster CA and names the expected identity.
//! - [`PinnedCoordinator`] (client side, joining): the server is the
//!   coordinator, and its chain carries a CA whose key matches the pin the
//!   admin gave with the join token (the kubeadm model).
//! - [`OnlyIdentity`] (server side): the client's chain leads to the cluster
//!   CA and names the one identity allowed to call (an agent allows only the
//!   coordinator).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

use crate::bundle::{Bundle, hex};
use crate::clock;

/// The coordinator's identity in its certificate.
pub const COORDINATOR_IDENTITY: &str = "coordinator.certfleet.internal";
/// A node's identity is its name followed by this.
pub const NODE_IDENTITY_SUFFIX: &str = ".node.certfleet.internal";
/// ALPN for gRPC over our own TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// The identity a node's certificate carries.
pub fn node_identity(node: &str) -> String {
    format!("{node}{NODE_IDENTITY_SUFFIX}")
}

// Kept here for the callers that predate `crate::names`, the one home of
// name rules.
use crate::names::is_valid_node_name;

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Coordinator,
    Node(String),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Coordinator => f.write_str("the coordinator"),
            Self::Node(n) => write!(f, "node {n}"),
        }
    }
}

/// The identity in a certificate's DNS SANs, if it has exactly one of ours.
/// (Its chain must have been verified already.)
pub fn peer_of(cert_der: &[u8]) -> Option<Peer> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut found = None;
    for name in &san.value.general_names {
        let GeneralName::DNSName(dns) = name else {
            continue;
        };
        let peer = if *dns == COORDINATOR_IDENTITY {
            Peer::Coordinator
        } else if let Some(node) = dns.strip_suffix(NODE_IDENTITY_SUFFIX)
            && is_valid_node_name(node)
        {
            Peer::Node(node.to_owned())
        } else {
            continue;
        };
        if found.replace(peer).is_some() {
            return None;
        }
    }
    found
}

/// The pin of a CA certificate: `sha256:` and the hex SHA-256 of its
/// SubjectPublicKeyInfo, so the pin survives re-issuing the CA on the same key.
pub fn ca_pin(ca_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca_der).ok()?;
    Some(format!(
        "sha256:{}",
        hex(&Sha256::digest(cert.tbs_certificate.subject_pki.raw))
    ))
}

/// Time until two thirds of the life of the certificate in `pem` (the
/// first, if there are several) has passed: zero once it has, `None` if it
/// does not parse. Both daemons renew their own identity then, which leaves
/// a third of its life for retries.
pub fn renewal_due_in(pem: &str) -> Option<Duration> {
    let b = Bundle::parse(pem, None, &[]).ok()?;
    let due = b.not_before + (b.not_after - b.not_before) * 2 / 3;
    let left = due.saturating_sub(clock::now());
    Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
}

/// The one crypto provider certfleet uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn identity_error(message: String) -> rustls::Error {
    #[derive(Debug)]
    struct IdentityError(String);
    impl fmt::Display for IdentityError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for IdentityError {}
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        IdentityError(message),
    ))))
}

fn check_identity(end_entity: &CertificateDer<'_>, expected: &str) -> Result<(), rustls::Error> {
    let expected_peer = if expected == COORDINATOR_IDENTITY {
        Peer::Coordinator
    } else {
        Peer::Node(expected.trim_end_matches(NODE_IDENTITY_SUFFIX).to_owned())
    };
    match peer_of(end_entity) {
        Some(peer) if peer == expected_peer => Ok(()),
        Some(peer) => Err(identity_error(format!(
            "certificate belongs to {peer}, not {expected_peer}"
        ))),
        None => Err(identity_error(format!(
            "certificate names no certfleet identity; expected {expected_peer}"
        ))),
    }
}

fn roots(ca_der: &CertificateDer<'static>) -> Result<Arc<rustls::RootCertStore>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone())?;
    Ok(Arc::new(roots))
}

/// Server verifier: chain to the cluster CA, and the leaf names the
/// expected identity: a fixed one, whatever server name the connection was
/// opened with, or the server name itself.
#[derive(Debug)]
pub struct ExpectIdentity {
    inner: Arc<WebPkiServerVerifier>,
    /// `None`: the identity the connection was opened with.
    expected: Option<String>,
}

impl ExpectIdentity {
    pub fn new(ca_der: &CertificateDer<'static>, expected: String) -> Result<Self, rustls::Error> {
        Self::build(ca_der, Some(expected))
    }

    /// Expects the identity each connection is opened with as its server
    /// name, so one TLS config (one verifier, one session cache) serves
    /// every agent: the coordinator opens each agent's connection with
    /// [`node_identity`] of that node.
    pub fn by_server_name(ca_der: &CertificateDer<'static>) -> Result<Self, rustls::Error> {
        Self::build(ca_der, None)
    }

    fn build(
        ca_der: &CertificateDer<'static>,
        expected: Option<String>,
    ) -> Result<Self, rustls::Error> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_der)?, provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Self { inner, expected })
    }
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match (&self.expected, server_name) {
            (Some(expected), _) => expected.clone(),
            (None, ServerName::DnsName(name)) => name.as_ref().to_owned(),
            (None, other) => {
                return Err(identity_error(format!(
                    "connection opened to {other:?}, not to a certfleet identity"
                )));
            }
        };
        let name = ServerName::try_from(expected.as_str())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)?;
        check_identity(end_entity, &expected)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server verifier for joining: the chain must carry a CA certificate whose
/// pin is `pin`, and the leaf must be the coordinator's, issued by that CA.
#[derive(Debug)]
pub struct PinnedCoordinator {
    pin: String,
    /// Handshake signatures are checked the same way either way.
    signatures: FingerprintOnly,
}

impl PinnedCoordinator {
    pub fn new(pin: String) -> Self {
        Self {
            pin,
            signatures: FingerprintOnly::new(),
        }
    }
}

impl ServerCertVerifier for PinnedCoordinator {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ca_pin(c).as_deref() == Some(self.pin.as_str()))
            .ok_or_else(|| {
                identity_error(format!(
                    "the server's chain has no CA matching the pin {}",
                    self.pin
                ))
            })?;
        ExpectIdentity::new(&ca.clone().into_owned(), COORDINATOR_IDENTITY.to_owned())?
            .verify_server_cert(end_entity, &[], _server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// A server verifier for probes that compare the served leaf's SHA-256
/// with an exact expected value, which is stricter than a trust store: it
/// accepts any certificate, and the caller reads the leaf after the
/// handshake. Handshake signatures are still verified, so the server proved
/// it holds the key of the certificate it showed.
#[derive(Debug)]
pub struct FingerprintOnly {
    provider: Arc<CryptoProvider>,
}

impl FingerprintOnly {
    pub fn new() -> Self {
        Self {
            provider: provider(),
        }
    }
}

impl Default for FingerprintOnly {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerCertVerifier for FingerprintOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client verifier: the client's chain leads to the cluster CA and its leaf
/// names `allowed`. With `optional`, a client may present no certificate
/// (the coordinator's enrollment service, where joiners have none yet).
#[derive(Debug)]
pub struct OnlyIdentity {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Option<String>,
}

impl OnlyIdentity {
    /// `allowed`: `Some(identity)` to admit only that identity, `None` to
    /// admit any identity the cluster CA issued.
    pub fn new(
        ca_der: &CertificateDer<'static>,
        allowed: Option<String>,
        optional: bool,
    ) -> Result<Self, rustls::Error> {
        let builder = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider());
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        let inner = builder
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Self { inner, allowed })
    }
}

impl ClientCertVerifier for OnlyIdentity {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match &self.allowed {
            Some(allowed) => check_identity(end_entity, allowed)?,
            None if peer_of(end_entity).is_none() => {
                return Err(identity_error(
                    "client certificate names no certfleet identity".into(),
                ));
            }
            None => {}
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_life() {
        let leaf = |from: i64, until: i64| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![node_identity("n1")]).unwrap();
            let at = |t| time::OffsetDateTime::from_unix_timestamp(clock::now() + t).unwrap();
            params.not_before = at(from);
            params.not_after = at(until);
            params.self_signed(&key).unwrap().pem()
        };
        let due = renewal_due_in(&leaf(-10, 290)).unwrap().as_secs();
        assert!((185..=190).contains(&due), "{due}");
        assert_eq!(renewal_due_in(&leaf(-250, 50)), Some(Duration::ZERO));
        assert_eq!(renewal_due_in("not a certificate"), None);
    }

    #[test]
    fn identity_comes_from_the_san() {
        let key = rcgen::KeyPair::generate().unwrap();
        let node = rcgen::CertificateParams::new(vec![node_identity("cn-unm-1")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(peer_of(node.der()), Some(Peer::Node("cn-unm-1".into())));
        let coord = rcgen::CertificateParams::new(vec![COORDINATOR_IDENTITY.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(peer_of(coord.der()), Some(Peer::Coordinator));
        let both = rcgen::CertificateParams::new(vec![
            COORDINATOR_IDENTITY.to_owned(),
            node_identity("x"),
        ])
        .unwrap()
        .self_signed(&key)
        .unwrap();
        assert_eq!(peer_of(both.der()), None, "two identities in one cert");
        assert!(check_identity(node.der(), COORDINATOR_IDENTITY).is_err());
        assert!(check_identity(coord.der(), COORDINATOR_IDENTITY).is_ok());
    }

    #[test]
    fn one_verifier_for_every_agent_expects_the_node_each_connection_was_opened_to() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let node_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![node_identity("cn-1")])
            .unwrap()
            .signed_by(&node_key, &issuer)
            .unwrap();
        let verifier = ExpectIdentity::by_server_name(&ca.der().clone()).unwrap();
        let opened_to = |node: &str| ServerName::try_from(node_identity(node)).unwrap();
        let verify = |name: &ServerName<'_>| {
            verifier.verify_server_cert(leaf.der(), &[], name, &[], UnixTime::now())
        };
        assert!(verify(&opened_to("cn-1")).is_ok());
        let err = verify(&opened_to("cn-2")).unwrap_err().to_string();
        assert!(err.contains("cn-2.node.certfleet.internal"), "{err}");
        let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let err = verify(&ip).unwrap_err().to_string();
        assert!(err.contains("not to a certfleet identity"), "{err}");
    }
}

/// A certificate and key that can be replaced while connections use it:
/// the agent renews its certificate without restarting, and every new
/// handshake, client or server side, presents the current one.
#[derive(Debug)]
pub struct LiveIdentity {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

/// Why identity material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate PEM: {0}")]
    Certificate(String),
    #[error("private key PEM: {0}")]
    Key(String),
}

impl LiveIdentity {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        Ok(Self {
            current: std::sync::RwLock::new(Arc::new(certified_key(cert_pem, key_pem)?)),
        })
    }

    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), IdentityError> {
        let key = certified_key(cert_pem, key_pem)?;
        *self.current.write().expect("identity lock poisoned") = Arc::new(key);
        Ok(())
    }

    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        Arc::clone(&self.current.read().expect("identity lock poisoned"))
    }
}

fn certified_key(
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::sign::CertifiedKey, IdentityError> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(IdentityError::Certificate("no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok(rustls::sign::CertifiedKey::new(chain, signing))
}

impl rustls::server::ResolvesServerCert for LiveIdentity {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS client config for certfleet's gRPC: our provider, ALPN h2, the
/// given server verifier and, when given, a client identity.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<Arc<LiveIdentity>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(identity),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A TLS server config for certfleet's gRPC: our provider, ALPN h2, the
/// server's identity and the given client verifier.
pub fn server_config(
    identity: Arc<LiveIdentity>,
    clients: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}
