//! What a node does with a certificate: the files it installs (owner,
//! group, mode) and the services that use them (check and restart argv,
//! verify endpoints).
//!
//! Both transports read this one description. The agent reads the
//! `[[certificates]]` part of its own `agent.toml`; the coordinator reads
//! the same TOML, plus the node's webroot, from a file per SSH node
//! ([`NodeSpec`]), and does the agent's work over SSH. Keeping the serde
//! types and their checks here means the two can never disagree on what a
//! config means.
//!
//! The checks here are the ones that need nothing from the node: users and
//! groups are names, resolved where the files are written (the agent looks
//! them up; over SSH, `chown` on the node does).
//!
//! [`served_leaf`] is the verify probe both transports use: the agent from
//! the node, the coordinator from its own side for an SSH node.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::bundle::hex;
use crate::identity::FingerprintOnly;

/// Where a certificate goes when the config names no files: certbot's
/// layout, so service configs pointing at /etc/letsencrypt/live keep working.
pub const DEFAULT_LIVE_ROOT: &str = "/etc/letsencrypt/live";

/// How long a service's check, restart and verify may each take by default.
pub const DEFAULT_SERVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a service's `timeout_secs` may be.
pub const MAX_SERVICE_TIMEOUT_SECS: u64 = 600;

/// PostgreSQL's SSLRequest: length 8, code 80877103 (protocol docs, 53.2.10).
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// `[[certificates]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub name: String,
    pub live_dir: Option<PathBuf>,
    #[serde(default)]
    pub files: Vec<RawFile>,
    #[serde(default)]
    pub services: Vec<RawService>,
}

/// `[[certificates.services]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    pub check: Option<Vec<String>>,
    pub restart: Vec<String>,
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub verify: Vec<RawEndpoint>,
}

/// `[[certificates.services.verify]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub address: String,
    pub sni: Option<String>,
    pub protocol: Option<String>,
}

/// `[[certificates.files]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub content: String,
    pub path: PathBuf,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub mode: Option<String>,
    pub dir_owner: Option<String>,
}

/// A key that holds a wrong value: the key's full name and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {reason}")]
pub struct SpecError {
    pub key: String,
    pub reason: String,
}

fn invalid(key: String, reason: String) -> SpecError {
    SpecError { key, reason }
}

/// What a target file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Cert,
    Chain,
    Fullchain,
    Privkey,
    /// The key followed by the full chain, in one file (haproxy, some mail servers).
    KeyFullchain,
}

impl Content {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cert => "cert",
            Self::Chain => "chain",
            Self::Fullchain => "fullchain",
            Self::Privkey => "privkey",
            Self::KeyFullchain => "key+fullchain",
        }
    }

    /// Whether the file holds the private key.
    pub fn has_key(self) -> bool {
        matches!(self, Self::Privkey | Self::KeyFullchain)
    }
}

/// One file written for a certificate. Owner, group and the optional
/// directory owner are names: the node resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub content: Content,
    pub path: PathBuf,
    pub owner: String,
    pub group: String,
    pub mode: u32,
    /// A service user who may own directories on the way to this file
    /// (postgres' data directory).
    pub dir_owner: Option<String>,
}

/// A service that serves the certificate. Its commands are argv, run
/// without a shell; only services in the node's description can ever run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// Validates the service's config before a restart (`apache2ctl -t`).
    pub check: Option<Vec<String>>,
    /// Restarts or reloads it (`systemctl reload apache2`).
    pub restart: Vec<String>,
    pub timeout: Duration,
    /// Where it serves the certificate; each must serve the new leaf.
    pub verify: Vec<Endpoint>,
}

/// How a verify endpoint speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TLS from the first byte (HTTPS, LDAPS, ...).
    Tls,
    /// PostgreSQL's SSLRequest, then TLS.
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// The server name sent in the handshake.
    pub sni: String,
    pub protocol: Protocol,
}

/// Where one certificate is installed on a node, and what uses it. `F`
/// is a file as the reader needs it: the agent resolves the names to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSpec<F = FileSpec> {
    pub name: String,
    pub files: Vec<F>,
    /// Restarted in this order after an install.
    pub services: Vec<Service>,
}

