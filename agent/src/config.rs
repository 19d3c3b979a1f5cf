//! The agent's config file (`agent.toml`).
//!
//! Two stages, so nothing starts on a half-checked config: [`RawConfig`]
//! mirrors the TOML and rejects unknown keys, then [`Config::try_from`]
//! checks every value and says which key is wrong and why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
        key: &'static str,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: String,
    state_dir: Option<PathBuf>,
    grpc: RawGrpc,
    http01: RawHttp01,
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
}

#[derive(Debug, Clone)]
pub struct Http01Config {
    pub mode: Http01Mode,
    /// How long a token lives when the coordinator does not say.
    pub token_ttl: Duration,
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
        Self::from_toml_str(&text, &path.display().to_string())
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
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        key,
        reason,
    };
    if raw.node.is_empty()
        || !raw
            .node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(
            "node",
            format!(
                "{:?} must be non-empty and use only A-Z a-z 0-9 - _ .",
                raw.node
            ),
        ));
    }
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
    let mode = match raw.http01.mode.as_str() {
        "standalone" => {
            if raw.http01.webroot.is_some() {
                return Err(invalid(
                    "http01.webroot",
                    "only applies when http01.mode = \"webroot\"".into(),
                ));
            }
            let listen = raw.http01.listen.ok_or_else(|| {
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
            Http01Mode::Standalone { listen }
        }
        "webroot" => {
            if raw.http01.listen.is_some() {
                return Err(invalid(
                    "http01.listen",
                    "only applies when http01.mode = \"standalone\"".into(),
                ));
            }
            let webroot = raw.http01.webroot.ok_or_else(|| {
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
            Http01Mode::Webroot { webroot }
        }
        other => {
            return Err(invalid(
                "http01.mode",
                format!("{other:?} is not one of \"standalone\", \"webroot\""),
            ));
        }
    };
    Ok(Config {
        node: raw.node,
        state_dir,
        grpc_listen,
        http01: Http01Config {
            mode,
            token_ttl: Duration::from_secs(ttl_secs),
        },
    })
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
        ] {
            let c = Config::from_toml_str(text, name).unwrap_or_else(|e| panic!("{e}"));
            assert!(name.contains(&c.node) || c.node == "web-1", "{name}");
        }
    }
}
