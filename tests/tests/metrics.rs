//! Metrics: Prometheus scrapes the coordinator's and every agent's
//! `/metrics` on a real cluster (Pebble, agents, nginx serving TLS), and
//! sees what an admin would check by hand: the expiry of the leaf each
//! node's nginx really serves, the version on each node's disk, and how
//! the last rollout ended.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS, Node};
use certfleet_tests::net::{free_port, http};
use certfleet_tests::process::eventually;
use certfleet_tests::verify::served_leaf_sha256;

const SNI: &str = "cn.dataone.test";
/// Where each agent serves its metrics, on its node's own address.
const AGENT_METRICS_PORT: u16 = 9465;

/// The series `name{labels}` in an OpenMetrics text, as a number.
fn value(text: &str, series: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let url = format!("http://{addr}/metrics");
    match http(http::Method::GET, &url, None, None).await {
        Ok((status, body)) if status == http::StatusCode::OK => Some(body),
        _ => None,
    }
}

/// The leaf the node's nginx serves: its SHA-256 is the one of the chain
/// on the node's disk, whose notAfter is returned.
async fn served_not_after(cluster: &Cluster, node: &Node) -> (String, i64) {
    let chain = std::fs::read_to_string(node.dir.join("ssl/certs/cn.pem")).unwrap();
    let on_disk = Bundle::parse(&chain, None, &[]).unwrap();
    let served = served_leaf_sha256(SocketAddr::new(node.ip, cluster.tls_port), SNI)
        .await
        .unwrap();
    assert_eq!(served, on_disk.leaf_sha256_hex(), "node {}", node.name);
    (served, on_disk.not_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn both_endpoints_show_what_the_nodes_serve_and_the_last_rollout() {
    let localhost: IpAddr = "127.0.0.1".parse().unwrap();
    let coordinator = SocketAddr::new(localhost, free_port(localhost));
    let (cluster, _nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 2,
        agent_certificates: format!(
            "{NGINX_TARGETS}\n[metrics]\nlisten = \"{{ip}}:{AGENT_METRICS_PORT}\"\n"
        ),
        coordinator_extra: format!("\n[metrics]\nlisten = \"{coordinator}\"\nprobe_secs = 1\n"),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = &cluster;

    // Version 2: issued, on every disk, restarted into service.
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    for step in ["distribute", "rollout"] {
        let out = c.ctl(&[step, CERT]).await.unwrap();
        assert_eq!(out.code, 0, "{step}: {}{}", out.stdout, out.stderr);
    }
    let live = Bundle::parse(
        &std::fs::read_to_string(c.live_dir().join("fullchain.pem")).unwrap(),
        None,
        &[],
    )
    .unwrap();

    let mut expected = Vec::new();
    for node in &c.nodes {
        let (sha, not_after) = served_not_after(c, node).await;
        assert_eq!(sha, live.leaf_sha256_hex(), "node {} serves v2", node.name);
        expected.push((node, not_after));
    }
    let expiry = |node: &Node| {
        format!(
            r#"certfleet_certificate_expiration_timestamp_seconds{{certificate="cn",node="{}",service="nginx",endpoint="{}:{}"}}"#,
            node.name, node.ip, c.tls_port
        )
    };
    // A probe that started before the rollout may still be the latest (one
    // between distribute and rollout sees version 2 on disk and version 1
    // served): wait for one that sees version 2 served everywhere.
    let text = eventually(
        "a probe after the rollout",
        Duration::from_secs(30),
        || async {
            let text = scrape(coordinator).await?;
            let all = expected.iter().all(|(n, not_after)| {
                value(
                    &text,
                    &format!(
                        r#"certfleet_certificate_version{{certificate="cn",node="{}"}}"#,
                        n.name
                    ),
                ) == Some(2)
                    && value(&text, &expiry(n)) == Some(*not_after)
            });
            all.then_some(text)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // The README's sample.
    let samples = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mail-samples");
    let _ = std::fs::create_dir_all(&samples);
    let _ = std::fs::write(samples.join("metrics.txt"), &text);

    for (node, not_after) in &expected {
        let series = expiry(node);
        assert_eq!(value(&text, &series), Some(*not_after), "{series}\n{text}");
        let probed = format!(
            r#"certfleet_node_probe_success{{certificate="cn",node="{}"}}"#,
            node.name
        );
        assert_eq!(value(&text, &probed), Some(1), "{text}");
    }
    let cert = |name: &str| format!(r#"{name}{{certificate="cn"}}"#);
    assert_eq!(
        value(&text, &cert("certfleet_certificate_live_version")),
        Some(2),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            &cert("certfleet_certificate_live_expiration_timestamp_seconds")
        ),
        Some(live.not_after),
        "{text}"
    );
    assert_eq!(
        value(&text, &cert("certfleet_rollout_last_success")),
        Some(1),
        "{text}"
    );
    let rolled = value(&text, &cert("certfleet_rollout_last_timestamp_seconds")).unwrap();
    assert!(
        (certfleet_proto::clock::now() - rolled).abs() < 120,
        "{rolled}"
    );
    assert_eq!(
        value(&text, &cert("certfleet_renewal_failures")),
        Some(0),
        "{text}"
    );
    assert!(
        value(&text, &cert("certfleet_renewal_next_timestamp_seconds")).unwrap()
            > certfleet_proto::clock::now(),
        "{text}"
    );
    assert_eq!(value(&text, "certfleet_outbox_pending"), Some(0), "{text}");
    assert_eq!(
        value(&text, "certfleet_approvals_pending"),
        Some(0),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");

    // Each agent reports on itself: up, two versions installed, a restart
    // that verified, the order's tokens placed.
    for node in &c.nodes {
        let addr = SocketAddr::new(node.ip, AGENT_METRICS_PORT);
        let text = scrape(addr)
            .await
            .unwrap_or_else(|| panic!("no metrics from agent {}", node.name));
        assert_eq!(value(&text, "certfleet_agent_up"), Some(1), "{text}");
        assert_eq!(
            value(&text, "certfleet_agent_installs_total"),
            Some(2),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"certfleet_agent_restarts_total{outcome="ok"}"#),
            Some(1),
            "{text}"
        );
        assert!(
            value(&text, "certfleet_agent_tokens_placed_total").unwrap() > 0,
            "{text}"
        );
        let installed = value(&text, "certfleet_agent_last_install_timestamp_seconds").unwrap();
        assert!((certfleet_proto::clock::now() - installed).abs() < 120);
    }

    // Nothing but GET /metrics.
    let (status, _) = http(
        http::Method::GET,
        &format!("http://{coordinator}/"),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, http::StatusCode::NOT_FOUND);
}

/// A coordinator whose `[metrics]` cannot listen refuses to start and says
/// why, as nginx does, rather than run with no metrics to alert on.
#[tokio::test(flavor = "multi_thread")]
async fn a_metrics_address_in_use_stops_the_coordinator_from_starting() {
    let localhost: IpAddr = "127.0.0.1".parse().unwrap();
    let taken = std::net::TcpListener::bind(SocketAddr::new(localhost, 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Cluster::start(ClusterSpec {
        nodes: 1,
        coordinator_extra: format!("\n[metrics]\nlisten = \"{addr}\"\n"),
        ..Default::default()
    })
    .await
    .err()
    .expect("the coordinator started with its metrics address taken");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!("binding metrics.listen {addr}")) && err.contains("in use"),
        "{err}"
    );
}