/// `[[certificates]]`: each one's name, files and services, no name twice,
/// and no path the target of two files. Keys are named
/// `certificates[i].…` as in the file.
pub fn validate_certificates(raw: Vec<RawCertificate>) -> Result<Vec<CertificateSpec>, SpecError> {
    validate_certificates_with(raw, |f, _| Ok(f))
}

/// [`validate_certificates`], turning each file into what the reader
/// needs with `resolve` as soon as it is checked; `resolve` gets a function
/// that names the file's keys.
pub fn validate_certificates_with<F>(
    raw: Vec<RawCertificate>,
    mut resolve: impl FnMut(FileSpec, &dyn Fn(&str) -> String) -> Result<F, SpecError>,
) -> Result<Vec<CertificateSpec<F>>, SpecError> {
    let mut out: Vec<CertificateSpec<F>> = Vec::with_capacity(raw.len());
    let mut all_paths: Vec<PathBuf> = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let RawCertificate {
            name,
            live_dir,
            files,
            services,
        } = c;
        crate::names::check_certificate_name(&name)
            .map_err(|e| invalid(format!("certificates[{i}].name"), e))?;
        if out.iter().any(|t| t.name == name) {
            return Err(invalid(
                format!("certificates[{i}].name"),
                format!("{name:?} is listed twice"),
            ));
        }
        let raw_files = raw_files(i, &name, live_dir, files)?;
        let mut has_key = false;
        let mut checked = Vec::with_capacity(raw_files.len());
        for (j, f) in raw_files.into_iter().enumerate() {
            let key = |field: &str| format!("certificates[{i}].files[{j}].{field}");
            let file = validate_file(f, &key, &mut all_paths)?;
            has_key |= file.content.has_key();
            checked.push(resolve(file, &key)?);
        }
        let services = validate_services(services, i)?;
        if !has_key {
            return Err(invalid(
                format!("certificates[{i}].files"),
                "no file holds the private key (\"privkey\" or \"key+fullchain\"): the certificate would be unusable".into(),
            ));
        }
        out.push(CertificateSpec {
            name,
            files: checked,
            services,
        });
    }
    Ok(out)
}

/// The files `certificates[i]` lists, or else certbot's four under its
/// `live_dir` (default: [`DEFAULT_LIVE_ROOT`]`/<name>`).
fn raw_files(
    i: usize,
    name: &str,
    live_dir: Option<PathBuf>,
    files: Vec<RawFile>,
) -> Result<Vec<RawFile>, SpecError> {
    if !files.is_empty() {
        if live_dir.is_some() {
            return Err(invalid(
                format!("certificates[{i}].live_dir"),
                "only applies when no [[certificates.files]] are listed".into(),
            ));
        }
        return Ok(files);
    }
    let dir = live_dir.unwrap_or_else(|| Path::new(DEFAULT_LIVE_ROOT).join(name));
    Ok(["cert", "chain", "fullchain", "privkey"]
        .into_iter()
        .map(|content| RawFile {
            content: content.to_owned(),
            path: dir.join(format!("{content}.pem")),
            owner: None,
            group: None,
            mode: None,
            dir_owner: None,
        })
        .collect())
}

/// One target file; `key` names its fields. No path may be the target of
/// two files of any certificate: `all_paths` holds those seen so far.
fn validate_file(
    f: RawFile,
    key: &dyn Fn(&str) -> String,
    all_paths: &mut Vec<PathBuf>,
) -> Result<FileSpec, SpecError> {
    let content = match f.content.as_str() {
        "cert" => Content::Cert,
        "chain" => Content::Chain,
        "fullchain" => Content::Fullchain,
        "privkey" => Content::Privkey,
        "key+fullchain" => Content::KeyFullchain,
        other => {
            return Err(invalid(
                key("content"),
                format!(
                    "{other:?} is not one of \"cert\", \"chain\", \"fullchain\", \"privkey\", \"key+fullchain\""
                ),
            ));
        }
    };
    if !f.path.is_absolute()
        || f.path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        || f.path.file_name().is_none()
    {
        return Err(invalid(
            key("path"),
            format!(
                "{} must be an absolute file path without ..",
                f.path.display()
            ),
        ));
    }
    if all_paths.contains(&f.path) {
        return Err(invalid(
            key("path"),
            format!("{} is the target of two files", f.path.display()),
        ));
    }
    all_paths.push(f.path.clone());
    Ok(FileSpec {
        mode: file_mode(content, f.mode, &key("mode"))?,
        content,
        path: f.path,
        owner: f.owner.unwrap_or_else(|| "root".into()),
        group: f.group.unwrap_or_else(|| "root".into()),
        dir_owner: f.dir_owner,
    })
}

