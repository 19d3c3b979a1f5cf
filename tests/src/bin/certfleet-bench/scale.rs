//! `--scale`: certfleet alone, from one node to a thousand and from one
//! name to a hundred.
//!
//! For each node count, a fresh cluster of that many real agents in
//! standalone mode (installing into certbot's layout, one service whose
//! check and restart are `true`, as `--fleet`), one certificate of
//! [`NAMES_PER_NODE_SWEEP`] names: `certfleet issue` with the coordinator's
//! own split of it, a `distribute` of the new version, a `distribute` that
//! finds every node up to date, and a `restart` (node by node), each the
//! median of `--runs`; then the agents' memory, and the coordinator's
//! twice: 2 s after the runs, and once it has closed its idle node
//! connections ([`IDLE_CONNECTION_SECS`]). For each name count, the same
//! issue on [`NODES_PER_NAME_SWEEP`] nodes.
//!
//! With `--perf DIR`, the largest cluster's extra `distribute` and
//! `restart` runs are also recorded with `perf record -g` attached to the
//! coordinator, into `DIR/distribute.data` and `DIR/restart.data`.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use certfleet_tests::cluster::{Cluster, ClusterSpec, Http01};

use super::{FLEET_TARGETS, Sample, median, plot, sample, spec, timed};

/// Names on the certificate while the node count grows: the shared name
/// and one per node of a 4-node cluster.
const NAMES_PER_NODE_SWEEP: usize = 5;
/// Nodes while the name count grows.
const NODES_PER_NAME_SWEEP: usize = 4;
/// Tries at starting each cluster of the node sweep.
const CLUSTER_ATTEMPTS: usize = 3;
/// How often `perf record` samples the coordinator, per second.
const PERF_FREQUENCY: &str = "1999";

/// One configuration's medians.
struct Point {
    nodes: usize,
    names: usize,
    setup_s: u64,
    /// `certfleet issue`'s wall time, CLI start to exit.
    issue_wall: u64,
    split: Sample,
    /// Fresh distribute, no-op distribute, restart; `None` in the name sweep.
    rollout: Option<(u64, u64, u64)>,
    coordinator: CoordinatorMemory,
    /// Median and largest agent RSS, KiB.
    agents: (u64, u64),
}

/// A process's resident memory now and at its peak, KiB.
#[derive(Default, Clone, Copy)]
struct Memory {
    rss: u64,
    peak: u64,
}

/// The coordinator's resident memory right after the runs (its node
/// connections open), once it has closed them as idle, and at its peak, KiB.
#[derive(Default, Clone, Copy)]
struct CoordinatorMemory {
    busy: u64,
    idle: u64,
    peak: u64,
}

/// `placement.idle_connection_secs` in the bench's clusters: short, so the
/// idle memory is measured within the run (the default is 60 s).
const IDLE_CONNECTION_SECS: u64 = 5;

fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// `certfleet --json issue cn` (past the rate-limit guard: every run orders
/// the same names): its wall time and the coordinator's split.
async fn issue(cluster: &Cluster) -> anyhow::Result<(u64, Sample)> {
    let start = Instant::now();
    let out = cluster.ctl(&["--json", "issue", "cn", "--force"]).await?;
    let wall = start.elapsed().as_millis() as u64;
    Ok((wall, sample(out)?))
}

fn medians(samples: &[(u64, Sample)]) -> (u64, Sample) {
    let col = |f: fn(&Sample) -> u64| median(samples.iter().map(|s| f(&s.1)).collect());
    (
        median(samples.iter().map(|s| s.0).collect()),
        Sample {
            total: col(|s| s.total),
            ca: col(|s| s.ca),
            placement: col(|s| s.placement),
            cleanup: col(|s| s.cleanup),
        },
    )
}

fn agents_rss(cluster: &Cluster) -> (u64, u64) {
    let mut rss: Vec<u64> = cluster
        .nodes
        .iter()
        .filter_map(|n| n.agent.as_ref()?.pid())
        .filter_map(|pid| memory(pid).map(|m| m.rss))
        .collect();
    rss.sort_unstable();
    if rss.is_empty() {
        return (0, 0);
    }
    (rss[rss.len() / 2], rss[rss.len() - 1])
}

