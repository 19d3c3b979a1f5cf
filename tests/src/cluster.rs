//! A whole certfleet cluster on loopback: Pebble, N agents, the
//! coordinator, and the CLI to drive it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use certfleet_proto::pb;
use certfleet_proto::pb::agent_client::AgentClient;
use serde_json::Value;
use tempfile::TempDir;

use crate::net::{Subnet, common_free_port, free_port, wait_listening};
use crate::nginx;
use crate::pebble::{Pebble, PebbleOptions};
use crate::process::{Proc, bin, eventually};

/// The DataONE-like node names the harness uses for the first four nodes.
pub const NODE_NAMES: [&str; 4] = ["cn-ucsb-1", "cn-unm-1", "cn-orc-1", "cn-ornl-1"];
/// The domain every test name lives under.
pub const DOMAIN: &str = "dataone.test";
/// The certificate every cluster is configured with.
pub const CERT: &str = "cn";

const STARTUP: Duration = Duration::from_secs(20);

/// How nodes answer HTTP-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http01 {
    /// The agent's own listener.
    Standalone,
    /// Files in a webroot that a real nginx serves.
    WebrootNginx,
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub http01: Http01,
    pub pebble: PebbleOptions,
    /// How many names the certificate has; `None`: the shared name plus one
    /// per node. More names than that are `alias-K` names spread over the
    /// nodes; fewer drop the last node names.
    pub sans: Option<usize>,
    /// Which node the shared name resolves to.
    pub shared_node: usize,
    /// Extra lines appended to the coordinator's config.
    pub coordinator_extra: String,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 4,
            http01: Http01::Standalone,
            pebble: PebbleOptions::default(),
            sans: None,
            shared_node: 1,
            coordinator_extra: String::new(),
        }
    }
}

pub struct Node {
    pub name: String,
    pub ip: IpAddr,
    pub grpc: SocketAddr,
    pub dir: PathBuf,
    pub webroot: Option<PathBuf>,
    pub agent: Option<Proc>,
    pub nginx: Option<Proc>,
}

impl Node {
    pub async fn client(&self) -> anyhow::Result<AgentClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| format!("connecting to agent {} at {}", self.name, self.grpc))?;
        Ok(AgentClient::new(channel))
    }

    /// The tokens the agent serves, as it reports them.
    pub async fn tokens(&self) -> anyhow::Result<Vec<String>> {
        let rsp = self
            .client()
            .await?
            .list_tokens(pb::ListTokensRequest {})
            .await?;
        Ok(rsp
            .into_inner()
            .tokens
            .into_iter()
            .map(|t| t.token)
            .collect())
    }

    /// The files in the webroot's challenge directory (webroot mode).
    pub fn webroot_files(&self) -> Vec<String> {
        let Some(root) = &self.webroot else {
            return Vec::new();
        };
        std::fs::read_dir(root.join(".well-known/acme-challenge"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops the node's agent, as a crashed or unreachable node would be.
    pub fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }
}

/// What a `certfleet` invocation did.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// The stdout's JSON lines.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The last JSON line (an `issue` stream's outcome).
    pub fn last_json(&self) -> Value {
        self.json_lines().pop().unwrap_or(Value::Null)
    }
}

pub struct Cluster {
    pub dir: TempDir,
    pub subnet: Subnet,
    pub pebble: Pebble,
    pub nodes: Vec<Node>,
    pub coordinator: Option<Proc>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    /// Every name of the certificate, the shared name first.
    pub sans: Vec<String>,
}

pub fn shared_name() -> String {
    format!("cn.{DOMAIN}")
}

pub fn node_name(i: usize) -> String {
    NODE_NAMES
        .get(i)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("cn-node-{i}"))
}

impl Cluster {
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("certfleet-test-")
            .tempdir()?;
        let subnet = Subnet::new();
        let ips: Vec<IpAddr> = (0..spec.nodes).map(|i| subnet.node(i)).collect();
        let http_port = common_free_port(&ips);
        let pebble = Pebble::start(&dir.path().join("pebble"), http_port, spec.pebble).await?;

        let total = spec
            .sans
            .unwrap_or(spec.nodes + 1)
            .clamp(1, certfleet_coordinator::config::MAX_SANS);
        let mut sans = vec![shared_name()];
        sans.extend((0..spec.nodes).map(|i| format!("{}.{DOMAIN}", node_name(i))));
        sans.extend((0..total.saturating_sub(sans.len())).map(|k| format!("alias-{k}.{DOMAIN}")));
        sans.truncate(total);
        // DNS: each node's name to its node, the shared name to the chosen
        // node, extra names round-robin across nodes.
        pebble
            .add_a(&sans[0], ips[spec.shared_node % spec.nodes])
            .await?;
        for (k, san) in sans.iter().enumerate().skip(1) {
            pebble.add_a(san, ips[(k - 1) % spec.nodes]).await?;
        }

        let mut nodes = Vec::with_capacity(spec.nodes);
        for (i, ip) in ips.iter().enumerate() {
            nodes.push(start_node(dir.path(), i, *ip, http_port, spec.http01).await?);
        }

