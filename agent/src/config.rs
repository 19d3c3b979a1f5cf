//! The agent's config file (`agent.toml`).
//!
//! Two stages, so nothing starts on a half-checked config: [`RawConfig`]
//! mirrors the TOML and rejects unknown keys, then [`Config::try_from`]
//! checks every value and says which key is wrong and why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certfleet_proto::node_spec::{self, FileSpec, RawCertificate, SpecError};
pub use certfleet_proto::node_spec::{
    Content, DEFAULT_LIVE_ROOT, DEFAULT_SERVICE_TIMEOUT, Endpoint, Protocol, Service,
};
use serde::Deserialize;

use crate::dir::{Dir, DirError, Trust};

/// How long a token is served when the coordinator does not say.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(10 * 60);
/// The longest a token may be served: an ACME authorization that has not
/// been validated in a day is abandoned anyway.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A config problem, naming the file, the key and the reason.
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
    #[error("config {origin}: key `{key}`: {source}")]
    Tree {
        origin: String,
        key: String,
        source: Box<DirError>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: String,
    state_dir: Option<PathBuf>,
    grpc: RawGrpc,
    http01: RawHttp01,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
    metrics: Option<crate::metrics::RawMetricsConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp01 {
    mode: String,
    listen: Option<String>,
    webroot: Option<PathBuf>,
    token_ttl_secs: Option<u64>,
    max_connections: Option<usize>,
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name, as the coordinator knows it.
    pub node: String,
    /// Where the agent keeps its identity.
    pub state_dir: PathBuf,
    /// Where the gRPC service listens.
    pub grpc_listen: SocketAddr,
    pub http01: Http01Config,
    /// Where each certificate's files go on this node, by certificate name.
    pub certificates: Vec<CertificateTargets>,
    /// `[metrics]`: where the agent's `/metrics` is served; `None`: not.
    pub metrics: Option<crate::metrics::MetricsConfig>,
}

/// One file the agent writes for a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetFile {
    pub content: Content,
    pub path: PathBuf,
    pub owner: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
    pub mode: u32,
    /// A service user who may own directories on the way to this file
    /// (postgres' data directory): `(name, uid)`. See [`crate::dir::Trust`].
    pub dir_owner: Option<(String, u32)>,
}

impl TargetFile {
    /// Who may own the directories above this file.
    pub fn trust(&self) -> Trust {
        Trust {
            service_owner: self.dir_owner.as_ref().map(|(_, uid)| *uid),
        }
    }
}

/// Where one certificate is installed on this node, and what uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateTargets {
    pub name: String,
    pub files: Vec<TargetFile>,
    /// Restarted in this order after an install.
    pub services: Vec<Service>,
}

#[derive(Debug, Clone)]
pub struct Http01Config {
    pub mode: Http01Mode,
    /// How long a token lives when the coordinator does not say.
    pub token_ttl: Duration,
    /// Limits of the standalone listener, so no client can take it offline.
    pub limits: ListenerLimits,
}

/// Bounds on the standalone HTTP-01 listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Most connections open at once. Past it, a new connection takes the
    /// place of the one idle longest; only when every one has a request in
    /// flight is the new one closed at once.
    pub max_connections: usize,
    /// Longest the listener waits for a request's headers, from when the
    /// connection opened or its previous response was sent.
    pub header_timeout: Duration,
    /// Longest a connection may stay open with no request in flight,
    /// whatever it does meanwhile: nothing, trickle headers, or leave its
    /// responses unread.
    pub idle_timeout: Duration,
}

/// Default of `http01.max_connections`: far above what validation needs
/// (a CA makes a handful of requests per name) and far below the 1024 file
/// descriptors a service gets by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of `http01.header_timeout_secs`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `http01.idle_timeout_secs`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// How this node answers HTTP-01.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Http01Mode {
    /// The agent's own HTTP listener on `listen`.
    Standalone { listen: SocketAddr },
    /// Files under `<webroot>/.well-known/acme-challenge/`, served by the
    /// node's web server.
    Webroot { webroot: PathBuf },
}

