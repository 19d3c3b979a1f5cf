//! A real OpenSSH server (Debian's `openssh-server`) for nodes the
//! coordinator reaches over SSH: `/usr/sbin/sshd -D -e -f CONF -p PORT` on
//! the node's loopback address, with a host key of its own (mode 0600),
//! `UsePAM no`, and root login by key only.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::net::{free_port, wait_listening};
use crate::process::Proc;

const SSHD: &str = "/usr/sbin/sshd";
const STARTUP: Duration = Duration::from_secs(10);

/// A running sshd; killed and reaped on drop.
pub struct Sshd {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// The host key's public half, as `ssh-keygen -l` fingerprints it.
    pub host_key_pub: PathBuf,
    proc: Proc,
}

/// Makes an ed25519 key pair at `path` (and `path.pub`), mode 0600.
pub fn keygen(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "certfleet-test",
            "-f",
        ])
        .arg(path)
        .output()
        .context("ssh-keygen (openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// `SHA256:...` of the public key file `pub_path`, as `ssh-keygen -lf` says.
pub fn fingerprint(pub_path: &Path) -> anyhow::Result<String> {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pub_path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("ssh-keygen -lf {}: {text}", pub_path.display()))
}

impl Sshd {
    /// Starts sshd in `dir` on `ip`, letting in root with the public key at
    /// `authorized` (any number of keys, one a line).
    pub async fn start(dir: &Path, ip: IpAddr, authorized: &Path) -> anyhow::Result<Self> {
        Self::start_at(dir, ip, None, authorized).await
    }

    /// [`Sshd::start`] on `port`, or a free one.
    async fn start_at(
        dir: &Path,
        ip: IpAddr,
        port: Option<u16>,
        authorized: &Path,
    ) -> anyhow::Result<Self> {
        if !Path::new(SSHD).exists() {
            bail!("{SSHD} is missing: install openssh-server");
        }
        std::fs::create_dir_all(dir)?;
        // The privilege separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd")?;
        let host_key = dir.join("ssh_host_ed25519_key");
        keygen(&host_key)?;
        let keys = dir.join("authorized_keys");
        std::fs::copy(authorized, &keys)?;
        let port = port.unwrap_or_else(|| free_port(ip));
        let conf = dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress {ip}\nHostKey {host_key}\nPidFile {pid}\nAuthorizedKeysFile {keys}\n\
                 UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nMaxSessions 10\nSubsystem sftp internal-sftp\n",
                host_key = host_key.display(),
                pid = dir.join("sshd.pid").display(),
                keys = keys.display(),
            ),
        )?;
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(port.to_string());
        let mut proc = Proc::spawn(&format!("sshd {ip}:{port}"), cmd, &dir.join("sshd.log"))?;
        let addr = SocketAddr::new(ip, port);
        if let Err(e) = wait_listening(addr, STARTUP).await {
            proc.check_running()?;
            bail!("sshd on {addr}: {e}");
        }
        Ok(Self {
            addr,
            dir: dir.to_owned(),
            host_key_pub: host_key.with_extension("pub"),
            proc,
        })
    }

    /// `root@IP:PORT`.
    pub fn destination(&self) -> String {
        format!("root@{}:{}", self.addr.ip(), self.addr.port())
    }

    /// The fingerprint of the host key it presents.
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        fingerprint(&self.host_key_pub)
    }

    /// Gives the server a new host key (as a rebuilt node has) and
    /// restarts it on the same address.
    pub async fn change_host_key(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        let keys = self.dir.join("authorized_keys.before");
        std::fs::copy(self.dir.join("authorized_keys"), &keys)?;
        *self = Self::start_at(&self.dir, self.addr.ip(), Some(self.addr.port()), &keys).await?;
        Ok(())
    }

    pub fn log(&self) -> String {
        self.proc.log_tail()
    }
}
