//! The coordinator's config file (`coordinator.toml`).
//!
//! Two stages, so nothing happens on a half-checked config: the raw structs
//! mirror the TOML and reject unknown keys, then [`Config::from_toml_str`]
//! checks every value (addresses, names, references between sections) and
//! says which key is wrong and why.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::Deserialize;

/// Port the CA fetches HTTP-01 responses from (RFC 8555 §8.3).
pub const DEFAULT_VALIDATION_PORT: u16 = 80;
/// Default of `acme.validation_tls_port`: where Let's Encrypt follows an
/// HTTP-to-HTTPS redirect.
pub const DEFAULT_VALIDATION_TLS_PORT: u16 = 443;
/// Nodes placed to, and self-checked, at once.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// How long one node may take to place, self-check or remove tokens.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(10);
/// See [`PlacementConfig::idle_connection`].
pub const DEFAULT_IDLE_CONNECTION: Duration = Duration::from_secs(60);
/// How long placed tokens live on a node if the coordinator never removes them.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// How long to wait for the CA to validate, and then to issue.
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(120);
/// Let's Encrypt's limit of names per certificate.
pub const MAX_SANS: usize = 100;
/// The largest cluster certfleet is built for.
pub const MAX_NODES: usize = 500;
/// Port the enrollment service listens on by default.
pub const DEFAULT_ENROLLMENT_PORT: u16 = 7444;
/// Node certificates are short-lived: a removed node's certificate dies soon.
pub const DEFAULT_AGENT_CERT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// A join token is for joining now, not for keeping.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Failed join attempts one source address may make within
/// [`DEFAULT_FAILED_JOIN_WINDOW`] before its attempts are refused: enough
/// for an admin's typos, too few to matter for a guesser.
pub const DEFAULT_FAILED_JOIN_LIMIT: u32 = 5;
/// How long a source's failed join attempts count against it.
pub const DEFAULT_FAILED_JOIN_WINDOW: Duration = Duration::from_secs(60);
/// The most failed join attempts `enrollment.failed_joins.limit` may allow.
const MAX_FAILED_JOIN_LIMIT: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("config {origin}: key `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
    #[error(
        "config {path} holds a secret (`{key}`) and is readable by every user (mode {mode:04o}); run `chmod o-rwx {path}`"
    )]
    WorldReadableSecret {
        path: PathBuf,
        key: &'static str,
        mode: u32,
    },
}

