//! End-to-end `issue` benchmark against a real Pebble (`PEBBLE_VA_NOSLEEP=1`,
//! no authorization reuse, no nonce rejection), over real agents on loopback.
//!
//! For each (nodes, names) pair it issues once to warm up (account creation),
//! then `--runs` times, and reports the medians of the coordinator's own
//! split: time waiting on the CA, placement + self-check, cleanup, and the
//! rest. With `--certbot` it also times Debian's certbot issuing the same
//! 4-node certificate through a `--manual-auth-hook` that copies each token
//! into every node's nginx webroot, as DataONE's runbook does, against
//! certfleet in webroot mode on the same nodes.
//!
//! With `--split` it measures only where one order's time goes, step by
//! step (4 nodes, 5 names), from the coordinator's `issued` log line. With
//! `--nonce-reject P` it runs only `--issues` orders in a row on a 4-node
//! cluster whose Pebble rejects P% of nonces, and counts those that succeed.
//!
//! Results are printed as a Markdown table for BENCHMARKS.md.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use certfleet_tests::cluster::{Cluster, ClusterSpec, Http01};
use certfleet_tests::pebble::PebbleOptions;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Node counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    nodes: Vec<usize>,
    /// Name counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    sans: Vec<usize>,
    /// Measured issuances per configuration (after one warm-up).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also compare with certbot at 4 nodes.
    #[arg(long)]
    certbot: bool,
    /// Also time distribute and restart on this many agents and measure
    /// their idle memory (0: skip).
    #[arg(long, default_value_t = 0)]
    fleet: usize,
    /// Skip the issue matrix (to run only --certbot or --fleet).
    #[arg(long)]
    no_issue: bool,
    /// Measure only the per-step split of a 4-node, 5-name order.
    #[arg(long)]
    split: bool,
    /// Measure only how many of `--issues` orders in a row succeed while
    /// Pebble rejects this percentage of nonces (`PEBBLE_WFE_NONCEREJECT`).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    nonce_reject: Option<u8>,
    /// Orders to run for `--nonce-reject`.
    #[arg(long, default_value_t = 100)]
    issues: usize,
}

#[derive(Default, Clone, Copy)]
struct Sample {
    total: u64,
    ca: u64,
    placement: u64,
    cleanup: u64,
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn spec(nodes: usize, sans: usize, http01: Http01) -> ClusterSpec {
    ClusterSpec {
        nodes,
        sans: Some(sans),
        http01,
        pebble: PebbleOptions {
            nonce_reject: 0,
            authz_reuse: 0,
            external_account: None,
        },
        shared_node: 1,
        ..Default::default()
    }
}

async fn issue_once(cluster: &Cluster) -> anyhow::Result<Sample> {
    let out = cluster.issue().await?;
    let last = out.last_json();
    if out.code != 0 {
        bail!("issue failed: {}\n{}", out.stdout, out.stderr);
    }
    let t = &last["certificate"]["timings_ms"];
    let get = |k: &str| t[k].as_u64().context("timings missing");
    Ok(Sample {
        total: get("total")?,
        ca: get("ca")?,
        placement: get("placement_and_self_check")?,
        cleanup: get("cleanup")?,
    })
}

async fn measure(cluster: &Cluster, runs: usize) -> anyhow::Result<Sample> {
    issue_once(cluster).await?; // warm-up: creates the ACME account
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        samples.push(issue_once(cluster).await?);
    }
    Ok(Sample {
        total: median(samples.iter().map(|s| s.total).collect()),
        ca: median(samples.iter().map(|s| s.ca).collect()),
        placement: median(samples.iter().map(|s| s.placement).collect()),
        cleanup: median(samples.iter().map(|s| s.cleanup).collect()),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.split || args.nonce_reject.is_some() {
        if args.split {
            split(args.runs).await?;
        }
        if let Some(percent) = args.nonce_reject {
            nonce_rejection(percent, args.issues).await?;
        }
        return Ok(());
    }
    if !args.no_issue {
        issue_matrix(&args).await?;
    }
    if args.certbot {
        certbot_comparison(args.runs).await?;
    }
    if args.fleet > 0 {
        fleet_bench(args.fleet, args.runs).await?;
    }
    Ok(())
}

async fn issue_matrix(args: &Args) -> anyhow::Result<()> {
    println!(
        "| nodes | names | total ms | CA ms | placement + self-check ms | cleanup ms | rest ms | outside CA ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &nodes in &args.nodes {
        for &sans in &args.sans {
            let cluster = Cluster::start(spec(nodes, sans, Http01::Standalone)).await?;
            let s = measure(&cluster, args.runs)
                .await
                .with_context(|| format!("{nodes} nodes, {sans} names"))?;
            let rest = s.total.saturating_sub(s.ca + s.placement + s.cleanup);
            println!(
                "| {nodes} | {} | {} | {} | {} | {} | {rest} | {} |",
                cluster.sans.len(),
                s.total,
                s.ca,
                s.placement,
                s.cleanup,
                s.total - s.ca
            );
        }
    }
    Ok(())
}

/// The steps of one order, as the coordinator's `issued` log line names
/// them (`<step>_ms=N`), with what each covers.
const STEPS: [(&str, &str); 6] = [
    (
        "authorize",
        "authorize: new order, its authorizations fetched",
    ),
    (
        "place_and_check",
        "place and check: tokens onto every node, self-check",
    ),
    (
        "answer_and_wait",
        "answer and wait: challenges answered, order polled until ready",
    ),
    (
        "finalize",
        "finalize: CSR sent, order polled until valid, chain downloaded",
    ),
    ("store", "store: chain checked, written, `live/` switched"),
    ("cleanup", "cleanup: tokens removed from every node"),
];

/// The `<step>_ms` fields of the coordinator's latest `issued` line.
fn last_split(log: &str) -> anyhow::Result<Vec<u64>> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" issued") && l.contains("authorize_ms="))
        .context("no `issued` line with step timings in the coordinator's log")?;
    let field = |key: &str| -> anyhow::Result<u64> {
        let value = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .with_context(|| format!("{key} missing from {line}"))?;
        Ok(value.parse()?)
    };
    let mut split: Vec<u64> = STEPS
        .iter()
        .map(|(name, _)| field(&format!("{name}_ms=")))
        .collect::<anyhow::Result<_>>()?;
    split.push(field("ms=")?); // the whole order
    Ok(split)
}

