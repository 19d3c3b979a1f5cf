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
//! With `--scheduler N` it measures only the renewal scheduler
//! (`certfleet_coordinator::renewal::Scheduler`, the daemon's own) tracking
//! N certificates stored in a real store, with a renewer that reads their
//! validity from it as the daemon's does but renews nothing: one wake-up's
//! pass, the next wake-up's computation, memory per entry, and the CPU an
//! idle scheduler uses.
//!
//! With `--ssh N` it measures only what reaching N webroot nodes over SSH
//! costs against their agents: the same placement (with self-check),
//! distribute and restart, through the agents, then with every node made
//! SSH-only (a real sshd each, strict host keys, one master per node).
//!
//! With `--installs N` it measures only the agents' share of a distribute
//! on this disk: N of the agent's installers writing a version at once.
//!
//! With `--peers` it measures only `certfleet issue` against certbot,
//! dehydrated, lego and acme-tiny on one 4-node webroot cluster (see
//! `peers`); with `--scale`, certfleet alone from 1 to 1,000 nodes and 1 to
//! 100 names (see `scale`). Both also draw their plots as SVG (`plot`).
//!
//! Results are printed as a Markdown table for BENCHMARKS.md.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use certfleet_tests::cluster::{Cluster, ClusterSpec, Http01};
use certfleet_tests::pebble::PebbleOptions;
use clap::Parser;

// The crate root of a binary looks for modules beside it, where cargo would
// take each file for a binary of its own: these live in a directory named
// after the binary instead.
#[path = "certfleet-bench/installs.rs"]
mod installs;
#[path = "certfleet-bench/peers.rs"]
mod peers;
#[path = "certfleet-bench/plot.rs"]
mod plot;
#[path = "certfleet-bench/scale.rs"]
mod scale;

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
    /// Measure only the renewal scheduler tracking this many certificates.
    #[arg(long)]
    scheduler: Option<usize>,
    /// Measure only placement, distribute and restart on this many
    /// webroot nodes, first through their agents, then over SSH.
    #[arg(long)]
    ssh: Option<usize>,
    /// Seconds `--scheduler` leaves the scheduler running idle.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Measure only the agent's file work of a distribute: this many of
    /// its installers on this disk install a new version at once (see
    /// `installs`).
    #[arg(long)]
    installs: Option<usize>,
    /// Measure only `certfleet issue` against certbot, dehydrated, lego
    /// and acme-tiny on the same 4-node cluster (each `--runs` times).
    #[arg(long)]
    peers: bool,
    /// Measure only certfleet alone over `--scale-nodes` and
    /// `--scale-names`.
    #[arg(long)]
    scale: bool,
    /// Node counts for `--scale`.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,250,1000")]
    scale_nodes: Vec<usize>,
    /// Name counts for `--scale` (on 4 nodes).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
    scale_names: Vec<usize>,
    /// Where `--peers` and `--scale` write their SVG plots.
    #[arg(long, default_value = "docs/bench")]
    plots: std::path::PathBuf,
    /// With `--scale`: record the largest cluster's distribute and restart
    /// with `perf record -g` on the coordinator, into this directory.
    #[arg(long)]
    perf: Option<std::path::PathBuf>,
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
    sample(cluster.issue().await?)
}

