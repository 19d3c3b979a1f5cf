//! Services that take their time: a restart runs as long as its service's
//! `timeout_secs` allows, however long that is, and one that outlives it is
//! killed with everything it started, reported as timed out, and the node
//! rolled back.
//!
//! One node running a real nginx (see `NGINX_TARGETS`), whose restart
//! command is made slow with a `sleep` in front of `nginx -s reload`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS};
use certfleet_tests::nginx::Nginx;
use certfleet_tests::process::eventually;
use certfleet_tests::verify::served_leaf_sha256;

const SNI: &str = "cn.dataone.test";
const RELOAD: &str =
    r#"restart = ["nginx", "-s", "reload", "-c", "{dir}/tls/nginx.conf", "-p", "{dir}/tls"]"#;
const TIMEOUT: &str = "timeout_secs = 5";

/// `NGINX_TARGETS` with `restart` running `script` through `sh -c` and the
/// service's limit set to `timeout_secs`.
fn targets(script: &str, timeout_secs: u64) -> String {
    assert!(NGINX_TARGETS.contains(RELOAD) && NGINX_TARGETS.contains(TIMEOUT));
    NGINX_TARGETS
        .replacen(RELOAD, &format!(r#"restart = ["sh", "-c", "{script}"]"#), 1)
        .replacen(TIMEOUT, &format!("timeout_secs = {timeout_secs}"), 1)
}

struct Fleet {
    cluster: Cluster,
    _nginx: Vec<Nginx>,
    v1: String,
}

impl Fleet {
    /// One node serving version 1 over TLS, its restart command `script`.
    async fn start(script: &str, timeout_secs: u64) -> Self {
        let (cluster, nginx) = Cluster::serving_version_1(ClusterSpec {
            nodes: 1,
            agent_certificates: targets(script, timeout_secs),
            ..Default::default()
        })
        .await
        .unwrap();
        let v1 = live_sha(&cluster);
        let fleet = Self {
            cluster,
            _nginx: nginx,
            v1,
        };
        assert_eq!(fleet.served().await, fleet.v1);
        fleet
    }

    async fn served(&self) -> String {
        let node = &self.cluster.nodes[0];
        served_leaf_sha256(SocketAddr::new(node.ip, self.cluster.tls_port), SNI)
            .await
            .unwrap()
    }

    /// Issues version 2 and returns its leaf's SHA-256.
    async fn issue_v2(&self) -> String {
        let out = self.cluster.issue().await.unwrap();
        assert_eq!(out.code, 0, "{}", out.stdout);
        let v2 = live_sha(&self.cluster);
        assert_ne!(v2, self.v1);
        v2
    }

    fn dir(&self) -> &Path {
        &self.cluster.nodes[0].dir
    }
}

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

fn on_disk_sha(dir: &Path) -> String {
    let chain = std::fs::read_to_string(dir.join("ssl/certs/cn.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

/// Whether `pid` has died. Its parent shell was killed with it, so a zombie
/// waits on init, not on the agent: that counts as dead.
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_that_takes_45_s_within_its_90_s_limit_succeeds() {
    let f = Fleet::start(
        "sleep 45 && nginx -s reload -c {dir}/tls/nginx.conf -p {dir}/tls",
        90,
    )
    .await;
    let v2 = f.issue_v2().await;

    let started = Instant::now();
    let out = f.cluster.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        started.elapsed() >= Duration::from_secs(45),
        "the restart did not wait for its command: {}",
        out.stdout
    );
    assert!(out.stdout.contains("nginx: verify ok"), "{}", out.stdout);
    assert_eq!(f.served().await, v2);
    assert_eq!(on_disk_sha(f.dir()), v2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_past_its_limit_is_killed_with_its_group_and_rolled_back() {
    // The sleep runs in the background, as what a restart command starts
    // would: only killing the whole process group stops it.
    let f = Fleet::start(
        "sleep 20 & echo $! >> {dir}/restart-sleep.pids; wait $!; nginx -s reload -c {dir}/tls/nginx.conf -p {dir}/tls",
        5,
    )
    .await;
    f.issue_v2().await;

    let started = Instant::now();
    let out = f.cluster.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    // The restart and the rollback's restart each stop at their limit,
    // well before the 20 s sleep ends.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    for expected in [
        "rollout halted at node cn-ucsb-1: service nginx, step restart",
        "timed out after 5 s (timeout_secs = 5); its process group was killed",
        "serves version 1 again",
    ] {
        assert!(
            out.stderr.contains(expected),
            "{expected:?}:\n{}",
            out.stderr
        );
    }
    assert!(
        out.stdout.contains("nginx: restart FAILED"),
        "{}",
        out.stdout
    );

    // Rolled back: version 1 on disk and served.
    assert_eq!(on_disk_sha(f.dir()), f.v1);
    assert_eq!(f.served().await, f.v1);

    // Every sleep a restart started is gone, not left running.
    let pids: Vec<u32> = std::fs::read_to_string(f.dir().join("restart-sleep.pids"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(!pids.is_empty());
    eventually(
        "the restart's sleep to be killed",
        Duration::from_secs(10),
        || {
            let all = pids.iter().all(|&pid| dead(pid));
            async move { all.then_some(()) }
        },
    )
    .await
    .unwrap();
}
