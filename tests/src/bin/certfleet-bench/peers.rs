//! `--peers`: `certfleet issue` against the other ACME clients Debian
//! ships, each doing what an admin does to get one certificate for a
//! 4-node cluster onto every node's HTTP-01 path.
//!
//! All run on the same cluster (4 nodes, each a real nginx serving its
//! webroot) and the same Pebble, one after the other, each issuing the same
//! 5 names in one certificate:
//! - certbot `--manual`, with auth and cleanup hooks that copy the token
//!   into (and remove it from) every node's webroot;
//! - dehydrated, with a hook whose `deploy_challenge` copies the token into
//!   every webroot and whose `clean_challenge` removes it;
//! - lego `--http.webroot` on one node, with the other nodes' nginx proxying
//!   `/.well-known/acme-challenge/` to it;
//! - acme-tiny `--acme-dir` on that node, the others proxying likewise.
//!
//! Wall time is each command's, from spawn to exit (so a client's start-up
//! counts, as does `certfleet`'s). CPU is user + system time: for a peer,
//! its whole process tree (`getrusage(RUSAGE_CHILDREN)` deltas: hooks,
//! `openssl`, `curl` included); for certfleet, the CLI's tree plus what the
//! coordinator and the four agents used meanwhile (`/proc/PID/stat`). The
//! CA (Pebble) and the web servers are nobody's share.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use certfleet_tests::cluster::{CERT, Cluster, Http01};
use nix::sys::resource::{UsageWho, getrusage};

use super::{median, plot, spec};

/// Nodes in the cluster and names in the certificate: the shared name and
/// one per node, as DataONE's.
const NODES: usize = 4;
const NAMES: usize = 5;
/// Where every node's challenge files live under its webroot (RFC 8555
/// §8.3).
const CHALLENGE_DIR: &str = ".well-known/acme-challenge";
const CONTACT: &str = "admins@dataone.test";

/// One client's figures over the measured runs.
struct Figures {
    client: &'static str,
    how: &'static str,
    wall_ms: u64,
    cpu_ms: f64,
}

/// CPU (user + system) of this process's reaped children so far, in ms.
fn children_cpu_ms() -> anyhow::Result<f64> {
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage(RUSAGE_CHILDREN)")?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    Ok(ms(usage.user_time()) + ms(usage.system_time()))
}

/// CPU (user + system) a running process has used, in ms (10 ms ticks).
fn process_cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces: count fields after its ')'.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("/proc/{pid}/stat: no ')' after the command name"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is rest's first: utime (14) and stime (15).
    let tick = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("/proc/{pid}/stat has no field {}", i + 3))?
            .parse::<f64>()?)
    };
    Ok((tick(11)? + tick(12)?) * 10.0)
}

/// CPU the cluster's own long-running certfleet processes (coordinator and
/// agents) have used so far, in ms.
fn certfleet_daemons_cpu_ms(cluster: &Cluster) -> anyhow::Result<f64> {
    let pids = cluster
        .coordinator
        .iter()
        .chain(cluster.nodes.iter().filter_map(|n| n.agent.as_ref()))
        .filter_map(|p| p.pid());
    pids.map(process_cpu_ms).sum()
}

/// Runs `cmd` to completion; fails with its output if it fails.
fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One warm-up, then `runs` timed runs of the command `make` builds:
/// median wall time and mean CPU of the child's process tree.
fn measure_command(
    runs: usize,
    what: &str,
    mut make: impl FnMut() -> anyhow::Result<Command>,
) -> anyhow::Result<(u64, f64)> {
    run(make()?, what)?;
    let mut walls = Vec::with_capacity(runs);
    let cpu_before = children_cpu_ms()?;
    for _ in 0..runs {
        let cmd = make()?;
        let start = Instant::now();
        run(cmd, what)?;
        walls.push(start.elapsed().as_millis() as u64);
    }
    let cpu = (children_cpu_ms()? - cpu_before) / runs as f64;
    Ok((median(walls), cpu))
}

/// `certfleet --json issue cn`, as the other clients are timed: the CLI's
/// wall clock; CPU of the CLI, the coordinator and the agents.
async fn certfleet(cluster: &Cluster, runs: usize) -> anyhow::Result<(u64, f64)> {
    let issue = || async {
        let out = cluster.issue().await?;
        if out.code != 0 {
            bail!("certfleet issue failed: {}\n{}", out.stdout, out.stderr);
        }
        anyhow::Ok(())
    };
    issue().await?; // warm-up: the ACME account, the agents' connections
    let mut walls = Vec::with_capacity(runs);
    let cpu_before = children_cpu_ms()? + certfleet_daemons_cpu_ms(cluster)?;
    for _ in 0..runs {
        let start = Instant::now();
        issue().await?;
        walls.push(start.elapsed().as_millis() as u64);
    }
    let cpu_after = children_cpu_ms()? + certfleet_daemons_cpu_ms(cluster)?;
    Ok((median(walls), (cpu_after - cpu_before) / runs as f64))
}

