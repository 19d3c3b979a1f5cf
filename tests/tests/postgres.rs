//! DataONE's postgres serves the cluster certificate too: its key must be
//! root:ssl-cert 0640 for postgres to accept it, and what it serves can
//! only be seen after PostgreSQL's SSLRequest (STARTTLS). A real postgres,
//! checked independently with `openssl s_client -starttls postgres`.

use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::Command;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS, ensure_ssl_cert_group};
use certfleet_tests::process::{Proc, eventually};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_PORT: u16 = 5432;

/// The node's files as in the nginx tests, with postgres as the service.
fn targets() -> String {
    let files = NGINX_TARGETS
        .split("[[certificates.services]]")
        .next()
        .expect("the nginx targets start with the files");
    format!(
        r#"{files}[[certificates.services]]
name = "postgresql"
restart = ["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "reload", "-D", "{{dir}}/pg"]
timeout_secs = 10
[[certificates.services.verify]]
address = "{{ip}}:5432"
sni = "cn.dataone.test"
protocol = "postgres"
"#
    )
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `openssl s_client -starttls postgres` sees: the leaf's SHA-256.
fn openssl_sees(addr: &str) -> Option<String> {
    let shown = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -starttls postgres -servername cn.dataone.test </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&shown.stdout);
    let hex = text
        .trim()
        .split_once('=')?
        .1
        .replace(':', "")
        .to_lowercase();
    (hex.len() == 64).then_some(hex)
}

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

/// Lets the postgres user reach the node's files, as on a real node where
/// /etc/ssl/private is root:ssl-cert 0710.
fn open_path_for_postgres(cluster: &Cluster, node_dir: &Path) {
    let mut dir = node_dir.to_owned();
    while dir.starts_with(cluster.dir.path()) {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if !dir.pop() {
            break;
        }
    }
    let private = node_dir.join("ssl/private");
    std::fs::create_dir_all(&private).unwrap();
    let ssl_cert = nix::unistd::Group::from_name("ssl-cert")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    chown(&private, Some(0), Some(ssl_cert)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o710)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_gets_the_new_certificate_over_starttls() {
    ensure_ssl_cert_group().unwrap();
    // The postgres user reads the key through the ssl-cert group, as on Debian.
    run(Command::new("usermod").args(["-a", "-G", "ssl-cert", "postgres"]));
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        agent_certificates: targets(),
        ..Default::default()
    })
    .await
    .unwrap();
    let node = &cluster.nodes[0];
    open_path_for_postgres(&cluster, &node.dir);
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stdout);
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);

    // A real postgres on the node's address, TLS from the installed files.
    let pg = node.dir.join("pg");
    std::fs::create_dir_all(&pg).unwrap();
    let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    chown(
        &pg,
        Some(postgres.uid.as_raw()),
        Some(postgres.gid.as_raw()),
    )
    .unwrap();
    run(Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            &format!("{PG_BIN}/initdb"),
            "-A",
            "trust",
            "-D",
        ])
        .arg(&pg));
    let conf = format!(
        "listen_addresses = '{ip}'\nport = {PG_PORT}\nunix_socket_directories = '{pg}'\nssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n",
        ip = node.ip,
        pg = pg.display(),
        cert = node.dir.join("ssl/certs/cn.pem").display(),
        key = node.dir.join("ssl/private/server.key").display(),
    );
    let mut text = std::fs::read_to_string(pg.join("postgresql.conf")).unwrap();
    text.push_str(&conf);
    std::fs::write(pg.join("postgresql.conf"), text).unwrap();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", &format!("{PG_BIN}/postgres"), "-D"])
        .arg(&pg);
    let mut server = Proc::spawn("postgres", cmd, &node.dir.join("postgres.log")).unwrap();
    let addr = format!("{}:{PG_PORT}", node.ip);
    let v1 = live_sha(&cluster);
    let seen = eventually(
        "postgres serving TLS",
        std::time::Duration::from_secs(20),
        || {
            let addr = addr.clone();
            async move { openssl_sees(&addr) }
        },
    )
    .await;
    if seen.is_err() {
        server.check_running().unwrap();
    }
    assert_eq!(seen.unwrap(), v1, "postgres does not serve version 1");

    // Version 2, rolled out: the agent reloads postgres and proves, over
    // STARTTLS, that it serves the new leaf; openssl agrees.
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0);
    let v2 = live_sha(&cluster);
    let out = cluster.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("postgresql: verify ok"),
        "{}",
        out.stdout
    );
    assert_eq!(openssl_sees(&addr).as_deref(), Some(v2.as_str()));
    let out = cluster.ctl(&["--json", "status", CERT]).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        status["nodes"][0]["served"][0]["sha256"],
        v2.as_str(),
        "{}",
        out.stdout
    );
    server.terminate(std::time::Duration::from_secs(10));
}
