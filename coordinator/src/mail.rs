//! Mail delivery: the `[mail]` config, the SMTP client (lettre, rustls on
//! aws-lc-rs), the loop that delivers the outbox, and the loop that warns
//! of certificates the nodes serve that are about to expire.
//!
//! Flows never talk SMTP: they hand a mail to the fleet's
//! `notify::Notifier`, which writes it to the outbox in the state database
//! first. [`deliver_until`] sends from there with a backoff
//! ([`backoff`]), so a mail waits out an SMTP outage and a coordinator
//! restart.
//!
//! Delivery is at least once. A mail is marked sent right after the SMTP
//! server accepted it (its `250` to the end of DATA). If the coordinator
//! dies between that reply and the mark, the mail is sent again at the
//! next start, with the same `Message-ID` (chosen when it was queued), so
//! the copy is recognisably the same message. A restart with the mail
//! still waiting (SMTP was down) sends it exactly once.
//!
//! `smtp+starttls://` requires STARTTLS: a server that does not offer it
//! gets no mail, and the error stays on the queued mail for
//! `certfleet outbox` to show.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::clock;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::db::{Db, OutboxMail};
use crate::error::ErrorKind;
use crate::fleet::Fleet;

/// Default of `mail.expiry_warning_days`: a node serving a certificate
/// with fewer days left than this is reported.
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 14;
/// Default of `mail.expiry_check_secs`: how often the nodes are probed
/// for what they serve.
pub const DEFAULT_EXPIRY_CHECK: Duration = Duration::from_secs(6 * 3600);
/// Waits between attempts to send one mail: the n-th failure waits the
/// n-th entry, and every later one the last (the cap).
pub const BACKOFF: [Duration; 6] = [
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(3600),
];
/// How long one SMTP conversation may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Mail sent per pass of the delivery loop before it looks again.
const BATCH: usize = 50;
/// The delivery loop looks at the outbox at least this often, even when
/// nothing woke it.
const IDLE: Duration = Duration::from_secs(60);
/// Sent mail `certfleet outbox` lists besides the waiting ones.
pub const LISTED_SENT: usize = 50;

/// How long to wait after a mail's `failures`-th failed attempt.
pub fn backoff(failures: u32) -> Duration {
    let at = (failures.max(1) as usize - 1).min(BACKOFF.len() - 1);
    BACKOFF[at]
}

/// `[mail]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMail {
    smtp: String,
    from: String,
    #[serde(default)]
    admins: Vec<String>,
    cluster: Option<String>,
    credentials_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    expiry_warning_days: Option<u32>,
    expiry_check_secs: Option<u64>,
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// `smtp://`: plain SMTP (a relay on the host or a trusted network).
    Plain,
    /// `smtp+starttls://`: plain, then STARTTLS, which is required.
    StartTls,
    /// `smtps://`: TLS from the first byte.
    Tls,
}

/// Where mail is handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpServer {
    pub security: Security,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for SmtpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.security {
            Security::Plain => "smtp",
            Security::StartTls => "smtp+starttls",
            Security::Tls => "smtps",
        };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl SmtpServer {
    /// `smtp://host[:25]`, `smtp+starttls://host[:587]`, `smtps://host[:465]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("{url:?} is not smtp://, smtp+starttls:// or smtps://HOST[:PORT]")
        })?;
        let (security, default_port) = match scheme {
            "smtp" => (Security::Plain, 25),
            "smtp+starttls" => (Security::StartTls, 587),
            "smtps" => (Security::Tls, 465),
            other => {
                return Err(format!(
                    "scheme {other:?} is not one of \"smtp\", \"smtp+starttls\", \"smtps\""
                ));
            }
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '@', '?']) {
            return Err(format!(
                "{url:?}: give only HOST[:PORT] (credentials go in mail.credentials_file)"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!("{url:?}: port {p:?} is not a number from 1 to 65535")
                })?;
                (h, port)
            }
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        Ok(Self {
            security,
            host: host.to_owned(),
            port,
        })
    }
}