/// The per-step split of a 4-node, 5-name order: one warm-up, then the
/// median of `runs` for each step.
async fn split(runs: usize) -> anyhow::Result<()> {
    let cluster = Cluster::start(spec(4, 5, Http01::Standalone)).await?;
    issue_once(&cluster).await?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        issue_once(&cluster).await?;
        samples.push(last_split(&cluster.coordinator_log())?);
    }
    let column = |i: usize| median(samples.iter().map(|s| s[i]).collect());
    println!();
    println!(
        "| 4 nodes, {} names, `PEBBLE_VA_NOSLEEP=1`, median of {runs} | ms |",
        cluster.sans.len()
    );
    println!("|---|---:|");
    for (i, (_, what)) in STEPS.iter().enumerate() {
        println!("| {what} | {} |", column(i));
    }
    println!(
        "| in the CA (authorize + answer and wait + finalize; medians summed) | {} |",
        column(0) + column(2) + column(3)
    );
    println!("| whole order | {} |", column(STEPS.len()));
    Ok(())
}

/// `issues` orders in a row on a 4-node cluster whose Pebble rejects
/// `percent`% of nonces; prints how many succeeded and why the others
/// failed.
async fn nonce_rejection(percent: u8, issues: usize) -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        pebble: PebbleOptions {
            nonce_reject: percent,
            authz_reuse: 0,
            external_account: None,
        },
        ..spec(4, 5, Http01::Standalone)
    })
    .await?;
    let mut ok = 0;
    let mut times = Vec::new();
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    for _ in 0..issues {
        let start = Instant::now();
        let out = cluster.issue().await?;
        if out.code == 0 {
            ok += 1;
            times.push(start.elapsed().as_millis() as u64);
        } else {
            let last = out.last_json();
            let error = &last["error"];
            let message = error["message"].as_str().unwrap_or(&out.stderr);
            // Up to the problem type: the detail names the nonce, unique
            // to each failure.
            let why = match error["acme_type"].as_str().filter(|t| !t.is_empty()) {
                Some(t) => message.find(t).map_or(message, |i| &message[..i + t.len()]),
                None => message,
            };
            *failures.entry(why.to_owned()).or_default() += 1;
        }
    }
    println!();
    println!(
        "| 4 nodes, {} names, `PEBBLE_WFE_NONCEREJECT={percent}` | |",
        cluster.sans.len()
    );
    println!("|---|---:|");
    println!("| orders that succeeded | {ok}/{issues} |");
    if !times.is_empty() {
        println!(
            "| `certfleet issue` wall time of those, median / max ms | {} / {} |",
            median(times.clone()),
            times.iter().max().unwrap_or(&0)
        );
    }
    for (why, n) in failures {
        println!("| failed ({n}x) | {} |", why.replace('|', "\\|"));
    }
    Ok(())
}

/// Every agent installs into certbot's layout under its node directory, and
/// has one service whose check and restart are `true`: what is timed is
/// certfleet's own work, not a real service's restart.
const FLEET_TARGETS: &str = r#"
[[certificates]]
name = "cn"
live_dir = "{dir}/live/cn"
[[certificates.services]]
name = "noop"
check = ["true"]
restart = ["true"]
"#;