impl ConfigError {
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Config
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    acme: RawAcme,
    #[serde(default)]
    placement: RawPlacement,
    #[serde(default)]
    enrollment: RawEnrollment,
    #[serde(default)]
    renewal: RawRenewal,
    #[serde(default)]
    recovery: RecoveryConfig,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
    #[serde(default)]
    approval: crate::approval::RawApprovalConfig,
    web: Option<crate::web::RawWebConfig>,
    mail: Option<crate::mail::RawMail>,
    ssh: Option<crate::ssh::RawSsh>,
    metrics: Option<crate::metrics::RawMetricsConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRenewal {
    enabled: Option<bool>,
    share_left: Option<f64>,
    max_jitter_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    directory: String,
    #[serde(default)]
    contact: Vec<String>,
    validation_port: Option<u16>,
    validation_tls_port: Option<u16>,
    #[serde(default)]
    agree_tos: bool,
    #[serde(default)]
    extra_roots: Vec<PathBuf>,
    ca_timeout_secs: Option<u64>,
    external_account: Option<RawExternalAccount>,
    staging_directory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExternalAccount {
    key_id: String,
    hmac_key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    concurrency: Option<usize>,
    node_timeout_secs: Option<u64>,
    token_ttl_secs: Option<u64>,
    idle_connection_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrollment {
    listen: Option<String>,
    advertise: Option<String>,
    agent_cert_validity_secs: Option<u64>,
    coordinator_cert_validity_secs: Option<u64>,
    join_token_ttl_secs: Option<u64>,
    #[serde(default)]
    failed_joins: RawFailedJoins,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailedJoins {
    limit: Option<u32>,
    window_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    name: String,
    sans: Vec<String>,
    nodes: Option<Vec<String>>,
    key: Option<String>,
    restart_batch: Option<usize>,
    after_issue: Option<String>,
    approval: Option<String>,
    #[serde(default)]
    mail: Vec<String>,
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where accounts, certificates and records live.
    pub state_dir: PathBuf,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    pub acme: AcmeConfig,
    pub placement: PlacementConfig,
    pub enrollment: EnrollmentConfig,
    pub renewal: RenewalConfig,
    /// What a coordinator that was stopped mid-operation does at its next start.
    pub recovery: RecoveryConfig,
    pub certificates: Vec<CertificateSpec>,
    /// `[approval]`: how long approval requests wait (`crate::approval`).
    pub approval: crate::approval::ApprovalConfig,
    /// `[web]`: the one-click approval page; `None`: no page, and approval
    /// mails carry no link.
    pub web: Option<crate::web::WebConfig>,
    /// `[mail]`: where mail to the administrators goes; `None`: none is sent.
    pub mail: Option<crate::mail::MailConfig>,
    /// `[ssh]`: how nodes without a reachable agent are reached.
    pub ssh: crate::ssh::SshConfig,
    /// `[metrics]`: the Prometheus endpoint; `None`: not served.
    pub metrics: Option<crate::metrics::MetricsConfig>,
}

/// The running config, shared by everything that reads it as it goes (the
/// fleet, the notifier) and replaced whole by a reload: a reader takes a
/// snapshot ([`Running::get`]) and keeps it for as long as it needs one
/// consistent config.
#[derive(Debug, Clone)]
pub struct Running(Arc<RwLock<Arc<Config>>>);

impl Running {
    pub fn new(config: Arc<Config>) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }

    /// The config in force now.
    pub fn get(&self) -> Arc<Config> {
        // Only ever replaced whole: a panic elsewhere cannot leave it torn.
        let config = self.0.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&config)
    }

    /// Replaces the config with what `next` makes of the one in force,
    /// if anything (no reader sees a change between the two).
    pub fn update<T>(&self, next: impl FnOnce(&Config) -> (Option<Config>, T)) -> T {
        let mut config = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let (new, out) = next(&config);
        if let Some(new) = new {
            *config = Arc::new(new);
        }
        out
    }
}

/// Where nodes join and renew their identities.
#[derive(Debug, Clone)]
pub struct EnrollmentConfig {
    /// The TCP address the enrollment service listens on.
    pub listen: SocketAddr,
    /// The `host:port` agents dial, printed in join commands.
    pub advertise: String,
    /// How long a node certificate is valid.
    pub agent_cert_validity: Duration,
    /// How long the coordinator's own certificate is valid; it is renewed
    /// in the background at two thirds of that.
    pub coordinator_cert_validity: Duration,
    /// How long a join token is valid unless `node add` says otherwise.
    pub join_token_ttl: Duration,
    /// `[enrollment.failed_joins]`: when a source address's join attempts
    /// are refused for failing too often.
    pub failed_joins: FailedJoinsConfig,
}

/// After `limit` failed join attempts from one source address within
/// `window` of its first, the coordinator refuses that source's join
/// attempts (without looking at them) until the window has passed, and
/// logs the window's attempts as one summary line rather than one each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedJoinsConfig {
    pub limit: u32,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The CA's ACME directory URL.
    pub directory: String,
    /// `mailto:` contacts for the account.
    pub contact: Vec<String>,
    /// The port the CA fetches HTTP-01 from, and so the port self-checked.
    pub validation_port: u16,
    /// The HTTPS port a redirect from HTTP-01 may lead the CA to (443; a
    /// test CA's `tlsPort`); the self-check follows redirects there too.
    pub validation_tls_port: u16,
    /// The operator has read and accepts the CA's terms of service; no
    /// account is created without it.
    pub agree_tos: bool,
    /// PEM files of extra roots to trust for the CA's API (e.g. Pebble's).
    pub extra_roots: Vec<PathBuf>,
    /// How long to wait for validation, and then for issuance.
    pub ca_timeout: Duration,
    /// External account binding (RFC 8555 §7.3.4), for CAs that require
    /// one (ZeroSSL, Google Trust Services, ...).
    pub external_account: Option<ExternalAccount>,
    /// A staging CA's ACME directory URL, which `--dry-run` orders run
    /// against with their own account (never the production account: a
    /// dry run must not count towards the production CA's limits). `None`:
    /// dry runs are refused, naming this key.
    pub staging_directory: Option<String>,
}

/// An external account binding: the CA's key id and MAC key.
#[derive(Clone)]
pub struct ExternalAccount {
    pub key_id: String,
    /// The decoded HMAC key. Secret: never shown by `Debug`.
    pub hmac_key: Vec<u8>,
}

impl std::fmt::Debug for ExternalAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalAccount")
            .field("key_id", &self.key_id)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct PlacementConfig {
    pub concurrency: usize,
    pub node_timeout: Duration,
    pub token_ttl: Duration,
    /// A connection to a node that nothing has used for this long is
    /// closed, and opened again when next needed.
    pub idle_connection: Duration,
}

/// A node of the cluster, as registered by `certfleet node add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The agent's gRPC address.
    pub agent: SocketAddr,
    /// The address the CA's HTTP-01 fetch reaches this node on (port:
    /// `acme.validation_port`). Self-checks go here directly, bypassing DNS.
    pub http01: IpAddr,
    /// Through its agent, over SSH, or both (`crate::ssh`).
    pub transport: crate::ssh::NodeTransport,
    /// Where its sshd is, for `ssh` and `auto`.
    pub ssh: Option<crate::ssh::SshDestination>,
}

