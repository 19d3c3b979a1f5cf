//! The local demo, on an embedded default: a real Pebble, the coordinator
//! with its cluster CA, three agents on loopback that join with one-time
//! tokens, and a real nginx per node serving TLS. It issues a certificate,
//! rolls it out, issues a second one, rolls that out node by node, and ends
//! with every node proven to serve the new certificate. The state is kept
//! afterwards so you can look at it.

use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS, ensure_ssl_cert_group};

async fn run(cluster: &Cluster, args: &[&str]) -> anyhow::Result<()> {
    println!("\n$ certfleet {}", args.join(" "));
    let code = cluster.ctl_inherit(args).await?;
    if code != 0 {
        anyhow::bail!(
            "certfleet {} failed (exit {code}); the coordinator's log:\n{}",
            args.join(" "),
            cluster.coordinator_log()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ensure_ssl_cert_group()?;
    println!(
        "Starting Pebble (ACME CA), the coordinator (with its cluster CA) and 3 agents on loopback, each joined with a one-time token…"
    );
    let cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        agent_certificates: NGINX_TARGETS.to_owned(),
        ..Default::default()
    })
    .await?;
    for node in &cluster.nodes {
        println!(
            "  node {:<10} agent {} (mutual TLS)  HTTP-01 on {}:{}  nginx TLS on {}:{}",
            node.name, node.grpc, node.ip, cluster.pebble.http_port, node.ip, cluster.tls_port
        );
    }
    println!("  names: {}", cluster.sans.join(", "));

    run(&cluster, &["nodes"]).await?;
    run(&cluster, &["issue", CERT]).await?;
    run(&cluster, &["distribute", CERT]).await?;
    println!("\n(starting nginx on every node with version 1)");
    let _nginx = cluster.serve_tls().await?;
    run(&cluster, &["issue", CERT]).await?;
    run(&cluster, &["rollout", CERT]).await?;
    run(&cluster, &["status", CERT]).await?;
    run(&cluster, &["certificates"]).await?;

    let live = cluster.live_dir();
    println!("\nEvery node's nginx now serves version 2 (checked by a TLS handshake to each).");
    println!(
        "The coordinator's copy is in {} (certbot's layout);",
        live.display()
    );
    for node in &cluster.nodes {
        println!(
            "{} installed {}/ssl/certs/cn.pem and {}/ssl/private/server.key (root:ssl-cert 0640)",
            node.name,
            node.dir.display(),
            node.dir.display()
        );
    }
    println!(
        "Inspect one with: openssl x509 -in {}/ssl/certs/cn.pem -noout -serial -ext subjectAltName -enddate",
        cluster.nodes[0].dir.display()
    );
    println!("(the demo's processes, nginx included, stop when it exits)");
    let Cluster { dir, .. } = cluster;
    println!(
        "All demo state (configs, logs, stores) is kept in {}",
        dir.keep().display()
    );
    Ok(())
}
