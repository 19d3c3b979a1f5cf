//! A whole certfleet cluster on loopback: Pebble, N agents, the
//! coordinator, and the CLI to drive it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

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
/// Mode of the directories the harness makes on a node's way to a webroot.
const DIR_MODE: u32 = 0o755;

/// How nodes answer HTTP-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http01 {
    /// The agent's own listener.
    Standalone,
    /// Files in a webroot that a real nginx serves.
    WebrootNginx,
    /// The same, with nginx redirecting every plain-HTTP request to HTTPS
    /// on the cluster's `tls_port` (the usual nginx setup), where it serves
    /// the webroot with a self-signed placeholder certificate.
    WebrootNginxHttps,
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
    /// `enrollment.agent_cert_validity_secs`, when a test wants it short.
    pub agent_cert_validity_secs: Option<u64>,
    /// `enrollment.coordinator_cert_validity_secs`, likewise.
    pub coordinator_cert_validity_secs: Option<u64>,
    /// `placement.idle_connection_secs`, when a test or the bench wants the
    /// coordinator to close idle node connections soon.
    pub idle_connection_secs: Option<u64>,
    /// The `[[certificates]]` part of every agent's config; `{dir}` becomes
    /// the node's directory, `{ip}` its address and `{tls_port}` the port
    /// its TLS services use. Default: certbot's layout under `{dir}/live/cn`.
    pub agent_certificates: String,
}

/// Install targets like DataONE's (the key root:ssl-cert 0640, as postgres
/// needs it) with the node's nginx (see [`Cluster::serve_tls`]) as the
/// service that uses them, reloaded with `nginx -s reload`.
pub const NGINX_TARGETS: &str = r#"
[[certificates]]
name = "cn"
[[certificates.files]]
content = "fullchain"
path = "{dir}/ssl/certs/cn.pem"
[[certificates.files]]
content = "privkey"
path = "{dir}/ssl/private/server.key"
group = "ssl-cert"
mode = "0640"
[[certificates.services]]
name = "nginx"
check = ["nginx", "-t", "-q", "-c", "{dir}/tls/nginx.conf", "-p", "{dir}/tls"]
restart = ["nginx", "-s", "reload", "-c", "{dir}/tls/nginx.conf", "-p", "{dir}/tls"]
timeout_secs = 5
[[certificates.services.verify]]
address = "{ip}:{tls_port}"
sni = "cn.dataone.test"
"#;

/// Makes sure the `ssl-cert` group [`NGINX_TARGETS`] uses exists.
pub fn ensure_ssl_cert_group() -> anyhow::Result<()> {
    let status = Command::new("groupadd").args(["-f", "ssl-cert"]).status()?;
    if !status.success() {
        bail!("groupadd -f ssl-cert failed (the tests and demo run as root)");
    }
    Ok(())
}

/// The default install targets: certbot's layout under the node's directory.
pub const DEFAULT_AGENT_CERTIFICATES: &str =
    "\n[[certificates]]\nname = \"cn\"\nlive_dir = \"{dir}/live/cn\"\n";

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 4,
            http01: Http01::Standalone,
            pebble: PebbleOptions::default(),
            sans: None,
            shared_node: 1,
            coordinator_extra: String::new(),
            agent_cert_validity_secs: None,
            coordinator_cert_validity_secs: None,
            idle_connection_secs: None,
            agent_certificates: DEFAULT_AGENT_CERTIFICATES.to_owned(),
        }
    }
}

pub struct Node {
    pub name: String,
    pub ip: IpAddr,
    pub grpc: SocketAddr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// The agent's state dir (its identity lives in `identity/`).
    pub state_dir: PathBuf,
    pub webroot: Option<PathBuf>,
    pub agent: Option<Proc>,
    pub nginx: Option<nginx::Nginx>,
    /// The coordinator's identity, so tests can call the agent as it does.
    coordinator: Arc<Credentials>,
}

