//! `systemctl reload` of the coordinator (SIGHUP) against the real
//! processes: a certificate added to the config is issued and distributed
//! without a restart, a section bound at start is reported as needing one
//! and keeps its running value, and a config that does not validate leaves
//! the running one in force.

use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, DEFAULT_AGENT_CERTIFICATES, DOMAIN};
use certfleet_tests::process::eventually;
use certfleet_tests::verify::chain_verifies;

/// The certificate the reload adds.
const ADDED: &str = "web";
/// Where `[enrollment] advertise` points after the reload: an address no
/// agent could dial (TEST-NET-3), so it shows if it were applied.
const ADVERTISED: &str = "203.0.113.7:7444";
/// How long a reload may take to be logged.
const RELOAD: Duration = Duration::from_secs(10);

fn added_name() -> String {
    format!("{ADDED}.{DOMAIN}")
}

/// Two nodes whose agents already have targets for [`ADDED`], as an admin
/// prepares the nodes before adding the certificate to the coordinator.
async fn cluster() -> Cluster {
    let agent_certificates = format!(
        "{DEFAULT_AGENT_CERTIFICATES}\n[[certificates]]\nname = \"{ADDED}\"\nlive_dir = \"{{dir}}/live/{ADDED}\"\n"
    );
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        agent_certificates,
        ..Default::default()
    })
    .await
    .unwrap();
    let ip = cluster.nodes[0].ip;
    cluster.pebble.add_a(&added_name(), ip).await.unwrap();
    cluster
}

/// The `[[certificates]]` block that adds [`ADDED`].
fn added_block() -> String {
    format!(
        "\n[[certificates]]\nname = \"{ADDED}\"\nsans = [\"{}\"]\n",
        added_name()
    )
}

fn reload_lines(cluster: &Cluster) -> Vec<String> {
    cluster
        .coordinator_log()
        .lines()
        .filter(|l| l.contains("config reload"))
        .map(str::to_owned)
        .collect()
}

