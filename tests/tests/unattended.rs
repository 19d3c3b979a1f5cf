//! The commands an admin leaves the coordinator alone with, through the
//! real processes against Pebble: the rate-limit guard and `--force`,
//! `--dry-run` against a staging directory, `certfleet renew`, and the
//! scheduler's fallback when the CA offers no ARI (Debian's Pebble 2.4).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, CtlOutput, NGINX_TARGETS, shared_name};
use certfleet_tests::pebble::PebbleOptions;
use certfleet_tests::process::eventually;
use certfleet_tests::verify::served_leaf_sha256;

/// What the coordinator logs, once, when the CA offers no `renewalInfo`.
const NO_ARI: &str = "the CA offers no renewal information (ARI";

fn ok(cluster: &Cluster, what: &str, out: &CtlOutput) {
    assert_eq!(
        out.code,
        0,
        "{what} failed: stdout:\n{}\nstderr:\n{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
}

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

/// Every file under `dir` (recursively) with its bytes, and every
/// symlink with its target: enough to tell that nothing was written.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let key = path.display().to_string();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            files.insert(key, target.display().to_string().into_bytes());
        } else if meta.is_dir() {
            files.extend(tree(&path));
        } else {
            files.insert(key, std::fs::read(&path).unwrap());
        }
    }
    files
}

/// What a dry run must leave as it found it: the store (archive/ and
/// live/), the rescue directory, and every node's installed files.
fn snapshot(cluster: &Cluster) -> BTreeMap<String, Vec<u8>> {
    let mut all = tree(&cluster.state_dir.join("archive"));
    all.extend(tree(&cluster.state_dir.join("live")));
    all.extend(tree(&cluster.state_dir.join("rescue")));
    for node in &cluster.nodes {
        all.extend(tree(&node.dir.join("ssl")));
    }
    all
}

async fn assert_no_tokens_left(cluster: &Cluster) {
    for node in &cluster.nodes {
        let tokens = node.tokens().await.unwrap();
        assert!(tokens.is_empty(), "{} still serves {tokens:?}", node.name);
        assert!(
            node.webroot_files().is_empty(),
            "{} webroot still holds {:?}",
            node.name,
            node.webroot_files()
        );
    }
}

/// Restarts the coordinator with `acme.staging_directory` set to the same
/// Pebble (a second directory is all a dry run needs; its account is its
/// own all the same).
async fn with_staging_directory(cluster: &mut Cluster) {
    if let Some(mut coordinator) = cluster.coordinator.take() {
        coordinator.terminate(Duration::from_secs(10));
    }
    let config = std::fs::read_to_string(&cluster.config_path).unwrap();
    let staging = format!(
        "[acme]\nstaging_directory = \"{}\"\n",
        cluster.pebble.directory_url()
    );
    let config = config.replacen("[acme]\n", &staging, 1);
    std::fs::write(&cluster.config_path, config).unwrap();
    cluster.start_coordinator().await.unwrap();
}