/// A certificate chain and key (PEM) and the CA they belong to.
#[derive(Clone)]
pub struct Credentials {
    pub chain_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl Credentials {
    /// The coordinator's identity, from its state dir.
    pub fn coordinator(state_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            chain_pem: std::fs::read_to_string(state_dir.join("identity/coordinator.pem"))?,
            key_pem: std::fs::read_to_string(state_dir.join("identity/coordinator.key"))?,
            ca_pem: std::fs::read_to_string(state_dir.join("ca/ca.pem"))?,
        })
    }

    /// A node's identity, from its agent's state dir.
    pub fn node(state_dir: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(state_dir.join("identity/node.pem"))?;
        Ok(Self {
            chain_pem: pem.clone(),
            key_pem: pem,
            ca_pem: std::fs::read_to_string(state_dir.join("identity/ca.pem"))?,
        })
    }
}

/// A gRPC client to `node`'s agent presenting `creds` (None: no client
/// certificate) and expecting the node's identity from the cluster CA.
pub fn agent_client_as(
    node_name: &str,
    addr: SocketAddr,
    ca_pem: &str,
    creds: Option<&Credentials>,
) -> anyhow::Result<AgentClient<tonic::transport::Channel>> {
    use certfleet_proto::identity::{ExpectIdentity, LiveIdentity, client_config, node_identity};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())?;
    let expected = node_identity(node_name);
    let verifier = ExpectIdentity::new(&ca, expected.clone())?;
    let identity = match creds {
        Some(c) => Some(Arc::new(LiveIdentity::from_pem(&c.chain_pem, &c.key_pem)?)),
        None => None,
    };
    let config = client_config(Arc::new(verifier), identity)?;
    let channel = certfleet_proto::tls::channel(addr, Arc::new(config), &expected);
    Ok(AgentClient::new(channel))
}

impl Node {
    /// A client calling this agent as the coordinator does.
    pub async fn client(&self) -> anyhow::Result<AgentClient<tonic::transport::Channel>> {
        agent_client_as(
            &self.name,
            self.grpc,
            &self.coordinator.ca_pem,
            Some(&self.coordinator),
        )
    }

    /// A client presenting other credentials (or none).
    pub fn client_as(
        &self,
        creds: Option<&Credentials>,
    ) -> anyhow::Result<AgentClient<tonic::transport::Channel>> {
        agent_client_as(&self.name, self.grpc, &self.coordinator.ca_pem, creds)
    }