/// `perf record -g` attached to `pid`, writing `out`.
fn perf_record(pid: u32, out: &Path) -> anyhow::Result<Child> {
    let child = Command::new("perf")
        .args([
            "record",
            "-g",
            "-F",
            PERF_FREQUENCY,
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record (apt-get install linux-perf)")?;
    // perf needs a moment to attach before the work starts.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

fn perf_stop(mut child: Child) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT)?;
    let status = child.wait()?;
    // perf record writes its data and exits 0 on SIGINT, or dies of it.
    use std::os::unix::process::ExitStatusExt;
    if !status.success() && status.signal() != Some(Signal::SIGINT as i32) {
        bail!("perf record ended with {status}");
    }
    Ok(())
}

async fn node_point(nodes: usize, runs: usize, perf: Option<&Path>) -> anyhow::Result<Point> {
    let mut attempt = 0;
    let (cluster, setup_s) = loop {
        attempt += 1;
        let started = Instant::now();
        let cluster = Cluster::start(ClusterSpec {
            agent_certificates: FLEET_TARGETS.to_owned(),
            idle_connection_secs: Some(IDLE_CONNECTION_SECS),
            ..spec(nodes, NAMES_PER_NODE_SWEEP, Http01::Standalone)
        })
        .await
        .with_context(|| format!("starting a cluster of {nodes} agents"));
        match cluster {
            Ok(c) => break (c, started.elapsed().as_secs()),
            // The harness picks each agent's ports when it starts it; with
            // a thousand agents, one of them now and then finds a port
            // taken by then. A new cluster gets new ports.
            Err(e) if attempt < CLUSTER_ATTEMPTS => eprintln!("{e:#}; starting again"),
            Err(e) => return Err(e),
        }
    };
    issue(&cluster).await?; // warm-up: the account, the connections
    timed(&cluster, &["distribute", "cn"]).await?;
    let (mut issues, mut fresh, mut noop, mut restart) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        issues.push(issue(&cluster).await?);
        fresh.push(timed(&cluster, &["distribute", "cn"]).await?);
        noop.push(timed(&cluster, &["distribute", "cn"]).await?);
        restart.push(timed(&cluster, &["restart", "cn"]).await?);
    }
    let coordinator_pid = cluster
        .coordinator
        .as_ref()
        .and_then(|c| c.pid())
        .context("the coordinator is not running")?;
    if let Some(dir) = perf {
        // A profile that fails to record loses only the profile.
        if let Err(e) = profile(&cluster, coordinator_pid, nodes, dir).await {
            eprintln!("perf: {e:#}");
        }
    }
    let coordinator = coordinator_memory(coordinator_pid).await;
    let (issue_wall, split) = medians(&issues);
    Ok(Point {
        nodes,
        names: cluster.sans.len(),
        setup_s,
        issue_wall,
        split,
        rollout: Some((median(fresh), median(noop), median(restart))),
        coordinator,
        agents: agents_rss(&cluster),
    })
}

/// How long after its last use jemalloc hands a freed page back to the
/// kernel (its `dirty_decay_ms`, 10 s by default), and a margin.
const ALLOCATOR_DECAY_SECS: u64 = 12;

/// The coordinator's memory 2 s after the last operation, then once it has
/// closed its idle node connections (it looks every half of
/// [`IDLE_CONNECTION_SECS`]) and its allocator has returned their pages.
async fn coordinator_memory(pid: u32) -> CoordinatorMemory {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = memory(pid).unwrap_or_default();
    let idle_after = IDLE_CONNECTION_SECS * 3 / 2 + ALLOCATOR_DECAY_SECS;
    tokio::time::sleep(Duration::from_secs(idle_after)).await;
    let idle = memory(pid).unwrap_or_default();
    CoordinatorMemory {
        busy: busy.rss,
        idle: idle.rss,
        peak: idle.peak,
    }
}

/// Records one more issue's `distribute` and a `restart` with `perf
/// record -g` attached to the coordinator.
async fn profile(
    cluster: &Cluster,
    coordinator_pid: u32,
    nodes: usize,
    dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    issue(cluster).await?;
    let rec = perf_record(coordinator_pid, &dir.join("distribute.data"))?;
    let ms = timed(cluster, &["distribute", "cn"]).await?;
    perf_stop(rec)?;
    let rec = perf_record(coordinator_pid, &dir.join("restart.data"))?;
    let restart_ms = timed(cluster, &["restart", "cn"]).await?;
    perf_stop(rec)?;
    eprintln!(
        "perf: {nodes} nodes, distribute {ms} ms, restart {restart_ms} ms (under perf), data in {}",
        dir.display()
    );
    Ok(())
}