fn write_script(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Every node's webroot, space-separated for a shell `for` loop.
fn webroots(cluster: &Cluster) -> anyhow::Result<String> {
    let roots: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| {
            n.webroot
                .as_ref()
                .map(|w| w.display().to_string())
                .with_context(|| format!("node {} has no webroot", n.name))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(roots.join(" "))
}

/// certbot `--manual`, its hooks copying the token to every webroot.
fn certbot(cluster: &Cluster, dir: &Path, runs: usize) -> anyhow::Result<(u64, f64)> {
    let roots = webroots(cluster)?;
    let auth = dir.join("auth-hook.sh");
    write_script(
        &auth,
        &format!(
            "#!/bin/sh\nset -e\nfor root in {roots}; do\n  mkdir -p \"$root/{CHALLENGE_DIR}\"\n  printf %s \"$CERTBOT_VALIDATION\" > \"$root/{CHALLENGE_DIR}/$CERTBOT_TOKEN\"\ndone\n"
        ),
    )?;
    let cleanup = dir.join("cleanup-hook.sh");
    write_script(
        &cleanup,
        &format!(
            "#!/bin/sh\nfor root in {roots}; do rm -f \"$root/{CHALLENGE_DIR}/$CERTBOT_TOKEN\"; done\n"
        ),
    )?;
    let base = |args: &[&str]| {
        let mut cmd = Command::new("certbot");
        cmd.args(args)
            .args(["--server", &cluster.pebble.directory_url()])
            .arg("--config-dir")
            .arg(dir.join("config"))
            .arg("--work-dir")
            .arg(dir.join("work"))
            .arg("--logs-dir")
            .arg(dir.join("logs"))
            .args(["--non-interactive", "--agree-tos", "-m", CONTACT])
            .env("REQUESTS_CA_BUNDLE", &cluster.pebble.listener_ca);
        cmd
    };
    run(base(&["register"]), "certbot register")?;
    measure_command(runs, "certbot certonly", || {
        let mut cmd = base(&["certonly", "--manual", "--preferred-challenges", "http"]);
        cmd.arg("--manual-auth-hook")
            .arg(&auth)
            .arg("--manual-cleanup-hook")
            .arg(&cleanup)
            .args(["--force-renewal", "--cert-name", CERT]);
        for san in &cluster.sans {
            cmd.args(["-d", san]);
        }
        Ok(cmd)
    })
}

/// dehydrated, its hook's `deploy_challenge` copying the token to every
/// webroot and `clean_challenge` removing it.
fn dehydrated(cluster: &Cluster, dir: &Path, runs: usize) -> anyhow::Result<(u64, f64)> {
    let roots = webroots(cluster)?;
    let hook = dir.join("hook.sh");
    // With HOOK_CHAIN=no (the default) the hook runs once per name:
    // `deploy_challenge DOMAIN TOKEN_FILENAME KEY_AUTHORIZATION`.
    write_script(
        &hook,
        &format!(
            r#"#!/bin/sh
set -e
# dehydrated runs with umask 077; nginx's workers (www-data) must read these.
umask 022
case "$1" in
deploy_challenge)
  for root in {roots}; do
    mkdir -p "$root/{CHALLENGE_DIR}"
    printf %s "$4" > "$root/{CHALLENGE_DIR}/$3"
  done ;;
clean_challenge)
  for root in {roots}; do rm -f "$root/{CHALLENGE_DIR}/$3"; done ;;
esac
"#
        ),
    )?;
    // dehydrated also writes each token into WELLKNOWN itself: a scratch
    // directory no web server serves, so only the hook's copies count.
    let wellknown = dir.join("wellknown");
    std::fs::create_dir_all(&wellknown)?;
    let config = dir.join("config");
    std::fs::write(
        &config,
        format!(
            "CA=\"{ca}\"\nCHALLENGETYPE=\"http-01\"\nBASEDIR=\"{base}\"\nWELLKNOWN=\"{wk}\"\nHOOK=\"{hook}\"\nCONTACT_EMAIL=\"{CONTACT}\"\n",
            ca = cluster.pebble.directory_url(),
            base = dir.display(),
            wk = wellknown.display(),
            hook = hook.display(),
        ),
    )?;
    let base = || {
        let mut cmd = Command::new("dehydrated");
        cmd.arg("--config")
            .arg(&config)
            .env("CURL_CA_BUNDLE", &cluster.pebble.listener_ca);
        cmd
    };
    let mut register = base();
    register.args(["--register", "--accept-terms"]);
    run(register, "dehydrated --register")?;
    measure_command(runs, "dehydrated --cron", || {
        let mut cmd = base();
        cmd.args(["--cron", "--force", "--alias", CERT]);
        for san in &cluster.sans {
            cmd.args(["--domain", san]);
        }
        Ok(cmd)
    })
}