    /// Places `tokens` on this agent as the coordinator does (default TTL).
    pub async fn place_tokens(&self, tokens: Vec<pb::Http01Token>) -> Result<u32, tonic::Status> {
        let mut client = self
            .client()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        client
            .place_tokens(pb::PlaceTokensRequest {
                tokens,
                ttl_seconds: 0,
            })
            .await
            .map(|r| r.into_inner().placed)
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

    /// Starts (or restarts) the agent process and waits for its listener.
    pub async fn start_agent(&mut self) -> anyhow::Result<()> {
        self.stop_agent();
        let mut cmd = Command::new(bin("certfleet-agent"));
        cmd.arg("--config").arg(&self.config_path);
        let log = self.dir.join("agent.log");
        let mut agent = Proc::spawn(&format!("certfleet-agent {}", self.name), cmd, &log)?;
        if let Err(e) = wait_listening(self.grpc, STARTUP).await {
            agent.check_running()?;
            bail!("agent {}: {e}", self.name);
        }
        self.agent = Some(agent);
        Ok(())
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
    /// The coordinator's enrollment address.
    pub enrollment: SocketAddr,
    /// The port every node's TLS services (the tests' nginx) listen on.
    pub tls_port: u16,
    /// Environment the coordinator is started with from now on (crash
    /// tests set the journal's pause point).
    pub coordinator_env: Vec<(String, String)>,
    spec: ClusterSpec,
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
        // As /srv or /var/www on a node: root's, and others may traverse it
        // (nginx's workers run as www-data and read the webroots below).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(DIR_MODE))?;
        let subnet = Subnet::new();
        let ips: Vec<IpAddr> = (0..spec.nodes).map(|i| subnet.node(i)).collect();
        let http_port = common_free_port(&ips);
        // Also where Pebble follows an HTTP-to-HTTPS redirect, as Let's
        // Encrypt does to 443.
        let tls_port = common_free_port(&ips);
        let pebble =
            Pebble::start(&dir.path().join("pebble"), http_port, tls_port, spec.pebble).await?;

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

        let state_dir = dir.path().join("coordinator/state");
        let socket = dir.path().join("coordinator/admin.sock");
        let config_path = dir.path().join("coordinator/coordinator.toml");
        let enrollment = SocketAddr::new("127.0.0.1".parse()?, free_port("127.0.0.1".parse()?));
        std::fs::create_dir_all(dir.path().join("coordinator"))?;
        let mut config = format!(
            r#"state_dir = "{state}"
admin_socket = "{socket}"

[acme]
directory = "{directory}"
contact = ["mailto:admins@{DOMAIN}"]
validation_port = {http_port}
validation_tls_port = {tls_port}
agree_tos = true
extra_roots = ["{ca}"]
ca_timeout_secs = 60

[placement]
concurrency = 32
node_timeout_secs = 5
{idle}
[enrollment]
listen = "{enrollment}"
"#,
            state = state_dir.display(),
            socket = socket.display(),
            directory = pebble.directory_url(),
            ca = pebble.listener_ca.display(),
            idle = spec
                .idle_connection_secs
                .map(|s| format!("idle_connection_secs = {s}\n"))
                .unwrap_or_default(),
        );
        if let Some(secs) = spec.agent_cert_validity_secs {
            config.push_str(&format!("agent_cert_validity_secs = {secs}\n"));
        }
        if let Some(secs) = spec.coordinator_cert_validity_secs {
            config.push_str(&format!("coordinator_cert_validity_secs = {secs}\n"));
        }
        config.push_str(&format!(
            "\n[[certificates]]\nname = \"{CERT}\"\nsans = {}\n",
            serde_json::to_string(&sans)?
        ));
        config.push_str(&spec.coordinator_extra);
        std::fs::write(&config_path, &config)?;
        // A config may hold a secret (an EAB key); the coordinator refuses
        // one that every user can read.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o640))?;

        let init = Command::new(bin("certfleet-coordinator"))
            .arg("--config")
            .arg(&config_path)
            .arg("init")
            .output()?;
        if !init.status.success() {
            bail!(
                "certfleet-coordinator init: {}",
                String::from_utf8_lossy(&init.stderr)
            );
        }

        let mut cluster = Self {
            dir,
            subnet,
            pebble,
            nodes: Vec::with_capacity(spec.nodes),
            coordinator: None,
            coordinator_env: Vec::new(),
            socket,
            state_dir,
            config_path,
            sans,
            enrollment,
            tls_port,
            spec: spec.clone(),
        };
        cluster.start_coordinator().await?;
        for _ in 0..spec.nodes {
            cluster.grow().await?;
        }
        Ok(cluster)
    }

    /// `certfleet --json node add`: returns (token, ca_pin).
    pub async fn node_add(
        &self,
        name: &str,
        agent: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<(String, String)> {
        let agent = agent.to_string();
        let mut args = vec!["--json", "node", "add", name, "--agent", &agent];
        args.extend_from_slice(extra);
        let out = self.ctl(&args).await?;
        if out.code != 0 {
            bail!("certfleet node add {name}: {}", out.stderr);
        }
        let v = out.last_json();
        Ok((
            v["token"].as_str().context("no token")?.to_owned(),
            v["ca_pin"].as_str().context("no ca_pin")?.to_owned(),
        ))
    }

    /// Removes node `i` and registers it again with `extra` arguments to
    /// `node add`, joins it again and restarts its agent.
    pub async fn readd_node(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<()> {
        let name = self.nodes[i].name.clone();
        let out = self.ctl(&["node", "remove", &name]).await?;
        if out.code != 0 {
            bail!("certfleet node remove {name}: {}", out.stderr);
        }
        let (token, pin) = self.node_add(&name, self.nodes[i].grpc, extra).await?;
        let (code, stderr) = join(
            &self.nodes[i].config_path,
            &self.enrollment.to_string(),
            &token,
            &pin,
        )?;
        if code != 0 {
            bail!("certfleet-agent join {name}: {stderr}");
        }
        self.nodes[i].start_agent().await
    }

    /// Adds one more node the real way (node add, join, start) and returns
    /// its index.
    pub async fn grow(&mut self) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let node = self.add_node(i).await?;
        self.nodes.push(node);
        Ok(i)
    }

    /// Registers node `i`, writes its agent config, joins it and starts it.
    async fn add_node(&self, i: usize) -> anyhow::Result<Node> {
        let mut node = prepare_node(self, i).await?;
        let (token, pin) = self.node_add(&node.name, node.grpc, &[]).await?;
        let joined = join(
            &node.config_path,
            &self.enrollment.to_string(),
            &token,
            &pin,
        )?;
        if joined.0 != 0 {
            bail!("certfleet-agent join {}: {}", node.name, joined.1);
        }
        node.start_agent().await?;
        Ok(node)
    }

    /// Starts the coordinator. If its enrollment port was taken between
    /// picking and binding, it is started again on a new one.
    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.start_coordinator_once().await {
                Err(e) if attempt < 5 && format!("{e:#}").contains("binding enrollment.listen") => {
                    let old = self.enrollment;
                    self.enrollment = SocketAddr::new(old.ip(), free_port(old.ip()));
                    let config = std::fs::read_to_string(&self.config_path)?.replace(
                        &format!("listen = \"{old}\""),
                        &format!("listen = \"{}\"", self.enrollment),
                    );
                    std::fs::write(&self.config_path, config)?;
                }
                other => return other,
            }
        }
    }

