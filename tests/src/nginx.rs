//! A real nginx (Debian's) serving one node's webroot, as DataONE's apache
//! does for its HTTP-01 files, and TLS with a node's installed files.
//!
//! As on Debian, the master runs as root and its workers as www-data
//! ([`WORKER_USER`]): the workers must be able to read what the agent puts
//! in a webroot, and a harness running them as root would hide exactly the
//! permission bugs an admin hits on the first issue.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::wait_listening;
use crate::process::Proc;

/// The user nginx's workers run as, as Debian's nginx.conf has it.
pub const WORKER_USER: &str = "www-data";

/// The part of every test nginx config that keeps it in the foreground and
/// everything it writes under `dir`; it ends inside the `http` block.
fn common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process on;
user {WORKER_USER};
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

/// Starts nginx in the foreground serving `webroot` on `ip:port`;
/// everything it writes stays in `dir`. Its workers (www-data) must be able
/// to reach `webroot`. With `https_port`, plain HTTP only redirects to
/// `https://$host:https_port$request_uri`, and the webroot is served there
/// with a self-signed placeholder certificate.
pub async fn serve_webroot(
    dir: &Path,
    ip: IpAddr,
    port: u16,
    https_port: Option<u16>,
    webroot: &Path,
) -> anyhow::Result<Nginx> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let root = webroot.display();
    let servers = match https_port {
        None => format!(
            r#"    server {{
        listen {ip}:{port};
        server_name _;
        root {root};
        location /.well-known/acme-challenge/ {{
            default_type text/plain;
        }}
    }}"#
        ),
        Some(https) => {
            let key = rcgen::KeyPair::generate()?;
            let cert = rcgen::CertificateParams::new(vec!["placeholder.invalid".to_owned()])?
                .self_signed(&key)?;
            std::fs::write(dir.join("placeholder.pem"), cert.pem())?;
            std::fs::write(dir.join("placeholder.key"), key.serialize_pem())?;
            let d = dir.display();
            format!(
                r#"    server {{
        listen {ip}:{port};
        server_name _;
        return 301 https://$host:{https}$request_uri;
    }}
    server {{
        listen {ip}:{https} ssl;
        server_name _;
        ssl_certificate {d}/placeholder.pem;
        ssl_certificate_key {d}/placeholder.key;
        root {root};
        location /.well-known/acme-challenge/ {{
            default_type text/plain;
        }}
    }}"#
            )
        }
    };
    let conf = format!("{common}\n{servers}\n}}\n", common = common(dir));
    std::fs::write(dir.join("nginx.conf"), conf)?;
    start("nginx (webroot)", dir, SocketAddr::new(ip, port)).await
}

/// Runs nginx on `prefix/nginx.conf` and waits for it to listen on `addr`.
async fn start(name: &str, prefix: &Path, addr: SocketAddr) -> anyhow::Result<Nginx> {
    let conf = prefix.join("nginx.conf");
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(prefix)
        .arg("-e")
        .arg(prefix.join("error.log"));
    let mut proc = Proc::spawn(name, cmd, &prefix.join("nginx.out"))?;
    if let Err(e) = wait_listening(addr, Duration::from_secs(10)).await {
        proc.check_running()?;
        return Err(e);
    }
    Ok(Nginx {
        proc,
        conf,
        prefix: prefix.to_owned(),
    })
}

/// A real nginx with a master process (so `nginx -s reload`, the agent's
/// restart command, works as in production) and www-data workers.
pub struct Nginx {
    proc: Proc,
    pub conf: std::path::PathBuf,
    pub prefix: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers too.
        self.proc.terminate(Duration::from_secs(5));
    }
}

/// The nginx config serving `cert`/`key` on `ip:port`.
pub fn tls_config(prefix: &Path, ip: IpAddr, port: u16, cert: &Path, key: &Path) -> String {
    format!(
        r#"{common}
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
) -> anyhow::Result<Nginx> {
    std::fs::create_dir_all(prefix.join("tmp"))?;
    std::fs::write(
        prefix.join("nginx.conf"),
        tls_config(prefix, ip, port, cert, key),
    )?;
    start("nginx (TLS)", prefix, SocketAddr::new(ip, port)).await
}
