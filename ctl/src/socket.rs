//! The coordinator's admin socket: where it is and how to reach it.
//!
//! The path comes from, in order: `--socket`, `CERTFLEET_SOCKET`, the
//! `admin_socket` key of the coordinator's config (`--config`,
//! `CERTFLEET_CONFIG`, or [`DEFAULT_CONFIG`] when that exists), and
//! [`DEFAULT_SOCKET`]. An admin on the coordinator's host thus needs no
//! option at all, whatever the config says.
//!
//! A failure to connect names the socket, the system's reason in words, and
//! what to do about it: a socket that is missing or refuses connections
//! means the coordinator is not running there (or the path came from the
//! wrong place, which the hint names); permission denied means the caller
//! is not in [`ADMIN_GROUP`].

use std::error::Error;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use certfleet_proto::cause_chain::{self, Chain};
use certfleet_proto::pb::admin_client::AdminClient;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket when nothing names one; the coordinator's own default.
pub(crate) const DEFAULT_SOCKET: &str = "/run/certfleet/admin.sock";

/// The coordinator's config, read for `admin_socket` when it exists and no
/// other config is named.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/certfleet/coordinator.toml";

/// The group whose members may use the socket (the coordinator's
/// `admin::ADMIN_GROUP`, which makes the socket 0660 with this group).
pub(crate) const ADMIN_GROUP: &str = "certfleet";

/// Where the socket's path came from, as hints name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `--socket`.
    Flag,
    /// `CERTFLEET_SOCKET`.
    Env,
    /// `admin_socket` in this config file.
    Config(PathBuf),
    /// [`DEFAULT_SOCKET`].
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag => f.write_str("--socket"),
            Self::Env => f.write_str("CERTFLEET_SOCKET"),
            Self::Config(path) => write!(f, "admin_socket in {}", path.display()),
            Self::Default => f.write_str("the built-in default"),
        }
    }
}

/// The coordinator config to read `admin_socket` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConfigFile {
    /// Named by `by` (`--config` or `CERTFLEET_CONFIG`): it must exist.
    Named { path: PathBuf, by: &'static str },
    /// The usual place: read if it exists.
    Usual(PathBuf),
}

/// The socket to connect to, and where its path came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminSocket {
    pub(crate) path: PathBuf,
    pub(crate) origin: Origin,
}

/// The coordinator's config could not be used to find the socket. Exit 2.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("reading {}{} for admin_socket: {}{}", .path.display(), named_by(*.by), Chain(.source), read_hint(.source.kind()))]
    Read {
        path: PathBuf,
        by: Option<&'static str>,
        source: io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },
}

fn named_by(by: Option<&'static str>) -> String {
    by.map(|by| format!(" (from {by})")).unwrap_or_default()
}

fn read_hint(kind: io::ErrorKind) -> String {
    match kind {
        io::ErrorKind::PermissionDenied => format!(
            " (let group {ADMIN_GROUP} read it, or name the socket with --socket or CERTFLEET_SOCKET)"
        ),
        _ => String::new(),
    }
}

/// The part of the coordinator's config the CLI needs. Every other key is
/// the coordinator's business and is ignored here.
#[derive(Deserialize)]
struct SocketConfig {
    admin_socket: Option<PathBuf>,
}

impl SocketConfig {
    fn from_toml_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            reason: e.to_string().trim_end().to_owned(),
        })?;
        if let Some(socket) = &config.admin_socket
            && !socket.is_absolute()
        {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                reason: format!(
                    "admin_socket = {:?} must be an absolute path",
                    socket.display()
                ),
            });
        }
        Ok(config)
    }
}

/// Picks the socket: `given` (from `--socket` or `CERTFLEET_SOCKET`) wins
/// and no config is read; then `admin_socket` from `config`; then
/// [`DEFAULT_SOCKET`].
pub(crate) fn locate(
    given: Option<(PathBuf, Origin)>,
    config: &ConfigFile,
) -> Result<AdminSocket, ConfigError> {
    if let Some((path, origin)) = given {
        return Ok(AdminSocket { path, origin });
    }
    let (path, by) = match config {
        ConfigFile::Named { path, by } => (path, Some(*by)),
        ConfigFile::Usual(path) => (path, None),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if by.is_none() && e.kind() == io::ErrorKind::NotFound => {
            return Ok(AdminSocket {
                path: DEFAULT_SOCKET.into(),
                origin: Origin::Default,
            });
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.clone(),
                by,
                source,
            });
        }
    };
    Ok(
        match SocketConfig::from_toml_str(path, &text)?.admin_socket {
            Some(socket) => AdminSocket {
                path: socket,
                origin: Origin::Config(path.clone()),
            },
            None => AdminSocket {
                path: DEFAULT_SOCKET.into(),
                origin: Origin::Default,
            },
        },
    )
}

/// The admin socket could not be reached.
#[derive(Debug)]
pub(crate) struct ConnectError {
    socket: AdminSocket,
    source: tonic::transport::Error,
}

