//! The local demo: a real Pebble, three agents on loopback and the
//! coordinator, then `certfleet issue` and `certfleet certificates`.
//! Everything runs from an embedded default; the state is kept afterwards
//! so you can look at it.

use std::time::Duration;

use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!(
        "Starting Pebble (ACME CA), the coordinator (with its cluster CA) and 3 agents on loopback, each joined with a one-time token…"
    );
    let cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        ..Default::default()
    })
    .await?;
    for node in &cluster.nodes {
        println!(
            "  node {:<10} agent {} (mutual TLS)  HTTP-01 on {}:{}",
            node.name, node.grpc, node.ip, cluster.pebble.http_port
        );
    }
    println!("  names: {}", cluster.sans.join(", "));
    println!("\n$ certfleet issue {CERT}");
    let code = cluster.ctl_inherit(&["issue", CERT]).await?;
    if code != 0 {
        eprintln!(
            "\ncertfleet issue failed (exit {code}); the coordinator's log:\n{}",
            cluster.coordinator_log()
        );
        std::process::exit(1);
    }
    println!("\n$ certfleet certificates");
    cluster.ctl_inherit(&["certificates"]).await?;

    let live = cluster.live_dir();
    // Give the coordinator a moment to flush its log before it is stopped.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let Cluster { dir, .. } = cluster;
    let kept = dir.keep();
    println!("\nThe certificate is in {}", live.display());
    for file in ["cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"] {
        println!("  {}", live.join(file).display());
    }
    println!(
        "Inspect it with: openssl x509 -in {} -noout -subject -ext subjectAltName -enddate",
        live.join("cert.pem").display()
    );
    println!(
        "All demo state (configs, logs, store) is kept in {}",
        kept.display()
    );
    Ok(())
}
