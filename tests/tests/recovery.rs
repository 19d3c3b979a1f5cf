//! A coordinator killed with `kill -9` at any step of an order, a
//! distribution or a rollout heals at its next start: no token stays on any
//! node, exactly one new version is live, every node serves one consistent
//! version, and `certfleet history` tells what happened.
//!
//! Each test stops the real coordinator at one journaled step (the
//! journal's crash-test pause point, `CERTFLEET_CRASH_TEST_PAUSE_AT`), kills
//! it there with SIGKILL, starts it again without the pause, and checks
//! what an admin would. Each point runs more than once: the second run
//! starts from what the first one's recovery left.

use std::collections::BTreeSet;
use std::time::Duration;

use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS, shared_name};
use certfleet_tests::crash::{
    self, kill_when_paused, newest_operation, restart_and_recover, start_paused_at,
};
use certfleet_tests::process::eventually;
use certfleet_tests::verify::served_leaf_sha256;
use serde_json::Value;

/// Runs of each crash point.
const RUNS: usize = 3;

/// What the admin does when the coordinator is killed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Command {
    Issue,
    Distribute,
    Rollout,
    Renew,
}

impl Command {
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Issue => &["issue", CERT],
            Self::Distribute => &["distribute", CERT],
            Self::Rollout => &["rollout", CERT],
            Self::Renew => &["renew", "--force", CERT],
        }
    }
}

async fn cluster(extra: &str) -> Cluster {
    let (cluster, nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 3,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: format!("after_issue = \"none\"\n{extra}"),
        ..Default::default()
    })
    .await
    .unwrap();
    // The nginx processes live as long as the cluster's directory.
    std::mem::forget(nginx);
    cluster
}

fn live_version(cluster: &Cluster) -> u32 {
    let target = std::fs::read_link(cluster.live_dir().join("cert.pem")).unwrap();
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    name.trim_start_matches("cert")
        .trim_end_matches(".pem")
        .parse()
        .unwrap()
}

/// The versions in the store's archive.
fn archived(cluster: &Cluster) -> usize {
    std::fs::read_dir(cluster.state_dir.join("archive").join(CERT))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("cert") && name.ends_with(".pem")
        })
        .count()
}

/// [`crash::kill_at`] running `command`.
async fn kill_at(cluster: &mut Cluster, point: &str, command: Command) {
    crash::kill_at(cluster, point, command.args()).await;
}

/// No node holds a token, in its agent or in a webroot.
async fn no_tokens_left(cluster: &Cluster) {
    for node in &cluster.nodes {
        let tokens = node.tokens().await.unwrap();
        assert!(
            tokens.is_empty(),
            "node {}: tokens left: {tokens:?}",
            node.name
        );
        assert!(
            node.webroot_files().is_empty(),
            "node {}: webroot files left: {:?}",
            node.name,
            node.webroot_files()
        );
    }
}

/// The one leaf every node serves, checked by handshakes.
async fn one_served_leaf(cluster: &Cluster) -> String {
    let mut seen = BTreeSet::new();
    for node in &cluster.nodes {
        let addr = std::net::SocketAddr::new(node.ip, cluster.tls_port);
        seen.insert(served_leaf_sha256(addr, &shared_name()).await.unwrap());
    }
    assert_eq!(seen.len(), 1, "nodes serve different leaves: {seen:?}");
    seen.into_iter().next().unwrap()
}

/// Every node serves the live version: `certfleet status` says so, and
/// handshakes with every node find that one leaf.
async fn every_node_serves_live(cluster: &Cluster, context: &str) {
    let s = status(cluster).await;
    assert_eq!(s["all_serving_live"], true, "{context}\n{s:#}");
    assert_eq!(
        one_served_leaf(cluster).await,
        s["live_sha256"],
        "{context}"
    );
}

/// The leaf SHA-256 of the live version, and of the version on each node's
/// disk, from `certfleet status`.
async fn status(cluster: &Cluster) -> Value {
    cluster
        .ctl(&["--json", "status", CERT])
        .await
        .unwrap()
        .last_json()
}

/// The interrupted operation in `history` (newest first): the one just
/// before the newest recovery.
fn interrupted(history: &[Value]) -> &Value {
    let at = history
        .iter()
        .position(|o| o["kind"] == "recovery")
        .unwrap();
    &history[at + 1]
}