impl ConnectError {
    /// The system's reason, when the socket itself failed (rather than the
    /// gRPC handshake on it).
    fn io(&self) -> Option<&io::Error> {
        cause_chain::find::<io::Error>(&self.source)
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connect {}: ", self.socket.path.display())?;
        match self.io() {
            // tonic's "transport error" around it says nothing more.
            Some(io) => write!(f, "{}", Chain(io))?,
            None => write!(f, "{}", Chain(&self.source))?,
        }
        if let Some(hint) = self
            .io()
            .and_then(|io| connect_hint(io.kind(), &self.socket.origin))
        {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

impl Error for ConnectError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

/// What to do when connecting to a socket (its path from `origin`) failed
/// with `kind`.
pub(crate) fn connect_hint(kind: io::ErrorKind, origin: &Origin) -> Option<String> {
    match kind {
        // No socket, or a socket left behind with nobody listening on it.
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => Some(format!(
            "is certfleet-coordinator running? socket path from {origin}"
        )),
        io::ErrorKind::PermissionDenied => Some(format!("add yourself to group {ADMIN_GROUP}")),
        _ => None,
    }
}

/// Connects to the coordinator's admin API on `socket`.
pub(crate) async fn connect(socket: &AdminSocket) -> Result<AdminClient<Channel>, ConnectError> {
    let path = socket.path.clone();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::from_static("http://certfleet.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|source| ConnectError {
            socket: socket.clone(),
            source,
        })?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(certfleet_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(certfleet_proto::MAX_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usual(path: &Path) -> ConfigFile {
        ConfigFile::Usual(path.to_owned())
    }

    #[test]
    fn socket_and_env_win_without_reading_the_config() {
        let config = ConfigFile::Named {
            path: "/nonexistent/coordinator.toml".into(),
            by: "--config",
        };
        for origin in [Origin::Flag, Origin::Env] {
            let found = locate(Some(("/tmp/a.sock".into(), origin.clone())), &config).unwrap();
            assert_eq!(
                found,
                AdminSocket {
                    path: "/tmp/a.sock".into(),
                    origin
                }
            );
        }
    }

    #[test]
    fn admin_socket_comes_from_the_config_else_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        // Other keys and sections are the coordinator's and are ignored.
        std::fs::write(
            &path,
            "state_dir = \"/x\"\nadmin_socket = \"/run/c/admin.sock\"\n[acme]\ndirectory = \"https://ca\"\n",
        )
        .unwrap();
        let named = ConfigFile::Named {
            path: path.clone(),
            by: "CERTFLEET_CONFIG",
        };
        for config in [usual(&path), named] {
            assert_eq!(
                locate(None, &config).unwrap(),
                AdminSocket {
                    path: "/run/c/admin.sock".into(),
                    origin: Origin::Config(path.clone())
                }
            );
        }
        std::fs::write(&path, "state_dir = \"/x\"\n").unwrap();
        let default = locate(None, &usual(&path)).unwrap();
        assert_eq!(default.path, Path::new(DEFAULT_SOCKET));
        assert_eq!(default.origin, Origin::Default);
        // No config in the usual place is no error.
        let missing = locate(None, &usual(&dir.path().join("none.toml"))).unwrap();
        assert_eq!(missing.origin, Origin::Default);
    }

    #[test]
    fn a_config_that_cannot_be_used_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        let err = locate(
            None,
            &ConfigFile::Named {
                path: missing.clone(),
                by: "--config",
            },
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            format!(
                "reading {} (from --config) for admin_socket: no such file or directory",
                missing.display()
            )
        );

        let path = dir.path().join("coordinator.toml");
        for (text, why) in [
            ("admin_socket = [", "TOML parse error at line 1"),
            ("admin_socket = 3", "invalid type"),
            (
                "admin_socket = \"run/admin.sock\"",
                "must be an absolute path",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = locate(None, &usual(&path)).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
            let err = err.to_string();
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(err.contains(why), "{text}: {err}");
        }
        // A directory cannot be read either.
        let err = locate(None, &usual(dir.path())).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
    }

    #[test]
    fn an_unreadable_config_says_how_to_do_without_it() {
        let err = ConfigError::Read {
            path: DEFAULT_CONFIG.into(),
            by: None,
            source: io::Error::from_raw_os_error(13),
        };
        assert_eq!(
            err.to_string(),
            "reading /etc/certfleet/coordinator.toml for admin_socket: permission denied (let group certfleet read it, or name the socket with --socket or CERTFLEET_SOCKET)"
        );
    }

    #[test]
    fn connect_hints_name_the_fix() {
        let from = Origin::Config(DEFAULT_CONFIG.into());
        for kind in [io::ErrorKind::NotFound, io::ErrorKind::ConnectionRefused] {
            assert_eq!(
                connect_hint(kind, &from).unwrap(),
                "is certfleet-coordinator running? socket path from admin_socket in /etc/certfleet/coordinator.toml"
            );
        }
        assert_eq!(
            connect_hint(io::ErrorKind::NotFound, &Origin::Default).unwrap(),
            "is certfleet-coordinator running? socket path from the built-in default"
        );
        assert_eq!(
            connect_hint(io::ErrorKind::PermissionDenied, &Origin::Flag).unwrap(),
            "add yourself to group certfleet"
        );
        assert_eq!(connect_hint(io::ErrorKind::TimedOut, &Origin::Env), None);
    }

    #[tokio::test]
    async fn connect_errors_name_the_socket_the_reason_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = AdminSocket {
            path: dir.path().join("admin.sock"),
            origin: Origin::Flag,
        };
        let err = connect(&missing).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "connect {}: no such file or directory (is certfleet-coordinator running? socket path from --socket)",
                missing.path.display()
            )
        );
        // A socket file nobody listens on any more: a coordinator that died.
        drop(std::os::unix::net::UnixListener::bind(&missing.path).unwrap());
        let err = connect(&missing).await.unwrap_err().to_string();
        assert!(
            err.ends_with(
                ": connection refused (is certfleet-coordinator running? socket path from --socket)"
            ),
            "{err}"
        );
    }
}
