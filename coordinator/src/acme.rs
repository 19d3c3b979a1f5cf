//! The ACME side: the HTTP client instant-acme talks through, the
//! account, created on first use and kept under `<state>/acme/`, and how
//! certfleet talks to the CA: `badNonce` retries within a step's time
//! budget (`nonce_retry!`) and the poll schedule ([`poll_wait`]). What to
//! ask the CA, and in which order, is `issue.rs`'s business; this module
//! knows nothing of orders beyond instant-acme's.
//!
//! The client trusts the system's roots plus any `acme.extra_roots` (Pebble's
//! root in tests), through rustls with the aws-lc-rs provider.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use certfleet_proto::cause_chain::{self, Chain};
use certfleet_proto::fsio;
use certfleet_proto::identity::provider;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, BytesResponse, ExternalAccountKey, HttpClient,
    NewAccount, Order, OrderStatus,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::AcmeConfig;

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
/// `<state>/acme/`: one line per CA directory whose terms of service the
/// operator accepted there.
pub const TOS_AGREED_FILE: &str = "terms-of-service-agreed";

/// Records that the operator accepted the terms of service of the CA that
/// `config` names, and of its staging CA if it names one (`certfleet-
/// coordinator init --agree-tos`). Directories accepted before stay.
pub fn record_tos_agreement(config: &crate::config::Config) -> Result<(), AcmeSetupError> {
    let dir = config.state_dir.join("acme");
    let path = dir.join(TOS_AGREED_FILE);
    let err = |e: std::io::Error| AcmeSetupError::Credentials {
        path: path.clone(),
        reason: e.to_string(),
    };
    fsio::create_private_dir(&dir).map_err(err)?;
    let mut note = match std::fs::read_to_string(&path) {
        Ok(note) => note,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(err(e)),
    };
    let acme = &config.acme;
    for directory in std::iter::once(&acme.directory).chain(&acme.staging_directory) {
        if !tos_agreed_in(&note, directory) {
            note.push_str(&tos_line(directory));
        }
    }
    fsio::write_atomic(&path, note.as_bytes(), 0o600).map_err(err)
}

fn tos_line(directory: &str) -> String {
    format!("accepted for {directory}\n")
}

/// Whether the marker `note` records the terms of the CA at `directory`:
/// accepting one CA's terms accepts no other's, so pointing `[acme]` at
/// another CA asks again.
fn tos_agreed_in(note: &str, directory: &str) -> bool {
    note.lines()
        .any(|l| l.strip_prefix("accepted for ") == Some(directory))
}

