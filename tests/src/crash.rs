//! Killing the coordinator at a journal step and starting it again: the
//! coordinator pauses at the step named in `CERTFLEET_CRASH_TEST_PAUSE_AT`
//! and logs `crash test: paused`; these helpers kill it there with SIGKILL
//! and wait for the recovery of its next start.

use std::time::Duration;

use serde_json::Value;

use crate::cluster::{CERT, Cluster};
use crate::process::eventually;

const PAUSE_ENV: &str = "CERTFLEET_CRASH_TEST_PAUSE_AT";

/// Restarts the coordinator with the pause at `point`, runs `certfleet
/// ARGS`, waits until the coordinator says it paused, and kills it with
/// SIGKILL.
pub async fn kill_at(cluster: &mut Cluster, point: &str, args: &[&str]) {
    cluster.coordinator.as_mut().unwrap().kill();
    let before = start_paused_at(cluster, point).await;
    let mut ctl = tokio::process::Command::new(crate::process::bin("certfleet"))
        .arg("--socket")
        .arg(&cluster.socket)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kill_when_paused(cluster, before, point).await;
    // The admin's command loses its coordinator and ends.
    let _ = tokio::time::timeout(Duration::from_secs(10), ctl.wait()).await;
    let _ = ctl.kill().await;
}

/// Starts the (stopped) coordinator with the pause at `point`; returns
/// how long its log was before, for [`kill_when_paused`].
pub async fn start_paused_at(cluster: &mut Cluster, point: &str) -> usize {
    cluster.coordinator_env = vec![(PAUSE_ENV.to_owned(), point.to_owned())];
    let before = cluster.coordinator_log().len();
    cluster.start_coordinator().await.unwrap();
    cluster.coordinator_env.clear();
    before
}

/// Waits until the coordinator logs, after `before`, that it paused at
/// `point`, and kills it with SIGKILL.
pub async fn kill_when_paused(cluster: &mut Cluster, before: usize, point: &str) {
    eventually(
        &format!("the coordinator to pause at {point}"),
        Duration::from_secs(60),
        || async {
            let log = cluster.coordinator_log();
            log.get(before..)?
                .contains("crash test: paused")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.coordinator_log()));
    cluster.coordinator.as_mut().unwrap().kill();
}

/// The id of the newest operation in the history (0: none).
pub async fn newest_operation(cluster: &Cluster) -> i64 {
    let out = cluster.ctl(&["--json", "history", CERT]).await.unwrap();
    out.last_json()[0]["id"].as_i64().unwrap_or(0)
}

/// Starts the coordinator again and waits for a recovery newer than
/// `newest_before` to end; returns the history, newest first.
pub async fn restart_and_recover(cluster: &mut Cluster, newest_before: i64) -> Vec<Value> {
    cluster.start_coordinator().await.unwrap();
    eventually("the recovery to end", Duration::from_secs(120), || async {
        let out = cluster.ctl(&["--json", "history", CERT]).await.ok()?;
        let ops = out.last_json().as_array()?.clone();
        let recovery = ops.iter().find(|o| o["kind"] == "recovery")?;
        let new = recovery["id"].as_i64()? > newest_before;
        (new && recovery["outcome"] != "running").then_some(ops)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.coordinator_log()))
}