/// The ACME credentials files in the coordinator's state, by file name.
fn credentials(cluster: &Cluster) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(cluster.state_dir.join("acme"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_guard_refuses_the_sixth_identical_order_and_force_passes() {
    // Authorization reuse keeps five orders fast: only the first validates.
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pebble: PebbleOptions {
            authz_reuse: 100,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    for version in 1..=5 {
        let out = cluster.issue().await.unwrap();
        ok(&cluster, &format!("issue {version}"), &out);
        assert_eq!(out.last_json()["certificate"]["version"], version);
    }
    let before = live_sha(&cluster);

    // The sixth for the same names within 7 days is refused before the CA
    // is asked: exit 1 (the request is fine, only its time is not), with
    // the time it becomes possible and the way past.
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let last = out.last_json();
    assert_eq!(last["stage"], "failed", "{}", out.stdout);
    assert_eq!(last["error"]["kind"], "rate_limited", "{last}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("5 certificates for exactly these names")
            && message.contains("possible at 20")
            && message.contains("--force"),
        "{message}"
    );
    assert!(
        !out.json_lines().iter().any(|e| e["stage"] == "order"),
        "no order was placed: {}",
        out.stdout
    );
    assert_eq!(live_sha(&cluster), before, "nothing new is live");
    // The same in words without --json.
    let out = cluster.ctl(&["issue", CERT]).await.unwrap();
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("rate-limit guard"), "{}", out.stderr);

    // --force orders anyway.
    let out = cluster
        .ctl(&["--json", "issue", "--force", CERT])
        .await
        .unwrap();
    ok(&cluster, "issue --force", &out);
    assert_eq!(out.last_json()["certificate"]["version"], 6);
    assert_ne!(live_sha(&cluster), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_orders_from_the_staging_ca_with_its_own_account_and_stores_nothing() {
    let (mut cluster, _nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 2,
        agent_certificates: NGINX_TARGETS.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Without a staging directory, a dry run is a config error naming the key.
    let out = cluster.ctl(&["issue", "--dry-run", CERT]).await.unwrap();
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("acme.staging_directory"),
        "{}",
        out.stderr
    );

    with_staging_directory(&mut cluster).await;
    let main_accounts = credentials(&cluster);
    assert_eq!(main_accounts.len(), 1, "{:?}", main_accounts.keys());
    let before = snapshot(&cluster);
    let served = served_leaf_sha256(
        std::net::SocketAddr::new(cluster.nodes[0].ip, cluster.tls_port),
        &shared_name(),
    )
    .await
    .unwrap();

    let out = cluster
        .ctl(&["--json", "issue", "--dry-run", CERT])
        .await
        .unwrap();
    ok(&cluster, "issue --dry-run", &out);
    let last = out.last_json();
    assert_eq!(last["stage"], "done");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("dry run") && message.contains("nothing was stored"),
        "{message}"
    );
    assert!(last.get("certificate").is_none(), "{last}");
    // Placement and the self-check ran on the real nodes.
    let events = out.json_lines();
    for node in &cluster.nodes {
        for stage in ["placement", "self-check"] {
            assert!(
                events.iter().any(|e| e["stage"] == stage
                    && e["node"] == node.name.as_str()
                    && e["ok"] == true),
                "no {stage} on {}: {}",
                node.name,
                out.stdout
            );
        }
    }

    // `renew --dry-run` runs the same, whether or not the certificate is due.
    let out = cluster.ctl(&["renew", "--dry-run"]).await.unwrap();
    ok(&cluster, "renew --dry-run", &out);
    assert!(
        out.stdout
            .contains(&format!("{CERT}: dry run of {CERT} succeeded")),
        "{}",
        out.stdout
    );

    // Nothing stored, nothing on the nodes changed, no token left.
    assert_eq!(snapshot(&cluster), before, "a dry run wrote something");
    assert_no_tokens_left(&cluster).await;
    let out = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    assert_eq!(out.last_json()[0]["version"], 1, "{}", out.stdout);
    for node in &cluster.nodes {
        let addr = std::net::SocketAddr::new(node.ip, cluster.tls_port);
        let now = served_leaf_sha256(addr, &shared_name()).await.unwrap();
        assert_eq!(now, served, "{} serves another leaf", node.name);
    }
    // The staging account is its own file; the main one is untouched.
    let accounts = credentials(&cluster);
    assert_eq!(accounts.len(), 2, "{:?}", accounts.keys());
    for (name, bytes) in &main_accounts {
        assert_eq!(accounts.get(name), Some(bytes), "{name} changed");
    }
    let staging = accounts
        .iter()
        .find(|(name, _)| !main_accounts.contains_key(*name))
        .unwrap();
    assert!(staging.0.starts_with("staging-account-"), "{}", staging.0);
    assert_ne!(staging.1, main_accounts.values().next().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn renew_orders_nothing_that_is_not_due_and_force_renews_and_rolls_out() {
    let (cluster, _nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 2,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: "after_issue = \"rollout\"\n".to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = live_sha(&cluster);
    let archive = cluster.state_dir.join("archive").join(CERT);
    let files = tree(&archive);

    let out = cluster.ctl(&["renew"]).await.unwrap();
    ok(&cluster, "renew", &out);
    assert!(
        out.stdout.contains(&format!("{CERT}: not due until 20")),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("[order] ok cn: order"),
        "{}",
        out.stdout
    );
    assert_eq!(tree(&archive), files, "renew stored something");

    let out = cluster
        .ctl(&["--json", "renew", "--force", CERT])
        .await
        .unwrap();
    ok(&cluster, "renew --force", &out);
    let events = out.json_lines();
    assert_eq!(events[0]["message"], format!("{CERT}: renewing (forced)"));
    let done = events.iter().find(|e| e["stage"] == "done").unwrap();
    assert_eq!(done["certificate"]["version"], 2, "{}", out.stdout);
    assert!(
        events.iter().any(|e| e["stage"] == "restart"),
        "after_issue = rollout restarts: {}",
        out.stdout
    );
    let v2 = live_sha(&cluster);
    assert_ne!(v1, v2);
    // Rolled out: every nginx serves the new leaf, by our own handshake.
    for node in &cluster.nodes {
        let addr = std::net::SocketAddr::new(node.ip, cluster.tls_port);
        let served = served_leaf_sha256(addr, &shared_name()).await.unwrap();
        assert_eq!(served, v2, "{} serves another leaf", node.name);
    }
    // An unknown name refuses the whole request as a usage error.
    let out = cluster.ctl(&["renew", CERT, "no-such-cert"]).await.unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("no-such-cert"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_ari_at_the_ca_renewal_falls_back_to_a_third_left_and_says_so_once() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    ok(&cluster, "issue", &cluster.issue().await.unwrap());
    // The scheduler asks the CA at its next pass after the issue.
    eventually(
        "the coordinator to note that the CA has no ARI",
        Duration::from_secs(30),
        || async { cluster.coordinator_log().contains(NO_ARI).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    // More passes (each issue wakes the scheduler) do not ask again.
    ok(&cluster, "issue", &cluster.issue().await.unwrap());
    ok(&cluster, "renew", &cluster.ctl(&["renew"]).await.unwrap());
    let listed = eventually(
        "the listing of version 2",
        Duration::from_secs(10),
        || async {
            let out = cluster.ctl(&["--json", "certificates"]).await.ok()?;
            let c = out.last_json()[0].clone();
            (c["version"] == 2 && c["next_renewal_unix"].as_i64()? > 0).then_some(c)
        },
    )
    .await
    .unwrap();
    let log = cluster.coordinator_log();
    assert_eq!(log.matches(NO_ARI).count(), 1, "{log}");
    // Due when a third of the lifetime is left, moved earlier by at most
    // the jitter (an hour for Pebble's five-year certificates).
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    let b = Bundle::parse(&chain, None, &[]).unwrap();
    let third_left = b.not_after - (b.not_after - b.not_before) / 3;
    let next = listed["next_renewal_unix"].as_i64().unwrap();
    assert!(
        next <= third_left + 1 && next >= third_left - 3600,
        "next renewal {next}, a third left at {third_left}: {listed}"
    );
}
