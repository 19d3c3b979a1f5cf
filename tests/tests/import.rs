//! `certfleet import --certbot DIR`: a lineage made by Debian's real
//! certbot against the cluster's Pebble comes in as version 1 of the
//! configured certificate, without a new order, and is distributed and
//! rolled out to every node; a lineage whose key is not its certificate's
//! is refused and nothing is stored.
//!
//! certbot answers HTTP-01 with its webroot plugin, each name through the
//! webroot of the node the name resolves to, which that node's nginx
//! serves on the port Pebble validates on: as on a DataONE node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Http01, NGINX_TARGETS};
use certfleet_tests::verify::served_leaf_sha256;

const SNI: &str = "cn.dataone.test";

/// certbot names a lineage after its first domain.
const LINEAGE: &str = "cn.dataone.test";

async fn cluster() -> Cluster {
    certfleet_tests::cluster::ensure_ssl_cert_group().unwrap();
    Cluster::start(ClusterSpec {
        nodes: 2,
        http01: Http01::WebrootNginx,
        agent_certificates: NGINX_TARGETS.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Runs `certbot certonly --webroot` for every name of the cluster's
/// certificate against its Pebble, with certbot's directories under
/// `dir`, and `extra` arguments; returns certbot's config directory (the
/// one `--certbot` takes).
fn certbot(cluster: &Cluster, dir: &Path, extra: &[&str]) -> PathBuf {
    let config_dir = dir.join("etc");
    let mut cmd = Command::new("certbot");
    cmd.args(["certonly", "--non-interactive", "--agree-tos"])
        .arg("--register-unsafely-without-email")
        .args(["--server", &cluster.pebble.directory_url()])
        .arg("--config-dir")
        .arg(&config_dir)
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--logs-dir")
        .arg(dir.join("logs"))
        .args(extra)
        .arg("--webroot")
        // Pebble's listener certificate is from the harness's own CA.
        .env("REQUESTS_CA_BUNDLE", &cluster.pebble.listener_ca);
    for (k, san) in cluster.sans.iter().enumerate() {
        let webroot = cluster
            .node_for_san(k)
            .webroot
            .as_ref()
            .expect("webroot mode");
        cmd.arg("-w").arg(webroot).args(["-d", san]);
    }
    let out = cmd
        .output()
        .expect("running certbot (apt-get install certbot)");
    assert!(
        out.status.success(),
        "certbot failed:\n{}\n{}\n--- pebble\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.pebble.log()
    );
    config_dir
}

fn leaf_sha(fullchain: &Path) -> String {
    let pem = std::fs::read_to_string(fullchain).unwrap();
    Bundle::parse(&pem, None, &[]).unwrap().leaf_sha256_hex()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certbot_lineage_is_imported_distributed_and_rolled_out() {
    let cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    let letsencrypt = certbot(&cluster, work.path(), &[]);
    let live = letsencrypt.join("live").join(LINEAGE);
    // As certbot leaves them: symlinks into archive/.
    assert!(
        std::fs::symlink_metadata(live.join("fullchain.pem"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let certbot_sha = leaf_sha(&live.join("cert.pem"));
    let dir = letsencrypt.to_str().unwrap();

    let out = cluster.ctl(&["import", "--certbot", dir]).await.unwrap();
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
    assert!(
        out.stdout.contains(&format!(
            "imported certbot lineage {LINEAGE} as {CERT} version 1"
        )),
        "{}",
        out.stdout
    );
    // No order was placed: Pebble issued one certificate, certbot's.
    assert_eq!(
        cluster
            .pebble
            .log()
            .matches("Issued certificate serial")
            .count(),
        1,
        "{}",
        cluster.pebble.log()
    );
    // The coordinator's store has certbot's certificate and key as version 1.
    assert_eq!(leaf_sha(&cluster.live_dir().join("cert.pem")), certbot_sha);
    assert_eq!(
        std::fs::read_to_string(cluster.live_dir().join("privkey.pem")).unwrap(),
        std::fs::read_to_string(live.join("privkey.pem")).unwrap()
    );
    let list = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    let listed = &list.last_json()[0];
    assert_eq!(
        (&listed["name"], &listed["version"], &listed["sha256"]),
        (&CERT.into(), &1.into(), &certbot_sha.clone().into()),
        "{}",
        list.stdout
    );

    // A second import would renumber history: refused, as a usage error.
    let again = cluster.ctl(&["import", "--certbot", dir]).await.unwrap();
    assert_eq!(again.code, 2, "{}\n{}", again.stdout, again.stderr);
    assert!(
        again.stderr.contains("already has version 1"),
        "{}",
        again.stderr
    );

    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let _nginx = cluster.serve_tls().await.unwrap();
    let out = cluster.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    for node in &cluster.nodes {
        let addr = SocketAddr::new(node.ip, cluster.tls_port);
        let served = served_leaf_sha256(addr, SNI).await.unwrap();
        assert_eq!(
            served, certbot_sha,
            "node {} serves another leaf",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lineage_whose_key_is_not_its_certificates_is_refused() {
    let cluster = cluster().await;
    let work = tempfile::tempdir().unwrap();
    // RSA, as certbot made keys before 2.0 (and DataONE's lineages have).
    let letsencrypt = certbot(&cluster, work.path(), &["--key-type", "rsa"]);
    let dir = letsencrypt.to_str().unwrap();
    // Another RSA key where certbot's was, as when files of two renewals
    // were copied together.
    let archived = letsencrypt
        .join("archive")
        .join(LINEAGE)
        .join("privkey1.pem");
    let certbots_key = std::fs::read(&archived).unwrap();
    let other = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .unwrap();
    assert!(other.status.success(), "openssl genpkey failed");
    std::fs::write(&archived, &other.stdout).unwrap();

    let out = cluster.ctl(&["import", "--certbot", dir]).await.unwrap();
    assert!(
        out.code == 1 || out.code == 2,
        "exit {}: {}\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr
            .contains("private key does not match the leaf certificate"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains(LINEAGE), "{}", out.stderr);
    // Nothing stored.
    assert!(!cluster.state_dir.join("archive").join(CERT).exists());
    assert!(!cluster.live_dir().exists());
    let list = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    assert_eq!(list.last_json(), serde_json::json!([]), "{}", list.stdout);

    // With certbot's own key back, the RSA lineage is imported.
    std::fs::write(&archived, certbots_key).unwrap();
    let out = cluster.ctl(&["import", "--certbot", dir]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        leaf_sha(&cluster.live_dir().join("cert.pem")),
        leaf_sha(&letsencrypt.join("live").join(LINEAGE).join("cert.pem"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lineage_file_that_is_not_a_regular_file_is_refused_by_path() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::create_dir_all(dir.join("renewal")).unwrap();
    std::fs::write(
        dir.join("renewal/cn.dataone.test.conf"),
        "version = 2.1.0\n",
    )
    .unwrap();
    let live = dir.join("live/cn.dataone.test");
    // A FIFO where the chain should be: reading it would block forever.
    std::fs::create_dir_all(&live).unwrap();
    nix::unistd::mkfifo(&live.join("fullchain.pem"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = cluster
        .ctl(&["import", "--certbot", dir.to_str().unwrap()])
        .await
        .unwrap();
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    let path = live.join("fullchain.pem");
    assert!(
        out.stderr.contains(&format!(
            "{}: is a FIFO, not a regular file",
            path.display()
        )),
        "{}",
        out.stderr
    );
}