async fn timed(cluster: &Cluster, args: &[&str]) -> anyhow::Result<u64> {
    let start = Instant::now();
    let out = cluster.ctl(args).await?;
    if out.code != 0 {
        bail!(
            "certfleet {}: {}\n{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
    }
    Ok(start.elapsed().as_millis() as u64)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn fleet_bench(nodes: usize, runs: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let cluster = Cluster::start(ClusterSpec {
        agent_certificates: FLEET_TARGETS.to_owned(),
        ..spec(nodes, 1, Http01::Standalone)
    })
    .await?;
    let setup = started.elapsed();
    timed(&cluster, &["issue", "cn"]).await?;
    let mut fresh = Vec::new();
    let mut noop = Vec::new();
    let mut restart = Vec::new();
    for _ in 0..runs {
        timed(&cluster, &["issue", "cn"]).await?;
        fresh.push(timed(&cluster, &["distribute", "cn"]).await?);
        noop.push(timed(&cluster, &["distribute", "cn"]).await?);
        restart.push(timed(&cluster, &["restart", "cn"]).await?);
    }
    // Idle: nothing has happened for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rss: Vec<u64> = cluster
        .nodes
        .iter()
        .filter_map(|n| n.agent.as_ref()?.pid())
        .filter_map(rss_kib)
        .collect();
    rss.sort_unstable();
    let restart_ms = median(restart);
    println!();
    println!(
        "| {nodes} agents (set up and joined in {} s) | median ms |",
        setup.as_secs()
    );
    println!("|---|---:|");
    println!(
        "| `certfleet distribute` of a new version to all | {} |",
        median(fresh)
    );
    println!(
        "| `certfleet distribute` again (every node already has it) | {} |",
        median(noop)
    );
    println!(
        "| `certfleet restart`, node by node, check and restart = `true` | {restart_ms} ({:.1} per node) |",
        restart_ms as f64 / nodes as f64
    );
    println!(
        "| agent idle RSS, median / max over {} agents | {:.1} / {:.1} MiB |",
        rss.len(),
        rss[rss.len() / 2] as f64 / 1024.0,
        *rss.last().unwrap_or(&0) as f64 / 1024.0
    );
    Ok(())
}

async fn certbot_comparison(runs: usize) -> anyhow::Result<()> {
    let cluster = Cluster::start(spec(4, 5, Http01::WebrootNginx)).await?;
    let ours = measure(&cluster, runs).await?;

    let dir = cluster.dir.path().join("certbot");
    std::fs::create_dir_all(&dir)?;
    let webroots: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.webroot.as_ref().expect("webroot").display().to_string())
        .collect();
    let auth = dir.join("auth-hook.sh");
    std::fs::write(
        &auth,
        format!(
            "#!/bin/sh\n# Copy the token to every node, as DataONE's hook rsyncs it to each peer.\nset -e\nfor root in {}; do\n  mkdir -p \"$root/.well-known/acme-challenge\"\n  printf %s \"$CERTBOT_VALIDATION\" > \"$root/.well-known/acme-challenge/$CERTBOT_TOKEN\"\ndone\n",
            webroots.join(" ")
        ),
    )?;
    let cleanup = dir.join("cleanup-hook.sh");
    std::fs::write(
        &cleanup,
        format!(
            "#!/bin/sh\nfor root in {}; do rm -f \"$root/.well-known/acme-challenge/$CERTBOT_TOKEN\"; done\n",
            webroots.join(" ")
        ),
    )?;
    for hook in [&auth, &cleanup] {
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(hook)
            .status()?;
    }
    let certbot = |args: &[&str]| {
        let mut cmd = std::process::Command::new("certbot");
        cmd.args(args)
            .args(["--server", &cluster.pebble.directory_url()])
            .arg("--config-dir")
            .arg(dir.join("config"))
            .arg("--work-dir")
            .arg(dir.join("work"))
            .arg("--logs-dir")
            .arg(dir.join("logs"))
            .args([
                "--non-interactive",
                "--agree-tos",
                "-m",
                "admins@dataone.test",
            ])
            .env("REQUESTS_CA_BUNDLE", &cluster.pebble.listener_ca);
        cmd
    };
    run(certbot(&["register"]), "certbot register")?;
    let mut times = Vec::new();
    for i in 0..=runs {
        let mut cmd = certbot(&["certonly", "--manual", "--preferred-challenges", "http"]);
        cmd.arg("--manual-auth-hook")
            .arg(&auth)
            .arg("--manual-cleanup-hook")
            .arg(&cleanup)
            .arg("--force-renewal")
            .args(["--cert-name", "cn"]);
        for san in &cluster.sans {
            cmd.args(["-d", san]);
        }
        let start = Instant::now();
        run(cmd, "certbot certonly")?;
        if i > 0 {
            times.push(start.elapsed().as_millis() as u64);
        }
    }
    let theirs = median(times);
    println!();
    println!(
        "| 4 nodes, {} names, webroot via nginx | median ms |",
        cluster.sans.len()
    );
    println!("|---|---:|");
    println!("| certbot 2.1 `--manual-auth-hook` copying to each webroot | {theirs} |");
    println!(
        "| `certfleet issue` (same nodes, same Pebble) | {} |",
        ours.total
    );
    println!(
        "| ratio certbot / certfleet | {:.1}x |",
        theirs as f64 / ours.total.max(1) as f64
    );
    Ok(())
}

fn run(mut cmd: std::process::Command, what: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(start.elapsed())
}