/// `[mail]`, validated.
#[derive(Debug, Clone)]
pub struct MailConfig {
    pub server: SmtpServer,
    /// The `From:` address.
    pub from: String,
    /// Who gets every mail.
    pub admins: Vec<String>,
    /// The cluster's name in every subject and body; `None`: the
    /// enrollment address agents dial (`enrollment.advertise`).
    pub cluster: Option<String>,
    /// A file holding `user = "…"` and `password = "…"` for SMTP AUTH,
    /// readable by its owner only.
    pub credentials_file: Option<PathBuf>,
    /// PEM roots the SMTP server's certificate must chain to, instead of
    /// the system's (a private mail CA).
    pub ca_file: Option<PathBuf>,
    pub expiry_warning_days: u32,
    pub expiry_check: Duration,
}

/// Checks `[mail]`; `invalid` names the config file.
pub(crate) fn validate(
    raw: RawMail,
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<MailConfig, ConfigError> {
    let server = SmtpServer::parse(&raw.smtp).map_err(|e| invalid("mail.smtp".into(), e))?;
    let address = |key: String, value: &str| {
        value
            .parse::<Mailbox>()
            .map(|_| ())
            .map_err(|e| invalid(key, format!("{value:?} is not a mail address: {e}")))
    };
    address("mail.from".into(), &raw.from)?;
    for (i, a) in raw.admins.iter().enumerate() {
        address(format!("mail.admins[{i}]"), a)?;
    }
    if let Some(c) = &raw.cluster
        && (c.trim().is_empty() || c.chars().any(char::is_control))
    {
        return Err(invalid(
            "mail.cluster".into(),
            format!("{c:?} must be a non-empty line of text"),
        ));
    }
    for (key, path) in [
        ("mail.credentials_file", &raw.credentials_file),
        ("mail.ca_file", &raw.ca_file),
    ] {
        if let Some(p) = path
            && !p.is_absolute()
        {
            return Err(invalid(
                key.into(),
                format!("{} must be an absolute path", p.display()),
            ));
        }
    }
    let days = raw
        .expiry_warning_days
        .unwrap_or(DEFAULT_EXPIRY_WARNING_DAYS);
    if !(1..=36_500).contains(&days) {
        return Err(invalid(
            "mail.expiry_warning_days".into(),
            format!("{days} must be between 1 and 36500"),
        ));
    }
    let expiry_check = match raw.expiry_check_secs {
        None => DEFAULT_EXPIRY_CHECK,
        Some(s) if (1..=7 * 24 * 3600).contains(&s) => Duration::from_secs(s),
        Some(s) => {
            return Err(invalid(
                "mail.expiry_check_secs".into(),
                format!("{s} must be between 1 and 604800 (a week)"),
            ));
        }
    };
    Ok(MailConfig {
        server,
        from: raw.from,
        admins: raw.admins,
        cluster: raw.cluster,
        credentials_file: raw.credentials_file,
        ca_file: raw.ca_file,
        expiry_warning_days: days,
        expiry_check,
    })
}

/// Why mail cannot be sent with the config as it is.
#[derive(Debug, thiserror::Error)]
pub enum MailSetupError {
    #[error(
        "SMTP credentials {path} are readable by group or others (mode {mode:04o}); run `chmod 600 {path}`",
        path = .path.display()
    )]
    CredentialsReadable { path: PathBuf, mode: u32 },
    #[error("SMTP credentials {path}: {reason}", path = .path.display())]
    Credentials { path: PathBuf, reason: String },
    #[error("mail.ca_file {path}: {reason}", path = .path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("mail.from {0:?} is not a mail address")]
    From(String),
    #[error("TLS for {server}: {reason}")]
    Tls { server: String, reason: String },
}

impl MailSetupError {
    /// Every one is the admin's to fix in the config or on disk.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Config
    }
}