/// The timings of an issue's last JSON line.
fn sample(out: certfleet_tests::cluster::CtlOutput) -> anyhow::Result<Sample> {
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
    if args.peers {
        return peers::bench(args.runs, &args.plots).await;
    }
    if args.scale {
        return scale::bench(
            &args.scale_nodes,
            &args.scale_names,
            args.runs,
            &args.plots,
            args.perf.as_deref(),
        )
        .await;
    }
    if let Some(n) = args.installs {
        return installs::bench(n);
    }
    if let Some(certificates) = args.scheduler {
        return scheduler::bench(certificates, Duration::from_secs(args.idle_secs)).await;
    }
    if let Some(nodes) = args.ssh {
        return ssh_vs_agent(nodes, args.runs).await;
    }
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

/// `--scheduler`: the renewal scheduler's own cost, apart from any order.
mod scheduler {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use certfleet_coordinator::renewal::{
        BoxFuture, Entry, MAX_SLEEP, Outcome, Policy, Renew, Renewed, Scheduler, SystemClock,
        Validity,
    };
    use certfleet_coordinator::store::Store;
    use certfleet_proto::bundle::Bundle;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    use super::{median, rss_kib};

    /// Passes timed for each per-pass figure (the median and the slowest
    /// are reported).
    const PASSES: usize = 1001;
    /// Entries tracked to measure memory per entry: enough that the heap's
    /// growth shows in the RSS above its noise.
    const MEMORY_ENTRIES: usize = 100_000;
    /// Names on each benchmark certificate (the shared name and one per
    /// node of a 4-node cluster).
    const SANS: usize = 5;
    /// Lifetime of the benchmark certificates, as Let's Encrypt's today.
    const LIFETIME_DAYS: i64 = 90;
    const DAY: i64 = 86_400;

    /// Renews nothing: reads each certificate's validity from the store as
    /// the daemon's `FleetRenewer` does, and fails every renewal at once
    /// (as one with a node down fails); counts the scheduler's wake-ups.
    struct StoreOnly {
        store: Store,
        names: Vec<String>,
        wakeups: AtomicU64,
    }

    impl Renew for StoreOnly {
        fn renew<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
            Box::pin(async move { Err(format!("benchmark: {name} is not renewed")) })
        }

        fn current(&self, name: &str) -> Option<Validity> {
            let live = self.store.live(name).ok()??;
            Some(Validity {
                not_before: live.bundle.not_before,
                not_after: live.bundle.not_after,
            })
        }

        fn names(&self) -> Vec<String> {
            // `Scheduler::run` calls this once per wake-up.
            self.wakeups.fetch_add(1, Ordering::Relaxed);
            self.names.clone()
        }
    }

    /// A store under `dir` holding `count` certificates of [`SANS`] names,
    /// each a leaf and its issuer (as a CA's fullchain), issued `age_days`
    /// ago for [`LIFETIME_DAYS`].
    fn store_with(dir: &std::path::Path, count: usize, age_days: i64) -> anyhow::Result<StoreOnly> {
        let store = Store::open(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "certfleet bench CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, &ca_key);
        let now = time::OffsetDateTime::now_utc();
        let mut names = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("cert-{i:03}");
            let mut sans = vec![format!("{name}.dataone.test")];
            sans.extend((1..SANS).map(|k| format!("node-{k}.{name}.dataone.test")));
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans.clone())?;
            params.distinguished_name.push(DnType::CommonName, &sans[0]);
            params.not_before = now - time::Duration::days(age_days);
            params.not_after = params.not_before + time::Duration::days(LIFETIME_DAYS);
            let leaf = params.signed_by(&key, &issuer)?;
            let key_pem = key.serialize_pem();
            let bundle = Bundle::parse(
                &format!("{}{}", leaf.pem(), ca.pem()),
                Some(&key_pem),
                &sans,
            )
            .with_context(|| format!("benchmark certificate {name}"))?;
            store.save(&name, &bundle, &key_pem)?;
            names.push(name);
        }
        Ok(StoreOnly {
            store,
            names,
            wakeups: AtomicU64::new(0),
        })
    }

    type Bench = Scheduler<StoreOnly, SystemClock>;

    fn scheduler(renewer: Arc<StoreOnly>) -> Arc<Bench> {
        Arc::new(Scheduler::new(
            renewer,
            SystemClock,
            Policy::default(),
            || 0.5,
        ))
    }

    /// Median and 99th percentile of `PASSES` runs of `f`, in
    /// microseconds (the slowest is mostly the machine's other work).
    fn micros(mut f: impl FnMut()) -> (f64, f64) {
        let mut ns: Vec<u64> = (0..PASSES)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_nanos() as u64
            })
            .collect();
        ns.sort_unstable();
        let p99 = ns[ns.len() * 99 / 100];
        (median(ns) as f64 / 1000.0, p99 as f64 / 1000.0)
    }

    /// This process's CPU time (user + system) so far, in clock ticks
    /// (`/proc/self/stat` fields 14 and 15; 100 a second on Linux).
    fn cpu_ticks() -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        // The command name may hold spaces: count fields after its ')'.
        let rest = stat
            .rsplit_once(')')
            .context("reading /proc/self/stat: no ')' after the command name")?
            .1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| -> anyhow::Result<u64> {
            Ok(fields
                .get(i)
                .with_context(|| format!("/proc/self/stat has no field {}", i + 3))?
                .parse()?)
        };
        // Field 3 (state) is rest's first: utime (14) and stime (15).
        Ok(field(11)? + field(12)?)
    }

    pub(super) async fn bench(count: usize, idle: Duration) -> anyhow::Result<()> {
        let dir = tempfile::Builder::new()
            .prefix("certfleet-bench-scheduler-")
            .tempdir()?;
        // Issued a day ago: none due for 59 days.
        let fresh = Arc::new(store_with(&dir.path().join("fresh"), count, 1)?);
        let s = scheduler(Arc::clone(&fresh));

        // The daemon's first pass tracks every certificate.
        let start = Instant::now();
        s.refresh();
        let first = start.elapsed();
        if s.entries().len() != count {
            bail!("tracked {} of {count} certificates", s.entries().len());
        }
        let (pass, pass_p99) = micros(|| {
            s.refresh();
            assert_eq!(s.start_due(), 0, "a fresh certificate came due");
        });
        // Of which reading each live certificate, as the daemon's renewer
        // does at every pass.
        let (reads, reads_p99) = micros(|| {
            for name in &fresh.names {
                std::hint::black_box(fresh.current(name));
            }
        });
        let (wake, wake_p99) = micros(|| {
            std::hint::black_box(s.sleep_for());
        });

        // Left alone: the daemon's loop, until `idle` has passed.
        let idle_renewer = Arc::new(store_with(&dir.path().join("idle"), count, 1)?);
        let idle_s = scheduler(Arc::clone(&idle_renewer));
        idle_s.refresh();
        let wakeups_before = idle_renewer.wakeups.load(Ordering::Relaxed);
        let cpu_before = cpu_ticks()?;
        let wall = Instant::now();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(Arc::clone(&idle_s).run(async {
            let _ = stop_rx.await;
        }));
        tokio::time::sleep(idle).await;
        let _ = stop_tx.send(());
        run.await?;
        let idle_wall = wall.elapsed();
        let idle_ticks = cpu_ticks()? - cpu_before;
        let wakeups = idle_renewer.wakeups.load(Ordering::Relaxed) - wakeups_before;

        // All due at once (issued 80 days ago), and every renewal failing.
        let due = scheduler(Arc::new(store_with(&dir.path().join("due"), count, 80)?));
        due.refresh();
        let start = Instant::now();
        let started = due.start_due();
        let start_all = start.elapsed();
        let settled = loop {
            let entries = due.entries();
            if entries.iter().all(|e| !e.running) {
                break start.elapsed();
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("{count} failing renewals did not settle within 30 s");
            }
            tokio::task::yield_now().await;
        };
        let failed = due
            .entries()
            .iter()
            .filter(|e| matches!(e.last, Some((_, Outcome::Failed(_)))))
            .count();
        let retry_in = due.sleep_for();

        // Memory: many entries, so the heap's growth shows in the RSS.
        let pid = std::process::id();
        let empty = StoreOnly {
            store: Store::open(&dir.path().join("memory"))?,
            names: Vec::new(),
            wakeups: AtomicU64::new(0),
        };
        let memory = scheduler(Arc::new(empty));
        let rss_before = rss_kib(pid).context("reading VmRSS from /proc/self/status")?;
        let validity = Validity {
            not_before: 1_800_000_000,
            not_after: 1_800_000_000 + LIFETIME_DAYS * DAY,
        };
        for i in 0..MEMORY_ENTRIES {
            memory.track(&format!("cert-{i:06}"), Some(validity), None);
        }
        let rss_after = rss_kib(pid).context("reading VmRSS from /proc/self/status")?;
        let per_entry =
            (rss_after.saturating_sub(rss_before) * 1024) as f64 / MEMORY_ENTRIES as f64;

        println!();
        println!(
            "| renewal scheduler, {count} certificates ({SANS} names, leaf + issuer) in a real store | |"
        );
        println!("|---|---:|");
        println!(
            "| first pass: every certificate read from the store and tracked | {:.2} ms |",
            first.as_secs_f64() * 1000.0
        );
        println!(
            "| one wake-up's pass, nothing due (`refresh` + `start_due`), median / p99 of {PASSES} | {pass:.0} / {pass_p99:.0} µs |"
        );
        println!(
            "| of which reading the {count} live certificates from the store, median / p99 | {reads:.0} / {reads_p99:.0} µs |"
        );
        println!(
            "| next wake-up (`sleep_for`), median / p99 of {PASSES} | {wake:.1} / {wake_p99:.1} µs |"
        );
        println!(
            "| idle {} s in `Scheduler::run`: wake-ups / CPU time (10 ms ticks) | {} / {} ms |",
            idle_wall.as_secs(),
            wakeups,
            idle_ticks * 10
        );
        let per_day = 86_400 / MAX_SLEEP.as_secs();
        println!(
            "| idle a whole day: at most a pass every `MAX_SLEEP` ({per_day} a day) | {:.0} ms of CPU a day |",
            per_day as f64 * pass / 1000.0
        );
        println!(
            "| all {count} due at once: `start_due` / until all {failed} failed renewals recorded | {:.2} / {:.2} ms ({started} started) |",
            start_all.as_secs_f64() * 1000.0,
            settled.as_secs_f64() * 1000.0
        );
        println!(
            "| after they failed, next wake-up in | {} s |",
            retry_in.as_secs()
        );
        println!(
            "| memory per tracked entry (RSS growth over {MEMORY_ENTRIES} entries) | {per_entry:.0} bytes |"
        );
        println!(
            "| so for {count} certificates (`Entry` itself: {} bytes) | {:.1} KiB |",
            std::mem::size_of::<Entry>(),
            per_entry * count as f64 / 1024.0
        );
        Ok(())
    }
}