/// instant-acme's HTTP client: hyper with rustls (aws-lc-rs).
#[derive(Clone)]
struct AcmeHttp {
    client: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    /// Where every answer's `Retry-After` is noted, for the poll schedule.
    retry_after: Arc<RetryAfter>,
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let url = req.uri().to_string();
        let retry_after = Arc::clone(&self.retry_after);
        let fut = self.client.request(req);
        Box::pin(async move {
            match fut.await {
                Ok(rsp) => {
                    retry_after.note(&url, rsp.headers());
                    Ok(BytesResponse::from(rsp))
                }
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
    Ok(AcmeHttp {
        client: HyperClient::builder(TokioExecutor::new()).build(connector),
        retry_after: Arc::default(),
    })
}

/// The ACME account, loaded or created on first use.
pub struct AcmeAccount {
    config: AcmeConfig,
    dir: PathBuf,
    /// The one client every request to the CA goes through.
    http: AcmeHttp,
    /// The account once loaded or created. A lock rather than a once-cell:
    /// a key rollover replaces it (see `rollover`), and no order may
    /// start with the old key while that runs.
    account: tokio::sync::Mutex<Option<Account>>,
    /// The credentials file's name before its directory hash:
    /// [`MAIN_ACCOUNT_FILE`], or [`STAGING_ACCOUNT_FILE`] for dry runs.
    file_prefix: &'static str,
    /// Whether the CA's directory offers ARI (`renewalInfo`), once a
    /// [`AcmeAccount::renewal_info`] call has found out.
    ari_offered: std::sync::OnceLock<bool>,
}

impl AcmeAccount {
    /// Checks the TLS setup now (so a bad root fails at startup); the
    /// account itself is created or loaded on first use.
    pub fn new(config: &AcmeConfig, state_dir: &Path) -> Result<Self, AcmeSetupError> {
        Ok(Self {
            http: http_client(config)?,
            config: config.clone(),
            dir: state_dir.join("acme"),
            account: tokio::sync::Mutex::new(None),
            file_prefix: MAIN_ACCOUNT_FILE,
            ari_offered: std::sync::OnceLock::new(),
        })
    }

    /// Credentials are kept per directory URL, so moving from a staging CA
    /// to production never reuses the wrong account.
    fn credentials_path(&self) -> PathBuf {
        let digest = Sha256::digest(self.config.directory.as_bytes());
        let id = certfleet_proto::bundle::hex(&digest[..8]);
        self.dir.join(format!("{}-{id}.json", self.file_prefix))
    }

    /// The CA's terms-of-service URL from its directory's `meta`
    /// (RFC 8555 §7.1.1), or a phrase saying where to look.
    async fn terms_url(&self) -> String {
        let fallback = format!("the terms of the CA at {}", self.config.directory);
        let Ok(request) =
            http::Request::get(&self.config.directory).body(BodyWrapper::from(Vec::new()))
        else {
            return fallback;
        };
        let Ok(mut response) = self.http.request(request).await else {
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

    /// The account, loaded or created on first use. instant-acme's
    /// `Account` is a cheap handle: an order keeps the key it started with.
    pub async fn get(&self) -> Result<Account, AcmeSetupError> {
        let mut cached = self.account.lock().await;
        if let Some(account) = &*cached {
            return Ok(account.clone());
        }
        let account = self.load_or_create().await?;
        *cached = Some(account.clone());
        Ok(account)
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
                let builder = Account::builder_with_http(Box::new(self.http.clone()));
                let creds: AccountCredentials =
                    serde_json::from_slice(&bytes).map_err(|e| cred_err(e.to_string()))?;
                let account = builder.from_credentials(creds).await.map_err(account_err)?;
                info!(id = account.id(), "loaded ACME account");
                Ok(account)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let note = std::fs::read_to_string(self.dir.join(TOS_AGREED_FILE));
                let agreed = note.is_ok_and(|n| tos_agreed_in(&n, &self.config.directory));
                if !self.config.agree_tos && !agreed {
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
                let deadline = Instant::now() + self.config.ca_timeout;
                let (account, creds) = nonce_retry!(
                    deadline,
                    Account::builder_with_http(Box::new(self.http.clone()))
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

/// The first look at an order after asking the CA to act on it (answer
/// the challenges, finalize). Pebble without its validation sleep is done
/// within milliseconds; a real CA takes a second or more, and
/// [`POLL_BACKOFF`] soon spaces the polls out.
pub const POLL_FIRST: Duration = Duration::from_millis(50);
/// Each wait between polls is this many times the one before...
pub const POLL_BACKOFF: u32 = 2;
/// ...up to this, so an order never waits more than this after the CA is
/// done. With it, a CA that takes up to 30 s gets at most one poll more
/// than from the schedule certfleet had before (instant-acme's
/// `RetryPolicy` at 100 ms, growing 1.5 times, no cap), and one that takes
/// the default `acme.ca_timeout_secs` at most three.
pub const POLL_MAX_INTERVAL: Duration = Duration::from_secs(10);

/// How long to wait before poll number `polls` (0 for the first) of an
/// order, given the CA's `Retry-After` on its last answer and the time
/// `left` in the step's budget; `None` when no poll fits in it.
///
/// The waits grow from [`POLL_FIRST`] by [`POLL_BACKOFF`] up to
/// [`POLL_MAX_INTERVAL`]. A longer `Retry-After` wins (RFC 8555 §7.4 and
/// §8.2): the CA has said when to ask. The last wait is cut short to end
/// at the deadline, so the budget gets its last look, unless the CA asked
/// not to be asked before then.
pub fn poll_wait(polls: u32, retry_after: Option<Duration>, left: Duration) -> Option<Duration> {
    if left.is_zero() || retry_after.is_some_and(|wait| wait > left) {
        return None;
    }
    let ours = POLL_BACKOFF
        .checked_pow(polls)
        .and_then(|factor| POLL_FIRST.checked_mul(factor))
        .map_or(POLL_MAX_INTERVAL, |wait| wait.min(POLL_MAX_INTERVAL));
    Some(ours.max(retry_after.unwrap_or_default()).min(left))
}

/// The CA's `Retry-After` answers, by request URL, for [`poll_wait`].
/// instant-acme reads the header only inside its own poll loop, which
/// cannot start early; the HTTP client sees every answer, so it notes the
/// header here.
#[derive(Debug, Default)]
struct RetryAfter(Mutex<HashMap<String, Instant>>);

impl RetryAfter {
    /// Notes the answer to a request for `url`: when the CA said to ask
    /// again, or nothing. Notes whose time has come go, so the map holds
    /// only what is still to be honoured.
    fn note(&self, url: &str, headers: &http::HeaderMap) {
        let now = Instant::now();
        let wait = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, SystemTime::now()));
        let mut notes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        notes.retain(|_, at| *at > now);
        match wait {
            Some(wait) if !wait.is_zero() => notes.insert(url.to_owned(), now + wait),
            _ => notes.remove(url),
        };
    }

    /// How long the CA asked to wait before asking about `url` again.
    fn take(&self, url: &str) -> Option<Duration> {
        // The key is the URL as the request carried it.
        let url = url
            .parse::<http::Uri>()
            .map_or(url.to_owned(), |u| u.to_string());
        let at = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&url)?;
        Some(at.saturating_duration_since(Instant::now()))
    }
}

/// A `Retry-After` value's wait from `now` (RFC 9110 §10.2.3): a number
/// of seconds, or an HTTP-date in its IMF-fixdate form (the one a server
/// may send, `Sun, 06 Nov 1994 08:49:37 GMT`).
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let [_weekday, day, month, year, clock, "GMT"] =
        value.split_ascii_whitespace().collect::<Vec<_>>()[..]
    else {
        return None;
    };
    let month = MONTHS.iter().position(|m| *m == month)? as u8 + 1;
    let date = time::Date::from_calendar_date(
        year.parse().ok()?,
        time::Month::try_from(month).ok()?,
        day.parse().ok()?,
    )
    .ok()?;
    let mut hms = clock.splitn(3, ':').map(|n| n.parse::<u8>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    let at = date.with_time(time::Time::from_hms(h, m, s).ok()?);
    let at = SystemTime::UNIX_EPOCH
        + Duration::from_secs(at.assume_utc().unix_timestamp().try_into().ok()?);
    Some(at.duration_since(now).unwrap_or_default())
}

/// Whether to send a request again that the CA refused with `err`: it
/// said `badNonce` and the step's `deadline` has not passed.
///
/// A `badNonce` answer carries a fresh nonce, which instant-acme keeps for
/// the next request (after a few tries of its own), and the CA acted on
/// nothing, so any request is safe to send again (RFC 8555 §6.5). A CA that
/// rejects many nonces (Pebble's `PEBBLE_WFE_NONCEREJECT`, or a real one
/// having a bad hour) gets as many tries as the step's time allows, not a
/// fixed number. There is no pause between them: each is a round trip to
/// the CA already.
pub(crate) fn retry_bad_nonce(
    err: &instant_acme::Error,
    deadline: Instant,
    tries: &mut u32,
) -> bool {
    let bad_nonce = matches!(err, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"));
    if !bad_nonce || Instant::now() >= deadline {
        return false;
    }
    *tries += 1;
    debug!(
        tries,
        "the CA rejected the nonce; sending again with a fresh one"
    );
    true
}

/// Evaluates `$call`, an `.await`ed request to the CA, again while
/// [`retry_bad_nonce`] says so for `$deadline`.
macro_rules! nonce_retry {
    ($deadline:expr, $call:expr) => {{
        let deadline: ::tokio::time::Instant = $deadline;
        let mut tries = 0;
        loop {
            match $call {
                Err(e) if $crate::acme::retry_bad_nonce(&e, deadline, &mut tries) => {}
                other => break other,
            }
        }
    }};
}
pub(crate) use nonce_retry;

/// Fetches every authorization of `order` (instant-acme caches them in the
/// order). A fetch that fails ends instant-acme's stream at that entry, so
/// after a `badNonce` the walk starts again; the ones already fetched cost
/// nothing the second time.
pub async fn fetch_authorizations(
    order: &mut Order,
    deadline: Instant,
) -> Result<(), instant_acme::Error> {
    let mut tries = 0;
    'walk: loop {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            if let Err(e) = authz {
                if retry_bad_nonce(&e, deadline, &mut tries) {
                    continue 'walk;
                }
                return Err(e);
            }
        }
        return Ok(());
    }
}

impl AcmeAccount {
    /// Polls `order` until the CA has validated it (`ready`) or given up on
    /// it (`invalid`), by `deadline`.
    pub async fn poll_ready(
        &self,
        order: &mut Order,
        deadline: Instant,
    ) -> Result<OrderStatus, instant_acme::Error> {
        self.poll(order, deadline, |s| {
            matches!(s, OrderStatus::Ready | OrderStatus::Invalid)
        })
        .await
    }

    /// Polls a finalized `order` until the CA has issued its certificate,
    /// and downloads the chain (PEM), by `deadline`.
    pub async fn poll_certificate(
        &self,
        order: &mut Order,
        deadline: Instant,
    ) -> Result<String, instant_acme::Error> {
        self.poll(order, deadline, |s| {
            matches!(s, OrderStatus::Valid | OrderStatus::Invalid)
        })
        .await?;
        nonce_retry!(deadline, order.certificate().await)?.ok_or(instant_acme::Error::Str(
            "no certificate received from the CA",
        ))
    }

    /// Polls `order` on the [`poll_wait`] schedule until `settled` accepts
    /// its status. The state the CA last sent counts: an order whose
    /// authorizations were all valid already is ready without a poll.
    async fn poll(
        &self,
        order: &mut Order,
        deadline: Instant,
        settled: fn(OrderStatus) -> bool,
    ) -> Result<OrderStatus, instant_acme::Error> {
        let mut polls = 0;
        loop {
            let state = order.state();
            if let Some(problem) = &state.error {
                return Err(instant_acme::Error::Api(problem.clone()));
            }
            if settled(state.status) {
                return Ok(state.status);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let retry_after = self.http.retry_after.take(order.url());
            let Some(wait) = poll_wait(polls, retry_after, left) else {
                return Err(instant_acme::Error::Timeout(None));
            };
            tokio::time::sleep(wait).await;
            nonce_retry!(deadline, order.refresh().await.map(drop))?;
            polls += 1;
            debug!(polls, status = ?order.state().status, "polled the order");
        }
    }
}

/// Why an account command (`certfleet account ...`) failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Setup(Box<AcmeSetupError>),
    #[error("ACME account {url} at {directory}: {action}: {}", problem_text(.source))]
    Ca {
        url: String,
        directory: String,
        action: &'static str,
        source: Box<instant_acme::Error>,
    },
    #[error("contact {contact:?}: {reason} (give each as --contact mailto:ops@example.org)")]
    Contact {
        contact: String,
        reason: &'static str,
    },
    #[error(
        "the CA now holds the new key of ACME account {url}, but storing it in {path} failed: {reason}. \
         The coordinator keeps using the new key until it stops; free the disk or fix the \
         directory's permissions, then run `certfleet account rollover` again to store a fresh one"
    )]
    NotStored {
        url: String,
        path: PathBuf,
        reason: String,
    },
}

impl From<AcmeSetupError> for AccountError {
    fn from(e: AcmeSetupError) -> Self {
        Self::Setup(Box::new(e))
    }
}

impl AccountError {
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            Self::Contact { .. } => ErrorKind::Config,
            Self::NotStored { .. } => ErrorKind::Store,
            Self::Ca { .. } => ErrorKind::Acme,
            Self::Setup(e) => match **e {
                AcmeSetupError::TermsNotAgreed { .. } => ErrorKind::Config,
                AcmeSetupError::Credentials { .. } => ErrorKind::Store,
                _ => ErrorKind::Acme,
            },
        }
    }
}

