//! A real SMTP server on loopback: Debian's `python3-aiosmtpd` with its
//! Mailbox handler writing a maildir, in plain, STARTTLS and SMTPS modes
//! (TLS with a leaf from a test CA made per server), and the mail it
//! received, parsed by Python's own `email` package.
//!
//! It runs as `/usr/bin/python3`: another `python3` on PATH may not see
//! Debian's module.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::net::{free_port, wait_listening};
use crate::process::{Proc, eventually};

/// How the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain SMTP, no STARTTLS offered.
    Plain,
    /// STARTTLS offered, and required before MAIL.
    StartTls,
    /// TLS from the first byte.
    Smtps,
}

/// An aiosmtpd server, started and stopped at will on the same port and
/// maildir, so mail it received survives a restart.
pub struct Smtp {
    pub mode: Mode,
    pub port: u16,
    /// The maildir: messages land in `new/`.
    pub maildir: PathBuf,
    /// The test CA the server's certificate chains to (PEM).
    pub ca: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
}

/// One message as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The file it was in.
    pub path: PathBuf,
    /// Every header, in order, as (name, value).
    pub headers: Vec<(String, String)>,
    /// The message's `Content-Type` (`multipart/alternative`).
    pub content_type: String,
    /// The decoded `text/plain` part.
    pub text: String,
    /// The decoded `text/html` part.
    pub html: String,
}

impl Received {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn subject(&self) -> &str {
        self.header("Subject").unwrap_or_default()
    }

    /// The envelope recipients aiosmtpd recorded (`X-RcptTo`).
    pub fn rcpt_to(&self) -> Vec<String> {
        self.header("X-RcptTo")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

impl Smtp {
    /// A server in `dir` (its maildir, certificates and log), on a free
    /// loopback port, not yet running.
    pub fn new(dir: &Path, mode: Mode) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca = write_certs(dir)?;
        Ok(Self {
            mode,
            port: free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            maildir: dir.join("maildir"),
            ca,
            dir: dir.to_owned(),
            proc: None,
        })
    }

    /// A running server.
    pub async fn start(dir: &Path, mode: Mode) -> anyhow::Result<Self> {
        let mut smtp = Self::new(dir, mode)?;
        smtp.run().await?;
        Ok(smtp)
    }

    /// Starts the server and waits until it listens.
    pub async fn run(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{}", self.port));
        let (cert, key) = (self.dir.join("smtp.pem"), self.dir.join("smtp.key"));
        match self.mode {
            Mode::Plain => {}
            Mode::StartTls => {
                cmd.arg("--tlscert").arg(&cert).arg("--tlskey").arg(&key);
            }
            Mode::Smtps => {
                cmd.arg("--smtpscert")
                    .arg(&cert)
                    .arg("--smtpskey")
                    .arg(&key);
            }
        }
        cmd.args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&self.maildir);
        let mut proc = Proc::spawn("aiosmtpd", cmd, &self.dir.join("aiosmtpd.log"))?;
        let addr = (Ipv4Addr::LOCALHOST, self.port).into();
        if let Err(e) = wait_listening(addr, Duration::from_secs(20)).await {
            proc.check_running()?;
            return Err(e);
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops the server (its maildir stays).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// `mail.smtp` for a coordinator that speaks this server's mode.
    pub fn url(&self) -> String {
        let scheme = match self.mode {
            Mode::Plain => "smtp",
            Mode::StartTls => "smtp+starttls",
            Mode::Smtps => "smtps",
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A coordinator's `[mail]` section for this server, sending to
    /// `admins`, with `extra` lines appended (e.g. `cluster = "…"`).
    pub fn config(&self, admins: &[&str], extra: &str) -> String {
        format!(
            "\n[mail]\nsmtp = \"{}\"\nfrom = \"certfleet@example.org\"\nadmins = {}\nca_file = \"{}\"\n{extra}\n",
            self.url(),
            serde_json::to_string(admins).unwrap_or_default(),
            self.ca.display()
        )
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("aiosmtpd.log")).unwrap_or_default()
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> anyhow::Result<Vec<Received>> {
        let new = self.maildir.join("new");
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = match std::fs::read_dir(&new) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| {
                    let t = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    (t, e.path())
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", new.display())),
        };
        files.sort();
        files.into_iter().map(|(_, p)| parse(&p)).collect()
    }

    /// Waits until a received message's subject contains `subject`;
    /// returns every such message.
    pub async fn wait_for(
        &self,
        subject: &str,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        eventually(&format!("a mail about {subject:?}"), timeout, || async {
            let found: Vec<Received> = self
                .messages()
                .ok()?
                .into_iter()
                .filter(|m| m.subject().contains(subject))
                .collect();
            (!found.is_empty()).then_some(found)
        })
        .await
        .with_context(|| {
            let got: Vec<String> = self
                .messages()
                .unwrap_or_default()
                .iter()
                .map(|m| m.subject().to_owned())
                .collect();
            format!("received so far: {got:?}\naiosmtpd log:\n{}", self.log())
        })
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parses one message with Python's `email` package (the decoding of
/// quoted-printable and base64 parts is its, not ours).
fn parse(path: &Path) -> anyhow::Result<Received> {
    const SCRIPT: &str = r#"
import email, json, sys
from email import policy
m = email.message_from_binary_file(open(sys.argv[1], "rb"), policy=policy.default)
parts = {}
for p in m.walk():
    if p.get_content_maintype() == "text":
        parts.setdefault(p.get_content_type(), p.get_content())
print(json.dumps({
    "headers": [[k, str(v)] for k, v in m.items()],
    "content_type": m.get_content_type(),
    "text": parts.get("text/plain", ""),
    "html": parts.get("text/html", ""),
}))
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!(
            "parsing {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Ok(Received {
        path: path.to_owned(),
        headers: v["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                (
                    h[0].as_str().unwrap_or_default().to_owned(),
                    h[1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        content_type: s("content_type"),
        text: s("text"),
        html: s("html"),
    })
}

/// Writes a test CA and a leaf for 127.0.0.1/localhost signed by it
/// (`smtp.pem`, `smtp.key`); returns the CA's path.
fn write_certs(dir: &Path) -> anyhow::Result<PathBuf> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "certfleet test mail CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = params.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("smtp.pem"), leaf.pem())?;
    std::fs::write(dir.join("smtp.key"), key.serialize_pem())?;
    let ca_path = dir.join("smtp-ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    Ok(ca_path)
}