/// The key a certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

/// `[renewal]`: the coordinator renews certificates by itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalConfig {
    /// Off only for a coordinator driven by hand (or by another scheduler).
    pub enabled: bool,
    /// When to renew, see [`crate::renewal::Policy`].
    pub policy: crate::renewal::Policy,
}

/// `[recovery]`: how a rollout cut off by a crash is healed at the next
/// start (`crate::recovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryConfig {
    #[serde(default)]
    pub rollout: RolloutRecovery,
}

/// `recovery.rollout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutRecovery {
    /// Restart the nodes the rollout had not yet verified, so that every
    /// node serves the live version.
    #[default]
    Resume,
    /// Put every node the rollout had touched back on the version it had,
    /// so that every node serves the previous version.
    Rollback,
}

/// What a renewal does after the new version is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterIssue {
    /// Nothing: an admin distributes and restarts.
    None,
    /// Put it on every node; services keep the old one until restarted.
    Distribute,
    /// Distribute, then restart node by node, proving each serves it.
    #[default]
    Rollout,
}

/// One certificate the cluster serves.
#[derive(Debug, Clone)]
pub struct CertificateSpec {
    /// Its name: the directory under `archive/` and `live/`.
    pub name: String,
    /// Every DNS name it covers; the shared name first by convention.
    pub sans: Vec<String>,
    /// The nodes that serve its names, in this order; `None`: every
    /// active registered node. Checked against the registry at issue time.
    pub nodes: Option<Vec<String>>,
    pub key: KeyType,
    /// Nodes restarted at once during a rollout (1: strictly one by one).
    pub restart_batch: usize,
    /// What an automatic renewal does once the new version is stored.
    pub after_issue: AfterIssue,
    /// Which step of a new version waits for a person (`crate::approval`).
    pub approval: crate::approval::Policy,
    /// Who gets this certificate's mail besides `mail.admins`.
    pub mail: Vec<String>,
}

impl Config {
    /// Where a certificate the store could not take is kept: beside the
    /// admin socket (`/run/certfleet/rescued` by default), which is on
    /// another file system than the state directory on a usual install.
    pub fn rescue_dir(&self) -> PathBuf {
        self.admin_socket
            .parent()
            .unwrap_or(Path::new("/run/certfleet"))
            .join("rescued")
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let config = Self::from_toml_str(&text, &path.display().to_string())?;
        if let Some(key) = config.secret_key() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(read_err)?
                .permissions()
                .mode()
                & 0o7777;
            if mode & 0o007 != 0 {
                return Err(ConfigError::WorldReadableSecret {
                    path: path.to_owned(),
                    key,
                    mode,
                });
            }
        }
        if let Some(mail) = &config.mail {
            mail.check_files().map_err(|e| ConfigError::Invalid {
                origin: path.display().to_string(),
                key: "mail".into(),
                reason: e.to_string(),
            })?;
        }
        Ok(config)
    }

    /// The first key of this config that holds a secret, if any.
    fn secret_key(&self) -> Option<&'static str> {
        self.acme
            .external_account
            .as_ref()
            .map(|_| "acme.external_account.hmac_key")
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        validate(raw, origin)
    }

    pub fn certificate(&self, name: &str) -> Option<&CertificateSpec> {
        self.certificates.iter().find(|c| c.name == name)
    }
}