/// `user` and `password` for SMTP AUTH. Never shown by `Debug`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SmtpCredentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for SmtpCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Reads the credentials file, refusing one that others may read.
fn read_credentials(path: &Path) -> Result<SmtpCredentials, MailSetupError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |reason: String| MailSetupError::Credentials {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(MailSetupError::CredentialsReadable {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    // toml's error quotes the offending line, which may hold the password.
    toml::from_str(&text)
        .map_err(|_| fail("must hold exactly `user = \"…\"` and `password = \"…\"` (TOML)".into()))
}

impl MailConfig {
    /// Checks what the config points at (credentials, CA), as the
    /// coordinator loads its config: a readable credentials file is
    /// refused before anything starts.
    pub fn check_files(&self) -> Result<(), MailSetupError> {
        if let Some(path) = &self.credentials_file {
            read_credentials(path)?;
        }
        self.tls_parameters().map(|_| ())
    }

    fn tls_parameters(&self) -> Result<Option<TlsParameters>, MailSetupError> {
        if self.server.security == Security::Plain {
            return Ok(None);
        }
        let mut builder = TlsParameters::builder(self.server.host.clone());
        if let Some(path) = &self.ca_file {
            let ca = |reason: String| MailSetupError::Ca {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca(e.to_string()))?;
            let root = Certificate::from_pem(&pem).map_err(|e| ca(e.to_string()))?;
            builder = builder
                .certificate_store(CertificateStore::None)
                .add_root_certificate(root);
        }
        builder
            .build_rustls()
            .map(Some)
            .map_err(|e| MailSetupError::Tls {
                server: self.server.to_string(),
                reason: chain(&e),
            })
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// The SMTP client.
#[derive(Clone)]
pub struct Sender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    server: SmtpServer,
}

impl Sender {
    pub fn new(config: &MailConfig) -> Result<Self, MailSetupError> {
        let tls = match (config.server.security, config.tls_parameters()?) {
            (Security::StartTls, Some(p)) => Tls::Required(p),
            (Security::Tls, Some(p)) => Tls::Wrapper(p),
            _ => Tls::None,
        };
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.server.host.clone())
                .port(config.server.port)
                .tls(tls)
                .timeout(Some(SMTP_TIMEOUT));
        if let Some(path) = &config.credentials_file {
            let c = read_credentials(path)?;
            builder = builder.credentials(Credentials::new(c.user, c.password));
        }
        Ok(Self {
            transport: builder.build(),
            from: config
                .from
                .parse()
                .map_err(|_| MailSetupError::From(config.from.clone()))?,
            server: config.server.clone(),
        })
    }

    /// Sends `mail` as queued: plain text with an HTML alternative, with
    /// the `Message-ID` and date it was queued with.
    pub async fn send(&self, mail: &OutboxMail) -> Result<(), String> {
        let message = self.message(mail)?;
        self.transport.send(message).await.map(|_| ()).map_err(|e| {
            let mut why = format!("{}: {}", self.server, chain(&e));
            if self.server.security == Security::StartTls && why.contains("STARTTLS") {
                why.push_str(
                    " (mail.smtp asks for STARTTLS, so nothing is sent in the clear; \
                     enable STARTTLS on the server, or use smtps://)",
                );
            }
            why
        })
    }

    fn message(&self, mail: &OutboxMail) -> Result<Message, String> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(mail.subject.clone())
            .message_id(Some(mail.message_id.clone()))
            .date(std::time::UNIX_EPOCH + Duration::from_secs(mail.created.max(0) as u64));
        for to in &mail.recipients {
            let to: Mailbox = to
                .parse()
                .map_err(|e| format!("recipient {to:?} is not a mail address: {e}"))?;
            builder = builder.to(to);
        }
        builder
            .multipart(MultiPart::alternative_plain_html(
                mail.text.clone(),
                mail.html.clone(),
            ))
            .map_err(|e| format!("building the message: {e}"))
    }
}

/// Delivers the outbox until `stop`: every waiting mail at once at start
/// (a restart is often a fixed mail setup), then each as it falls due or
/// as soon as one is queued (`wake`).
pub async fn deliver_until(
    db: Arc<Db>,
    sender: Sender,
    wake: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut first = true;
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let pass = deliver_due(&db, &sender, (!first).then(clock::now));
        first = false;
        tokio::select! {
            () = pass => {}
            () = stop.cancelled() => return,
        }
        let wait = match db.next_mail_due() {
            Ok(Some(at)) => {
                Duration::from_secs((at - clock::now()).clamp(0, IDLE.as_secs() as i64) as u64)
            }
            Ok(None) => IDLE,
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox");
                IDLE
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
            () = woken => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Sends the mail due at `now` (all waiting, if `None`), one at a time.
async fn deliver_due(db: &Db, sender: &Sender, now: Option<i64>) {
    let due = match db.due_mail(now, BATCH) {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "reading the outbox");
            return;
        }
    };
    for mail in due {
        let span = tracing::info_span!("mail", id = mail.id, certificate = %mail.certificate);
        let _enter = span.enter();
        // The mark follows the server's acceptance directly: the window in
        // which a crash sends a mail twice is one SQLite write long.
        let result = sender.send(&mail).await;
        let now = clock::now();
        let recorded = match &result {
            Ok(()) => {
                tracing::info!(subject = %mail.subject, "mail sent");
                db.mail_sent(mail.id, now)
            }
            Err(why) => {
                let wait = backoff(mail.attempts + 1);
                tracing::warn!(error = %why, retry_in = ?wait, "mail not sent");
                db.mail_failed(mail.id, why, now + wait.as_secs() as i64)
            }
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "recording the outcome of a mail in the outbox");
        }
    }
}