/// Makes every node but the first proxy `/.well-known/acme-challenge/` to
/// the first node's nginx, which serves its webroot: how a cluster behind
/// one ACME client answers HTTP-01 on every node without copying.
async fn proxy_challenges_to_first_node(cluster: &Cluster) -> anyhow::Result<()> {
    let first = &cluster.nodes[0];
    let upstream = format!("{}:{}", first.ip, cluster.pebble.http_port);
    let served =
        "location /.well-known/acme-challenge/ {\n            default_type text/plain;\n        }";
    let proxied = format!(
        "location /.well-known/acme-challenge/ {{\n            proxy_pass http://{upstream};\n        }}"
    );
    for node in &cluster.nodes[1..] {
        let nginx = node
            .nginx
            .as_ref()
            .with_context(|| format!("node {} has no nginx", node.name))?;
        let conf = std::fs::read_to_string(&nginx.conf)?;
        if !conf.contains(served) {
            bail!(
                "{}: no challenge location to replace with a proxy",
                nginx.conf.display()
            );
        }
        std::fs::write(&nginx.conf, conf.replace(served, &proxied))?;
        let mut reload = Command::new("nginx");
        reload
            .arg("-s")
            .arg("reload")
            .arg("-c")
            .arg(&nginx.conf)
            .arg("-p")
            .arg(&nginx.prefix);
        run(reload, "nginx -s reload")?;
    }
    // A reload takes effect when the new workers run: wait until a probe
    // on the first node is served through every other node.
    let root = first.webroot.as_ref().context("the first node's webroot")?;
    let challenges = root.join(CHALLENGE_DIR);
    std::fs::create_dir_all(&challenges)?;
    let probe = challenges.join("certfleet-bench-probe");
    std::fs::write(&probe, "proxied")?;
    for node in &cluster.nodes[1..] {
        let url = format!(
            "http://{}:{}/{CHALLENGE_DIR}/certfleet-bench-probe",
            node.ip, cluster.pebble.http_port
        );
        certfleet_tests::process::eventually(
            &format!("{url} proxied to {upstream}"),
            std::time::Duration::from_secs(10),
            || {
                let url = url.clone();
                async move {
                    let (status, body) =
                        certfleet_tests::net::http(http::Method::GET, &url, None, None)
                            .await
                            .ok()?;
                    (status.is_success() && body == "proxied").then_some(())
                }
            },
        )
        .await?;
    }
    std::fs::remove_file(&probe)?;
    Ok(())
}

/// lego `--http.webroot` on the first node (the others proxy to it).
fn lego(cluster: &Cluster, dir: &Path, runs: usize) -> anyhow::Result<(u64, f64)> {
    let root = cluster.nodes[0]
        .webroot
        .as_ref()
        .context("the first node's webroot")?;
    measure_command(runs, "lego run", || {
        let mut cmd = Command::new("lego");
        cmd.args(["--server", &cluster.pebble.directory_url()])
            .args(["--email", CONTACT, "--accept-tos"])
            .arg("--path")
            .arg(dir)
            .arg("--http")
            .arg("--http.webroot")
            .arg(root)
            .env("LEGO_CA_CERTIFICATES", &cluster.pebble.listener_ca);
        for san in &cluster.sans {
            cmd.args(["--domains", san]);
        }
        cmd.arg("run");
        Ok(cmd)
    })
}

