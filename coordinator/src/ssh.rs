//! Nodes reached over OpenSSH: those that never run the agent, and those
//! whose agent is down when a certificate must go out.
//!
//! A node's registry record says how it is reached ([`NodeTransport`]):
//! through its agent, over SSH, or `auto`, the agent first and SSH for a
//! call the agent could not be reached for ([`Fallback`]). [`Reach`] is the
//! fleet's [`Connect`]: it builds each node's transport from that.
//!
//! Over SSH the coordinator does the agent's work itself ([`SshNode`]),
//! from the node's description ([`certfleet_proto::node_spec::NodeSpec`],
//! the same TOML as the agent's `[[certificates]]` plus the webroot) kept
//! on the coordinator, one file per node. On the node, a small fixed script
//! (`ssh/remote.sh`, compiled in) does the file work under the agent's
//! rules; every path, token and file travels on its standard input, never
//! in its arguments. Verify probes run from the coordinator.
//!
//! Host keys are checked strictly against certfleet's own known_hosts file
//! (`<state>/ssh/known_hosts`), which only `certfleet node trust-host`
//! writes ([`hostkey`]). The crate's default (accept a new key) is not used.
//!
//! Each node has one multiplexed master connection (ControlPersist), and at
//! most `ssh.max_sessions` commands at once on it, below sshd's
//! `MaxSessions` (10 by default). A coordinator killed with SIGKILL leaves
//! its masters running; [`clean_control_dir`] ends them at the next start.

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::challenge::{Http01Response, Token};
use serde::Deserialize;

use crate::journal::Journal;
use crate::progress::{Progress, Stage};
use crate::store::Store;
use crate::transport::{
    BundleToInstall, ClusterTrust, Connect, ConnectError, GrpcAgent, NodeCertificate, NodeInstall,
    NodeRemoval, RestartReport, Transport, TransportError,
};

pub mod admin_api;
pub mod hostkey;
mod node;

pub use node::{REMOTE_SCRIPT, SshNode};

/// How the coordinator reaches a node, as the registry stores it
/// (`nodes.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeTransport {
    /// Through its agent, over mutual TLS.
    #[default]
    Agent,
    /// Over SSH only: the node runs no agent.
    Ssh,
    /// Through the agent, and over SSH for any call the agent could not be
    /// reached for (connection refused or timed out; not a refusal).
    Auto,
}

impl NodeTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Ssh => "ssh",
            Self::Auto => "auto",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(Self::Agent),
            "ssh" => Ok(Self::Ssh),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "{other:?} is not one of \"agent\", \"ssh\", \"auto\""
            )),
        }
    }

    /// Whether the node is reached over SSH for some calls.
    pub fn uses_ssh(self) -> bool {
        self != Self::Agent
    }
}

impl fmt::Display for NodeTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a node is reached, as its registry record holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReach {
    pub transport: NodeTransport,
    /// Where its sshd is; required for `ssh` and `auto`.
    pub ssh: Option<SshDestination>,
}

impl NodeReach {
    /// From the registry's `transport` and `ssh` columns.
    pub fn from_columns(transport: &str, ssh: &str) -> Result<Self, String> {
        Ok(Self {
            transport: NodeTransport::parse(transport)?,
            ssh: match ssh {
                "" => None,
                s => Some(SshDestination::parse(s)?),
            },
        })
    }

    /// The `ssh` column: the destination, or empty.
    pub fn ssh_column(&self) -> String {
        self.ssh
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    }
}

/// A registry record as `certfleet nodes` shows it.
fn admin_node_info(record: crate::db::NodeRecord) -> certfleet_proto::pb::NodeInfo {
    crate::admin::node_info(record)
}

/// The address a node's errors name it by: its agent's, or for a node
/// reached over SSH only (which registers no agent), its sshd's.
pub fn agent_address(agent: &str, reach: &NodeReach) -> Result<std::net::SocketAddr, String> {
    if agent.is_empty()
        && let Some(ssh) = &reach.ssh
    {
        let ip: std::net::IpAddr = ssh
            .host
            .parse()
            .map_err(|_| format!("ssh host {} is not an IP address", ssh.host))?;
        return Ok(std::net::SocketAddr::new(ip, ssh.port));
    }
    agent
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())
}

/// Where a node's sshd is: `user@host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshDestination {
    pub user: String,
    /// A name or an IP address (an IPv6 one without brackets).
    pub host: String,
    pub port: u16,
}

/// The port an SSH destination without one uses.
pub const DEFAULT_SSH_PORT: u16 = 22;