/// A CA refusal's problem document, `type` and `detail` unchanged
/// (RFC 7807); any other error in words.
fn problem_text(err: &instant_acme::Error) -> String {
    match err {
        instant_acme::Error::Api(p) => format!(
            "{}: {}",
            p.r#type.as_deref().unwrap_or("(no type)"),
            p.detail.as_deref().unwrap_or("(no detail)")
        ),
        other => other.to_string(),
    }
}

/// The account as `certfleet account` shows it. Never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    /// The account's URL at the CA.
    pub url: String,
    pub directory: String,
    pub contacts: Vec<String>,
    /// "valid" once the CA has answered for the key just now.
    pub status: String,
    /// RFC 7638 thumbprint of the account's public key, base64url.
    pub key_thumbprint: String,
}

/// Checks a contact before it goes to the CA: RFC 8555 §7.3 contacts are
/// URLs, and the CAs certfleet targets (Let's Encrypt, Pebble) take only
/// `mailto:` ones with a single address.
pub fn check_contact(contact: &str) -> Result<(), AccountError> {
    let refuse = |reason| AccountError::Contact {
        contact: contact.to_owned(),
        reason,
    };
    let address = contact
        .strip_prefix("mailto:")
        .ok_or_else(|| refuse("not a mailto: URL"))?;
    let (local, domain) = address
        .split_once('@')
        .ok_or_else(|| refuse("no @ in the address"))?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !b",;<>@?&%\"".contains(&b))
    };
    if !plain(local) || !plain(domain) || !domain.contains('.') {
        return Err(refuse(
            "not one plain address (no spaces, commas, queries or encoded characters)",
        ));
    }
    Ok(())
}