/// A file's mode (default: 0600 for a key, else 0644). A key is never
/// readable or writable by every user.
fn file_mode(content: Content, mode: Option<String>, key: &str) -> Result<u32, SpecError> {
    let default_mode = if content.has_key() { "0600" } else { "0644" };
    let mode_text = mode.unwrap_or_else(|| default_mode.into());
    let mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            invalid(
                key.to_owned(),
                format!("{mode_text:?} is not an octal mode like \"0640\""),
            )
        })?;
    if content.has_key() && mode & 0o007 != 0 {
        return Err(invalid(
            key.to_owned(),
            format!(
                "{mode_text} would let every user read or change the private key; use 0600 or 0640"
            ),
        ));
    }
    Ok(mode)
}

/// `certificates[i].services`: each name once, argv commands, and the
/// endpoints that must serve the new certificate.
fn validate_services(raw: Vec<RawService>, i: usize) -> Result<Vec<Service>, SpecError> {
    let mut services: Vec<Service> = Vec::with_capacity(raw.len());
    for (j, s) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("certificates[{i}].services[{j}].{field}");
        if s.name.is_empty() || services.iter().any(|other| other.name == s.name) {
            return Err(invalid(
                key("name"),
                format!("{:?} must be non-empty and unique", s.name),
            ));
        }
        let argv_ok = |argv: &[String]| !argv.is_empty() && !argv[0].is_empty();
        if !argv_ok(&s.restart) {
            return Err(invalid(
                key("restart"),
                "must be a non-empty argv, e.g. [\"systemctl\", \"reload\", \"apache2\"]".into(),
            ));
        }
        if let Some(check) = &s.check
            && !argv_ok(check)
        {
            return Err(invalid(
                key("check"),
                "must be a non-empty argv, e.g. [\"apache2ctl\", \"-t\"]".into(),
            ));
        }
        let timeout = match s.timeout_secs {
            None => DEFAULT_SERVICE_TIMEOUT,
            Some(t) if (1..=MAX_SERVICE_TIMEOUT_SECS).contains(&t) => Duration::from_secs(t),
            Some(t) => {
                return Err(invalid(
                    key("timeout_secs"),
                    format!("{t} must be between 1 and {MAX_SERVICE_TIMEOUT_SECS}"),
                ));
            }
        };
        let mut verify = Vec::with_capacity(s.verify.len());
        for (k, e) in s.verify.into_iter().enumerate() {
            let key = |field: &str| format!("certificates[{i}].services[{j}].verify[{k}].{field}");
            verify.push(validate_endpoint(e, &key)?);
        }
        services.push(Service {
            name: s.name,
            check: s.check,
            restart: s.restart,
            timeout,
            verify,
        });
    }
    Ok(services)
}

/// One verify endpoint; `key` names its fields. The SNI defaults to the
/// address's host.
fn validate_endpoint(e: RawEndpoint, key: &dyn Fn(&str) -> String) -> Result<Endpoint, SpecError> {
    let host = match e.address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host,
        _ => {
            return Err(invalid(
                key("address"),
                format!("{:?} must be host:port", e.address),
            ));
        }
    };
    let protocol = match e.protocol.as_deref().unwrap_or("tls") {
        "tls" => Protocol::Tls,
        "postgres" => Protocol::Postgres,
        other => {
            return Err(invalid(
                key("protocol"),
                format!("{other:?} is not one of \"tls\", \"postgres\""),
            ));
        }
    };
    let sni = e
        .sni
        .unwrap_or_else(|| host.trim_matches(['[', ']']).to_owned());
    Ok(Endpoint {
        address: e.address,
        sni,
        protocol,
    })
}

/// The file the coordinator keeps for a node it reaches over SSH.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeSpec {
    webroot: PathBuf,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
}