    async fn start_coordinator_once(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("certfleet-coordinator"));
        cmd.arg("--config").arg(&self.config_path);
        cmd.envs(self.coordinator_env.iter().map(|(k, v)| (k, v)));
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

    /// Rewrites the coordinator's config with `edit` and sends the
    /// coordinator SIGHUP, as `systemctl reload` does. Returns at once:
    /// the reload's outcome is in the coordinator's log.
    pub fn reload_coordinator(&self, edit: impl FnOnce(String) -> String) -> anyhow::Result<()> {
        use nix::sys::signal::{Signal, kill};
        let config = std::fs::read_to_string(&self.config_path)?;
        std::fs::write(&self.config_path, edit(config))?;
        let pid = self
            .coordinator
            .as_ref()
            .and_then(Proc::pid)
            .context("the coordinator is not running")?;
        kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP)?;
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

    /// Starts a real nginx on every node serving TLS on `tls_port` from the
    /// files [`NGINX_TARGETS`] installs (distribute first).
    pub async fn serve_tls(&self) -> anyhow::Result<Vec<nginx::Nginx>> {
        let mut servers = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            servers.push(
                nginx::serve_tls(
                    &node.dir.join("tls"),
                    node.ip,
                    self.tls_port,
                    &node.dir.join("ssl/certs/cn.pem"),
                    &node.dir.join("ssl/private/server.key"),
                )
                .await?,
            );
        }
        Ok(servers)
    }

    /// A cluster for `spec` whose every node has version 1 installed and a
    /// real nginx serving it over TLS (see [`Cluster::serve_tls`]); the
    /// nginx servers stop when the returned list is dropped.
    pub async fn serving_version_1(spec: ClusterSpec) -> anyhow::Result<(Self, Vec<nginx::Nginx>)> {
        ensure_ssl_cert_group()?;
        let cluster = Self::start(spec).await?;
        let out = cluster.issue().await?;
        if out.code != 0 {
            bail!("certfleet issue: {}{}", out.stdout, out.stderr);
        }
        let out = cluster.ctl(&["distribute", CERT]).await?;
        if out.code != 0 {
            bail!("certfleet distribute: {}{}", out.stdout, out.stderr);
        }
        let nginx = cluster.serve_tls().await?;
        Ok((cluster, nginx))
    }

    /// `certfleet --json issue cn`.
    pub async fn issue(&self) -> anyhow::Result<CtlOutput> {
        self.ctl(&["--json", "issue", CERT]).await
    }

    pub fn live_dir(&self) -> PathBuf {
        self.state_dir.join("live").join(CERT)
    }

    /// A TLS client of the coordinator's listeners as a node or an admin
    /// reaches them: it trusts only the cluster CA, expects the
    /// coordinator's identity, offers `alpn` and no client certificate.
    pub fn coordinator_tls(
        &self,
        alpn: &[&[u8]],
    ) -> (
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    ) {
        use rustls::pki_types::pem::PemObject;
        let ca = std::fs::read(self.state_dir.join("ca/ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut tls =
            rustls::ClientConfig::builder_with_provider(certfleet_proto::identity::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(
            certfleet_proto::identity::COORDINATOR_IDENTITY.to_owned(),
        )
        .unwrap();
        (tokio_rustls::TlsConnector::from(Arc::new(tls)), name)
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

/// The uid and gid of nginx's worker user ([`nginx::WORKER_USER`]).
pub fn web_user() -> anyhow::Result<(u32, u32)> {
    let user = nix::unistd::User::from_name(nginx::WORKER_USER)?
        .with_context(|| format!("no user {} on this machine", nginx::WORKER_USER))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// Runs `certfleet-agent join`, the token on its standard input as
/// `certfleet node add` says; returns its exit code and stderr.
pub fn join(
    config: &Path,
    coordinator: &str,
    token: &str,
    pin: &str,
) -> anyhow::Result<(i32, String)> {
    use std::io::Write;
    let mut child = Command::new(bin("certfleet-agent"))
        .arg("--config")
        .arg(config)
        .args(["join", "--coordinator", coordinator, "--ca-pin", pin])
        .args(["--token-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("the agent's standard input")?;
    // A write error means the agent exited before reading: its stderr says why.
    let _ = writeln!(stdin, "{token}");
    drop(stdin);
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Makes node `i`'s directory and agent config (and its nginx in webroot
/// mode); the agent is neither joined nor started.
async fn prepare_node(cluster: &Cluster, i: usize) -> anyhow::Result<Node> {
    let (certificates, tls_port, root) = (
        &cluster.spec.agent_certificates,
        cluster.tls_port,
        cluster.dir.path(),
    );
    let (ip, http_port, mode) = (
        cluster.subnet.node(i),
        cluster.pebble.http_port,
        cluster.spec.http01,
    );
    let coordinator = Credentials::coordinator(&cluster.state_dir)?;
    let name = node_name(i);
    let dir = root.join("nodes").join(&name);
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&state_dir)?;
    for d in [root.join("nodes"), dir.clone()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    let grpc = SocketAddr::new(ip, free_port(ip));
    let (http01, webroot, nginx) = match mode {
        Http01::Standalone => (
            format!("mode = \"standalone\"\nlisten = \"{ip}:{http_port}\"\n"),
            None,
            None,
        ),
        Http01::WebrootNginx | Http01::WebrootNginxHttps => {
            // As on Debian: the web server's user owns the webroot, and
            // it has no .well-known yet.
            let webroot = dir.join("webroot");
            std::fs::create_dir_all(&webroot)?;
            let www = web_user()?;
            std::os::unix::fs::chown(&webroot, Some(www.0), Some(www.1))?;
            let https = (mode == Http01::WebrootNginxHttps).then_some(tls_port);
            let nginx =
                nginx::serve_webroot(&dir.join("nginx"), ip, http_port, https, &webroot).await?;
            (
                format!("mode = \"webroot\"\nwebroot = \"{}\"\n", webroot.display()),
                Some(webroot),
                Some(nginx),
            )
        }
    };
    let config = format!(
        "node = \"{name}\"\nstate_dir = \"{}\"\n\n[grpc]\nlisten = \"{grpc}\"\n\n[http01]\n{http01}{}",
        state_dir.display(),
        certificates
            .replace("{dir}", &dir.display().to_string())
            .replace("{ip}", &ip.to_string())
            .replace("{tls_port}", &tls_port.to_string())
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config)?;
    Ok(Node {
        name,
        ip,
        grpc,
        dir,
        config_path,
        state_dir,
        webroot,
        agent: None,
        nginx,
        coordinator: Arc::new(coordinator),
    })
}

impl Cluster {
    /// The node `self.sans[k]` resolves to, as [`Cluster::start`] told
    /// challtestsrv's DNS: the shared name to `shared_node`, the others
    /// round-robin. Another ACME client (certbot in the import test)
    /// answers a name's challenge there.
    pub fn node_for_san(&self, k: usize) -> &Node {
        let n = self.nodes.len();
        let i = if k == 0 {
            self.spec.shared_node % n
        } else {
            (k - 1) % n
        };
        &self.nodes[i]
    }
}

/// Nodes reached over SSH (`certfleet node add --ssh`, `--transport auto`).
impl Cluster {
    /// certfleet's own login key, where the coordinator looks by default
    /// (`<state>/ssh/id_ed25519`); made on first use.
    pub fn ssh_key(&self) -> anyhow::Result<PathBuf> {
        let key = self.state_dir.join("ssh/id_ed25519");
        if !key.exists() {
            crate::sshd::keygen(&key)?;
        }
        Ok(key)
    }

    /// The default directory of the coordinator's node descriptions:
    /// `nodes/` beside its config.
    pub fn node_specs_dir(&self) -> PathBuf {
        self.config_path
            .parent()
            .map(|d| d.join("nodes"))
            .unwrap_or_default()
    }

    /// Writes node `i`'s description for the coordinator: its webroot and
    /// `certificates` (the agent's `[[certificates]]` TOML, with `{dir}`,
    /// `{ip}` and `{tls_port}` filled in as for its agent).
    pub fn write_node_spec(&self, i: usize, certificates: &str) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let webroot = node
            .webroot
            .as_ref()
            .context("an SSH node needs a webroot: use Http01::WebrootNginx")?;
        let text = format!(
            "webroot = \"{}\"\n{}",
            webroot.display(),
            certificates
                .replace("{dir}", &node.dir.display().to_string())
                .replace("{ip}", &node.ip.to_string())
                .replace("{tls_port}", &self.tls_port.to_string())
        );
        std::fs::create_dir_all(self.node_specs_dir())?;
        std::fs::write(
            self.node_specs_dir().join(format!("{}.toml", node.name)),
            text,
        )?;
        Ok(())
    }

    /// Starts an sshd on node `i` that lets certfleet's key in as root.
    pub async fn start_sshd(&self, i: usize) -> anyhow::Result<crate::sshd::Sshd> {
        let key = self.ssh_key()?;
        let node = &self.nodes[i];
        crate::sshd::Sshd::start(&node.dir.join("sshd"), node.ip, &key.with_extension("pub")).await
    }

    /// Makes node `i` SSH-only, the real way: an sshd on it, its
    /// description written from the agent's targets, its agent stopped,
    /// the node registered again with only `--ssh`, and its host key
    /// trusted (`--yes`).
    pub async fn make_ssh_only(&mut self, i: usize) -> anyhow::Result<crate::sshd::Sshd> {
        let sshd = self.start_sshd(i).await?;
        self.write_node_spec(i, &self.spec.agent_certificates.clone())?;
        self.nodes[i].stop_agent();
        let name = self.nodes[i].name.clone();
        let ip = self.nodes[i].ip.to_string();
        let dest = sshd.destination();
        for args in [
            vec!["node", "remove", &name],
            vec!["node", "add", &name, "--ssh", &dest, "--http01", &ip],
            vec!["node", "trust-host", &name, "--yes"],
        ] {
            let out = self.ctl(&args).await?;
            if out.code != 0 {
                bail!("certfleet {}: {}{}", args.join(" "), out.stdout, out.stderr);
            }
        }
        Ok(sshd)
    }
}