impl SshDestination {
    /// Parses `user@host[:port]` (`user@[v6]:port` for IPv6). The user and
    /// host are restricted to characters ssh takes literally, so neither
    /// can be read as an option.
    pub fn parse(s: &str) -> Result<Self, String> {
        let shape =
            || format!("{s:?} is not like root@10.0.0.5 or certfleet@cn-1.example.org:2222");
        let (user, rest) = s.split_once('@').ok_or_else(shape)?;
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(shape)?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(shape)?)),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let port = match port {
            None => DEFAULT_SSH_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?}: port {p:?} is not a number from 1 to 65535"))?,
        };
        let plain = |t: &str, extra: &[u8]| {
            !t.is_empty()
                && !t.starts_with('-')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
        };
        if !plain(user, b"") {
            return Err(format!(
                "{s:?}: user {user:?} must be letters, digits, . _ -"
            ));
        }
        if !plain(host, b":") {
            return Err(format!(
                "{s:?}: host {host:?} must be a name or an IP address"
            ));
        }
        Ok(Self {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// The host as known_hosts and ssh-keyscan name it: `host`, or
    /// `[host]:port` for a port other than 22.
    pub fn known_hosts_name(&self) -> String {
        if self.port == DEFAULT_SSH_PORT {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for SshDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// `[ssh]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsh {
    key_file: Option<PathBuf>,
    node_specs_dir: Option<PathBuf>,
    connect_timeout_secs: Option<u64>,
    max_sessions: Option<usize>,
    control_dir: Option<PathBuf>,
    sudo_script: Option<PathBuf>,
}

/// Default of `ssh.connect_timeout_secs`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `ssh.max_sessions`: commands at once on one node. sshd's
/// `MaxSessions` defaults to 10 and counts the master's own session too.
pub const DEFAULT_MAX_SESSIONS: usize = 4;
/// The longest control directory: ssh puts its socket at
/// `<dir>/.ssh-connectionXXXXXX/master` plus a 17-byte temporary suffix,
/// and a Unix socket's path holds at most 108 bytes.
pub const MAX_CONTROL_DIR_LEN: usize = 59;
/// Where control directories go when the state directory's path is too
/// long for one.
pub const SHORT_CONTROL_ROOT: &str = "/run/certfleet/ssh";

/// `[ssh]`: how the coordinator reaches nodes over SSH.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// The private key certfleet logs in with (default
    /// `<state>/ssh/id_ed25519`).
    pub key_file: PathBuf,
    /// Where each SSH node's description is: `<dir>/<node>.toml`.
    pub node_specs_dir: PathBuf,
    /// certfleet's own known_hosts: `<state>/ssh/known_hosts`.
    pub known_hosts: PathBuf,
    pub connect_timeout: Duration,
    /// Commands at once on one node.
    pub max_sessions: usize,
    /// Where the master connections' sockets are.
    pub control_dir: PathBuf,
    /// For a login that is not root: the path of the remote script as
    /// installed on the node, run with `sudo -n` (the sudoers rule allows
    /// only it). `None`: the login is root, and the script is sent.
    pub sudo_script: Option<PathBuf>,
    /// Where the coordinator records what it installed over SSH.
    pub records_dir: PathBuf,
}

/// Checks `[ssh]`; `config_path` is the config file's path when known,
/// whose directory's `nodes/` holds the node descriptions by default.
/// Errors are (key, reason).
pub fn validate_config(
    raw: Option<RawSsh>,
    state_dir: &Path,
    config_path: Option<&Path>,
) -> Result<SshConfig, (String, String)> {
    let raw = raw.unwrap_or_default();
    let ssh_dir = state_dir.join("ssh");
    let absolute = |key: &str, p: Option<PathBuf>, default: PathBuf| match p {
        Some(p) if !p.is_absolute() => Err((
            format!("ssh.{key}"),
            format!("{} must be an absolute path", p.display()),
        )),
        Some(p) => Ok(p),
        None => Ok(default),
    };
    let config_dir = config_path
        .and_then(Path::parent)
        .filter(|d| d.is_absolute())
        .unwrap_or(Path::new("/etc/certfleet"));
    let connect_timeout = match raw.connect_timeout_secs {
        None => DEFAULT_CONNECT_TIMEOUT,
        Some(s) if (1..=300).contains(&s) => Duration::from_secs(s),
        Some(s) => {
            return Err((
                "ssh.connect_timeout_secs".into(),
                format!("{s} must be between 1 and 300"),
            ));
        }
    };
    let max_sessions = raw.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
    if !(1..=9).contains(&max_sessions) {
        return Err((
            "ssh.max_sessions".into(),
            format!(
                "{max_sessions} must be between 1 and 9 (below sshd's MaxSessions, 10 by default)"
            ),
        ));
    }
    let control_dir = match raw.control_dir {
        Some(d) => {
            let d = absolute("control_dir", Some(d), PathBuf::new())?;
            if d.as_os_str().len() > MAX_CONTROL_DIR_LEN {
                return Err((
                    "ssh.control_dir".into(),
                    format!(
                        "{} is longer than {MAX_CONTROL_DIR_LEN} bytes: ssh's control socket inside it would pass the 108-byte limit of a socket path",
                        d.display()
                    ),
                ));
            }
            d
        }
        None => default_control_dir(&ssh_dir),
    };
    Ok(SshConfig {
        key_file: absolute("key_file", raw.key_file, ssh_dir.join("id_ed25519"))?,
        node_specs_dir: absolute(
            "node_specs_dir",
            raw.node_specs_dir,
            config_dir.join("nodes"),
        )?,
        known_hosts: ssh_dir.join("known_hosts"),
        connect_timeout,
        max_sessions,
        control_dir,
        sudo_script: raw
            .sudo_script
            .map(|p| absolute("sudo_script", Some(p), PathBuf::new()))
            .transpose()?,
        records_dir: ssh_dir.join("installed"),
    })
}

/// `<state>/ssh/ctl` when that is short enough for ssh's control socket;
/// otherwise a directory under [`SHORT_CONTROL_ROOT`] named by a hash of
/// the state directory, so two coordinators on one host do not share one.
fn default_control_dir(ssh_dir: &Path) -> PathBuf {
    let dir = ssh_dir.join("ctl");
    if dir.as_os_str().len() <= MAX_CONTROL_DIR_LEN {
        return dir;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ssh_dir.hash(&mut h);
    Path::new(SHORT_CONTROL_ROOT).join(format!("{:016x}", h.finish()))
}

impl SshConfig {
    /// The ssh client config every connection uses (`ssh -F`): only
    /// certfleet's own known_hosts counts, never the system-wide one, and
    /// nothing from the user's or the system's ssh_config applies.
    pub fn client_config(&self) -> PathBuf {
        self.known_hosts.with_file_name("ssh_config")
    }

    /// The description file of `node`.
    pub fn node_spec_path(&self, node: &str) -> PathBuf {
        self.node_specs_dir.join(format!("{node}.toml"))
    }

    /// Makes the directories certfleet's SSH state lives in (0700), and
    /// ends the master connections a killed coordinator left.
    pub fn prepare(&self) -> std::io::Result<usize> {
        for dir in [&self.control_dir, &self.records_dir] {
            certfleet_proto::fsio::create_private_dir(dir)?;
        }
        if let Some(parent) = self.known_hosts.parent() {
            certfleet_proto::fsio::create_private_dir(parent)?;
        }
        certfleet_proto::fsio::write_atomic(
            &self.client_config(),
            CLIENT_CONFIG.as_bytes(),
            0o600,
        )?;
        Ok(clean_control_dir(&self.control_dir))
    }
}

/// What `ssh -F` reads: `KnownHosts::Strict` and the user known_hosts
/// file come as options; this turns off the system-wide known_hosts
/// (`/etc/ssh/ssh_known_hosts`), which ssh would otherwise also trust.
const CLIENT_CONFIG: &str = "# Written by certfleet-coordinator; replaced at every start.\nGlobalKnownHostsFile /dev/null\n";

/// Ends every ssh master whose control socket is in `dir` (`ssh -O exit`),
/// and removes their directories. Returns how many were found.
///
/// The `openssh` crate keeps each master in `<dir>/.ssh-connectionXXXXXX/`
/// with ControlPersist, so a coordinator killed with SIGKILL leaves them
/// running with their sockets; a master that no longer answers on its
/// socket is already gone.
pub fn clean_control_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut found = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(".ssh-connection") {
            continue;
        }
        let path = entry.path();
        let socket = path.join("master");
        if socket.exists() {
            found += 1;
            let ended = std::process::Command::new("ssh")
                .arg("-F")
                .arg("/dev/null")
                .arg("-S")
                .arg(&socket)
                .arg("-O")
                .arg("exit")
                .arg("certfleet-master")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            tracing::info!(socket = %socket.display(), ok = ended.is_ok_and(|s| s.success()), "ended an ssh master left by an earlier run");
        }
        let _ = std::fs::remove_dir_all(&path);
    }
    found
}

/// What an SSH transport shares across nodes: the config, and the store,
/// from which a rollback reads the previous version.
pub struct SshContext {
    pub config: SshConfig,
    pub store: Store,
}

/// The fleet's [`Connect`]: each node through its agent, over SSH, or
/// both, as its registry record says.
#[derive(Clone)]
pub struct Reach {
    pub trust: ClusterTrust,
    pub ssh: Arc<SshContext>,
}

impl Connect for Reach {
    fn connect(&self, node: &crate::config::Node) -> Result<Arc<dyn Transport>, ConnectError> {
        let ssh = |dest: &Option<SshDestination>| -> Result<Arc<SshNode>, ConnectError> {
            let dest = dest.clone().ok_or_else(|| {
                format!(
                    "node {} is reached over SSH but has no SSH destination: `certfleet node set {} --ssh user@host[:port]`",
                    node.name, node.name
                )
            })?;
            Ok(Arc::new(SshNode::new(
                &node.name,
                dest,
                Arc::clone(&self.ssh),
            )))
        };
        Ok(match node.transport {
            NodeTransport::Agent => Arc::new(GrpcAgent::new(node, &self.trust)),
            NodeTransport::Ssh => ssh(&node.ssh)?,
            NodeTransport::Auto => Arc::new(Fallback {
                node: node.name.clone(),
                agent: GrpcAgent::new(node, &self.trust),
                ssh: ssh(&node.ssh)?,
            }),
        })
    }
}

tokio::task_local! {
    /// Where a fallback is recorded for the operation running in this task.
    static FALLBACKS: FallbackSink;
}

/// An operation's journal and progress, for fallbacks to be recorded in.
#[derive(Clone)]
struct FallbackSink {
    journal: Journal,
    progress: Progress,
}

/// Runs `operation` so that any fallback to SSH in it is journaled in
/// `journal` (step "fallback", so `certfleet history` shows it) and shown
/// in `progress`. Transports are shared by every operation, so they learn
/// which one called them from the task they run in.
pub fn record_fallbacks<F: Future>(
    journal: Journal,
    progress: Progress,
    operation: F,
) -> impl Future<Output = F::Output> {
    FALLBACKS.scope(FallbackSink { journal, progress }, operation)
}

/// A node reached through its agent, and over SSH when the agent cannot be
/// reached.
pub struct Fallback {
    node: String,
    agent: GrpcAgent,
    ssh: Arc<SshNode>,
}

/// The journal step of a fallback.
pub const FALLBACK_STEP: &str = "fallback";

impl Fallback {
    /// The agent's answer, or, when the agent could not be reached, SSH's.
    async fn call<'a, T, A, S>(&'a self, what: &str, agent: A, ssh: S) -> Result<T, TransportError>
    where
        A: Future<Output = Result<T, TransportError>> + Send + 'a,
        S: FnOnce(
            &'a SshNode,
        )
            -> std::pin::Pin<Box<dyn Future<Output = Result<T, TransportError>> + Send + 'a>>,
    {
        let why = match agent.await {
            Err(TransportError::Unreachable(why)) => why,
            Err(TransportError::Timeout(d)) => format!("no answer within {d:?}"),
            other => return other,
        };
        let detail = format!(
            "agent unreachable ({why}); {what} over SSH ({})",
            self.ssh.destination()
        );
        tracing::warn!(node = %self.node, "{detail}");
        let _ = FALLBACKS.try_with(|sink| {
            if let Err(e) = sink.journal.step(FALLBACK_STEP, &self.node, &detail) {
                tracing::warn!(node = %self.node, error = %e, "cannot journal the fallback");
            }
            sink.progress
                .node(stage_of(what), &self.node, true, detail.clone());
        });
        ssh(&self.ssh).await
    }
}