/// The account commands: show, change the contacts, roll the key over.
impl AcmeAccount {
    /// Where the contacts certfleet last gave the CA are kept. The CA
    /// holds them too, but instant-acme does not read the account object
    /// back.
    fn contacts_path(&self) -> PathBuf {
        self.credentials_path().with_extension("contacts.json")
    }

    /// The contacts last set with `account update`, or else the config's
    /// (which the account was created with).
    fn contacts(&self) -> Result<Vec<String>, AcmeSetupError> {
        let path = self.contacts_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AcmeSetupError::Credentials {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(self.config.contact.clone()),
            Err(e) => Err(AcmeSetupError::Credentials {
                path,
                reason: e.to_string(),
            }),
        }
    }

    fn ca_error(
        &self,
        url: &str,
        action: &'static str,
    ) -> impl FnOnce(instant_acme::Error) -> AccountError {
        let (url, directory) = (url.to_owned(), self.config.directory.clone());
        move |source| AccountError::Ca {
            url,
            directory,
            action,
            source: Box::new(source),
        }
    }

    fn summary(&self, account: &Account) -> Result<AccountSummary, AccountError> {
        Ok(AccountSummary {
            url: account.id().to_owned(),
            directory: self.config.directory.clone(),
            contacts: self.contacts()?,
            status: "valid".to_owned(),
            key_thumbprint: account.key_thumbprint().to_owned(),
        })
    }

