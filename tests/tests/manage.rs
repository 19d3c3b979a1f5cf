//! Taking certificates and the account in hand: `certfleet revoke` (Pebble's
//! management API shows the certificate revoked), `certfleet account`
//! (after a key rollover the old key is refused and the new one orders),
//! and `certfleet delete` (the store forgets the certificate; the nodes'
//! files stay, or with `--from-nodes` go, and nothing else on a node
//! changes).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, DOMAIN, Node};

async fn cluster(nodes: usize) -> Cluster {
    Cluster::start(ClusterSpec {
        nodes,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Runs `certfleet ARGS`, which must succeed.
async fn ok(cluster: &Cluster, args: &[&str]) -> certfleet_tests::cluster::CtlOutput {
    let out = cluster.ctl(args).await.unwrap();
    assert_eq!(
        out.code,
        0,
        "certfleet {args:?}\n{}\n{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_is_seen_at_the_ca_and_a_bad_reason_or_version_is_a_usage_error() {
    let cluster = cluster(1).await;
    let issued = ok(&cluster, &["--json", "issue", CERT]).await;
    let serial = issued.last_json()["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let (revoked, status) = cluster.pebble.revoked(&serial).await.unwrap();
    assert!(!revoked, "freshly issued: {status}");

    let out = cluster
        .ctl(&["revoke", CERT, "--reason", "stolen"])
        .await
        .unwrap();
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("--reason \"stolen\""), "{}", out.stderr);
    assert!(
        out.stderr.contains("keyCompromise") && out.stderr.contains("cessationOfOperation"),
        "the valid reasons are listed: {}",
        out.stderr
    );
    let out = cluster
        .ctl(&["revoke", CERT, "--version", "7"])
        .await
        .unwrap();
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("no version 7"), "{}", out.stderr);
    assert!(!cluster.pebble.revoked(&serial).await.unwrap().0);

    let out = ok(
        &cluster,
        &["--json", "revoke", CERT, "--reason", "keyCompromise"],
    )
    .await;
    let answer = out.last_json();
    assert_eq!(answer["serial"], serial.as_str(), "{answer}");
    assert_eq!(answer["version"], 1, "{answer}");
    let (revoked, status) = cluster.pebble.revoked(&serial).await.unwrap();
    assert!(revoked, "Pebble: {status}");
    // RFC 5280's keyCompromise is 1.
    assert_eq!(status["Reason"], 1, "Pebble: {status}");
}

/// The coordinator's stored ACME credentials file.
fn credentials_file(cluster: &Cluster) -> PathBuf {
    std::fs::read_dir(cluster.state_dir.join("acme"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("account-") && name.ends_with(".json") && !name.contains(".contacts")
        })
        .expect("an account credentials file")
}

/// An account operation with the credentials in `creds`, straight to
/// Pebble: change the contacts.
async fn update_contacts_with(cluster: &Cluster, creds: &[u8]) -> Result<(), instant_acme::Error> {
    let creds: instant_acme::AccountCredentials = serde_json::from_slice(creds).unwrap();
    let account = instant_acme::Account::builder_with_root(&cluster.pebble.listener_ca)?
        .from_credentials(creds)
        .await?;
    account
        .update_contacts(&[&format!("mailto:direct@{DOMAIN}")])
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_key_rollover_the_old_key_is_refused_and_the_new_one_orders() {
    let cluster = cluster(1).await;
    ok(&cluster, &["--json", "issue", CERT]).await;
    let shown = ok(&cluster, &["--json", "account", "show"])
        .await
        .last_json();
    assert_eq!(shown["status"], "valid", "{shown}");
    assert_eq!(shown["directory"], cluster.pebble.directory_url().as_str());
    assert_eq!(shown["contacts"][0], format!("mailto:admins@{DOMAIN}"));
    let url = shown["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://127.0.0.1:"), "{shown}");
    let text = ok(&cluster, &["account", "show"]).await.stdout;
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains("key_pkcs8"),
        "{text}"
    );

    let path = credentials_file(&cluster);
    let old = std::fs::read(&path).unwrap();
    let rolled = ok(&cluster, &["--json", "account", "rollover"])
        .await
        .last_json();
    assert_eq!(rolled["url"], url.as_str(), "the same account: {rolled}");
    assert_ne!(
        rolled["key_thumbprint"], shown["key_thumbprint"],
        "{rolled}"
    );
    let new = std::fs::read(&path).unwrap();
    assert_ne!(new, old, "the new credentials are stored");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // The CA refuses the old key, and takes the new one.
    match update_contacts_with(&cluster, &old).await {
        Err(instant_acme::Error::Api(problem)) => eprintln!("the old key: {problem}"),
        other => panic!("the old key is not refused by Pebble: {other:?}"),
    }
    update_contacts_with(&cluster, &new)
        .await
        .expect("the stored new key works at Pebble");
    // The running coordinator orders with the new key, and says so.
    let out = ok(&cluster, &["--json", "issue", CERT]).await;
    assert_eq!(out.last_json()["certificate"]["version"], 2);
    let shown = ok(&cluster, &["--json", "account", "show"])
        .await
        .last_json();
    assert_eq!(shown["key_thumbprint"], rolled["key_thumbprint"]);

    // Contacts: a bad one is a usage error; a good one is kept.
    let out = cluster
        .ctl(&["account", "update", "--contact", "ops@example.org"])
        .await
        .unwrap();
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("\"ops@example.org\""), "{}", out.stderr);
    let contact = format!("mailto:ops@{DOMAIN}");
    let updated = ok(
        &cluster,
        &["--json", "account", "update", "--contact", &contact],
    )
    .await
    .last_json();
    assert_eq!(updated["contacts"], serde_json::json!([contact]));
    let shown = ok(&cluster, &["--json", "account", "show"])
        .await
        .last_json();
    assert_eq!(shown["contacts"], serde_json::json!([contact]));
}

/// Every file under the node's directory but the agent's own state and
/// log, with its contents.
fn node_files(node: &Node) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, skip: &[PathBuf], out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if skip.contains(&path) {
                continue;
            }
            if path.is_dir() {
                walk(&path, skip, out);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    let skip = [node.state_dir.clone(), node.dir.join("agent.log")];
    let mut out = BTreeMap::new();
    walk(&node.dir, &skip, &mut out);
    out
}

fn certificate_names(cluster_out: &certfleet_tests::cluster::CtlOutput) -> Vec<String> {
    cluster_out
        .json_lines()
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_forgets_the_certificate_and_leaves_node_files_unless_asked() {
    let cluster = cluster(2).await;
    ok(&cluster, &["--json", "issue", CERT]).await;
    ok(&cluster, &["distribute", CERT]).await;
    let installed: Vec<_> = cluster.nodes.iter().map(node_files).collect();
    let live = cluster.nodes[0].dir.join("live/cn");
    assert!(live.join("fullchain.pem").exists(), "{installed:?}");

    // Without a terminal to ask on, only --yes deletes.
    let out = cluster.ctl(&["delete", CERT]).await.unwrap();
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("--yes"), "{}", out.stderr);
    assert!(cluster.live_dir().exists());

    ok(&cluster, &["delete", CERT, "--yes"]).await;
    let listed = ok(&cluster, &["--json", "certificates"]).await;
    assert!(
        !certificate_names(&listed).contains(&CERT.to_owned()),
        "{}",
        listed.stdout
    );
    assert!(!cluster.live_dir().exists());
    assert!(!cluster.state_dir.join("archive/cn").exists());
    // Exits 1: no node serves a live version.
    let status = cluster.ctl(&["status", CERT]).await.unwrap().stdout;
    assert!(status.starts_with("not issued"), "{status}");
    for (node, before) in cluster.nodes.iter().zip(&installed) {
        assert_eq!(&node_files(node), before, "node {} changed", node.name);
    }
    let out = cluster.ctl(&["delete", CERT, "--yes"]).await.unwrap();
    assert_eq!(out.code, 2, "nothing left to delete: {}", out.stderr);
    assert!(out.stderr.contains("not been issued"), "{}", out.stderr);

    // Numbering goes on: the nodes still hold version 1.
    let again = ok(&cluster, &["--json", "issue", CERT]).await;
    assert_eq!(
        again.last_json()["certificate"]["version"],
        2,
        "{}",
        again.stdout
    );
    ok(&cluster, &["distribute", CERT]).await;
    let before: Vec<_> = cluster.nodes.iter().map(node_files).collect();
    // A file of someone else's beside the targets stays.
    let other = live.join("README");
    std::fs::write(&other, "not certfleet's").unwrap();

    let out = ok(
        &cluster,
        &["--json", "delete", CERT, "--yes", "--from-nodes"],
    )
    .await;
    for node in &cluster.nodes {
        assert!(out.stdout.contains(&node.name), "{}", out.stdout);
    }
    assert!(!cluster.live_dir().exists());
    for (node, before) in cluster.nodes.iter().zip(&before) {
        let after = node_files(node);
        let target = node.dir.join("live/cn");
        let expected: BTreeMap<_, _> = before
            .iter()
            .filter(|(path, _)| !path.starts_with(&target))
            .map(|(p, d)| (p.clone(), d.clone()))
            .collect();
        let mut after_without_other = after.clone();
        after_without_other.remove(&other);
        assert_eq!(
            after_without_other, expected,
            "node {}: only the installed files went",
            node.name
        );
        assert!(
            before.keys().any(|p| p.starts_with(&target)),
            "node {} had installed files",
            node.name
        );
    }
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "not certfleet's");
    let status = cluster
        .ctl(&["--json", "status", CERT])
        .await
        .unwrap()
        .last_json();
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["version"], 0, "nothing installed: {status}");
    }
}