/// Rewrites the config with `edit`, sends SIGHUP, and returns the line
/// the coordinator logged about the reload, once it has; the coordinator
/// must still run after it.
async fn reload(cluster: &mut Cluster, edit: impl FnOnce(String) -> String) -> String {
    let before = reload_lines(cluster).len();
    cluster.reload_coordinator(edit).unwrap();
    let line = eventually("the coordinator's reload log line", RELOAD, || {
        let line = reload_lines(cluster).get(before).cloned();
        async move { line }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let coordinator = cluster.coordinator.as_mut().unwrap();
    coordinator.check_running().unwrap();
    line
}

/// Runs the CLI and asserts it exited 0.
async fn ok(cluster: &Cluster, args: &[&str]) -> certfleet_tests::cluster::CtlOutput {
    let out = cluster.ctl(args).await.unwrap();
    assert_eq!(
        out.code,
        0,
        "certfleet {}: stdout:\n{}\nstderr:\n{}\n{}",
        args.join(" "),
        out.stdout,
        out.stderr,
        cluster.logs()
    );
    out
}

/// `certfleet --json issue NAME`; the version stored.
async fn issue(cluster: &Cluster, name: &str) -> u64 {
    let out = ok(cluster, &["--json", "issue", name]).await;
    let last = out.last_json();
    assert_eq!(last["stage"], "done", "{}", out.stdout);
    last["certificate"]["version"].as_u64().unwrap()
}

fn leaf_sha(fullchain: &std::path::Path) -> String {
    let pem = std::fs::read_to_string(fullchain)
        .unwrap_or_else(|e| panic!("reading {}: {e}", fullchain.display()));
    Bundle::parse(&pem, None, &[]).unwrap().leaf_sha256_hex()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_added_on_reload_is_issued_and_distributed_without_a_restart() {
    let mut cluster = cluster().await;
    let unknown = cluster.ctl(&["issue", ADDED]).await.unwrap();
    assert_eq!(unknown.code, 2, "{}\n{}", unknown.stdout, unknown.stderr);

    let line = reload(&mut cluster, |config| {
        config.replacen(
            "[enrollment]\n",
            &format!("[enrollment]\nadvertise = \"{ADVERTISED}\"\n"),
            1,
        ) + &added_block()
    })
    .await;
    assert!(
        line.contains("config reloaded")
            && line.contains("applied=[[certificates]]")
            && line.contains("needs_restart=[enrollment]"),
        "{line}"
    );

    // Issued at the CA for its name, stored, and onto every node.
    assert_eq!(issue(&cluster, ADDED).await, 1);
    let live = cluster.state_dir.join("live").join(ADDED);
    let fullchain = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    let root = cluster.pebble.root_pem().await.unwrap();
    chain_verifies(&fullchain, &root, &[added_name()]).unwrap();
    ok(&cluster, &["distribute", ADDED]).await;
    let sha = leaf_sha(&live.join("fullchain.pem"));
    for node in &cluster.nodes {
        let installed = node.dir.join("live").join(ADDED).join("fullchain.pem");
        assert_eq!(leaf_sha(&installed), sha, "node {}", node.name);
    }
    // The certificate that was there keeps working.
    assert_eq!(issue(&cluster, CERT).await, 1);

    // [enrollment] is bound at start: join commands still name the
    // address the coordinator listens on.
    let out = ok(
        &cluster,
        &[
            "--json",
            "node",
            "add",
            "cn-later-1",
            "--agent",
            "127.0.0.1:7443",
        ],
    )
    .await;
    let join = out.last_json()["join_command"].as_str().unwrap().to_owned();
    assert!(
        join.contains(&format!("--coordinator {} ", cluster.enrollment))
            && !join.contains(ADVERTISED),
        "{join}"
    );

    // A new renewal policy moves the next renewal at once: the reload
    // wakes the scheduler, which otherwise sleeps up to 10 minutes.
    let before = next_renewal(&cluster).await.expect("cn has a next renewal");
    let line = reload(&mut cluster, |config| {
        config + "\n[renewal]\nshare_left = 0.9\nmax_jitter_secs = 0\n"
    })
    .await;
    assert!(line.contains("applied=[renewal]"), "{line}");
    let year = 365 * 24 * 3600;
    eventually(
        "the next renewal moved by the new policy",
        RELOAD,
        || async {
            next_renewal(&cluster)
                .await
                .filter(|at| *at < before - year)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: it was {before}\n{}", cluster.logs()));
}

/// When `certfleet certificates` says [`CERT`] renews next.
async fn next_renewal(cluster: &Cluster) -> Option<i64> {
    let out = cluster.ctl(&["--json", "certificates"]).await.ok()?;
    let listed = out.last_json();
    let cn = listed.as_array()?.iter().find(|c| c["name"] == CERT)?;
    cn["next_renewal_unix"].as_i64().filter(|at| *at > 0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_config_on_reload_is_refused_and_the_coordinator_goes_on_issuing() {
    let mut cluster = cluster().await;
    let line = reload(&mut cluster, |config| config + &added_block()).await;
    assert!(line.contains("applied=[[certificates]]"), "{line}");

    let line = reload(&mut cluster, |config| config + "\nnot = [valid\n").await;
    assert!(
        line.contains("config reload refused: the running config stays"),
        "{line}"
    );
    // The running config, with the certificate the first reload added.
    assert_eq!(issue(&cluster, ADDED).await, 1);
    assert_eq!(issue(&cluster, CERT).await, 1);

    // Taken out of the file again: no longer issued.
    let line = reload(&mut cluster, |config| {
        config
            .replace("\nnot = [valid\n", "")
            .replace(&added_block(), "")
    })
    .await;
    assert!(line.contains("applied=[[certificates]]"), "{line}");
    let gone = cluster.ctl(&["issue", ADDED]).await.unwrap();
    assert_eq!(gone.code, 2, "{}\n{}", gone.stdout, gone.stderr);
    assert!(
        gone.stderr
            .contains(&format!("no certificate named \"{ADDED}\"")),
        "{}",
        gone.stderr
    );
}