/// A DNS name as an ACME identifier: LDH labels, no wildcard (HTTP-01
/// cannot validate wildcards, RFC 8555 §8.3), at most 253 characters.
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.starts_with("*.") {
        return Err("wildcards cannot be validated over HTTP-01".into());
    }
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(format!("label {label:?} is not a valid DNS label"));
        }
    }
    Ok(())
}

/// Builds a [`ConfigError::Invalid`] for `key`, naming the file.
type Invalid<'a> = &'a dyn Fn(String, String) -> ConfigError;

fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
    let invalid = |key: String, reason: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        key,
        reason,
    };
    let state_dir = absolute(raw.state_dir, "/var/lib/certfleet", "state_dir", &invalid)?;
    let admin_socket = absolute(
        raw.admin_socket,
        "/run/certfleet/admin.sock",
        "admin_socket",
        &invalid,
    )?;
    let ssh = crate::ssh::validate_config(raw.ssh, &state_dir, Some(Path::new(origin)))
        .map_err(|(k, r)| invalid(k, r))?;
    Ok(Config {
        ssh,
        state_dir,
        admin_socket,
        acme: validate_acme(raw.acme, &invalid)?,
        placement: validate_placement(raw.placement, &invalid)?,
        enrollment: validate_enrollment(raw.enrollment, &invalid)?,
        renewal: validate_renewal(raw.renewal, &invalid)?,
        recovery: raw.recovery,
        certificates: validate_certificates(raw.certificates, &invalid)?,
        approval: crate::approval::validate_config(raw.approval).map_err(|(k, r)| invalid(k, r))?,
        web: raw
            .web
            .map(crate::web::validate_config)
            .transpose()
            .map_err(|(k, r)| invalid(k, r))?,
        mail: raw
            .mail
            .map(|m| crate::mail::validate(m, &invalid))
            .transpose()?,
        metrics: raw
            .metrics
            .map(crate::metrics::validate_config)
            .transpose()
            .map_err(|(k, r)| invalid(k, r))?,
    })
}

/// `[renewal]`.
fn validate_renewal(raw: RawRenewal, invalid: Invalid<'_>) -> Result<RenewalConfig, ConfigError> {
    let share_left = raw.share_left.unwrap_or(crate::renewal::DEFAULT_SHARE_LEFT);
    if !(share_left > 0.0 && share_left < 1.0) {
        return Err(invalid(
            "renewal.share_left".into(),
            format!("{share_left} must be between 0 and 1 (a third, 0.333, by default)"),
        ));
    }
    let max_jitter = match raw.max_jitter_secs {
        None => crate::renewal::MAX_JITTER,
        Some(s) if s <= crate::renewal::MAX_JITTER.as_secs() => Duration::from_secs(s),
        Some(s) => {
            return Err(invalid(
                "renewal.max_jitter_secs".into(),
                format!(
                    "{s} must be at most {}",
                    crate::renewal::MAX_JITTER.as_secs()
                ),
            ));
        }
    };
    Ok(RenewalConfig {
        enabled: raw.enabled.unwrap_or(true),
        policy: crate::renewal::Policy {
            share_left,
            max_jitter,
        },
    })
}

/// `value`, or `default`; either way an absolute path.
fn absolute(
    value: Option<PathBuf>,
    default: &str,
    key: &str,
    invalid: Invalid<'_>,
) -> Result<PathBuf, ConfigError> {
    let path = value.unwrap_or_else(|| PathBuf::from(default));
    if !path.is_absolute() {
        return Err(invalid(
            key.into(),
            format!("{} must be an absolute path", path.display()),
        ));
    }
    Ok(path)
}

