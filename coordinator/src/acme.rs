//! The ACME side: the HTTP client instant-acme talks through, and the
//! account, created on first use and kept under `<state>/acme/`.
//!
//! The client trusts the system's roots plus any `acme.extra_roots` (Pebble's
//! root in tests), through rustls with the aws-lc-rs provider.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use certfleet_proto::cause_chain::{self, Chain};
use certfleet_proto::fsio;
use certfleet_proto::identity::provider;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, BytesResponse, ExternalAccountKey, HttpClient,
    NewAccount,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tracing::info;

use crate::config::AcmeConfig;
use crate::issue::nonce_retry;

#[derive(Debug, thiserror::Error)]
pub enum AcmeSetupError {
    #[error("reading extra root {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("no trusted roots: the system has none and acme.extra_roots is empty")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("ACME account at {directory}: {source}")]
    Account {
        directory: String,
        source: instant_acme::Error,
    },
    #[error("account credentials {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error(
        "the CA's terms of service have not been accepted, so no ACME account was created: \
         read {terms} and set `acme.agree_tos = true` in the coordinator's config \
         (or run `certfleet-coordinator init --agree-tos`)"
    )]
    TermsNotAgreed { terms: String },
}

/// The file `certfleet-coordinator init --agree-tos` leaves under
/// `<state>/acme/`: the operator accepted the CA's terms of service there.
pub const TOS_AGREED_FILE: &str = "terms-of-service-agreed";

/// Records that the operator accepted the terms of service of the CA that
/// `config` names (`certfleet-coordinator init --agree-tos`).
pub fn record_tos_agreement(config: &crate::config::Config) -> Result<(), AcmeSetupError> {
    let dir = config.state_dir.join("acme");
    let path = dir.join(TOS_AGREED_FILE);
    let err = |e: std::io::Error| AcmeSetupError::Credentials {
        path: path.clone(),
        reason: e.to_string(),
    };
    fsio::create_private_dir(&dir).map_err(err)?;
    let note = format!("accepted for {}\n", config.acme.directory);
    fsio::write_atomic(&path, note.as_bytes(), 0o600).map_err(err)
}

/// instant-acme's HTTP client: hyper with rustls (aws-lc-rs).
struct AcmeHttp(HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>);

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.0.request(req);
        Box::pin(async move {
            match fut.await {
                Ok(rsp) => Ok(BytesResponse::from(rsp)),
                Err(e) => Err(instant_acme::Error::Other(CaRequestError::new(&e).into())),
            }
        })
    }
}

/// A request to the CA that got no answer: hyper's `client error
/// (Connect)` with every cause below it in words, and what to do where that
/// is known. Callers add what was being done and the directory URL.
#[derive(Debug, thiserror::Error)]
#[error("{chain}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
pub(crate) struct CaRequestError {
    chain: String,
    hint: Option<&'static str>,
}

impl CaRequestError {
    fn new(err: &(dyn std::error::Error + 'static)) -> Self {
        Self {
            chain: Chain(err).to_string(),
            hint: ca_hint(err),
        }
    }
}

/// What to do about a failed request to the CA, where the cause says.
fn ca_hint(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    match cause_chain::find::<rustls::Error>(err)? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => Some(
            "the CA's certificate is not trusted here: for a private CA or Pebble, set acme.extra_roots to its root certificate",
        ),
        _ => None,
    }
}

fn http_client(config: &AcmeConfig) -> Result<AcmeHttp, AcmeSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    // A system without a CA bundle is fine when extra roots are given.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for path in &config.extra_roots {
        let root_err = |reason: String| AcmeSetupError::Root {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| root_err(e.to_string()))?;
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| root_err(e.to_string()))?;
            roots.add(cert).map_err(|e| root_err(e.to_string()))?;
            found += 1;
        }
        if found == 0 {
            return Err(root_err("holds no PEM certificate".into()));
        }
    }
    if roots.is_empty() {
        return Err(AcmeSetupError::NoRoots);
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Without TCP_NODELAY, Nagle's algorithm holds each small JWS POST for
    // the peer's delayed ACK, ~40 ms per request on Linux.
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(AcmeHttp(
        HyperClient::builder(TokioExecutor::new()).build(connector),
    ))
}

/// The ACME account, loaded or created on first use.
pub struct AcmeAccount {
    config: AcmeConfig,
    dir: PathBuf,
    account: OnceCell<Account>,
}