impl Http01Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Standalone { .. } => "standalone",
            Self::Webroot { .. } => "webroot",
        }
    }
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let origin = path.display().to_string();
        let config = Self::from_toml_str(&text, &origin)?;
        config.check_tree(&origin)?;
        Ok(config)
    }

    /// Checks the file tree this config writes into against the rule in
    /// [`crate::dir`]: every directory above the state directory, the
    /// webroot and each target is root's and writable by no one else (or
    /// the target's `dir_owner`'s). Missing directories are fine: the agent
    /// makes them. The webroot itself must exist and may be anyone's.
    pub fn check_tree(&self, origin: &str) -> Result<(), ConfigError> {
        let tree = |key: String, source: DirError| ConfigError::Tree {
            origin: origin.to_owned(),
            key,
            source: Box::new(source),
        };
        Dir::check_parent(&self.state_dir.join("identity"), Trust::default())
            .map_err(|e| tree("state_dir".into(), e))?;
        if let Http01Mode::Webroot { webroot } = &self.http01.mode {
            Dir::open_root(webroot).map_err(|e| tree("http01.webroot".into(), e))?;
        }
        for (i, c) in self.certificates.iter().enumerate() {
            for (j, f) in c.files.iter().enumerate() {
                Dir::check_parent(&f.path, f.trust())
                    .map_err(|e| tree(format!("certificates[{i}].files[{j}].path"), e))?;
            }
        }
        Ok(())
    }

    /// Parses and validates `text`; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        validate(raw, origin)
    }
}

fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        key: key.to_owned(),
        reason,
    };
    // The same rule the coordinator applies at `node add` and join, so a
    // mistake shows here rather than at join.
    certfleet_proto::names::check_node_name(&raw.node).map_err(|e| invalid("node", e))?;
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/certfleet-agent"));
    if !state_dir.is_absolute() {
        return Err(invalid(
            "state_dir",
            format!("{} must be an absolute path", state_dir.display()),
        ));
    }
    let grpc_listen = raw.grpc.listen.parse().map_err(|e| {
        invalid(
            "grpc.listen",
            format!(
                "{:?} is not an address like 127.0.0.2:7443: {e}",
                raw.grpc.listen
            ),
        )
    })?;
    let ttl_secs = raw
        .http01
        .token_ttl_secs
        .unwrap_or(DEFAULT_TOKEN_TTL.as_secs());
    if ttl_secs == 0 || ttl_secs > MAX_TOKEN_TTL.as_secs() {
        return Err(invalid(
            "http01.token_ttl_secs",
            format!(
                "{ttl_secs} must be between 1 and {}",
                MAX_TOKEN_TTL.as_secs()
            ),
        ));
    }
    let limits = validate_limits(&raw.http01, &invalid)?;
    let mode = validate_mode(raw.http01, &invalid)?;
    let certificates = validate_certificates(raw.certificates, origin)?;
    let metrics = raw
        .metrics
        .map(crate::metrics::validate_config)
        .transpose()
        .map_err(|(key, reason)| invalid(key, reason))?;
    Ok(Config {
        certificates,
        metrics,
        node: raw.node,
        state_dir,
        grpc_listen,
        http01: Http01Config {
            mode,
            token_ttl: Duration::from_secs(ttl_secs),
            limits,
        },
    })
}

