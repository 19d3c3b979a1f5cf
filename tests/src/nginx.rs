//! A real nginx (Debian's) serving one node's webroot, as DataONE's apache
//! does for its HTTP-01 files.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::wait_listening;
use crate::process::Proc;

/// The part of every test nginx config that keeps it in the foreground and
/// everything it writes under `dir`; it ends inside the `http` block.
fn common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;"#
    )
}

/// Starts nginx in the foreground, as the invoking user, serving `webroot`
/// on `ip:port`; everything it writes stays in `dir`.
pub async fn serve_webroot(
    dir: &Path,
    ip: IpAddr,
    port: u16,
    webroot: &Path,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let conf = format!(
        r#"master_process off;
{common}
    server {{
        listen {ip}:{port};
        server_name _;
        root {root};
        location /.well-known/acme-challenge/ {{
            default_type text/plain;
        }}
    }}
}}
"#,
        root = webroot.display(),
        common = common(dir),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut proc = Proc::spawn("nginx", cmd, &dir.join("nginx.out"))?;
    if let Err(e) = wait_listening(SocketAddr::new(ip, port), Duration::from_secs(10)).await {
        proc.check_running()?;
        return Err(e);
    }
    Ok(proc)
}

/// A real nginx serving TLS with a node's installed certificate files, as
/// apache does on DataONE's nodes. It runs with a master process, so
/// `nginx -s reload` (the agent's restart command) works as in production.
pub struct TlsNginx {
    proc: Proc,
    pub conf: std::path::PathBuf,
    pub prefix: std::path::PathBuf,
}

impl Drop for TlsNginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers too.
        self.proc.terminate(Duration::from_secs(5));
    }
}

/// The nginx config serving `cert`/`key` on `ip:port`.
pub fn tls_config(prefix: &Path, ip: IpAddr, port: u16, cert: &Path, key: &Path) -> String {
    format!(
        r#"master_process on;
user root;
{common}
    server {{
        listen {ip}:{port} ssl;
        server_name _;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "ok\n"; }}
    }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
        common = common(prefix),
    )
}

/// Starts nginx serving TLS from `prefix/nginx.conf` (written here).
pub async fn serve_tls(
    prefix: &Path,
    ip: IpAddr,
    port: u16,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<TlsNginx> {
    std::fs::create_dir_all(prefix.join("tmp"))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, tls_config(prefix, ip, port, cert, key))?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(prefix)
        .arg("-e")
        .arg(prefix.join("error.log"));
    let mut proc = Proc::spawn("nginx (TLS)", cmd, &prefix.join("nginx.out"))?;
    if let Err(e) = wait_listening(SocketAddr::new(ip, port), Duration::from_secs(10)).await {
        proc.check_running()?;
        return Err(e);
    }
    Ok(TlsNginx {
        proc,
        conf,
        prefix: prefix.to_owned(),
    })
}