/// Placement (with self-check, from the issue's own timings), a fresh
/// distribute and a restart, median over `runs`.
async fn pipeline_costs(cluster: &Cluster, runs: usize) -> anyhow::Result<(u64, u64, u64)> {
    // Past the rate-limit guard: both halves order the same names.
    let issue = || async { sample(cluster.ctl(&["--json", "issue", "cn", "--force"]).await?) };
    issue().await?; // warm-up: the account, the ssh masters
    let (mut place, mut dist, mut restart) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        place.push(issue().await?.placement);
        dist.push(timed(cluster, &["distribute", "cn"]).await?);
        restart.push(timed(cluster, &["restart", "cn"]).await?);
    }
    Ok((median(place), median(dist), median(restart)))
}

/// `--ssh`: the same steps through agents, then over SSH.
async fn ssh_vs_agent(nodes: usize, runs: usize) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec {
        agent_certificates: FLEET_TARGETS.to_owned(),
        ..spec(nodes, 1, Http01::WebrootNginx)
    })
    .await?;
    let agent = pipeline_costs(&cluster, runs).await?;
    let mut sshds = Vec::with_capacity(nodes);
    for i in 0..nodes {
        sshds.push(cluster.make_ssh_only(i).await?);
    }
    let ssh = pipeline_costs(&cluster, runs).await?;
    let n = nodes as f64;
    println!();
    println!("| {nodes} webroot nodes, median of {runs} | agents ms | SSH ms | SSH per node ms |");
    println!("|---|---:|---:|---:|");
    for (what, a, s) in [
        ("placement + self-check (parallel)", agent.0, ssh.0),
        (
            "`certfleet distribute` of a new version (parallel)",
            agent.1,
            ssh.1,
        ),
        (
            "`certfleet restart`, node by node, check and restart = `true`",
            agent.2,
            ssh.2,
        ),
    ] {
        println!("| {what} | {a} | {s} | {:.1} |", s as f64 / n);
    }
    drop(sshds);
    Ok(())
}