/// `[acme]`.
fn validate_acme(raw: RawAcme, invalid: Invalid<'_>) -> Result<AcmeConfig, ConfigError> {
    let directory = raw.directory;
    if !directory.starts_with("https://") {
        return Err(invalid(
            "acme.directory".into(),
            format!("{directory:?} must be an https:// URL"),
        ));
    }
    for (i, c) in raw.contact.iter().enumerate() {
        if !c.starts_with("mailto:") || c.len() <= "mailto:".len() {
            return Err(invalid(
                format!("acme.contact[{i}]"),
                format!("{c:?} must be a mailto: URL"),
            ));
        }
    }
    let port = |value: Option<u16>, default: u16, key: &str| match value.unwrap_or(default) {
        0 => Err(invalid(key.into(), "0 is not a port".into())),
        port => Ok(port),
    };
    let validation_port = port(
        raw.validation_port,
        DEFAULT_VALIDATION_PORT,
        "acme.validation_port",
    )?;
    let validation_tls_port = port(
        raw.validation_tls_port,
        DEFAULT_VALIDATION_TLS_PORT,
        "acme.validation_tls_port",
    )?;
    for (i, root) in raw.extra_roots.iter().enumerate() {
        if !root.is_absolute() {
            return Err(invalid(
                format!("acme.extra_roots[{i}]"),
                format!("{} must be an absolute path", root.display()),
            ));
        }
    }
    let external_account = match raw.external_account {
        None => None,
        Some(eab) => Some(validate_external_account(eab, invalid)?),
    };
    if let Some(staging) = &raw.staging_directory
        && !staging.starts_with("https://")
    {
        return Err(invalid(
            "acme.staging_directory".into(),
            format!("{staging:?} must be an https:// URL"),
        ));
    }
    Ok(AcmeConfig {
        directory,
        contact: raw.contact,
        validation_port,
        validation_tls_port,
        agree_tos: raw.agree_tos,
        extra_roots: raw.extra_roots,
        ca_timeout: secs(
            raw.ca_timeout_secs,
            DEFAULT_CA_TIMEOUT,
            1..=3600,
            "acme.ca_timeout_secs",
            invalid,
        )?,
        external_account,
        staging_directory: raw.staging_directory,
    })
}

/// `[acme.external_account]`. The MAC key is a secret: no message shows it.
fn validate_external_account(
    raw: RawExternalAccount,
    invalid: Invalid<'_>,
) -> Result<ExternalAccount, ConfigError> {
    use base64::Engine;
    if raw.key_id.is_empty() {
        return Err(invalid(
            "acme.external_account.key_id".into(),
            "must not be empty".into(),
        ));
    }
    let hmac_key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.hmac_key.trim_end_matches('='))
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            invalid(
                "acme.external_account.hmac_key".into(),
                "must be the base64url MAC key the CA gave (the value is not shown)".into(),
            )
        })?;
    Ok(ExternalAccount {
        key_id: raw.key_id,
        hmac_key,
    })
}

/// `[placement]`.
fn validate_placement(
    raw: RawPlacement,
    invalid: Invalid<'_>,
) -> Result<PlacementConfig, ConfigError> {
    let concurrency = raw.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if !(1..=MAX_NODES).contains(&concurrency) {
        return Err(invalid(
            "placement.concurrency".into(),
            format!("{concurrency} must be between 1 and {MAX_NODES}"),
        ));
    }
    Ok(PlacementConfig {
        concurrency,
        node_timeout: secs(
            raw.node_timeout_secs,
            DEFAULT_NODE_TIMEOUT,
            1..=300,
            "placement.node_timeout_secs",
            invalid,
        )?,
        token_ttl: secs(
            raw.token_ttl_secs,
            DEFAULT_TOKEN_TTL,
            60..=86_400,
            "placement.token_ttl_secs",
            invalid,
        )?,
        idle_connection: secs(
            raw.idle_connection_secs,
            DEFAULT_IDLE_CONNECTION,
            1..=86_400,
            "placement.idle_connection_secs",
            invalid,
        )?,
    })
}

/// `[enrollment]` and `[enrollment.failed_joins]`.
fn validate_enrollment(
    raw: RawEnrollment,
    invalid: Invalid<'_>,
) -> Result<EnrollmentConfig, ConfigError> {
    let listen_text = raw
        .listen
        .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_ENROLLMENT_PORT}"));
    let listen: SocketAddr = listen_text.parse().map_err(|e| {
        invalid(
            "enrollment.listen".into(),
            format!(
                "{listen_text:?} is not an address like 0.0.0.0:{DEFAULT_ENROLLMENT_PORT}: {e}"
            ),
        )
    })?;
    let advertise = raw.advertise.unwrap_or_else(|| listen.to_string());
    if advertise
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err(invalid(
            "enrollment.advertise".into(),
            format!("{advertise:?} must be host:port, the address agents dial"),
        ));
    }
    Ok(EnrollmentConfig {
        listen,
        advertise,
        agent_cert_validity: secs(
            raw.agent_cert_validity_secs,
            DEFAULT_AGENT_CERT_VALIDITY,
            10..=90 * 24 * 3600,
            "enrollment.agent_cert_validity_secs",
            invalid,
        )?,
        coordinator_cert_validity: secs(
            raw.coordinator_cert_validity_secs,
            crate::pki::COORDINATOR_VALIDITY,
            10..=5 * 365 * 24 * 3600,
            "enrollment.coordinator_cert_validity_secs",
            invalid,
        )?,
        join_token_ttl: secs(
            raw.join_token_ttl_secs,
            DEFAULT_JOIN_TOKEN_TTL,
            1..=7 * 24 * 3600,
            "enrollment.join_token_ttl_secs",
            invalid,
        )?,
        failed_joins: validate_failed_joins(raw.failed_joins, invalid)?,
    })
}