fn steps(op: &Value) -> Vec<String> {
    op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap().to_owned())
        .collect()
}

/// An order killed at `point`: after recovery, exactly one new version is
/// live, no token is left, the nodes serve one leaf, and history says it.
async fn order_killed_at(point: &str) {
    let mut cluster = cluster("").await;
    for run in 0..RUNS {
        let version = live_version(&cluster);
        let archive = archived(&cluster);
        let newest = newest_operation(&cluster).await;
        kill_at(&mut cluster, point, Command::Issue).await;
        let history = restart_and_recover(&mut cluster, newest).await;
        let recovery = &history[0];
        let context = format!("run {run}, point {point}: {history:#?}");
        assert_eq!(recovery["outcome"], "ok", "{context}");
        let cut = interrupted(&history);
        assert_eq!(cut["kind"], "issue", "{context}");
        let outcome = cut["outcome"].as_str().unwrap();
        assert!(
            outcome.starts_with(&format!("interrupted after step \"{point}\"")),
            "{context}"
        );
        assert!(steps(cut).contains(&point.to_owned()), "{context}");
        assert_eq!(live_version(&cluster), version + 1, "{context}");
        assert_eq!(archived(&cluster), archive + 1, "{context}");
        no_tokens_left(&cluster).await;
        one_served_leaf(&cluster).await;
        // What recovery did is in its own steps.
        let text = cluster.ctl(&["history", CERT]).await.unwrap().stdout;
        assert!(text.contains("recovered"), "{text}");
        assert!(text.contains(&format!("version {}", version + 1)), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_killed_with_tokens_placed_is_finished_at_restart() {
    order_killed_at("placed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_killed_with_challenges_answered_is_finished_at_restart() {
    order_killed_at("answered").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_killed_once_finalized_is_fetched_again_from_its_url() {
    order_killed_at("finalized").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_killed_once_stored_only_has_its_tokens_removed() {
    order_killed_at("stored").await;
}

/// Issues a new version, then runs `command` killed at `point`; returns the
/// history after recovery.
async fn new_version_then_killed(
    cluster: &mut Cluster,
    point: &str,
    command: Command,
) -> Vec<Value> {
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let newest = newest_operation(cluster).await;
    kill_at(cluster, point, command).await;
    restart_and_recover(cluster, newest).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_distribution_killed_mid_way_is_run_again_at_restart() {
    let mut cluster = cluster("").await;
    for run in 0..RUNS {
        let history = new_version_then_killed(&mut cluster, "installed", Command::Distribute).await;
        let context = format!("run {run}: {history:#?}");
        assert_eq!(history[0]["outcome"], "ok", "{context}");
        assert_eq!(interrupted(&history)["kind"], "distribute", "{context}");
        // Every node has the live version on disk; none was restarted, so
        // they all still serve the same (older) leaf.
        let s = status(&cluster).await;
        let live = s["live_sha256"].as_str().unwrap();
        for n in s["nodes"].as_array().unwrap() {
            assert_eq!(n["sha256"], live, "{context}\n{s:#}");
            assert_eq!(n["intact"], true, "{context}\n{s:#}");
        }
        let served = one_served_leaf(&cluster).await;
        assert_ne!(served, live, "{context}");
        no_tokens_left(&cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_killed_mid_way_is_resumed_at_restart() {
    let mut cluster = cluster("").await;
    for run in 0..RUNS {
        let history = new_version_then_killed(&mut cluster, "verified", Command::Rollout).await;
        let context = format!("run {run}: {history:#?}");
        assert_eq!(history[0]["outcome"], "ok", "{context}");
        assert_eq!(interrupted(&history)["kind"], "rollout", "{context}");
        let text = cluster.ctl(&["history", CERT]).await.unwrap().stdout;
        assert!(text.contains("resumed the rollout"), "{text}");
        every_node_serves_live(&cluster, &context).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_whose_resumption_is_killed_too_is_resumed_again() {
    let mut cluster = cluster("").await;
    // Killed after the first node is verified; the recovery resumes with
    // the second node and is killed once that one is verified.
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    kill_at(&mut cluster, "verified", Command::Rollout).await;
    let before = start_paused_at(&mut cluster, "verified").await;
    kill_when_paused(&mut cluster, before, "verified").await;
    // Two nodes were restarted onto the new version, one was not.
    let mut served = BTreeSet::new();
    for node in &cluster.nodes {
        let addr = std::net::SocketAddr::new(node.ip, cluster.tls_port);
        served.insert(served_leaf_sha256(addr, &shared_name()).await.unwrap());
    }
    assert_eq!(served.len(), 2, "the test needs a node left behind");

    // The killed recovery is closed as interrupted first: wait for the
    // one healing it to end.
    cluster.start_coordinator().await.unwrap();
    let history = eventually(
        "the second recovery to end",
        Duration::from_secs(120),
        || async {
            let out = cluster.ctl(&["--json", "history", CERT]).await.ok()?;
            let ops = out.last_json().as_array()?.clone();
            let newest = ops.first()?;
            let outcome = newest["outcome"].as_str()?;
            let ended = newest["kind"] == "recovery"
                && outcome != "running"
                && !outcome.starts_with("interrupted");
            ended.then_some(ops)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.coordinator_log()));
    let context = format!("{history:#?}");
    // Newest first: this recovery, the one killed, the rollout.
    assert_eq!(history[0]["kind"], "recovery", "{context}");
    assert_eq!(history[0]["outcome"], "ok", "{context}");
    assert_eq!(history[1]["kind"], "recovery", "{context}");
    assert_eq!(history[2]["kind"], "rollout", "{context}");
    let text = cluster.ctl(&["history", CERT]).await.unwrap().stdout;
    assert!(
        text.contains(&format!("operation #{} (rollout", history[2]["id"])),
        "{text}"
    );
    assert!(text.contains("resumed the rollout"), "{text}");
    every_node_serves_live(&cluster, &context).await;
    no_tokens_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_killed_mid_way_is_rolled_back_when_the_config_says_so() {
    let mut cluster = cluster("\n[recovery]\nrollout = \"rollback\"\n").await;
    for run in 0..RUNS {
        let before = one_served_leaf(&cluster).await;
        let history = new_version_then_killed(&mut cluster, "verified", Command::Rollout).await;
        let context = format!("run {run}: {history:#?}");
        assert_eq!(history[0]["outcome"], "ok", "{context}");
        let text = cluster.ctl(&["history", CERT]).await.unwrap().stdout;
        assert!(text.contains("rolled back"), "{text}");
        // Every node is back on the leaf it served before the rollout.
        let s = status(&cluster).await;
        if s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["served"][0]["sha256"] != before)
        {
            panic!("{text}\n{s:#}\n{}", cluster.coordinator_log());
        }
        assert_eq!(
            one_served_leaf(&cluster).await,
            before,
            "{text}\n{s:#}\n{}",
            cluster.coordinator_log()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_killed_mid_way_still_waits_for_its_approval() {
    // approval = "rollout": a renewal distributes, then waits for a person
    // before restarting. Killed while distributing, it must not restart
    // anything at the next start: it asks for the approval instead.
    let (mut cluster, nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 3,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: "after_issue = \"rollout\"\napproval = \"rollout\"\n".to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    std::mem::forget(nginx);
    let before = one_served_leaf(&cluster).await;
    let newest = newest_operation(&cluster).await;
    kill_at(&mut cluster, "installed", Command::Renew).await;
    let history = restart_and_recover(&mut cluster, newest).await;
    let context = format!("{history:#?}");
    assert_eq!(history[0]["outcome"], "ok", "{context}");
    assert_eq!(interrupted(&history)["kind"], "renewal", "{context}");
    let out = cluster.ctl(&["--json", "approvals"]).await.unwrap();
    let pending: Vec<Value> = out
        .json_lines()
        .into_iter()
        .filter(|a| a["state"] == "pending")
        .collect();
    assert_eq!(pending.len(), 1, "{}", out.stdout);
    assert_eq!(pending[0]["version"], 2, "{}", out.stdout);
    // Distributed to every node, restarted on none.
    let s = status(&cluster).await;
    let live = s["live_sha256"].as_str().unwrap();
    for n in s["nodes"].as_array().unwrap() {
        assert_eq!(n["sha256"], live, "{s:#}");
    }
    assert_eq!(one_served_leaf(&cluster).await, before, "{context}");
}