/// What the coordinator does on a node reached over SSH: HTTP-01 tokens go
/// under `webroot` (an SSH node has no standalone responder), certificates
/// as `certificates` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Tokens go to `<webroot>/.well-known/acme-challenge/`.
    pub webroot: PathBuf,
    pub certificates: Vec<CertificateSpec>,
}

/// Why a node's description is unusable: the file, and the key or syntax.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeSpecError {
    #[error("node description {origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("node description {origin}: {source}")]
    Invalid {
        origin: String,
        #[source]
        source: SpecError,
    },
}

impl NodeSpec {
    /// Parses and checks `text`; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, NodeSpecError> {
        let raw: RawNodeSpec = toml::from_str(text).map_err(|e| NodeSpecError::Syntax {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let spec_error = |source| NodeSpecError::Invalid {
            origin: origin.to_owned(),
            source,
        };
        if !raw.webroot.is_absolute()
            || raw
                .webroot
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(spec_error(invalid(
                "webroot".into(),
                format!(
                    "{} must be an absolute path without ..",
                    raw.webroot.display()
                ),
            )));
        }
        let certificates = validate_certificates(raw.certificates).map_err(spec_error)?;
        Ok(Self {
            webroot: raw.webroot,
            certificates,
        })
    }

    /// The description of `certificate`, if this node installs it.
    pub fn certificate(&self, certificate: &str) -> Option<&CertificateSpec> {
        self.certificates.iter().find(|c| c.name == certificate)
    }
}

/// The SHA-256 (lowercase hex) of the leaf `endpoint` serves, or why none
/// could be read, within `timeout`. Any certificate is accepted: the point
/// is to see which one is served, not to trust it.
pub async fn served_leaf(endpoint: &Endpoint, timeout: Duration) -> Result<String, String> {
    match tokio::time::timeout(timeout, probe(endpoint)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no TLS handshake within {timeout:?}")),
    }
}

async fn probe(endpoint: &Endpoint) -> Result<String, String> {
    let mut tcp = TcpStream::connect(&endpoint.address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if endpoint.protocol == Protocol::Postgres {
        tcp.write_all(&PG_SSL_REQUEST)
            .await
            .map_err(|e| format!("SSLRequest: {e}"))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| format!("SSLRequest: {e}"))?;
        if answer[0] != b'S' {
            return Err(format!(
                "server refused TLS (answered {:?})",
                answer[0] as char
            ));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FingerprintOnly::new()))
        .with_no_client_auth();
    let name = ServerName::try_from(endpoint.sni.clone())
        .map_err(|e| format!("SNI {:?}: {e}", endpoint.sni))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate served")?;
    Ok(hex(&Sha256::digest(leaf)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_description_reads_like_the_agents_certificates_part() {
        let spec = NodeSpec::from_toml_str(
            r#"
webroot = "/var/www/html"
[[certificates]]
name = "cn"
[[certificates.files]]
content = "privkey"
path = "/etc/ssl/private/cn.key"
group = "ssl-cert"
mode = "0640"
[[certificates.services]]
name = "nginx"
restart = ["systemctl", "reload", "nginx"]
[[certificates.services.verify]]
address = "127.0.0.9:8443"
"#,
            "nodes/cn-9.toml",
        )
        .unwrap();
        let cn = spec.certificate("cn").unwrap();
        assert_eq!(cn.files[0].group, "ssl-cert");
        assert_eq!(cn.files[0].mode, 0o640);
        assert_eq!(cn.services[0].verify[0].sni, "127.0.0.9");
    }

    #[test]
    fn a_world_readable_key_is_refused_naming_the_file_and_key() {
        let e = NodeSpec::from_toml_str(
            "webroot = \"/w\"\n[[certificates]]\nname = \"cn\"\n[[certificates.files]]\ncontent = \"privkey\"\npath = \"/k\"\nmode = \"0644\"\n",
            "nodes/x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nodes/x.toml") && e.contains("certificates[0].files[0].mode"),
            "{e}"
        );
    }

    #[test]
    fn a_relative_webroot_is_refused() {
        let e = NodeSpec::from_toml_str("webroot = \"www\"\n", "n.toml").unwrap_err();
        assert!(e.to_string().contains("webroot"), "{e}");
    }
}