/// `[enrollment.failed_joins]`.
fn validate_failed_joins(
    raw: RawFailedJoins,
    invalid: Invalid<'_>,
) -> Result<FailedJoinsConfig, ConfigError> {
    let limit = match raw.limit {
        None => DEFAULT_FAILED_JOIN_LIMIT,
        Some(limit) if (1..=MAX_FAILED_JOIN_LIMIT).contains(&limit) => limit,
        Some(limit) => {
            return Err(invalid(
                "enrollment.failed_joins.limit".into(),
                format!("{limit} must be between 1 and {MAX_FAILED_JOIN_LIMIT}"),
            ));
        }
    };
    Ok(FailedJoinsConfig {
        limit,
        window: secs(
            raw.window_secs,
            DEFAULT_FAILED_JOIN_WINDOW,
            1..=24 * 3600,
            "enrollment.failed_joins.window_secs",
            invalid,
        )?,
    })
}

/// `[[certificates]]`: each one's own checks, and no name twice.
fn validate_certificates(
    raw: Vec<RawCertificate>,
    invalid: Invalid<'_>,
) -> Result<Vec<CertificateSpec>, ConfigError> {
    let mut certificates = Vec::with_capacity(raw.len());
    let mut seen = HashSet::new();
    for (i, c) in raw.into_iter().enumerate() {
        certfleet_proto::names::check_certificate_name(&c.name)
            .map_err(|e| invalid(format!("certificates[{i}].name"), e))?;
        if !seen.insert(c.name.clone()) {
            return Err(invalid(
                format!("certificates[{i}].name"),
                format!("{:?} is defined twice", c.name),
            ));
        }
        certificates.push(validate_certificate(i, c, invalid)?);
    }
    Ok(certificates)
}

/// `certificates[i]`, whose name is checked.
fn validate_certificate(
    i: usize,
    c: RawCertificate,
    invalid: Invalid<'_>,
) -> Result<CertificateSpec, ConfigError> {
    let sans = validate_sans(i, &c.sans, invalid)?;
    if let Some(list) = &c.nodes {
        validate_nodes(i, list, invalid)?;
    }
    let key = match c.key.as_deref().unwrap_or("ecdsa-p256") {
        "ecdsa-p256" => KeyType::EcdsaP256,
        "rsa-2048" => KeyType::Rsa2048,
        "rsa-3072" => KeyType::Rsa3072,
        "rsa-4096" => KeyType::Rsa4096,
        other => {
            return Err(invalid(
                format!("certificates[{i}].key"),
                format!(
                    "{other:?} is not one of \"ecdsa-p256\", \"rsa-2048\", \"rsa-3072\", \"rsa-4096\""
                ),
            ));
        }
    };
    let restart_batch = c.restart_batch.unwrap_or(1);
    if !(1..=MAX_NODES).contains(&restart_batch) {
        return Err(invalid(
            format!("certificates[{i}].restart_batch"),
            format!("{restart_batch} must be between 1 and {MAX_NODES}"),
        ));
    }
    let after_issue = match c.after_issue.as_deref().unwrap_or("rollout") {
        "none" => AfterIssue::None,
        "distribute" => AfterIssue::Distribute,
        "rollout" => AfterIssue::Rollout,
        other => {
            return Err(invalid(
                format!("certificates[{i}].after_issue"),
                format!("{other:?} is not one of \"none\", \"distribute\", \"rollout\""),
            ));
        }
    };
    for (j, to) in c.mail.iter().enumerate() {
        if to.parse::<lettre::message::Mailbox>().is_err() {
            return Err(invalid(
                format!("certificates[{i}].mail[{j}]"),
                format!("{to:?} is not a mail address"),
            ));
        }
    }
    let approval = crate::approval::Policy::parse(c.approval.as_deref(), after_issue)
        .map_err(|reason| invalid(format!("certificates[{i}].approval"), reason))?;
    Ok(CertificateSpec {
        approval,
        name: c.name,
        sans,
        nodes: c.nodes,
        key,
        restart_batch,
        after_issue,
        mail: c.mail,
    })
}

