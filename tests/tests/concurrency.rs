//! One operation per certificate: two admins who run `certfleet rollout` at
//! once, or `issue` during a rollout, get `busy` naming what runs, exit 1,
//! and change nothing; with `--wait` the second runs once the first ends.
//!
//! Every node runs a real nginx whose restart takes [`RESTART_SECS`] (a
//! `sleep` before `nginx -s reload`), so a rollout lasts long enough for a
//! second command to arrive while it runs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use certfleet_coordinator::db::Db;
use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, CtlOutput, NGINX_TARGETS};
use certfleet_tests::nginx::Nginx;
use certfleet_tests::process::eventually;
use certfleet_tests::verify::served_leaf_sha256;

/// How long each node's nginx restart takes.
const RESTART_SECS: u64 = 3;
const NODES: usize = 2;
const SNI: &str = "cn.dataone.test";

/// A cluster whose nodes serve version 1 while version 2 is live.
struct Fleet {
    cluster: Cluster,
    _nginx: Vec<Nginx>,
    v1: String,
    v2: String,
}

/// [`NGINX_TARGETS`] with a restart that sleeps [`RESTART_SECS`] first.
fn slow_targets() -> String {
    let reload =
        r#"restart = ["nginx", "-s", "reload", "-c", "{dir}/tls/nginx.conf", "-p", "{dir}/tls"]"#;
    let slow = format!(
        r#"restart = ["sh", "-c", "sleep {RESTART_SECS} && nginx -s reload -c {{dir}}/tls/nginx.conf -p {{dir}}/tls"]"#
    );
    assert!(NGINX_TARGETS.contains(reload), "NGINX_TARGETS changed");
    assert!(
        NGINX_TARGETS.contains("timeout_secs = 5"),
        "NGINX_TARGETS changed"
    );
    NGINX_TARGETS
        .replace(reload, &slow)
        .replace("timeout_secs = 5", "timeout_secs = 30")
}

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

async fn served(cluster: &Cluster, i: usize) -> String {
    let addr = SocketAddr::new(cluster.nodes[i].ip, cluster.tls_port);
    served_leaf_sha256(addr, SNI).await.unwrap()
}

async fn fleet() -> Fleet {
    let (cluster, nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: NODES,
        agent_certificates: slow_targets(),
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = live_sha(&cluster);
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stdout);
    let v2 = live_sha(&cluster);
    assert_ne!(v1, v2);
    Fleet {
        cluster,
        _nginx: nginx,
        v1,
        v2,
    }
}

/// Waits until the coordinator has a rollout of the certificate running.
async fn rollout_running(cluster: &Cluster) {
    let state = cluster.state_dir.clone();
    eventually("a running rollout", Duration::from_secs(30), || {
        let state = state.clone();
        async move {
            let db = Db::open(&state).ok()?;
            (db.last_rollout(CERT).ok()?.as_deref() == Some("running")).then_some(())
        }
    })
    .await
    .unwrap();
}

fn is_busy(out: &CtlOutput, running: &str) -> bool {
    let uid = nix::unistd::getuid().as_raw();
    out.code == 1
        && out
            .stderr
            .contains(&format!("busy: {running} of {CERT} (started "))
        && out.stderr.contains(&format!(" by uid {uid}) is running"))
}

/// What a command restarted, from its progress lines.
fn restarted(out: &CtlOutput) -> usize {
    out.stdout
        .lines()
        .filter(|l| l.contains("[restart]") && l.contains("serves version"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_rollouts_at_once_one_runs_and_the_other_is_busy() {
    let f = fleet().await;
    let c = &f.cluster;
    let (a, b) = tokio::join!(c.ctl(&["rollout", CERT]), c.ctl(&["rollout", CERT]));
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ran, busy) = if a.code == 0 { (a, b) } else { (b, a) };
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.stderr);
    assert!(
        is_busy(&busy, "rollout"),
        "{}\n{}\n{}",
        busy.code,
        busy.stdout,
        busy.stderr
    );
    // The busy one touched nothing: only the other restarted, each node once.
    assert_eq!(restarted(&ran), NODES, "{}", ran.stdout);
    assert_eq!(restarted(&busy), 0, "{}", busy.stdout);
    assert!(!busy.stdout.contains("[distribute]"), "{}", busy.stdout);
    for i in 0..NODES {
        assert_eq!(served(c, i).await, f.v2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_issue_during_a_rollout_is_busy_and_leaves_the_live_version_alone() {
    let f = fleet().await;
    let c = &f.cluster;
    let rollout = c.ctl(&["rollout", CERT]);
    let issue = async {
        rollout_running(c).await;
        c.ctl(&["issue", CERT]).await.unwrap()
    };
    let (rollout, issue) = tokio::join!(rollout, issue);
    let rollout = rollout.unwrap();
    assert!(
        is_busy(&issue, "rollout"),
        "{}\n{}\n{}",
        issue.code,
        issue.stdout,
        issue.stderr
    );
    assert_eq!(rollout.code, 0, "{}\n{}", rollout.stdout, rollout.stderr);
    // Version 2 stayed live, and every node serves it.
    assert_eq!(live_sha(c), f.v2);
    for i in 0..NODES {
        assert_eq!(served(c, i).await, f.v2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_wait_the_second_rollout_runs_after_the_first() {
    let f = fleet().await;
    let c = &f.cluster;
    let first = async {
        let out = c.ctl(&["rollout", CERT]).await.unwrap();
        (out, Instant::now())
    };
    let second = async {
        rollout_running(c).await;
        let out = c.ctl(&["rollout", CERT, "--wait"]).await.unwrap();
        (out, Instant::now())
    };
    let ((first, first_end), (second, second_end)) = tokio::join!(first, second);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    assert_eq!(second.code, 0, "{}\n{}", second.stdout, second.stderr);
    assert!(
        second
            .stdout
            .lines()
            .any(|l| l.starts_with("[wait]") && l.contains("waiting for rollout of cn (started ")),
        "{}",
        second.stdout
    );
    assert_eq!(restarted(&first), NODES, "{}", first.stdout);
    assert_eq!(restarted(&second), NODES, "{}", second.stdout);
    // The second restarted every node after the first had finished.
    let restarts = Duration::from_secs(RESTART_SECS * NODES as u64);
    assert!(
        second_end.duration_since(first_end) >= restarts,
        "the rollouts overlapped: the second ended {:?} after the first",
        second_end.duration_since(first_end)
    );
    for i in 0..NODES {
        assert_eq!(served(c, i).await, f.v2);
    }
    assert_ne!(f.v1, f.v2);
}