    /// The account, after asking the CA whether the stored key still
    /// names a valid account (a new-account request with
    /// `onlyReturnExisting`, RFC 8555 §7.3.1): an account deactivated or
    /// rolled over elsewhere shows as the CA's refusal, not as "valid".
    pub async fn show(&self) -> Result<AccountSummary, AccountError> {
        let account = self.get().await?;
        let path = self.credentials_path();
        let bytes = std::fs::read(&path).map_err(|e| AcmeSetupError::Credentials {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let creds: AccountCredentials =
            serde_json::from_slice(&bytes).map_err(|e| AcmeSetupError::Credentials {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let pkcs8 = creds.private_key();
        let deadline = Instant::now() + self.config.ca_timeout;
        let found = nonce_retry!(
            deadline,
            async {
                let key = instant_acme::Key::from_pkcs8_der(pkcs8.clone_key())?;
                let der = rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.clone_key());
                Account::builder_with_http(Box::new(self.http.clone()))
                    .from_key((key, der), self.config.directory.clone())
                    .await
            }
            .await
        )
        .map_err(self.ca_error(account.id(), "asking the CA for the account"))?;
        if found.0.id() != account.id() {
            return Err(AccountError::Ca {
                url: account.id().to_owned(),
                directory: self.config.directory.clone(),
                action: "asking the CA for the account",
                source: Box::new(instant_acme::Error::Other(
                    format!("the CA says the stored key belongs to {}", found.0.id()).into(),
                )),
            });
        }
        self.summary(&account)
    }

    /// Replaces the account's contacts at the CA (RFC 8555 §7.3.2), then
    /// records them for `show`.
    pub async fn update_contacts(
        &self,
        contacts: &[String],
    ) -> Result<AccountSummary, AccountError> {
        for contact in contacts {
            check_contact(contact)?;
        }
        let account = self.get().await?;
        let list: Vec<&str> = contacts.iter().map(String::as_str).collect();
        let deadline = Instant::now() + self.config.ca_timeout;
        nonce_retry!(deadline, account.update_contacts(&list).await)
            .map_err(self.ca_error(account.id(), "updating the contacts"))?;
        let path = self.contacts_path();
        let json = serde_json::to_vec(contacts).map_err(|e| AcmeSetupError::Credentials {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fsio::write_atomic(&path, &json, 0o600).map_err(|e| AcmeSetupError::Credentials {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        info!(
            id = account.id(),
            contacts = contacts.len(),
            "updated the ACME account's contacts"
        );
        self.summary(&account)
    }

    /// Rolls the account key over (RFC 8555 §7.3.5) and stores the new
    /// credentials (write-temp, fsync, rename; mode 0600) in place of the
    /// old, which the CA no longer accepts.
    ///
    /// The cached account is locked throughout: no order starts with the
    /// old key, and every order after uses the new one. An order already
    /// under way keeps the key it started with, and its later requests are
    /// refused by the CA.
    pub async fn rollover(&self) -> Result<AccountSummary, AccountError> {
        let mut cached = self.account.lock().await;
        let mut account = match &*cached {
            Some(account) => account.clone(),
            None => self.load_or_create().await?,
        };
        let url = account.id().to_owned();
        let deadline = Instant::now() + self.config.ca_timeout;
        let creds = nonce_retry!(deadline, account.update_key().await)
            .map_err(self.ca_error(&url, "rolling the key over"))?;
        // The CA has switched: from here on only the new key works.
        *cached = Some(account.clone());
        let path = self.credentials_path();
        let not_stored = |reason: String| AccountError::NotStored {
            url: url.clone(),
            path: path.clone(),
            reason,
        };
        let json = serde_json::to_vec(&creds).map_err(|e| not_stored(e.to_string()))?;
        fsio::write_atomic(&path, &json, 0o600).map_err(|e| not_stored(e.to_string()))?;
        info!(id = %url, path = %path.display(), "rolled the ACME account key over");
        drop(cached);
        self.summary(&account)
    }
}

/// The main account's credentials file name, before its directory hash.
pub const MAIN_ACCOUNT_FILE: &str = "account";
/// The dry-run account's: its own file, so a staging CA's account never
/// replaces the production one, even when both URLs are the same (tests).
pub const STAGING_ACCOUNT_FILE: &str = "staging-account";

/// Why the CA's renewal window could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AriError {
    #[error(transparent)]
    Setup(#[from] AcmeSetupError),
    #[error("reading the certificate's ARI identifier: {0}")]
    Identifier(String),
    #[error("asking the CA for the renewal window: {0}")]
    Acme(#[from] instant_acme::Error),
}

impl AcmeAccount {
    /// The account `--dry-run` orders use: at `acme.staging_directory`,
    /// with its own credentials file under `<state>/acme/`, created on
    /// first use under the same terms-of-service rule as the main one.
    /// `None` when no staging directory is configured.
    pub fn staging(config: &AcmeConfig, state_dir: &Path) -> Result<Option<Self>, AcmeSetupError> {
        let Some(directory) = &config.staging_directory else {
            return Ok(None);
        };
        let staging = AcmeConfig {
            directory: directory.clone(),
            ..config.clone()
        };
        let mut account = Self::new(&staging, state_dir)?;
        account.file_prefix = STAGING_ACCOUNT_FILE;
        Ok(Some(account))
    }

    /// Whether the CA offers ARI, once known: an order sends `replaces`
    /// only then (instant-acme refuses an order with `replaces` otherwise).
    pub fn ari_offered(&self) -> Option<bool> {
        self.ari_offered.get().copied()
    }

    /// The CA's suggested renewal window for the certificate whose leaf is
    /// `leaf_der` (RFC 9773 §4.2), and how long until asking again. `None`
    /// when the CA's directory offers no `renewalInfo` (Pebble before 2.6).
    pub async fn renewal_info(
        &self,
        leaf_der: &[u8],
    ) -> Result<Option<(instant_acme::RenewalInfo, Duration)>, AriError> {
        let der = CertificateDer::from(leaf_der);
        let id =
            instant_acme::CertificateIdentifier::try_from(&der).map_err(AriError::Identifier)?;
        let account = self.get().await?;
        match account.renewal_info(&id).await {
            Ok(answer) => {
                let _ = self.ari_offered.set(true);
                Ok(Some(answer))
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                let _ = self.ari_offered.set(false);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use instant_acme::Problem;

    use super::*;

    #[test]
    fn the_terms_are_accepted_per_ca_directory() {
        let state = tempfile::tempdir().unwrap();
        let toml = |extra: &str| {
            format!(
                "state_dir = \"{}\"\n[acme]\ndirectory = \"https://ca.example/dir\"\n{extra}[enrollment]\nlisten = \"127.0.0.1:7444\"\n",
                state.path().display()
            )
        };
        let config = crate::config::Config::from_toml_str(&toml(""), "t.toml").unwrap();
        record_tos_agreement(&config).unwrap();
        let note =
            std::fs::read_to_string(state.path().join("acme").join(TOS_AGREED_FILE)).unwrap();
        assert!(tos_agreed_in(&note, "https://ca.example/dir"), "{note}");
        // Another CA (or one whose URL merely starts the same) asks again.
        assert!(!tos_agreed_in(&note, "https://other.example/dir"));
        assert!(!tos_agreed_in(&note, "https://ca.example/dir2"));

        // Accepting again with a staging CA adds it and keeps the first.
        let staging = "staging_directory = \"https://staging.example/dir\"\n";
        let config = crate::config::Config::from_toml_str(&toml(staging), "t.toml").unwrap();
        record_tos_agreement(&config).unwrap();
        record_tos_agreement(&config).unwrap();
        let note =
            std::fs::read_to_string(state.path().join("acme").join(TOS_AGREED_FILE)).unwrap();
        assert_eq!(
            note,
            "accepted for https://ca.example/dir\naccepted for https://staging.example/dir\n"
        );
    }

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

    fn problem(kind: &str) -> instant_acme::Error {
        instant_acme::Error::Api(Problem {
            r#type: Some(format!("urn:ietf:params:acme:error:{kind}")),
            detail: Some("JWS has an invalid anti-replay nonce".into()),
            status: Some(400),
            subproblems: Vec::new(),
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn polls_start_early_and_back_off_to_a_cap() {
        let plenty = Duration::from_secs(120);
        let waits: Vec<u64> = (0..11)
            .map(|n| poll_wait(n, None, plenty).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [
                50, 100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000
            ]
        );
        // However long the CA takes, the growth never overflows.
        assert_eq!(poll_wait(40, None, plenty), Some(POLL_MAX_INTERVAL));
        assert_eq!(poll_wait(u32::MAX, None, plenty), Some(POLL_MAX_INTERVAL));
    }

    #[test]
    fn polls_honour_retry_after_within_the_budget() {
        let left = Duration::from_secs(60);
        // The CA's word wins when it asks for longer than the schedule...
        assert_eq!(
            poll_wait(0, Some(Duration::from_secs(3)), left),
            Some(Duration::from_secs(3))
        );
        // ...and a shorter one does not make the schedule poll sooner.
        assert_eq!(poll_wait(5, Some(ms(100)), left), Some(ms(1600)));
        // The last wait ends at the deadline: one last look.
        assert_eq!(poll_wait(9, None, ms(2500)), Some(ms(2500)));
        assert_eq!(poll_wait(0, Some(ms(900)), ms(1000)), Some(ms(900)));
        // No poll once the budget is spent, nor when the CA asks to wait
        // past it.
        assert_eq!(poll_wait(0, None, Duration::ZERO), None);
        assert_eq!(poll_wait(0, Some(Duration::from_secs(61)), left), None);
    }

    /// How many polls find out that the CA finished `after` the request
    /// that started the wait, with `wait(n)` before poll `n`.
    fn polls_to_see(after: Duration, wait: impl Fn(u32) -> Duration) -> u32 {
        let (mut at, mut polls) = (Duration::ZERO, 0);
        while at < after {
            at += wait(polls);
            polls += 1;
        }
        polls
    }

    #[test]
    fn a_real_ca_gets_at_most_a_few_more_polls_than_before() {
        let budget = Duration::from_secs(120);
        let ours = |n| poll_wait(n, None, budget).unwrap();
        // instant-acme's schedule as certfleet used it before: 100 ms
        // first, then 1.5 times the wait before, no cap.
        let before = |n| ms(100).mul_f64(1.5f64.powi(n as i32));
        // Every 10 ms from an instant CA to one that takes the default
        // `acme.ca_timeout_secs`.
        for after in (0..12_000).map(|i| ms(10 * i)) {
            let (now, then) = (polls_to_see(after, ours), polls_to_see(after, before));
            let allowed = if after < Duration::from_secs(30) {
                1
            } else {
                3
            };
            assert!(
                now <= then + allowed,
                "a CA done after {after:?} gets {now} polls, {then} before"
            );
        }
        // Pebble without its validation sleep is done at once: one poll, 50 ms in.
        assert_eq!(polls_to_see(ms(5), ours), 1);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        // RFC 9110's example date.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:51:07 GMT", now),
            Some(Duration::from_secs(90))
        );
        // A date gone by: ask now.
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for nonsense in [
            "",
            "soon",
            "-1",
            "Sun, 06 Nov 1994 08:51:07 CET",
            "Sun, 31 Feb 1994 08:51:07 GMT",
        ] {
            assert_eq!(retry_after(nonsense, now), None, "{nonsense:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_noted_per_url_until_answered_without_it() {
        let notes = RetryAfter::default();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        let order = "https://ca.test/order/1";
        notes.note(order, &headers);
        notes.note("https://ca.test/authz/1", &http::HeaderMap::new());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(notes.take(order), Some(Duration::from_secs(2)));
        assert_eq!(notes.take(order), None, "taken once");
        notes.note(order, &headers);
        notes.note(order, &http::HeaderMap::new());
        assert_eq!(notes.take(order), None, "the later answer said nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn bad_nonce_is_retried_as_often_as_the_ca_says_it() {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut calls = 0;
        let mut call = || {
            calls += 1;
            let rejected = calls <= 50;
            async move {
                tokio::time::sleep(ms(2)).await; // a round trip to the CA
                if rejected {
                    Err(problem("badNonce"))
                } else {
                    Ok("done")
                }
            }
        };
        let result = nonce_retry!(deadline, call().await);
        assert_eq!(result.unwrap(), "done");
        assert_eq!(calls, 51);
    }

    #[tokio::test(start_paused = true)]
    async fn other_problems_are_not_retried() {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut calls = 0;
        let mut call = || {
            calls += 1;
            async { Err::<(), _>(problem("rateLimited")) }
        };
        let result = nonce_retry!(deadline, call().await);
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_nonce_retries_stop_at_the_steps_budget() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1);
        let mut calls = 0;
        let mut call = || {
            calls += 1;
            async {
                tokio::time::sleep(ms(10)).await;
                Err::<(), _>(problem("badNonce"))
            }
        };
        let result = nonce_retry!(deadline, call().await);
        let err = result.unwrap_err();
        assert!(
            matches!(&err, instant_acme::Error::Api(p) if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce")),
            "{err}"
        );
        // Tries until the deadline, none after it.
        assert_eq!(calls, 100);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
