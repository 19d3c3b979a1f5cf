//! One node reached over SSH: the agent's calls, done by the coordinator
//! with the remote script and its own probes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use certfleet_proto::bundle::Bundle;
use certfleet_proto::cause_chain::Chain;
use certfleet_proto::challenge::{Http01Response, Token};
use certfleet_proto::node_spec::{CertificateSpec, Content, NodeSpec, Service, served_leaf};
use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, Semaphore};

use super::{SshContext, SshDestination, hostkey};
use crate::transport::{
    BundleToInstall, CALL_DEADLINE, NodeCertificate, NodeInstall, NodeRemoval, RESTART_DEADLINE,
    RestartReport, ServedReport, ServiceReport, Transport, TransportError,
};

/// The remote script, sent by content (`sh -c SCRIPT`).
pub const REMOTE_SCRIPT: &str = include_str!("remote.sh");

/// Bytes of a command's output kept for a report.
const OUTPUT_TAIL: usize = 800;
/// Longest one verify probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between verify probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Probes in a row that must see the expected leaf, as the agent's verify
/// wants: a reload hands new connections to new workers while old ones
/// wind down.
const VERIFY_CONSECUTIVE: u32 = 3;
/// Versions remembered per certificate and node: the current one and the
/// one a rollback returns to.
const KEPT_VERSIONS: usize = 2;

/// A node reached over SSH.
pub struct SshNode {
    name: String,
    dest: SshDestination,
    ctx: Arc<SshContext>,
    /// The node's master connection, made on first use and remade when it
    /// dies.
    session: Mutex<Option<Arc<Session>>>,
    /// Bounds the commands at once on the master, below sshd's MaxSessions.
    sessions: Semaphore,
}

/// What the coordinator installed on a node over SSH, per version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    /// Oldest first; the last is current.
    versions: Vec<Installed>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Installed {
    version: u32,
    leaf_sha256: String,
    not_after: i64,
    /// Target path → SHA-256 of what was written there.
    files: BTreeMap<String, String>,
}

fn refused(code: tonic::Code, message: String) -> TransportError {
    TransportError::Refused { code, message }
}

impl SshNode {
    pub fn new(name: &str, dest: SshDestination, ctx: Arc<SshContext>) -> Self {
        let sessions = Semaphore::new(ctx.config.max_sessions);
        Self {
            name: name.to_owned(),
            dest,
            ctx,
            session: Mutex::new(None),
            sessions,
        }
    }

    pub fn destination(&self) -> &SshDestination {
        &self.dest
    }

