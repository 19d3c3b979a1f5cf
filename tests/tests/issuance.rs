//! Issuance scenarios against a real Pebble, real agents on loopback, the
//! real coordinator and the real CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Http01};
use certfleet_tests::pebble::PebbleOptions;
use certfleet_tests::verify::chain_verifies;

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asserts an issue run succeeded and returns its certificate JSON.
fn issued(cluster: &Cluster, out: &certfleet_tests::cluster::CtlOutput) -> serde_json::Value {
    let last = out.last_json();
    assert_eq!(
        (out.code, last["stage"].as_str()),
        (0, Some("done")),
        "issue failed: stdout:\n{}\nstderr:\n{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
    last["certificate"].clone()
}

async fn assert_no_tokens_left(cluster: &Cluster) {
    for node in &cluster.nodes {
        if node.agent.is_some() {
            let tokens = node.tokens().await.unwrap();
            assert!(tokens.is_empty(), "node {} still serves {tokens:?}", node.name);
        }
        assert!(
            node.webroot_files().is_empty(),
            "node {} webroot still holds {:?}",
            node.name,
            node.webroot_files()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn issues_one_certificate_for_a_four_node_cluster() {
    // The shared name resolves to the second node, not the first.
    let cluster = Cluster::start(ClusterSpec {
        shared_node: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(cluster.sans.len(), 5);

    let out = cluster.issue().await.unwrap();
    let cert = issued(&cluster, &out);
    assert_eq!(cert["version"], 1);

    // Progress reached the CLI per node, for placement and self-check.
    let events = out.json_lines();
    for node in &cluster.nodes {
        for stage in ["placement", "self-check"] {
            assert!(
                events
                    .iter()
                    .any(|e| e["stage"] == stage && e["node"] == node.name.as_str() && e["ok"] == true),
                "no successful {stage} event for {}: {}",
                node.name,
                out.stdout
            );
        }
    }

    // live/ points at version 1, in certbot's layout, and the chain verifies
    // against Pebble's root for every name.
    let live = cluster.live_dir();
    assert_eq!(
        std::fs::read_link(live.join("fullchain.pem")).unwrap(),
        PathBuf::from(format!("../../archive/{CERT}/fullchain1.pem"))
    );
    let fullchain = read(live.join("fullchain.pem"));
    let key = read(live.join("privkey.pem"));
    let root = cluster.pebble.root_pem().await.unwrap();
    chain_verifies(&fullchain, &root, &cluster.sans).unwrap();
    let bundle = Bundle::parse(&fullchain, Some(&key), &cluster.sans).unwrap();
    assert_eq!(cert["serial"], bundle.serial.as_str());
    assert_eq!(read(live.join("cert.pem")), bundle.leaf_pem);
    let key_mode = std::fs::metadata(cluster.state_dir.join(format!("archive/{CERT}/privkey1.pem")))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "private key mode");
    let account_dir = cluster.state_dir.join("acme");
    for entry in std::fs::read_dir(&account_dir).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "account credentials mode");
    }
    assert_no_tokens_left(&cluster).await;

    // A second issue gives version 2 and moves live/ to it.
    let out = cluster.issue().await.unwrap();
    let cert2 = issued(&cluster, &out);
    assert_eq!(cert2["version"], 2);
    assert_ne!(cert2["serial"], cert["serial"]);
    let fullchain2 = read(live.join("fullchain.pem"));
    let bundle2 = Bundle::parse(&fullchain2, Some(&read(live.join("privkey.pem"))), &cluster.sans).unwrap();
    assert_eq!(cert2["serial"], bundle2.serial.as_str());
    assert!(cluster.state_dir.join(format!("archive/{CERT}/cert1.pem")).exists());

    // `certificates` lists what is live.
    let out = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], CERT);
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[0]["sans"].as_array().unwrap().len(), 5);
    assert!(list[0]["days_left"].as_i64().unwrap() > 0);
    let out = cluster.ctl(&["certificates"]).await.unwrap();
    assert!(out.stdout.contains(&bundle2.serial), "{}", out.stdout);
}