/// The progress stage a call belongs to.
fn stage_of(what: &str) -> Stage {
    match what {
        "placing tokens" => Stage::Placement,
        "removing tokens" => Stage::Cleanup,
        "installing" => Stage::Distribute,
        "rolling back" => Stage::Rollback,
        _ => Stage::Restart,
    }
}

#[tonic::async_trait]
impl Transport for Fallback {
    async fn place_tokens(
        &self,
        batch: &[Http01Response],
        ttl: Duration,
    ) -> Result<(), TransportError> {
        self.call("placing tokens", self.agent.place_tokens(batch, ttl), |s| {
            Box::pin(s.place_tokens(batch, ttl))
        })
        .await
    }

    async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError> {
        self.call("removing tokens", self.agent.remove_tokens(tokens), |s| {
            Box::pin(s.remove_tokens(tokens))
        })
        .await
    }

    async fn install_certificate(
        &self,
        bundle: &BundleToInstall,
    ) -> Result<NodeInstall, TransportError> {
        self.call("installing", self.agent.install_certificate(bundle), |s| {
            Box::pin(s.install_certificate(bundle))
        })
        .await
    }

    async fn restart_services(
        &self,
        certificate: &str,
        expected: &str,
        keep_going: bool,
    ) -> Result<RestartReport, TransportError> {
        self.call(
            "restarting",
            self.agent
                .restart_services(certificate, expected, keep_going),
            |s| Box::pin(s.restart_services(certificate, expected, keep_going)),
        )
        .await
    }