impl AcmeAccount {
    /// Checks the TLS setup now (so a bad root fails at startup); the
    /// account itself is created or loaded on first use.
    pub fn new(config: &AcmeConfig, state_dir: &Path) -> Result<Self, AcmeSetupError> {
        http_client(config)?;
        Ok(Self {
            config: config.clone(),
            dir: state_dir.join("acme"),
            account: OnceCell::new(),
        })
    }

    /// Credentials are kept per directory URL, so moving from a staging CA
    /// to production never reuses the wrong account.
    fn credentials_path(&self) -> PathBuf {
        let digest = Sha256::digest(self.config.directory.as_bytes());
        let id = certfleet_proto::bundle::hex(&digest[..8]);
        self.dir.join(format!("account-{id}.json"))
    }

    /// The CA's terms-of-service URL from its directory's `meta`
    /// (RFC 8555 §7.1.1), or a phrase saying where to look.
    async fn terms_url(&self) -> String {
        let fallback = format!("the terms of the CA at {}", self.config.directory);
        let Ok(client) = http_client(&self.config) else {
            return fallback;
        };
        let Ok(request) =
            http::Request::get(&self.config.directory).body(BodyWrapper::from(Vec::new()))
        else {
            return fallback;
        };
        let Ok(mut response) = client.request(request).await else {
            return fallback;
        };
        let Ok(body) = response.body.into_bytes().await else {
            return fallback;
        };
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|d| d["meta"]["termsOfService"].as_str().map(str::to_owned))
            .unwrap_or(fallback)
    }

    pub async fn get(&self) -> Result<&Account, AcmeSetupError> {
        self.account.get_or_try_init(|| self.load_or_create()).await
    }

    async fn load_or_create(&self) -> Result<Account, AcmeSetupError> {
        let path = self.credentials_path();
        let account_err = |source| AcmeSetupError::Account {
            directory: self.config.directory.clone(),
            source,
        };
        let cred_err = |reason: String| AcmeSetupError::Credentials {
            path: path.clone(),
            reason,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let builder = Account::builder_with_http(Box::new(http_client(&self.config)?));
                let creds: AccountCredentials =
                    serde_json::from_slice(&bytes).map_err(|e| cred_err(e.to_string()))?;
                let account = builder.from_credentials(creds).await.map_err(account_err)?;
                info!(id = account.id(), "loaded ACME account");
                Ok(account)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.config.agree_tos && !self.dir.join(TOS_AGREED_FILE).exists() {
                    return Err(AcmeSetupError::TermsNotAgreed {
                        terms: self.terms_url().await,
                    });
                }
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let new_account = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let eab = self
                    .config
                    .external_account
                    .as_ref()
                    .map(|e| ExternalAccountKey::new(e.key_id.clone(), &e.hmac_key));
                let (account, creds) = nonce_retry!(
                    Account::builder_with_http(Box::new(http_client(&self.config)?))
                        .create(&new_account, self.config.directory.clone(), eab.as_ref())
                        .await
                )
                .map_err(account_err)?;
                let json = serde_json::to_vec(&creds).map_err(|e| cred_err(e.to_string()))?;
                fsio::create_private_dir(&self.dir).map_err(|e| cred_err(e.to_string()))?;
                fsio::write_atomic(&path, &json, 0o600).map_err(|e| cred_err(e.to_string()))?;
                info!(id = account.id(), path = %path.display(), "created ACME account");
                Ok(account)
            }
            Err(e) => Err(cred_err(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    /// A failed handshake as hyper-rustls hands it on: rustls' error in
    /// tokio-rustls' io::Error in its own.
    fn handshake_error(e: rustls::Error) -> io::Error {
        io::Error::other(io::Error::new(io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn an_untrusted_ca_says_to_set_extra_roots() {
        let untrusted = handshake_error(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert_eq!(
            CaRequestError::new(&untrusted).to_string(),
            "invalid peer certificate: UnknownIssuer (the CA's certificate is not trusted here: for a private CA or Pebble, set acme.extra_roots to its root certificate)"
        );
        // Other failures get their cause in words, and no guess.
        let expired = handshake_error(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        ));
        assert_eq!(ca_hint(&expired), None);
        let refused = io::Error::from_raw_os_error(111);
        assert_eq!(
            CaRequestError::new(&refused).to_string(),
            "connection refused"
        );
    }
}
