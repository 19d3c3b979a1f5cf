//! What a user would check about a certificate: that it chains to the CA's
//! root for each of its names, the way a TLS client would verify it.

use std::sync::Arc;

use anyhow::Context;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Verifies `fullchain_pem` (leaf first) against `root_pem` for every name
/// in `names`, with rustls' WebPKI verifier.
pub fn chain_verifies(fullchain_pem: &str, root_pem: &str, names: &[String]) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(root?)?;
    }
    let provider = certfleet_proto::identity::provider();
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(fullchain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let (leaf, intermediates) = chain.split_first().context("empty chain")?;
    for name in names {
        let server_name = ServerName::try_from(name.clone())?;
        verifier
            .verify_server_cert(leaf, intermediates, &server_name, &[], UnixTime::now())
            .with_context(|| format!("chain does not verify for {name}"))?;
    }
    Ok(())
}

/// The SHA-256 (hex) of the leaf `addr` serves, by the test's own TLS
/// handshake, as `openssl s_client` would show an admin.
pub async fn served_leaf_sha256(addr: std::net::SocketAddr, sni: &str) -> anyhow::Result<String> {
    use sha2::Digest;
    let config = rustls::ClientConfig::builder_with_provider(certfleet_proto::identity::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            certfleet_proto::identity::FingerprintOnly::new(),
        ))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_owned())?, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .context("no certificate served")?;
    Ok(certfleet_proto::bundle::hex(&sha2::Sha256::digest(&leaf)))
}