/// `certificates[i].sans`, lower-cased: DNS names, each once.
fn validate_sans(
    i: usize,
    raw: &[String],
    invalid: Invalid<'_>,
) -> Result<Vec<String>, ConfigError> {
    if raw.is_empty() || raw.len() > MAX_SANS {
        return Err(invalid(
            format!("certificates[{i}].sans"),
            format!("has {} names; it must have 1 to {MAX_SANS}", raw.len()),
        ));
    }
    let mut sans = Vec::with_capacity(raw.len());
    for (j, san) in raw.iter().enumerate() {
        let san = san.to_ascii_lowercase();
        check_dns_name(&san).map_err(|reason| {
            invalid(
                format!("certificates[{i}].sans[{j}]"),
                format!("{san:?}: {reason}"),
            )
        })?;
        if sans.contains(&san) {
            return Err(invalid(
                format!("certificates[{i}].sans[{j}]"),
                format!("{san:?} is listed twice"),
            ));
        }
        sans.push(san);
    }
    Ok(sans)
}

/// `certificates[i].nodes`: node names, each once, and at least one.
fn validate_nodes(i: usize, list: &[String], invalid: Invalid<'_>) -> Result<(), ConfigError> {
    if list.is_empty() {
        return Err(invalid(
            format!("certificates[{i}].nodes"),
            "is empty; leave it out to mean every active node".into(),
        ));
    }
    for (j, n) in list.iter().enumerate() {
        certfleet_proto::names::check_node_name(n)
            .map_err(|e| invalid(format!("certificates[{i}].nodes[{j}]"), e))?;
        if list[..j].contains(n) {
            return Err(invalid(
                format!("certificates[{i}].nodes[{j}]"),
                format!("{n:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

fn secs(
    value: Option<u64>,
    default: Duration,
    range: std::ops::RangeInclusive<u64>,
    key: &str,
    invalid: Invalid<'_>,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if range.contains(&v) => Ok(Duration::from_secs(v)),
        Some(v) => Err(invalid(
            key.to_owned(),
            format!("{v} must be between {} and {}", range.start(), range.end()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
state_dir = "/var/lib/certfleet"
[acme]
directory = "https://localhost:14000/dir"
validation_port = 5002
[enrollment]
listen = "127.0.0.1:7444"
[[certificates]]
name = "cn"
sans = ["CN.example.org", "cn-ucsb-1.example.org"]
"#;

    fn err(text: &str) -> String {
        Config::from_toml_str(text, "coordinator.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_node_listed_twice_or_misnamed_is_named() {
        let e = err(&format!(
            "{GOOD}nodes = [\"cn-ucsb-1\", \"cn-unm-1\", \"cn-ucsb-1\"]\n"
        ));
        assert!(
            e.contains("certificates[0].nodes[2]") && e.contains("listed twice"),
            "{e}"
        );
        let e = err(&format!("{GOOD}nodes = [\"CN_UCSB\"]\n"));
        assert!(
            e.contains("certificates[0].nodes[0]") && e.contains("DNS label"),
            "{e}"
        );
    }

    #[test]
    fn the_validation_ports_and_terms_default_safely() {
        let c = Config::from_toml_str(GOOD, "c.toml").unwrap();
        assert_eq!(c.acme.validation_tls_port, DEFAULT_VALIDATION_TLS_PORT);
        assert!(!c.acme.agree_tos, "the terms are never accepted by default");
        let e = err(&GOOD.replace("validation_port = 5002", "validation_tls_port = 0"));
        assert!(e.contains("acme.validation_tls_port"), "{e}");
    }

    #[test]
    fn accepts_and_defaults() {
        let c = Config::from_toml_str(GOOD, "c.toml").unwrap();
        let cert = c.certificate("cn").unwrap();
        assert_eq!(cert.sans[0], "cn.example.org");
        assert_eq!(cert.nodes, None);
        assert_eq!(cert.key, KeyType::EcdsaP256);
        assert_eq!(c.enrollment.advertise, "127.0.0.1:7444");
        assert_eq!(
            c.enrollment.agent_cert_validity,
            DEFAULT_AGENT_CERT_VALIDITY
        );
        assert_eq!(
            c.enrollment.failed_joins,
            FailedJoinsConfig {
                limit: DEFAULT_FAILED_JOIN_LIMIT,
                window: DEFAULT_FAILED_JOIN_WINDOW
            }
        );
    }

    #[test]
    fn failed_joins_is_a_table_of_enrollment_and_checked() {
        // A sub-table may come after other tables, as the test harness
        // appends it.
        let text = format!("{GOOD}[enrollment.failed_joins]\nlimit = 3\nwindow_secs = 5\n");
        let c = Config::from_toml_str(&text, "c.toml").unwrap();
        assert_eq!(
            c.enrollment.failed_joins,
            FailedJoinsConfig {
                limit: 3,
                window: Duration::from_secs(5)
            }
        );
        let e = err(&format!("{GOOD}[enrollment.failed_joins]\nlimit = 0\n"));
        assert!(
            e.contains("enrollment.failed_joins.limit") && e.contains("between 1 and"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}[enrollment.failed_joins]\nwindow_secs = 0\n"
        ));
        assert!(e.contains("enrollment.failed_joins.window_secs"), "{e}");
        let e = err(&format!("{GOOD}[enrollment.failed_joins]\nlimt = 3\n"));
        assert!(e.contains("limt"), "{e}");
    }

    #[test]
    fn names_the_bad_key() {
        let e = err(&GOOD.replace("validation_port", "validaton_port"));
        assert!(
            e.contains("coordinator.toml") && e.contains("validaton_port"),
            "{e}"
        );
        let e = err(&format!("{GOOD}nodes = [\"No_pe\"]\n"));
        assert!(
            e.contains("certificates[0].nodes[0]") && e.contains("No_pe"),
            "{e}"
        );
        let e = err(&GOOD.replace("CN.example.org", "*.example.org"));
        assert!(
            e.contains("certificates[0].sans[0]") && e.contains("wildcard"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:7444", "127.0.0.1"));
        assert!(e.contains("enrollment.listen"), "{e}");
        let e = err(&GOOD.replace("https://localhost", "http://localhost"));
        assert!(e.contains("acme.directory"), "{e}");
        let staging = "validation_port = 5002\nstaging_directory = \"http://localhost:14001/dir\"";
        let e = err(&GOOD.replace("validation_port = 5002", staging));
        assert!(e.contains("acme.staging_directory"), "{e}");
        let e = err(&format!("{GOOD}key = \"dsa\"\n"));
        assert!(e.contains("certificates[0].key"), "{e}");
    }

    #[test]
    fn a_world_readable_config_with_a_secret_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        let text = GOOD.replace(
            "validation_port = 5002",
            "validation_port = 5002\n[acme.external_account]\nkey_id = \"kid-1\"\nhmac_key = \"c2VjcmV0LW1hYy1rZXk\"",
        );
        std::fs::write(&path, &text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("coordinator.toml")
                && err.contains("acme.external_account.hmac_key")
                && err.contains("0644"),
            "{err}"
        );
        assert!(
            !err.contains("c2VjcmV0"),
            "the error shows the secret: {err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let config = Config::load(&path).unwrap();
        let eab = config.acme.external_account.as_ref().unwrap();
        assert_eq!(eab.hmac_key, b"secret-mac-key");
        assert!(!format!("{config:?}").contains("secret-mac-key"));
        // Without a secret, a world-readable config is fine.
        std::fs::write(&path, GOOD).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load(&path).unwrap();
    }

    #[test]
    fn the_shipped_dataone_example_is_valid() {
        let text = include_str!("../../deploy/examples/dataone/coordinator.toml");
        let c = Config::from_toml_str(text, "deploy/examples/dataone/coordinator.toml").unwrap();
        assert_eq!(
            c.certificate("cn.dataone.org")
                .unwrap()
                .nodes
                .as_ref()
                .unwrap()
                .len(),
            4
        );
        assert_eq!(c.certificate("cn.dataone.org").unwrap().sans.len(), 5);
        assert_eq!(c.acme.validation_port, 80);
    }
}