async fn name_point(names: usize, runs: usize) -> anyhow::Result<Point> {
    let started = Instant::now();
    let cluster = Cluster::start(ClusterSpec {
        idle_connection_secs: Some(IDLE_CONNECTION_SECS),
        ..spec(NODES_PER_NAME_SWEEP, names, Http01::Standalone)
    })
    .await?;
    let setup_s = started.elapsed().as_secs();
    issue(&cluster).await?;
    let mut issues = Vec::new();
    for _ in 0..runs {
        issues.push(issue(&cluster).await?);
    }
    let coordinator_pid = cluster
        .coordinator
        .as_ref()
        .and_then(|c| c.pid())
        .context("the coordinator is not running")?;
    let coordinator = coordinator_memory(coordinator_pid).await;
    let (issue_wall, split) = medians(&issues);
    Ok(Point {
        nodes: NODES_PER_NAME_SWEEP,
        names: cluster.sans.len(),
        setup_s,
        issue_wall,
        split,
        rollout: None,
        coordinator,
        agents: agents_rss(&cluster),
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_issue_table(points: &[Point], runs: usize) {
    println!();
    println!(
        "| nodes | names | `certfleet issue` wall ms | total ms | CA ms | placement + self-check ms | cleanup ms | rest ms | coordinator RSS busy / idle / peak MiB | agent RSS median / max MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in points {
        let s = p.split;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} |",
            p.nodes,
            p.names,
            p.issue_wall,
            s.total,
            s.ca,
            s.placement,
            s.cleanup,
            s.total.saturating_sub(s.ca + s.placement + s.cleanup),
            mib(p.coordinator.busy),
            mib(p.coordinator.idle),
            mib(p.coordinator.peak),
            mib(p.agents.0),
            mib(p.agents.1),
        );
    }
    println!("\n(medians of {runs} after one warm-up)");
}

pub(super) async fn bench(
    nodes: &[usize],
    names: &[usize],
    runs: usize,
    plots: &Path,
    perf: Option<&Path>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(plots)?;
    let largest = nodes.iter().copied().max().unwrap_or(0);
    let mut by_nodes = Vec::new();
    for &n in nodes {
        let point = node_point(n, runs, perf.filter(|_| n == largest)).await?;
        eprintln!(
            "{n} nodes: set up in {} s, issue {} ms",
            point.setup_s, point.issue_wall
        );
        by_nodes.push(point);
    }
    let mut by_names = Vec::new();
    for &k in names {
        by_names.push(name_point(k, runs).await?);
    }
    if !by_nodes.is_empty() {
        print_issue_table(&by_nodes, runs);
        println!();
        println!(
            "| nodes | set up and joined s | `distribute` of a new version ms | `distribute`, all up to date ms | `restart` ms | restart per node ms |"
        );
        println!("|---:|---:|---:|---:|---:|---:|");
        for p in &by_nodes {
            let (fresh, noop, restart) = p.rollout.unwrap_or_default();
            println!(
                "| {} | {} | {fresh} | {noop} | {restart} | {:.2} |",
                p.nodes,
                p.setup_s,
                restart as f64 / p.nodes as f64
            );
        }
        let series = |name: &str, f: &dyn Fn(&Point) -> f64| {
            (
                name.to_owned(),
                by_nodes
                    .iter()
                    .map(|p| (p.nodes as f64, f(p)))
                    .collect::<Vec<_>>(),
            )
        };
        plot::lines(
            &plots.join("scale-nodes.svg"),
            &format!(
                "certfleet from 1 to {largest} nodes ({NAMES_PER_NODE_SWEEP} names), medians of {runs}"
            ),
            "nodes (log scale)",
            "ms",
            true,
            &[
                series("issue (CLI wall time)", &|p| p.issue_wall as f64),
                series("issue: in the CA", &|p| p.split.ca as f64),
                series("issue: placement + self-check", &|p| {
                    p.split.placement as f64
                }),
                series("issue: cleanup", &|p| p.split.cleanup as f64),
                series("distribute a new version", &|p| {
                    p.rollout.unwrap_or_default().0 as f64
                }),
                series("restart, node by node", &|p| {
                    p.rollout.unwrap_or_default().2 as f64
                }),
            ],
        )?;
        plot::lines(
            &plots.join("scale-memory.svg"),
            &format!("Memory from 1 to {largest} nodes"),
            "nodes (log scale)",
            "RSS, MiB",
            true,
            &[
                series("coordinator RSS after the runs", &|p| {
                    mib(p.coordinator.busy)
                }),
                series("coordinator RSS, idle connections closed", &|p| {
                    mib(p.coordinator.idle)
                }),
                series("coordinator peak RSS (VmHWM)", &|p| mib(p.coordinator.peak)),
                series("agent RSS, median", &|p| mib(p.agents.0)),
                series("agent RSS, max", &|p| mib(p.agents.1)),
            ],
        )?;
    }
    if !by_names.is_empty() {
        print_issue_table(&by_names, runs);
        let series = |name: &str, f: &dyn Fn(&Point) -> f64| {
            (
                name.to_owned(),
                by_names
                    .iter()
                    .map(|p| (p.names as f64, f(p)))
                    .collect::<Vec<_>>(),
            )
        };
        plot::lines(
            &plots.join("scale-names.svg"),
            &format!(
                "certfleet issue from 1 to {} names ({NODES_PER_NAME_SWEEP} nodes), medians of {runs}",
                names.iter().max().unwrap_or(&0)
            ),
            "names in the certificate",
            "ms",
            false,
            &[
                series("issue (CLI wall time)", &|p| p.issue_wall as f64),
                series("in the CA", &|p| p.split.ca as f64),
                series("placement + self-check", &|p| p.split.placement as f64),
                series("cleanup", &|p| p.split.cleanup as f64),
                series("rest (keys, CSR, store)", &|p| {
                    p.split
                        .total
                        .saturating_sub(p.split.ca + p.split.placement + p.split.cleanup)
                        as f64
                }),
            ],
        )?;
    }
    eprintln!("plots written under {}", plots.display());
    Ok(())
}