        let state_dir = dir.path().join("coordinator/state");
        let socket = dir.path().join("coordinator/admin.sock");
        let config_path = dir.path().join("coordinator/coordinator.toml");
        std::fs::create_dir_all(dir.path().join("coordinator"))?;
        let mut config = format!(
            r#"state_dir = "{state}"
admin_socket = "{socket}"

[acme]
directory = "{directory}"
contact = ["mailto:admins@{DOMAIN}"]
validation_port = {http_port}
extra_roots = ["{ca}"]
ca_timeout_secs = 60

[placement]
concurrency = 32
node_timeout_secs = 5
"#,
            state = state_dir.display(),
            socket = socket.display(),
            directory = pebble.directory_url(),
            ca = pebble.listener_ca.display(),
        );
        for node in &nodes {
            config.push_str(&format!(
                "\n[[nodes]]\nname = \"{}\"\nagent = \"{}\"\n",
                node.name, node.grpc
            ));
        }
        config.push_str(&format!(
            "\n[[certificates]]\nname = \"{CERT}\"\nsans = {}\n",
            serde_json::to_string(&sans)?
        ));
        config.push_str(&spec.coordinator_extra);
        std::fs::write(&config_path, &config)?;

        let mut cluster = Self {
            dir,
            subnet,
            pebble,
            nodes,
            coordinator: None,
            socket,
            state_dir,
            config_path,
            sans,
        };
        cluster.start_coordinator().await?;
        Ok(cluster)
    }

    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("certfleet-coordinator"));
        cmd.arg("--config").arg(&self.config_path);
        let log = self.dir.path().join("coordinator/coordinator.log");
        let mut proc = Proc::spawn("certfleet-coordinator", cmd, &log)?;
        let socket = self.socket.clone();
        let waited = eventually("the admin socket", STARTUP, || {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(&socket)
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
        if let Err(e) = waited {
            proc.check_running()?;
            return Err(e);
        }
        self.coordinator = Some(proc);
        Ok(())
    }

    /// Runs the `certfleet` CLI against this cluster's coordinator.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<CtlOutput> {
        let out = tokio::process::Command::new(bin("certfleet"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .await?;
        Ok(CtlOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the `certfleet` CLI with the terminal as its output; returns
    /// its exit code.
    pub async fn ctl_inherit(&self, args: &[&str]) -> anyhow::Result<i32> {
        let status = tokio::process::Command::new(bin("certfleet"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .status()
            .await?;
        Ok(status.code().unwrap_or(-1))
    }

    /// `certfleet --json issue cn`.
    pub async fn issue(&self) -> anyhow::Result<CtlOutput> {
        self.ctl(&["--json", "issue", CERT]).await
    }

    pub fn live_dir(&self) -> PathBuf {
        self.state_dir.join("live").join(CERT)
    }

    pub fn coordinator_log(&self) -> String {
        self.coordinator
            .as_ref()
            .map(Proc::log_text)
            .unwrap_or_default()
    }

    /// Everything the processes logged, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut s = format!("--- coordinator\n{}", self.coordinator_log());
        for n in &self.nodes {
            if let Some(a) = &n.agent {
                s.push_str(&format!("--- agent {}\n{}", n.name, a.log_tail()));
            }
        }
        s.push_str(&format!("--- pebble\n{}", self.pebble.log()));
        s
    }
}

pub async fn start_node(
    root: &Path,
    i: usize,
    ip: IpAddr,
    http_port: u16,
    mode: Http01,
) -> anyhow::Result<Node> {
    let name = node_name(i);
    let dir = root.join("nodes").join(&name);
    std::fs::create_dir_all(&dir)?;
    let grpc = SocketAddr::new(ip, free_port(ip));
    let (http01, webroot, nginx) = match mode {
        Http01::Standalone => (
            format!("mode = \"standalone\"\nlisten = \"{ip}:{http_port}\"\n"),
            None,
            None,
        ),
        Http01::WebrootNginx => {
            let webroot = dir.join("webroot");
            std::fs::create_dir_all(&webroot)?;
            let nginx = nginx::serve_webroot(&dir.join("nginx"), ip, http_port, &webroot).await?;
            (
                format!("mode = \"webroot\"\nwebroot = \"{}\"\n", webroot.display()),
                Some(webroot),
                Some(nginx),
            )
        }
    };
    let config = format!("node = \"{name}\"\n\n[grpc]\nlisten = \"{grpc}\"\n\n[http01]\n{http01}");
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config)?;
    let mut cmd = Command::new(bin("certfleet-agent"));
    cmd.arg("--config").arg(&config_path);
    let mut agent = Proc::spawn(
        &format!("certfleet-agent {name}"),
        cmd,
        &dir.join("agent.log"),
    )?;
    if let Err(e) = wait_listening(grpc, STARTUP).await {
        agent.check_running()?;
        bail!("agent {name}: {e}");
    }
    Ok(Node {
        name,
        ip,
        grpc,
        dir,
        webroot,
        agent: Some(agent),
        nginx,
    })
}