/// Probes what every node serves every `every`, and warns of what
/// expires within `days` (`notify::expiring`), until `stop`.
pub async fn warn_expiry_until(
    fleet: Arc<Fleet>,
    every: Duration,
    days: u32,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = check_expiry(&fleet, days) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One node serving a leaf, with that leaf's notAfter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub node: String,
    /// The endpoints ("service address") serving it.
    pub endpoints: Vec<String>,
    pub leaf_sha256: String,
    pub version: Option<u32>,
    pub not_after: i64,
}

/// Every certificate with a live version: what its nodes serve, and a
/// warning for each leaf that expires within `days`.
async fn check_expiry(fleet: &Fleet, days: u32) {
    let names: Vec<String> = fleet
        .config()
        .certificates
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for name in names {
        if !matches!(fleet.live(&name), Ok(Some(_))) {
            continue;
        }
        let status = match crate::status::status(fleet, &name).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(certificate = %name, error = %e, "expiry check: probing the nodes");
                continue;
            }
        };
        let serving = served(fleet, &name, &status);
        let limit = clock::now() + i64::from(days) * 86_400;
        let expiring: Vec<Serving> = serving
            .into_iter()
            .filter(|s| s.not_after < limit)
            .collect();
        crate::notify::expiring(fleet, &name, days, &expiring);
    }
}

/// Each node's served leaves, each with the endpoints serving it and its
/// notAfter (`FleetStatus::served_leaves`).
fn served(fleet: &Fleet, name: &str, status: &crate::status::FleetStatus) -> Vec<Serving> {
    let mut out: Vec<Serving> = Vec::new();
    for leaf in status.served_leaves(fleet, name) {
        let where_ = format!("{} {}", leaf.endpoint.service, leaf.endpoint.address);
        match out
            .iter_mut()
            .find(|s| s.node == leaf.node && s.leaf_sha256 == leaf.leaf_sha256)
        {
            Some(s) => s.endpoints.push(where_),
            None => out.push(Serving {
                node: leaf.node.to_owned(),
                endpoints: vec![where_],
                leaf_sha256: leaf.leaf_sha256.to_owned(),
                version: Some(leaf.version),
                not_after: leaf.not_after,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_stays_at_the_cap() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [30, 60, 300, 900, 1800, 3600, 3600, 3600]);
        assert_eq!(backoff(0), BACKOFF[0]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn smtp_urls_say_how_the_connection_is_protected() {
        let p = |u: &str| SmtpServer::parse(u);
        assert_eq!(
            p("smtp+starttls://mail.example.org").unwrap(),
            SmtpServer {
                security: Security::StartTls,
                host: "mail.example.org".into(),
                port: 587
            }
        );
        assert_eq!(p("smtps://127.0.0.1:2465").unwrap().port, 2465);
        assert_eq!(p("smtp://[::1]:25").unwrap().host, "::1");
        assert_eq!(p("smtp://relay").unwrap().security, Security::Plain);
        assert!(
            p("smtp://u:pw@relay")
                .unwrap_err()
                .contains("credentials_file")
        );
        assert!(p("imap://relay").unwrap_err().contains("\"imap\""));
        assert!(p("smtps://relay:0").unwrap_err().contains("port"));
        assert!(p("relay:25").is_err());
    }

    #[test]
    fn readable_credentials_are_refused_naming_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smtp.credentials");
        std::fs::write(&path, "user = \"certfleet\"\npassword = \"hunter2\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_credentials(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "SMTP credentials {p} are readable by group or others (mode 0640); run `chmod 600 {p}`",
                p = path.display()
            )
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = read_credentials(&path).unwrap();
        assert_eq!(c.user, "certfleet");
        assert!(!format!("{c:?}").contains("hunter2"));
        std::fs::write(&path, "password = \"hunter2\"\n").unwrap();
        let err = read_credentials(&path).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
