//! Rollout: services restarted node by node, each node proven to serve the
//! new certificate by a real TLS handshake before the next is touched; a
//! failing node rolled back to the old one and the rollout halted.
//!
//! Every node runs its own real nginx serving TLS from the files its agent
//! installed; the agent's restart command is `nginx -s reload`.

use std::net::SocketAddr;
use std::path::PathBuf;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS, Node};
use certfleet_tests::nginx::Nginx;
use certfleet_tests::verify::served_leaf_sha256;

const SNI: &str = "cn.dataone.test";

const TARGETS: &str = NGINX_TARGETS;

struct Fleet {
    cluster: Cluster,
    nginx: Vec<Nginx>,
    v1: String,
}

fn tls_addr(cluster: &Cluster, node: &Node) -> SocketAddr {
    SocketAddr::new(node.ip, cluster.tls_port)
}

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

fn on_disk_sha(node: &Node) -> String {
    let chain = std::fs::read_to_string(node.dir.join("ssl/certs/cn.pem")).unwrap();
    let key = std::fs::read_to_string(node.dir.join("ssl/private/server.key")).unwrap();
    Bundle::parse(&chain, Some(&key), &[])
        .unwrap()
        .leaf_sha256_hex()
}

async fn served(cluster: &Cluster, i: usize) -> String {
    served_leaf_sha256(tls_addr(cluster, &cluster.nodes[i]), SNI)
        .await
        .unwrap()
}

fn config_path(node: &Node) -> PathBuf {
    node.dir.join("tls/nginx.conf")
}

/// A cluster whose nodes all serve version 1 over TLS.
async fn fleet(nodes: usize) -> Fleet {
    let (cluster, nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes,
        agent_certificates: TARGETS.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = live_sha(&cluster);
    for i in 0..nodes {
        assert_eq!(served(&cluster, i).await, v1);
    }
    Fleet { cluster, nginx, v1 }
}

#[tokio::test(flavor = "multi_thread")]
async fn rollout_puts_the_new_certificate_into_every_service() {
    let f = fleet(4).await;
    let c = &f.cluster;
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0);
    let v2 = live_sha(c);
    assert_ne!(v2, f.v1);

    let out = c.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    for (i, node) in c.nodes.iter().enumerate() {
        assert_eq!(
            served(c, i).await,
            v2,
            "node {} serves the old certificate",
            node.name
        );
        assert_eq!(on_disk_sha(node), v2);
    }
    // Node by node, in order: each node's restart finished before the next began.
    let order: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("[restart]") && l.contains("serves version 2"))
        .map(|l| l.split_whitespace().nth(2).unwrap().trim_end_matches(':'))
        .collect();
    assert_eq!(
        order,
        ["cn-ucsb-1", "cn-unm-1", "cn-orc-1", "cn-ornl-1"],
        "{}",
        out.stdout
    );

    let out = c.ctl(&["--json", "status", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stdout);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(status["all_serving_live"], true);
    assert_eq!(status["last_rollout"], "ok");
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["served"][0]["sha256"], v2.as_str());
        assert!(n["days_left"].as_i64().unwrap() > 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_check_on_node_3_rolls_it_back_and_halts() {
    let f = fleet(4).await;
    let c = &f.cluster;
    // Node 3's nginx config gets broken on disk; the running nginx is fine.
    let conf = config_path(&c.nodes[2]);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nbogus_directive on;\n");
    std::fs::write(&conf, text).unwrap();
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0);
    let v2 = live_sha(c);

    let out = c.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stderr.contains("rollout halted at node cn-orc-1"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("service nginx, step check"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("bogus_directive"),
        "the output should show what nginx said: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("untouched: cn-ornl-1"),
        "{}",
        out.stderr
    );
    // Nodes 1-2 serve the new certificate; node 3 the old one, from files
    // rolled back to version 1; node 4 was never restarted.
    assert_eq!(served(c, 0).await, v2);
    assert_eq!(served(c, 1).await, v2);
    assert_eq!(served(c, 2).await, f.v1);
    assert_eq!(on_disk_sha(&c.nodes[2]), f.v1);
    assert_eq!(served(c, 3).await, f.v1);
    let node4_log = std::fs::read_to_string(c.nodes[3].dir.join("agent.log")).unwrap();
    assert!(
        !node4_log.contains("service restart"),
        "node 4 was restarted:\n{node4_log}"
    );

    let out = c.ctl(&["--json", "status", CERT]).await.unwrap();
    assert_eq!(
        out.code, 1,
        "status must fail while a node does not serve the live version"
    );
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(status["last_rollout"], "halted");
    // status shows what the rollout recorded on each node: nodes 1-2
    // verified, node 3's failed check in nginx's words and its rollback,
    // nothing on node 4.
    assert_eq!(status["last_rollout_version"], 2, "{status}");
    let steps = status["last_rollout_steps"].as_array().unwrap();
    let on = |node: &str| -> Vec<(&str, bool)> {
        steps
            .iter()
            .filter(|s| s["node"] == node)
            .map(|s| (s["step"].as_str().unwrap(), s["ok"].as_bool().unwrap()))
            .collect()
    };
    assert_eq!(on("cn-ucsb-1"), [("nginx:verify", true)], "{status}");
    assert_eq!(on("cn-unm-1"), [("nginx:verify", true)], "{status}");
    assert_eq!(
        on("cn-orc-1"),
        [("nginx:check", false), ("rollback", true)],
        "{status}"
    );
    assert!(on("cn-ornl-1").is_empty(), "{status}");
    let check = steps.iter().find(|s| s["step"] == "nginx:check").unwrap();
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("bogus_directive"),
        "{check}"
    );
    // The same, one line per node, for a terminal.
    let out = c.ctl(&["status", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    let after = out
        .stdout
        .split_once("last rollout, of version 2 (halted), step by step:\n")
        .unwrap_or_else(|| panic!("no rollout steps: {}", out.stdout))
        .1;
    let lines: Vec<&str> = after.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(
        lines[0].starts_with("cn-ucsb-1 ") && lines[0].ends_with(" nginx:verify ok"),
        "{}",
        out.stdout
    );
    assert!(
        lines[2].starts_with("cn-orc-1 ")
            && lines[2].contains(" nginx:check FAILED (")
            && lines[2].ends_with("), rollback ok"),
        "{}",
        out.stdout
    );
    drop(f.nginx);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_keeps_serving_the_old_certificate_is_caught() {
    let mut f = fleet(3).await;
    // Node 2's "restart" does nothing: the new files sit on disk while the
    // old certificate is still served, the classic silent failure.
    let node = &mut f.cluster.nodes[1];
    let config = std::fs::read_to_string(&node.config_path).unwrap();
    let broken = config.replacen(
        &format!(
            "restart = [\"nginx\", \"-s\", \"reload\", \"-c\", \"{0}/tls/nginx.conf\", \"-p\", \"{0}/tls\"]",
            node.dir.display()
        ),
        "restart = [\"true\"]",
        1,
    );
    assert_ne!(config, broken);
    std::fs::write(&node.config_path, broken).unwrap();
    node.start_agent().await.unwrap();
    let c = &f.cluster;
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0);
    let v2 = live_sha(c);

    let out = c.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stderr.contains("rollout halted at node cn-unm-1"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("step verify"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&f.v1),
        "the output should show the old fingerprint served: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("serves version 1 again"),
        "{}",
        out.stderr
    );
    assert_eq!(served(c, 0).await, v2);
    assert_eq!(served(c, 1).await, f.v1);
    assert_eq!(on_disk_sha(&c.nodes[1]), f.v1);
    assert_eq!(served(c, 2).await, f.v1);
}