    async fn rollback_certificate(&self, certificate: &str) -> Result<NodeInstall, TransportError> {
        self.call(
            "rolling back",
            self.agent.rollback_certificate(certificate),
            |s| Box::pin(s.rollback_certificate(certificate)),
        )
        .await
    }

    async fn certificate_status(
        &self,
        certificate: &str,
        probe: bool,
    ) -> Result<NodeCertificate, TransportError> {
        self.call(
            "status",
            self.agent.certificate_status(certificate, probe),
            |s| Box::pin(s.certificate_status(certificate, probe)),
        )
        .await
    }

    async fn remove_certificate(&self, certificate: &str) -> Result<NodeRemoval, TransportError> {
        self.call(
            "removing",
            self.agent.remove_certificate(certificate),
            |s| Box::pin(s.remove_certificate(certificate)),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_is_user_host_and_port() {
        let d = SshDestination::parse("root@127.0.0.5:2222").unwrap();
        assert_eq!(
            (d.user.as_str(), d.host.as_str(), d.port),
            ("root", "127.0.0.5", 2222)
        );
        assert_eq!(d.known_hosts_name(), "[127.0.0.5]:2222");
        let d = SshDestination::parse("certfleet@cn-1.example.org").unwrap();
        assert_eq!(
            (d.port, d.known_hosts_name()),
            (22, "cn-1.example.org".to_owned())
        );
        let d = SshDestination::parse("root@[::1]:22").unwrap();
        assert_eq!(d.host, "::1");
    }

    #[test]
    fn a_destination_that_ssh_could_read_as_an_option_is_refused() {
        for bad in [
            "-oProxyCommand=x@h",
            "root@-oProxyCommand=x",
            "root@h:0",
            "h",
            "ro ot@h",
            "root@h;ls",
        ] {
            assert!(SshDestination::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_registry_from_before_ssh_gains_the_columns_and_keeps_its_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let old = rusqlite::Connection::open(dir.path().join("certfleet.db")).unwrap();
        old.execute_batch(
            "CREATE TABLE nodes (name TEXT PRIMARY KEY, agent TEXT NOT NULL, http01 TEXT NOT NULL,
                 state TEXT NOT NULL, cert_serial TEXT, cert_not_after INTEGER NOT NULL DEFAULT 0,
                 last_contact INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL);
             INSERT INTO nodes (name, agent, http01, state, created)
                 VALUES ('cn-1', '127.0.0.2:7443', '127.0.0.2', 'active', 0);",
        )
        .unwrap();
        drop(old);
        let db = crate::db::Db::open(dir.path()).unwrap();
        let nodes = db.nodes().unwrap();
        assert_eq!(nodes[0].reach, NodeReach::default());
        let reach = NodeReach {
            transport: NodeTransport::Auto,
            ssh: Some(SshDestination::parse("root@127.0.0.2:2222").unwrap()),
        };
        db.set_reach("cn-1", &reach).unwrap();
        drop(db);
        let db = crate::db::Db::open(dir.path()).unwrap();
        assert_eq!(db.node("cn-1").unwrap().unwrap().reach, reach);
    }

    #[test]
    fn a_long_state_dir_gets_a_short_control_dir() {
        let long = Path::new("/var/lib/a-very-long-state-directory-name-for-certfleet/ssh");
        let dir = default_control_dir(long);
        assert!(dir.starts_with(SHORT_CONTROL_ROOT), "{}", dir.display());
        assert!(dir.as_os_str().len() <= MAX_CONTROL_DIR_LEN);
        assert_eq!(
            default_control_dir(Path::new("/var/lib/certfleet/ssh")),
            Path::new("/var/lib/certfleet/ssh/ctl")
        );
    }
}
