//! Certificates renew themselves: the coordinator daemon, left alone,
//! renews a certificate when its configured share of lifetime is left and
//! rolls the new version out to every node's nginx.

use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS};
use certfleet_tests::process::eventually;

/// Pebble's certificates last five years; renewing when all but 1e-7 of
/// that is left makes one due about 16 s after it is issued.
const RENEW_SOON: &str = r#"after_issue = "rollout"

[renewal]
share_left = 0.9999999
max_jitter_secs = 0
"#;

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_due_certificate_renews_by_itself_and_is_rolled_out() {
    let (cluster, _nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 2,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: RENEW_SOON.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = live_sha(&cluster);
    // The listing says when the next renewal is.
    let out = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    let listed = out.last_json();
    assert!(
        listed[0]["next_renewal_unix"].as_i64().unwrap_or(0) > 0,
        "{listed}"
    );
    // Nobody types anything: a new version appears and every node's nginx
    // serves it, as `certfleet status` proves by its own handshakes.
    let v2 = eventually(
        "a renewed version served by every node",
        Duration::from_secs(90),
        || async {
            let out = cluster.ctl(&["--json", "status", CERT]).await.ok()?;
            let v = out.last_json();
            let live = v["live_sha256"].as_str()?.to_owned();
            (live != v1 && v["all_serving_live"] == true).then_some(live)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.coordinator_log()));
    assert_ne!(v1, v2);
    let out = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    let listed = out.last_json();
    assert!(listed[0]["version"].as_u64().unwrap() >= 2, "{listed}");
    let log = cluster.coordinator_log();
    assert!(log.contains("renewal due: renewing"), "{log}");
}