/// `http01.mode`, with the `listen` or `webroot` that mode needs (and not
/// the other).
fn validate_mode(
    raw: RawHttp01,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Http01Mode, ConfigError> {
    match raw.mode.as_str() {
        "standalone" => {
            if raw.webroot.is_some() {
                return Err(invalid(
                    "http01.webroot",
                    "only applies when http01.mode = \"webroot\"".into(),
                ));
            }
            let listen = raw.listen.ok_or_else(|| {
                invalid(
                    "http01.listen",
                    "is required when http01.mode = \"standalone\"".into(),
                )
            })?;
            let listen = listen.parse().map_err(|e| {
                invalid(
                    "http01.listen",
                    format!("{listen:?} is not an address like 127.0.0.2:80: {e}"),
                )
            })?;
            Ok(Http01Mode::Standalone { listen })
        }
        "webroot" => {
            if raw.listen.is_some() {
                return Err(invalid(
                    "http01.listen",
                    "only applies when http01.mode = \"standalone\"".into(),
                ));
            }
            let webroot = raw.webroot.ok_or_else(|| {
                invalid(
                    "http01.webroot",
                    "is required when http01.mode = \"webroot\"".into(),
                )
            })?;
            if !webroot.is_absolute() {
                return Err(invalid(
                    "http01.webroot",
                    format!("{} must be an absolute path", webroot.display()),
                ));
            }
            Ok(Http01Mode::Webroot { webroot })
        }
        other => Err(invalid(
            "http01.mode",
            format!("{other:?} is not one of \"standalone\", \"webroot\""),
        )),
    }
}

/// `http01.max_connections`, `header_timeout_secs`, `idle_timeout_secs`.
fn validate_limits(
    raw: &RawHttp01,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ListenerLimits, ConfigError> {
    let defaults = ListenerLimits::default();
    let max_connections = raw.max_connections.unwrap_or(defaults.max_connections);
    if !(1..=65536).contains(&max_connections) {
        return Err(invalid(
            "http01.max_connections",
            format!("{max_connections} must be between 1 and 65536"),
        ));
    }
    let secs = |key: &str, value: Option<u64>, default: Duration| match value {
        None => Ok(default),
        Some(s) if (1..=3600).contains(&s) => Ok(Duration::from_secs(s)),
        Some(s) => Err(invalid(key, format!("{s} must be between 1 and 3600"))),
    };
    Ok(ListenerLimits {
        max_connections,
        header_timeout: secs(
            "http01.header_timeout_secs",
            raw.header_timeout_secs,
            defaults.header_timeout,
        )?,
        idle_timeout: secs(
            "http01.idle_timeout_secs",
            raw.idle_timeout_secs,
            defaults.idle_timeout,
        )?,
    })
}

/// `[[certificates]]`: checked as every node's description is
/// ([`certfleet_proto::node_spec`]), with each file's users and group
/// looked up on this node.
fn validate_certificates(
    raw: Vec<RawCertificate>,
    origin: &str,
) -> Result<Vec<CertificateTargets>, ConfigError> {
    let specs = node_spec::validate_certificates_with(raw, resolve_file).map_err(|e| {
        ConfigError::Invalid {
            origin: origin.to_owned(),
            key: e.key,
            reason: e.reason,
        }
    })?;
    Ok(specs
        .into_iter()
        .map(|c| CertificateTargets {
            name: c.name,
            files: c.files,
            services: c.services,
        })
        .collect())
}

/// One target file with its owner, group and directory owner looked up
/// on this node; `key` names its fields.
fn resolve_file(f: FileSpec, key: &dyn Fn(&str) -> String) -> Result<TargetFile, SpecError> {
    let (owner, uid) = user(f.owner, &key("owner"))?;
    let dir_owner = match f.dir_owner {
        None => None,
        Some(name) => Some(user(name, &key("dir_owner"))?),
    };
    let group = f.group;
    let gid = nix::unistd::Group::from_name(&group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| SpecError {
            key: key("group"),
            reason: format!("no group named {group:?} on this node"),
        })?;
    Ok(TargetFile {
        content: f.content,
        path: f.path,
        owner,
        uid,
        group,
        gid,
        mode: f.mode,
        dir_owner,
    })
}

/// The user `name` and its uid; `key` is the config key that names it.
fn user(name: String, key: &str) -> Result<(String, u32), SpecError> {
    match user_uid(&name) {
        Some(uid) => Ok((name, uid)),
        None => Err(SpecError {
            key: key.to_owned(),
            reason: format!("no user named {name:?} on this node"),
        }),
    }
}

fn user_uid(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "cn-ucsb-1"
[grpc]
listen = "127.0.0.2:7443"
[http01]
mode = "standalone"
listen = "127.0.0.2:80"
"#;

    #[test]
    fn accepts_standalone() {
        let c = Config::from_toml_str(GOOD, "agent.toml").unwrap();
        assert_eq!(c.http01.token_ttl, DEFAULT_TOKEN_TTL);
        assert_eq!(
            c.http01.mode,
            Http01Mode::Standalone {
                listen: "127.0.0.2:80".parse().unwrap()
            }
        );
    }

    #[test]
    fn a_node_name_the_cluster_would_refuse_is_refused_here() {
        for bad in ["CN-UCSB-1", "cn_ucsb_1", "cn.ucsb", "-cn", &"a".repeat(64)] {
            let text = GOOD.replace("cn-ucsb-1", bad);
            let err = Config::from_toml_str(&text, "a.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("key `node`") && err.contains("DNS label"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn names_unknown_key() {
        let text = GOOD.replace("[grpc]", "colour = \"red\"\n[grpc]");
        let err = Config::from_toml_str(&text, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent.toml") && err.contains("colour"),
            "{err}"
        );
    }

    #[test]
    fn names_missing_webroot_and_relative_path() {
        let text = GOOD.replace(
            "mode = \"standalone\"\nlisten = \"127.0.0.2:80\"",
            "mode = \"webroot\"",
        );
        let err = Config::from_toml_str(&text, "a.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http01.webroot") && err.contains("required"),
            "{err}"
        );
        let text = GOOD.replace(
            "mode = \"standalone\"\nlisten = \"127.0.0.2:80\"",
            "mode = \"webroot\"\nwebroot = \"var/www\"",
        );
        let err = Config::from_toml_str(&text, "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("absolute"), "{err}");
    }

    #[test]
    fn names_bad_address_and_ttl() {
        let text = GOOD.replace("127.0.0.2:7443", "nowhere");
        let err = Config::from_toml_str(&text, "a.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grpc.listen") && err.contains("nowhere"),
            "{err}"
        );
        let text = format!("{GOOD}token_ttl_secs = 0\n");
        let err = Config::from_toml_str(&text, "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http01.token_ttl_secs"), "{err}");
    }

    #[test]
    fn certificate_targets_default_to_certbots_layout_and_check_modes() {
        let text = format!("{GOOD}\n[[certificates]]\nname = \"cn\"\n");
        let c = Config::from_toml_str(&text, "a.toml").unwrap();
        let files = &c.certificates[0].files;
        assert_eq!(files.len(), 4);
        assert_eq!(
            files[3].path,
            Path::new("/etc/letsencrypt/live/cn/privkey.pem")
        );
        assert_eq!((files[3].mode, files[0].mode), (0o600, 0o644));
        let text = format!(
            "{GOOD}\n[[certificates]]\nname = \"cn\"\n[[certificates.files]]\ncontent = \"privkey\"\npath = \"/k.pem\"\nmode = \"0644\"\n"
        );
        let err = Config::from_toml_str(&text, "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificates[0].files[0].mode"), "{err}");
        let text = format!(
            "{GOOD}\n[[certificates]]\nname = \"cn\"\n[[certificates.files]]\ncontent = \"cert\"\npath = \"/c.pem\"\ngroup = \"no-such-group-x\"\n"
        );
        let err = Config::from_toml_str(&text, "a.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("files[0].group") && err.contains("no-such-group-x"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_examples_are_valid() {
        for (name, text) in [
            (
                "agent-cn-ucsb-1.toml",
                include_str!("../../deploy/examples/dataone/agent-cn-ucsb-1.toml"),
            ),
            (
                "agent-cn-unm-1.toml",
                include_str!("../../deploy/examples/dataone/agent-cn-unm-1.toml"),
            ),
            (
                "agent-cn-orc-1.toml",
                include_str!("../../deploy/examples/dataone/agent-cn-orc-1.toml"),
            ),
            (
                "agent-cn-ornl-1.toml",
                include_str!("../../deploy/examples/dataone/agent-cn-ornl-1.toml"),
            ),
            (
                "agent-standalone.toml",
                include_str!("../../deploy/examples/agent-standalone.toml"),
            ),
            (
                "agent-nginx.toml",
                include_str!("../../deploy/examples/agent-nginx.toml"),
            ),
        ] {
            // The DataONE examples name the ssl-cert group, as the node would have.
            let c = Config::from_toml_str(text, name).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                name.contains(&c.node) || c.node.starts_with("web-"),
                "{name}"
            );
        }
    }
}
