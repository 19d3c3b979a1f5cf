//! A real nginx (Debian's) serving one node's webroot, as DataONE's apache
//! does for its HTTP-01 files.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::wait_listening;
use crate::process::Proc;

/// Starts nginx in the foreground, as the invoking user, serving `webroot`
/// on `ip:port`; everything it writes stays in `dir`.
pub async fn serve_webroot(
    dir: &Path,
    ip: IpAddr,
    port: u16,
    webroot: &Path,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process off;
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
    scgi_temp_path {d}/tmp/scgi;
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
        root = webroot.display()
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