/// acme-tiny `--acme-dir` on the first node (the others proxy to it). A
/// new key and CSR each run (`openssl req`), as the other clients make a
/// new key for each certificate; acme-tiny's own pre-check fetches
/// `http://NAME/` on port 80, which these test names do not resolve to, so
/// it runs with `--disable-check` (Pebble checks every node anyway).
fn acme_tiny(cluster: &Cluster, dir: &Path, runs: usize) -> anyhow::Result<(u64, f64)> {
    let root = cluster.nodes[0]
        .webroot
        .as_ref()
        .context("the first node's webroot")?;
    let challenges = root.join(CHALLENGE_DIR);
    std::fs::create_dir_all(&challenges)?;
    let account = dir.join("account.key");
    let mut genrsa = Command::new("openssl");
    genrsa.args(["genrsa", "-out"]).arg(&account).arg("2048");
    run(genrsa, "openssl genrsa (acme-tiny's account key)")?;
    let san = cluster
        .sans
        .iter()
        .map(|s| format!("DNS:{s}"))
        .collect::<Vec<_>>()
        .join(",");
    let script = dir.join("issue.sh");
    write_script(
        &script,
        &format!(
            r#"#!/bin/sh
set -e
cd "{dir}"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout domain.key -subj "/CN={cn}" -addext "subjectAltName={san}" -out domain.csr 2>/dev/null
acme-tiny --quiet --disable-check --account-key account.key --csr domain.csr \
  --acme-dir "{challenges}" --directory-url "{url}" --contact "mailto:{CONTACT}" > fullchain.pem
"#,
            dir = dir.display(),
            cn = cluster.sans[0],
            challenges = challenges.display(),
            url = cluster.pebble.directory_url(),
        ),
    )?;
    measure_command(runs, "acme-tiny", || {
        let mut cmd = Command::new(&script);
        cmd.env("SSL_CERT_FILE", &cluster.pebble.listener_ca);
        Ok(cmd)
    })
}

pub(super) async fn bench(runs: usize, plots: &Path) -> anyhow::Result<()> {
    let cluster = Cluster::start(spec(NODES, NAMES, Http01::WebrootNginx)).await?;
    let dir = cluster.dir.path().join("peers");
    let sub = |name: &str| -> anyhow::Result<std::path::PathBuf> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let mut all = Vec::new();
    let (wall_ms, cpu_ms) = certfleet(&cluster, runs).await?;
    all.push(Figures {
        client: "certfleet",
        how: "`certfleet issue`: the agents place each token on their node",
        wall_ms,
        cpu_ms,
    });
    let (wall_ms, cpu_ms) = certbot(&cluster, &sub("certbot")?, runs)?;
    all.push(Figures {
        client: "certbot 2.1",
        how: "`certonly --manual`, hooks copy the token to every webroot",
        wall_ms,
        cpu_ms,
    });
    let (wall_ms, cpu_ms) = dehydrated(&cluster, &sub("dehydrated")?, runs)?;
    all.push(Figures {
        client: "dehydrated 0.7",
        how: "`--cron --force`, `deploy_challenge` copies to every webroot",
        wall_ms,
        cpu_ms,
    });
    proxy_challenges_to_first_node(&cluster).await?;
    let (wall_ms, cpu_ms) = lego(&cluster, &sub("lego")?, runs)?;
    all.push(Figures {
        client: "lego 4.9",
        how: "`--http.webroot` on one node, the others proxy to it",
        wall_ms,
        cpu_ms,
    });
    let (wall_ms, cpu_ms) = acme_tiny(&cluster, &sub("acme-tiny")?, runs)?;
    all.push(Figures {
        client: "acme-tiny 5.0",
        how: "`--acme-dir` on one node, the others proxy to it (new key + CSR each run)",
        wall_ms,
        cpu_ms,
    });

    let ours = &all[0];
    println!();
    println!(
        "| {NODES} nodes, {} names, median wall of {runs} / mean CPU | how | wall ms | CPU ms | wall / certfleet | CPU / certfleet |",
        cluster.sans.len()
    );
    println!("|---|---|---:|---:|---:|---:|");
    for f in &all {
        println!(
            "| {} | {} | {} | {:.0} | {:.1}x | {:.1}x |",
            f.client,
            f.how,
            f.wall_ms,
            f.cpu_ms,
            f.wall_ms as f64 / ours.wall_ms.max(1) as f64,
            f.cpu_ms / ours.cpu_ms.max(1.0)
        );
    }
    std::fs::create_dir_all(plots)?;
    let path = plots.join("peers.svg");
    plot::bars(
        &path,
        &format!(
            "One certificate ({} names) for {NODES} nodes: median wall time of {runs}",
            cluster.sans.len()
        ),
        "wall time, ms",
        "ms",
        &all.iter()
            .map(|f| (f.client.to_owned(), f.wall_ms as f64))
            .collect::<Vec<_>>(),
    )?;
    let cpu_path = plots.join("peers-cpu.svg");
    plot::bars(
        &cpu_path,
        &format!(
            "One certificate ({} names) for {NODES} nodes: CPU (user + system), mean of {runs}",
            cluster.sans.len()
        ),
        "CPU time, ms",
        "ms",
        &all.iter()
            .map(|f| (f.client.to_owned(), f.cpu_ms))
            .collect::<Vec<_>>(),
    )?;
    println!("\nplots: {} {}", path.display(), cpu_path.display());
    Ok(())
}