    /// The node's description, read fresh each call so an edit applies at
    /// once.
    fn spec(&self) -> Result<NodeSpec, TransportError> {
        let path = self.ctx.config.node_spec_path(&self.name);
        // It decides what runs as root on the node: only root or the
        // coordinator itself may be able to change it.
        if let Ok(meta) = std::fs::metadata(&path) {
            use std::os::unix::fs::MetadataExt;
            let own = nix::unistd::geteuid().as_raw();
            if (meta.uid() != 0 && meta.uid() != own) || meta.mode() & 0o022 != 0 {
                return Err(refused(
                    tonic::Code::FailedPrecondition,
                    format!(
                        "node {}'s description {} is owned by uid {} with mode {:o}: it decides what runs as root on the node, so it must be owned by root (or the coordinator) and writable by no one else (chown root {1}; chmod go-w {1})",
                        self.name,
                        path.display(),
                        meta.uid(),
                        meta.mode() & 0o7777
                    ),
                ));
            }
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            refused(
                tonic::Code::FailedPrecondition,
                format!(
                    "node {} is reached over SSH, but its description {} cannot be read: {e} (write the agent's [[certificates]] and a webroot there)",
                    self.name,
                    path.display()
                ),
            )
        })?;
        NodeSpec::from_toml_str(&text, &path.display().to_string())
            .map_err(|e| refused(tonic::Code::FailedPrecondition, e.to_string()))
    }

    fn certificate_spec(&self, certificate: &str) -> Result<CertificateSpec, TransportError> {
        let spec = self.spec()?;
        spec.certificate(certificate).cloned().ok_or_else(|| {
            refused(
                tonic::Code::NotFound,
                format!(
                    "node {}'s description {} has no [[certificates]] named {certificate:?}",
                    self.name,
                    self.ctx.config.node_spec_path(&self.name).display()
                ),
            )
        })
    }

    /// The master connection, made if there is none or it died.
    async fn session(&self) -> Result<Arc<Session>, TransportError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref()
            && s.check().await.is_ok()
        {
            return Ok(Arc::clone(s));
        }
        *slot = None;
        let c = &self.ctx.config;
        let mut b = SessionBuilder::default();
        b.known_hosts_check(KnownHosts::Strict)
            .user_known_hosts_file(&c.known_hosts)
            .config_file(c.client_config())
            .user(self.dest.user.clone())
            .port(self.dest.port)
            .keyfile(&c.key_file)
            .connect_timeout(c.connect_timeout)
            .control_directory(&c.control_dir);
        let session = b
            .connect_mux(&self.dest.host)
            .await
            .map_err(|e| self.connect_error(&e))?;
        let session = Arc::new(session);
        *slot = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Why a connection failed, in the admin's terms.
    fn connect_error(&self, e: &openssh::Error) -> TransportError {
        let text = Chain(e).to_string();
        let host = self.dest.known_hosts_name();
        let changed = text.contains("IDENTIFICATION HAS CHANGED");
        if changed || text.contains("Host key verification failed") {
            let presented = match hostkey::scan(&self.dest, self.ctx.config.connect_timeout) {
                Ok(keys) => keys
                    .iter()
                    .map(|k| format!("{} {}", k.key_type, k.fingerprint))
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(e) => format!("(cannot read it: {e})"),
            };
            let message = if changed {
                format!(
                    "node {}: the host key of {host} CHANGED: it now presents {presented}, not the key certfleet trusts in {}. Refused. If the node was rebuilt, check the new fingerprint on its console, then `certfleet node trust-host {}`",
                    self.name,
                    self.ctx.config.known_hosts.display(),
                    self.name
                )
            } else {
                format!(
                    "node {}: the host key of {host} ({presented}) is not trusted: it is not in {}. Check the fingerprint on the node (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then `certfleet node trust-host {}`",
                    self.name,
                    self.ctx.config.known_hosts.display(),
                    self.name
                )
            };
            return refused(tonic::Code::PermissionDenied, message);
        }
        if text.contains("Permission denied") {
            return refused(
                tonic::Code::PermissionDenied,
                format!(
                    "node {}: {} refused certfleet's key {}: add its public key ({}.pub) to {}'s authorized_keys on the node ({text})",
                    self.name,
                    self.dest,
                    self.ctx.config.key_file.display(),
                    self.ctx.config.key_file.display(),
                    self.dest.user
                ),
            );
        }
        TransportError::Unreachable(format!("ssh {}: {text}", self.dest))
    }

    /// Runs the remote script's `op` with `input` on its standard input;
    /// its standard output, or why it failed.
    async fn remote(
        &self,
        op: &str,
        input: &str,
        deadline: Duration,
    ) -> Result<String, TransportError> {
        match tokio::time::timeout(deadline, self.remote_once(op, input)).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout(deadline)),
        }
    }

    async fn remote_once(&self, op: &str, input: &str) -> Result<String, TransportError> {
        let session = self.session().await?;
        let _permit = self
            .sessions
            .acquire()
            .await
            .map_err(|_| TransportError::Unreachable("ssh session limiter closed".into()))?;
        let mut cmd = match &self.ctx.config.sudo_script {
            None => {
                let mut c = session.command("sh");
                c.arg("-c")
                    .arg(REMOTE_SCRIPT)
                    .arg("certfleet-remote")
                    .arg(op);
                c
            }
            Some(script) => {
                let mut c = session.command("sudo");
                c.arg("-n").arg(script.to_string_lossy()).arg(op);
                c
            }
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let lost = |e: openssh::Error| {
            TransportError::Unreachable(format!("ssh {}: {op}: {}", self.dest, Chain(&e)))
        };
        let mut child = cmd.spawn().await.map_err(lost)?;
        if let Some(mut stdin) = child.stdin().take() {
            let written = stdin.write_all(input.as_bytes()).await;
            let _ = stdin.shutdown().await;
            drop(stdin);
            if let Err(e) = written {
                return Err(TransportError::Unreachable(format!(
                    "ssh {}: {op}: sending input: {e}",
                    self.dest
                )));
            }
        }
        let out = child.wait_with_output().await.map_err(lost)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = match (stderr.trim(), stdout.trim()) {
            ("", "") => format!("exited with {}", out.status),
            ("", o) => tail(o),
            (e, _) => tail(e),
        };
        Err(refused(
            tonic::Code::FailedPrecondition,
            format!("node {} over ssh: {op}: {why}", self.name),
        ))
    }

    fn record_path(&self, certificate: &str) -> PathBuf {
        self.ctx
            .config
            .records_dir
            .join(&self.name)
            .join(format!("{certificate}.json"))
    }

    fn read_record(&self, certificate: &str) -> Result<Record, TransportError> {
        let path = self.record_path(certificate);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                refused(
                    tonic::Code::Internal,
                    format!(
                        "record {}: {e}; remove it and distribute again",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(refused(
                tonic::Code::Internal,
                format!("record {}: {e}", path.display()),
            )),
        }
    }

    fn write_record(&self, certificate: &str, record: &Record) -> Result<(), TransportError> {
        let path = self.record_path(certificate);
        let fail = |e: std::io::Error| {
            refused(
                tonic::Code::Internal,
                format!("record {}: {e}", path.display()),
            )
        };
        if let Some(dir) = path.parent() {
            certfleet_proto::fsio::create_private_dir(dir).map_err(fail)?;
        }
        let bytes = serde_json::to_vec(record).map_err(|e| fail(std::io::Error::other(e)))?;
        certfleet_proto::fsio::write_atomic(&path, &bytes, 0o600).map_err(fail)
    }

    /// Writes `fullchain`+`key` as version `version` into the targets of
    /// `spec`; what was written.
    async fn write_version(
        &self,
        spec: &CertificateSpec,
        version: u32,
        fullchain_pem: &str,
        key_pem: &str,
    ) -> Result<Installed, TransportError> {
        let bundle = Bundle::parse(fullchain_pem, Some(key_pem), &[]).map_err(|e| {
            refused(
                tonic::Code::InvalidArgument,
                format!("version {version}: {e}"),
            )
        })?;
        let mut input = String::new();
        for f in &spec.files {
            let path = f.path.to_string_lossy();
            if path.contains('\n') {
                return Err(refused(
                    tonic::Code::InvalidArgument,
                    format!("target {path:?}: a path with a newline cannot be sent"),
                ));
            }
            let data = file_content(f.content, &bundle, key_pem);
            let b64 = base64::engine::general_purpose::STANDARD.encode(data.as_bytes());
            input.push_str(&format!(
                "{path}\n{}\n{}\n{:o}\n{}\n{b64}\n",
                f.owner,
                f.group,
                f.mode,
                f.dir_owner.as_deref().unwrap_or("")
            ));
        }
        let out = self.remote("install", &input, CALL_DEADLINE).await?;
        let files = parse_hashes(&out);
        Ok(Installed {
            version,
            leaf_sha256: bundle.leaf_sha256_hex(),
            not_after: bundle.not_after,
            files,
        })
    }

    /// Runs `argv` on the node within `timeout`; (ok, output tail).
    async fn run(
        &self,
        argv: &[String],
        timeout: Duration,
    ) -> Result<(bool, String), TransportError> {
        if argv.iter().any(|a| a.contains('\n')) {
            return Ok((
                false,
                "an argument holds a newline, which cannot be sent".into(),
            ));
        }
        let mut input = format!("{}\n", timeout.as_secs().max(1));
        for a in argv {
            input.push_str(a);
            input.push('\n');
        }
        match self
            .remote("run", &input, timeout + Duration::from_secs(15))
            .await
        {
            Ok(out) => Ok((true, tail(&out))),
            Err(TransportError::Refused { message, .. }) => Ok((false, message)),
            Err(e) => Err(e),
        }
    }

    /// Checks, restarts and verifies one service.
    async fn restart_one(
        &self,
        s: &Service,
        expected: &str,
    ) -> Result<ServiceReport, TransportError> {
        let report = |step: &str, ok: bool, detail: String, served| ServiceReport {
            service: s.name.clone(),
            step: step.to_owned(),
            ok,
            detail,
            served,
        };
        if let Some(check) = &s.check {
            let (ok, out) = self.run(check, s.timeout).await?;
            if !ok {
                return Ok(report("check", false, out, Vec::new()));
            }
        }
        let (ok, out) = self.run(&s.restart, s.timeout).await?;
        if !ok {
            return Ok(report("restart", false, out, Vec::new()));
        }
        let served = verify(s, expected).await;
        let ok = served.iter().all(|r| r.result.as_deref() == Ok(expected));
        let detail = if ok {
            format!("serves {expected}")
        } else {
            format!("does not serve {expected} within {:?}", s.timeout)
        };
        Ok(report("verify", ok, detail, served))
    }
}

/// Probes every endpoint of `s` from the coordinator until each served
/// `expected` [`VERIFY_CONSECUTIVE`] times in a row, or `s.timeout` passed;
/// what each served last.
async fn verify(s: &Service, expected: &str) -> Vec<ServedReport> {
    let started = Instant::now();
    let mut streak = 0;
    loop {
        let served = probe_all(s).await;
        if served.iter().all(|r| r.result.as_deref() == Ok(expected)) {
            streak += 1;
        } else {
            streak = 0;
        }
        if streak >= VERIFY_CONSECUTIVE || started.elapsed() >= s.timeout {
            return served;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// What every endpoint of `s` serves now, seen from the coordinator.
async fn probe_all(s: &Service) -> Vec<ServedReport> {
    let probes = s.verify.iter().map(|e| async move {
        ServedReport {
            service: s.name.clone(),
            address: e.address.clone(),
            result: served_leaf(e, PROBE_TIMEOUT).await,
        }
    });
    futures::future::join_all(probes).await
}

/// The bytes a target of `content` gets, as the agent writes them.
fn file_content(content: Content, bundle: &Bundle, key_pem: &str) -> String {
    let fullchain = format!("{}{}", bundle.leaf_pem, bundle.chain_pem);
    let key = if key_pem.ends_with('\n') {
        key_pem.to_owned()
    } else {
        format!("{key_pem}\n")
    };
    match content {
        Content::Cert => bundle.leaf_pem.clone(),
        Content::Chain => bundle.chain_pem.clone(),
        Content::Fullchain => fullchain,
        Content::Privkey => key,
        Content::KeyFullchain => format!("{key}{fullchain}"),
    }
}

/// "SHA256 PATH" lines → path → hash; "-" for a path with no regular file.
fn parse_hashes(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(h, p)| (p.to_owned(), h.to_owned()))
        .collect()
}

/// The last [`OUTPUT_TAIL`] bytes of `s`, trimmed, on a char boundary.
fn tail(s: &str) -> String {
    let s = s.trim();
    let mut start = s.len().saturating_sub(OUTPUT_TAIL);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

fn check_tokens(tokens: &[&str]) -> Result<(), TransportError> {
    for t in tokens {
        if Token::parse(t).is_err() {
            return Err(refused(
                tonic::Code::InvalidArgument,
                format!("token {t:?} is not base64url"),
            ));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Transport for SshNode {
    async fn place_tokens(
        &self,
        batch: &[Http01Response],
        _ttl: Duration,
    ) -> Result<(), TransportError> {
        // Over SSH nothing expires a token by itself: the flows remove
        // them (on success, failure, and after a crash, from the journal).
        let spec = self.spec()?;
        let mut input = format!("{}\n", spec.webroot.display());
        let tokens: Vec<&str> = batch.iter().map(|r| r.token().as_str()).collect();
        check_tokens(&tokens)?;
        for r in batch {
            input.push_str(&format!(
                "{} {}\n",
                r.token().as_str(),
                r.key_authorization()
            ));
        }
        self.remote("place", &input, CALL_DEADLINE).await?;
        Ok(())
    }

    async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError> {
        let spec = self.spec()?;
        let mut input = format!("{}\n", spec.webroot.display());
        for t in tokens {
            input.push_str(t.as_str());
            input.push('\n');
        }
        let out = self.remote("remove", &input, CALL_DEADLINE).await?;
        Ok(out.trim().parse().unwrap_or(0))
    }

    async fn install_certificate(
        &self,
        bundle: &BundleToInstall,
    ) -> Result<NodeInstall, TransportError> {
        let spec = self.certificate_spec(&bundle.certificate)?;
        let mut record = self.read_record(&bundle.certificate)?;
        let leaf = Bundle::parse(&bundle.fullchain_pem, None, &[])
            .map_err(|e| refused(tonic::Code::InvalidArgument, e.to_string()))?
            .leaf_sha256_hex();
        // Idempotent: a node that has exactly this, intact, is left alone.
        if let Some(current) = record.versions.last()
            && current.version == bundle.version
            && current.leaf_sha256 == leaf
        {
            let paths: String = current.files.keys().map(|p| format!("{p}\n")).collect();
            let now = parse_hashes(&self.remote("hash", &paths, CALL_DEADLINE).await?);
            if now == current.files {
                return Ok(NodeInstall {
                    version: bundle.version,
                    leaf_sha256: leaf,
                    changed: false,
                });
            }
        }
        let installed = self
            .write_version(
                &spec,
                bundle.version,
                &bundle.fullchain_pem,
                &bundle.key_pem,
            )
            .await?;
        record.versions.retain(|v| v.version != bundle.version);
        record.versions.push(installed.clone());
        let excess = record.versions.len().saturating_sub(KEPT_VERSIONS);
        record.versions.drain(..excess);
        self.write_record(&bundle.certificate, &record)?;
        Ok(NodeInstall {
            version: installed.version,
            leaf_sha256: installed.leaf_sha256,
            changed: true,
        })
    }

    async fn restart_services(
        &self,
        certificate: &str,
        expected: &str,
        keep_going: bool,
    ) -> Result<RestartReport, TransportError> {
        let spec = self.certificate_spec(certificate)?;
        let work = async {
            let mut services = Vec::with_capacity(spec.services.len());
            let mut ok = true;
            for s in &spec.services {
                let report = self.restart_one(s, expected).await?;
                ok &= report.ok;
                let stop = !report.ok && !keep_going;
                services.push(report);
                if stop {
                    break;
                }
            }
            Ok(RestartReport { ok, services })
        };
        match tokio::time::timeout(RESTART_DEADLINE, work).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout(RESTART_DEADLINE)),
        }
    }

    async fn rollback_certificate(&self, certificate: &str) -> Result<NodeInstall, TransportError> {
        let spec = self.certificate_spec(certificate)?;
        let mut record = self.read_record(certificate)?;
        let Some(previous) = record
            .versions
            .len()
            .checked_sub(2)
            .map(|i| record.versions[i].clone())
        else {
            return Err(refused(
                tonic::Code::FailedPrecondition,
                format!("node {}: no earlier version to roll back to", self.name),
            ));
        };
        let (fullchain, key) = self
            .ctx
            .store
            .read_version(certificate, previous.version)
            .map_err(|e| refused(tonic::Code::Internal, e.to_string()))?
            .ok_or_else(|| {
                refused(
                    tonic::Code::FailedPrecondition,
                    format!(
                        "version {} of {certificate} is no longer in the store; cannot roll node {} back to it",
                        previous.version, self.name
                    ),
                )
            })?;
        let installed = self
            .write_version(&spec, previous.version, &fullchain, &key)
            .await?;
        record.versions.pop();
        record.versions.pop();
        record.versions.push(installed.clone());
        self.write_record(certificate, &record)?;
        Ok(NodeInstall {
            version: installed.version,
            leaf_sha256: installed.leaf_sha256,
            changed: true,
        })
    }

    async fn certificate_status(
        &self,
        certificate: &str,
        probe: bool,
    ) -> Result<NodeCertificate, TransportError> {
        let spec = self.certificate_spec(certificate)?;
        let record = self.read_record(certificate)?;
        let mut status = NodeCertificate {
            version: 0,
            leaf_sha256: String::new(),
            intact: true,
            problem: String::new(),
            not_after: 0,
            served: Vec::new(),
        };
        if let Some(current) = record.versions.last() {
            status.version = current.version;
            status.leaf_sha256 = current.leaf_sha256.clone();
            status.not_after = current.not_after;
            let paths: String = current.files.keys().map(|p| format!("{p}\n")).collect();
            let now = parse_hashes(&self.remote("hash", &paths, CALL_DEADLINE).await?);
            if let Some((path, _)) = current.files.iter().find(|(p, h)| now.get(*p) != Some(*h)) {
                status.intact = false;
                status.problem =
                    format!("{path} changed since certfleet installed it (or is missing)");
            }
        }
        if probe {
            for s in &spec.services {
                status.served.extend(probe_all(s).await);
            }
        }
        Ok(status)
    }

    async fn remove_certificate(&self, certificate: &str) -> Result<NodeRemoval, TransportError> {
        let record = self.read_record(certificate)?;
        let Some(current) = record.versions.last() else {
            return Ok(NodeRemoval::default());
        };
        let input: String = current
            .files
            .iter()
            .map(|(p, h)| format!("{h} {p}\n"))
            .collect();
        let out = self.remote("delete", &input, CALL_DEADLINE).await?;
        let mut removal = NodeRemoval {
            version: current.version,
            ..NodeRemoval::default()
        };
        for line in out.lines() {
            match line.split_once(' ') {
                Some(("removed", p)) => removal.removed.push(p.to_owned()),
                Some(("kept", p)) => removal
                    .kept
                    .push(format!("{p}: changed since certfleet installed it")),
                _ => {}
            }
        }
        let path = self.record_path(certificate);
        let _ = std::fs::remove_file(&path);
        Ok(removal)
    }
}
