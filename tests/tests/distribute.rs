//! Distribution: the certificate and key onto every node, into the files
//! each agent's own config declares, with the right owner and mode,
//! atomically (crash-safe), idempotently, and for nodes that join later.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS, Node};

const TARGETS: &str = NGINX_TARGETS;

fn ensure_ssl_cert_group() {
    certfleet_tests::cluster::ensure_ssl_cert_group().unwrap();
}

fn gid_of(group: &str) -> u32 {
    nix::unistd::Group::from_name(group)
        .unwrap()
        .unwrap()
        .gid
        .as_raw()
}

async fn cluster(nodes: usize) -> Cluster {
    ensure_ssl_cert_group();
    Cluster::start(ClusterSpec {
        nodes,
        agent_certificates: TARGETS.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn cert_path(node: &Node) -> PathBuf {
    node.dir.join("ssl/certs/cn.pem")
}

fn key_path(node: &Node) -> PathBuf {
    node.dir.join("ssl/private/server.key")
}

/// The pair on the node's disk, checked to match; returns the leaf's SHA-256.
fn installed_pair(node: &Node) -> String {
    let chain = std::fs::read_to_string(cert_path(node)).unwrap();
    let key = std::fs::read_to_string(key_path(node)).unwrap();
    Bundle::parse(&chain, Some(&key), &[])
        .unwrap_or_else(|e| panic!("node {}: installed pair does not match: {e}", node.name))
        .leaf_sha256_hex()
}

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

async fn issue(cluster: &Cluster) {
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_node_gets_the_files_with_owner_group_and_mode() {
    let mut cluster = cluster(4).await;
    issue(&cluster).await;
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let sha = live_sha(&cluster);
    for node in &cluster.nodes {
        assert!(out.stdout.contains(&node.name), "{}", out.stdout);
        assert_eq!(installed_pair(node), sha, "node {}", node.name);
        let key = std::fs::metadata(key_path(node)).unwrap();
        assert_eq!(
            (key.uid(), key.gid(), key.permissions().mode() & 0o777),
            (0, gid_of("ssl-cert"), 0o640),
            "node {} key owner/mode",
            node.name
        );
        let cert = std::fs::metadata(cert_path(node)).unwrap();
        assert_eq!((cert.uid(), cert.permissions().mode() & 0o777), (0, 0o644));
    }

    // Again: nothing to do.
    let out = cluster.ctl(&["--json", "distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0);
    let events = out.json_lines();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["stage"] == "distribute"
                && e["message"].as_str().unwrap().starts_with("already had"))
            .count(),
        4,
        "{}",
        out.stdout
    );

    // Drift: someone edits one node's key file; only that node is rewritten.
    std::fs::write(key_path(&cluster.nodes[2]), "not a key\n").unwrap();
    let out = cluster.ctl(&["--json", "distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stdout);
    let installed: Vec<String> = out
        .json_lines()
        .iter()
        .filter(|e| {
            e["stage"] == "distribute" && e["message"].as_str().unwrap().starts_with("installed")
        })
        .map(|e| e["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(installed, ["cn-orc-1"]);
    assert_eq!(installed_pair(&cluster.nodes[2]), sha);

    // A node that joins later gets the current version without a new order.
    let i = cluster.grow().await.unwrap();
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(installed_pair(&cluster.nodes[i]), sha);
    let list = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(
        list[0]["version"], 1,
        "distribute must not order a new certificate"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_down_fails_the_distribution_by_name_and_the_rest_still_get_it() {
    let mut cluster = cluster(3).await;
    issue(&cluster).await;
    cluster.nodes[1].stop_agent();
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stderr.contains("node cn-unm-1"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&cluster.nodes[1].grpc.to_string()),
        "{}",
        out.stderr
    );
    let sha = live_sha(&cluster);
    assert_eq!(installed_pair(&cluster.nodes[0]), sha);
    assert_eq!(installed_pair(&cluster.nodes[2]), sha);
    // An unknown version is a usage error naming it: exit 2.
    let out = cluster
        .ctl(&["distribute", CERT, "--version", "9"])
        .await
        .unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("no version 9"), "{}", out.stderr);
}

/// A small deterministic pseudo-random sequence for kill timings.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_agent_mid_install_never_leaves_a_mismatched_pair() {
    let mut cluster = cluster(1).await;
    issue(&cluster).await;
    issue(&cluster).await;
    let mut rng = Lcg(0x5eed);
    let mut kills = 0;
    for round in 0..24u32 {
        let version = 1 + round % 2;
        let args = ["distribute", CERT, "--version", &version.to_string()].map(str::to_owned);
        let socket = cluster.socket.clone();
        let cli = tokio::spawn(async move {
            tokio::process::Command::new(certfleet_tests::process::bin("certfleet"))
                .arg("--socket")
                .arg(&socket)
                .args(&args)
                .output()
                .await
                .unwrap()
        });
        // Kill somewhere from before the request arrives to after it is done.
        tokio::time::sleep(Duration::from_micros(rng.next(12_000))).await;
        cluster.nodes[0].stop_agent();
        kills += 1;
        let _ = cli.await;
        cluster.nodes[0].start_agent().await.unwrap();
        // Whatever the moment, the agent has finished or discarded the swap:
        // the files hold a matching pair of one version.
        if cert_path(&cluster.nodes[0]).exists() {
            installed_pair(&cluster.nodes[0]);
        }
        // No temp file is left beside the targets.
        for dir in ["ssl/certs", "ssl/private"] {
            let stray: Vec<_> = std::fs::read_dir(cluster.nodes[0].dir.join(dir))
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(".certfleet-"))
                        .collect()
                })
                .unwrap_or_default();
            assert!(stray.is_empty(), "round {round}: stray temps in {dir}");
        }
    }
    assert_eq!(kills, 24);
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(installed_pair(&cluster.nodes[0]), live_sha(&cluster));
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount (the tests run as root, as CI does)");
        assert!(
            status.success(),
            "mounting a tmpfs at {} failed",
            dir.display()
        );
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_cleanly_and_keeps_the_old_files() {
    ensure_ssl_cert_group();
    // The node's certificate files live on a 64 KiB tmpfs.
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        agent_certificates: TARGETS.replace("{dir}/ssl", "{dir}/small/ssl"),
        ..Default::default()
    })
    .await
    .unwrap();
    let node = &cluster.nodes[0];
    let small = node.dir.join("small");
    let _mount = Tmpfs::mount(&small, "64k");
    issue(&cluster).await;
    let out = cluster
        .ctl(&["distribute", CERT, "--version", "1"])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let cert = small.join("ssl/certs/cn.pem");
    let key = small.join("ssl/private/server.key");
    let v1 = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());

    // Fill the disk, then try version 2.
    issue(&cluster).await;
    let filler = small.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 1024];
    use std::io::Write;
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    let out = cluster
        .ctl(&["distribute", CERT, "--version", "2"])
        .await
        .unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stderr.contains("No space left on device"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("node cn-ucsb-1"), "{}", out.stderr);
    assert_eq!(
        (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()),
        v1,
        "old files changed"
    );
    for dir in ["ssl/certs", "ssl/private"] {
        let stray = std::fs::read_dir(small.join(dir))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".certfleet-"))
            .count();
        assert_eq!(
            stray,
            0,
            "temp files left in {dir}: {:?}",
            std::fs::read_dir(small.join(dir))
                .unwrap()
                .flatten()
                .map(|e| (e.file_name(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                .collect::<Vec<_>>()
        );
    }
    // With room again, version 2 goes on.
    std::fs::remove_file(&filler).unwrap();
    let out = cluster
        .ctl(&["distribute", CERT, "--version", "2"])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let chain = std::fs::read_to_string(&cert).unwrap();
    let k = std::fs::read_to_string(&key).unwrap();
    assert_eq!(
        Bundle::parse(&chain, Some(&k), &[])
            .unwrap()
            .leaf_sha256_hex(),
        live_sha(&cluster)
    );
}
