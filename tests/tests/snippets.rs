//! `certfleet snippet` and `certfleet-agent snippet`, run for real: the
//! printed config is the whole port-80 config of a real nginx or apache2
//! on the node's address and Pebble's validation port, the agent answers
//! HTTP-01 behind it (from its webroot, or its own responder proxied to),
//! and a certificate is issued through it. Plain HTTP elsewhere must be
//! redirected to HTTPS, and the challenge path must not be.
//!
//! Each web server also has a default virtual host that answers every
//! other name with an error, so the snippet's own server names are what
//! let the CA's and the self-check's requests through.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use certfleet_tests::apache;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, web_user};
use certfleet_tests::net::{free_port, wait_listening};
use certfleet_tests::nginx::WORKER_USER;
use certfleet_tests::process::{Proc, bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the agent answers HTTP-01 behind the web server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Files in a webroot the web server serves.
    Webroot,
    /// Its own responder on another port, which the web server proxies to.
    Proxy,
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_serving_the_webroot_issues_and_redirects_the_rest() {
    issue_through("nginx", Mode::Webroot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_proxying_to_the_agent_issues_and_redirects_the_rest() {
    issue_through("nginx", Mode::Proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_serving_the_webroot_issues_and_redirects_the_rest() {
    issue_through("apache", Mode::Webroot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apache_proxying_to_the_agent_issues_and_redirects_the_rest() {
    issue_through("apache", Mode::Proxy).await;
}

/// A one-node cluster whose agent answers HTTP-01 in `mode` behind `server`
/// configured with nothing but the snippet; issues the certificate through it.
async fn issue_through(server: &str, mode: Mode) {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    })
    .await
    .unwrap();
    let http = SocketAddr::new(cluster.nodes[0].ip, cluster.pebble.http_port);
    let challenge = move_agent_behind_a_web_server(&mut cluster, mode).unwrap();
    let snippet = snippet(&cluster, server, &challenge, http);

    let node_dir = cluster.nodes[0].dir.clone();
    let web = match server {
        "nginx" => Web::Nginx(
            start_nginx(&node_dir.join("web"), http, &snippet)
                .await
                .unwrap(),
        ),
        _ => Web::Apache(
            apache::serve(
                &node_dir.join("web"),
                http,
                &needed_modules(&snippet),
                &snippet,
            )
            .await
            .unwrap(),
        ),
    };
    cluster.nodes[0].start_agent().await.unwrap();

    for name in &cluster.sans {
        let (status, location) = get(http, name, "/other?x=1").await.unwrap();
        assert_eq!(
            (status, location.as_deref()),
            (301, Some(format!("https://{name}/other?x=1").as_str())),
            "{server} with the snippet:\n{snippet}\n{}",
            web.logs()
        );
    }
    let (status, location) = get(http, &cluster.sans[0], "/.well-known/acme-challenge/x")
        .await
        .unwrap();
    assert_eq!(
        (status, location),
        (404, None),
        "the challenge path is redirected or refused by {server} with:\n{snippet}\n{}",
        web.logs()
    );

    let out = cluster.issue().await.unwrap();
    let last = out.last_json();
    assert_eq!(
        (out.code, last["stage"].as_str()),
        (0, Some("done")),
        "issue through {server} ({mode:?}) failed:\n{}\n{}\n--- {server}\n{}\n{}",
        out.stdout,
        out.stderr,
        web.logs(),
        cluster.logs()
    );
    // Pebble and the self-check fetched every name's token through the
    // web server, not around it.
    let served = web
        .access_log()
        .lines()
        .filter(|l| l.contains("/.well-known/acme-challenge/") && l.contains("\" 200"))
        .count();
    assert!(
        served >= cluster.sans.len(),
        "{server} served {served} challenge responses for {} names:\n{}",
        cluster.sans.len(),
        web.access_log()
    );
}

/// Stops node 0's agent and rewrites its `[http01]` for `mode`; returns
/// `certfleet snippet`'s flag for the same place (`--webroot DIR` or
/// `--proxy ADDR`).
fn move_agent_behind_a_web_server(
    cluster: &mut Cluster,
    mode: Mode,
) -> anyhow::Result<[String; 2]> {
    let http_port = cluster.pebble.http_port;
    let node = &mut cluster.nodes[0];
    node.stop_agent();
    let standalone = format!(
        "mode = \"standalone\"\nlisten = \"{}:{http_port}\"\n",
        node.ip
    );
    let (http01, flag) = match mode {
        Mode::Webroot => {
            // As on Debian: the web server's user owns the webroot.
            let webroot = node.dir.join("webroot");
            std::fs::create_dir_all(&webroot)?;
            let (uid, gid) = web_user()?;
            std::os::unix::fs::chown(&webroot, Some(uid), Some(gid))?;
            node.webroot = Some(webroot.clone());
            let root = webroot.display().to_string();
            (
                format!("mode = \"webroot\"\nwebroot = \"{root}\"\n"),
                ["--webroot".to_owned(), root],
            )
        }
        Mode::Proxy => {
            let responder = SocketAddr::new(node.ip, free_port(node.ip));
            (
                format!("mode = \"standalone\"\nlisten = \"{responder}\"\n"),
                ["--proxy".to_owned(), responder.to_string()],
            )
        }
    };
    let config = std::fs::read_to_string(&node.config_path)?;
    if !config.contains(&standalone) {
        bail!(
            "{}: no {standalone:?} in\n{config}",
            node.config_path.display()
        );
    }
    std::fs::write(&node.config_path, config.replace(&standalone, &http01))?;
    Ok(flag)
}

/// The snippet for `server`, from the agent's config on the node; asserts
/// that `certfleet snippet` on the coordinator's host, given the same
/// place by flag, prints the same.
fn snippet(cluster: &Cluster, server: &str, challenge: &[String; 2], http: SocketAddr) -> String {
    let node = &cluster.nodes[0];
    let listen = http.to_string();
    let names = cluster.sans.join(",");
    let from_agent = run(Command::new(bin("certfleet-agent"))
        .arg("--config")
        .arg(&node.config_path)
        .args(["snippet", server, CERT, "--server-name", &names])
        .args(["--listen", &listen]));
    // The agent's default install targets: certbot's layout in its live_dir.
    let live = node.dir.join("live").join(CERT);
    let from_ctl = run(Command::new(bin("certfleet"))
        .arg("--config")
        .arg(&cluster.config_path)
        .args(["snippet", server, CERT])
        .args(challenge)
        .args(["--listen", &listen])
        .arg("--fullchain")
        .arg(live.join("fullchain.pem"))
        .arg("--privkey")
        .arg(live.join("privkey.pem")));
    assert_eq!(
        from_agent, from_ctl,
        "certfleet-agent snippet and certfleet snippet differ"
    );
    for name in &cluster.sans {
        assert!(
            from_agent.contains(name),
            "{name} missing from:\n{from_agent}"
        );
    }
    from_agent
}

/// Runs `cmd`, which must succeed; its standard output.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The modules the snippet's `# Needs: a2enmod ...` line names.
fn needed_modules(snippet: &str) -> Vec<&str> {
    let line = snippet
        .lines()
        .find_map(|l| l.strip_prefix("# Needs: a2enmod "))
        .unwrap_or_else(|| panic!("no `# Needs: a2enmod` line in:\n{snippet}"));
    line.split_whitespace()
        .take_while(|w| !w.starts_with('('))
        .collect()
}

/// A GET of `path` on `addr` with `Host: host`; the status and the
/// `Location` header.
async fn get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, Option<String>)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET http://{host}{path} from {addr}: timed out"))??;
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET http://{host}{path} from {addr}: no status in {head:?}"))?;
    let location = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("location")
            .then(|| value.trim().to_owned())
    });
    Ok((status, location))
}

/// The web server in front of the agent.
enum Web {
    Nginx(Nginx),
    Apache(apache::Apache),
}

impl Web {
    fn access_log(&self) -> String {
        match self {
            Self::Nginx(n) => std::fs::read_to_string(n.dir.join("access.log")).unwrap_or_default(),
            Self::Apache(a) => a.access_log(),
        }
    }

    fn logs(&self) -> String {
        match self {
            Self::Nginx(n) => format!(
                "{}{}",
                std::fs::read_to_string(n.dir.join("error.log")).unwrap_or_default(),
                n.proc.log_text()
            ),
            Self::Apache(a) => a.logs(),
        }
    }
}

/// nginx with the snippet as its only named server; stopped with SIGTERM
/// (so the master stops its workers) when dropped.
struct Nginx {
    proc: Proc,
    dir: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.terminate(Duration::from_secs(5));
    }
}

/// Starts nginx (master as root, workers as www-data, as on Debian) on
/// `listen` with a default server that answers 421 and the snippet.
async fn start_nginx(dir: &Path, listen: SocketAddr, snippet: &str) -> anyhow::Result<Nginx> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let d = dir.display();
    let conf = format!(
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
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen {listen} default_server;
        server_name _;
        return 421;
    }}
{snippet}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let check = Command::new("nginx")
        .args(["-t", "-q", "-c"])
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .output()?;
    if !check.status.success() {
        bail!(
            "nginx -t -c {}: {}\n--- snippet\n{snippet}",
            path.display(),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut proc = Proc::spawn("nginx (snippet)", cmd, &dir.join("nginx.out"))?;
    if let Err(e) = wait_listening(listen, Duration::from_secs(10)).await {
        proc.check_running()?;
        return Err(e);
    }
    Ok(Nginx {
        proc,
        dir: dir.to_owned(),
    })
}
