//! Nodes reached over SSH: an SSH-only node and an `auto` node whose
//! agent is down are served like the agent nodes, over a real sshd with
//! strict host keys; the coordinator does the agent's work with its remote
//! script and probes from its own side.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Http01, NGINX_TARGETS, Node};
use certfleet_tests::crash;
use certfleet_tests::hostile::{as_user, root_only_dir, snapshot};
use certfleet_tests::nginx::Nginx;
use certfleet_tests::process::eventually;
use certfleet_tests::sshd::Sshd;
use certfleet_tests::verify::served_leaf_sha256;

const SNI: &str = "cn.dataone.test";

fn live_sha(c: &Cluster) -> String {
    let chain = std::fs::read_to_string(c.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

async fn served(c: &Cluster, node: &Node) -> String {
    served_leaf_sha256(SocketAddr::new(node.ip, c.tls_port), SNI)
        .await
        .unwrap_or_else(|e| format!("nothing: {e}"))
}

async fn ctl_ok(c: &Cluster, args: &[&str]) -> String {
    let out = c.ctl(args).await.unwrap();
    assert_eq!(
        out.code,
        0,
        "certfleet {}: {}\n{}\n{}",
        args.join(" "),
        out.stdout,
        out.stderr,
        c.logs()
    );
    out.stdout
}

/// Makes node `i` SSH-only, reached at `dest` (`user@host:port`), without
/// trusting its host key yet.
async fn make_ssh_only(c: &mut Cluster, i: usize, dest: &str) {
    c.nodes[i].stop_agent();
    let name = c.nodes[i].name.clone();
    ctl_ok(c, &["node", "remove", &name]).await;
    let ip = c.nodes[i].ip.to_string();
    ctl_ok(c, &["node", "add", &name, "--ssh", dest, "--http01", &ip]).await;
}

/// Makes node `i` an `auto` node, then stops its agent.
async fn make_auto_with_agent_down(c: &mut Cluster, i: usize, sshd: &Sshd) {
    let name = c.nodes[i].name.clone();
    ctl_ok(
        c,
        &[
            "node",
            "set",
            &name,
            "--transport",
            "auto",
            "--ssh",
            &sshd.destination(),
        ],
    )
    .await;
    c.nodes[i].stop_agent();
}

struct Mixed {
    cluster: Cluster,
    /// Node 2's and node 3's.
    sshds: Vec<Sshd>,
    _nginx: Vec<Nginx>,
}

/// Four nodes in webroot mode behind nginx: 0 and 1 with agents, 2 SSH
/// only, 3 `auto` with its agent stopped. Version 1 issued, distributed,
/// and served by every node's nginx.
async fn mixed() -> Mixed {
    certfleet_tests::cluster::ensure_ssl_cert_group().unwrap();
    let mut c = Cluster::start(ClusterSpec {
        nodes: 4,
        http01: Http01::WebrootNginx,
        agent_certificates: NGINX_TARGETS.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut sshds = Vec::new();
    sshds.push(c.make_ssh_only(2).await.unwrap());
    let sshd = c.start_sshd(3).await.unwrap();
    c.write_node_spec(3, NGINX_TARGETS).unwrap();
    make_auto_with_agent_down(&mut c, 3, &sshd).await;
    let name = c.nodes[3].name.clone();
    ctl_ok(&c, &["node", "trust-host", &name, "--yes"]).await;
    sshds.push(sshd);
    let out = c.issue().await.unwrap();
    assert_eq!(
        out.code,
        0,
        "issue: {}\n{}\n{}",
        out.stdout,
        out.stderr,
        c.logs()
    );
    ctl_ok(&c, &["distribute", CERT]).await;
    let nginx = c.serve_tls().await.unwrap();
    Mixed {
        cluster: c,
        sshds,
        _nginx: nginx,
    }
}

fn owner_group_mode(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn ssl_cert_gid() -> u32 {
    nix::unistd::Group::from_name("ssl-cert")
        .unwrap()
        .unwrap()
        .gid
        .as_raw()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_cluster_issues_distributes_and_rolls_out_over_agents_and_ssh() {
    let m = mixed().await;
    let c = &m.cluster;
    let v1 = live_sha(c);
    for node in &c.nodes {
        assert_eq!(
            served(c, node).await,
            v1,
            "node {} after distribute",
            node.name
        );
    }
    // Version 2 through the whole pipeline: placement and self-check over
    // SSH for nodes 2 and 3, then rollout.
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0, "issue: {}\n{}", out.stdout, out.stderr);
    let v2 = live_sha(c);
    assert_ne!(v2, v1);
    let out = c.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(
        out.code,
        0,
        "rollout: {}\n{}\n{}",
        out.stdout,
        out.stderr,
        c.logs()
    );
    for node in &c.nodes {
        assert_eq!(
            served(c, node).await,
            v2,
            "node {} after rollout",
            node.name
        );
    }
    // The files on the SSH nodes are as the description says.
    for node in &c.nodes[2..] {
        let key = node.dir.join("ssl/private/server.key");
        let cert = node.dir.join("ssl/certs/cn.pem");
        assert_eq!(
            owner_group_mode(&key),
            (0, ssl_cert_gid(), 0o640),
            "{}",
            key.display()
        );
        assert_eq!(owner_group_mode(&cert), (0, 0, 0o644), "{}", cert.display());
        let chain = std::fs::read_to_string(&cert).unwrap();
        let pem = std::fs::read_to_string(&key).unwrap();
        assert_eq!(
            Bundle::parse(&chain, Some(&pem), &[])
                .unwrap()
                .leaf_sha256_hex(),
            v2
        );
        // No token left in the webroot, no temporary file beside a target.
        assert!(
            node.webroot_files().is_empty(),
            "{:?}",
            node.webroot_files()
        );
        for dir in [key.parent().unwrap(), cert.parent().unwrap()] {
            let leftovers: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".certfleet"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?} in {}", dir.display());
        }
    }
    // `certfleet nodes` says how each node is reached, in text and JSON.
    let reach = [
        ("agent", None),
        ("agent", None),
        ("ssh", Some(m.sshds[0].destination())),
        ("auto", Some(m.sshds[1].destination())),
    ];
    let text = ctl_ok(c, &["nodes"]).await;
    assert!(
        text.lines()
            .next()
            .is_some_and(|h| h.contains("TRANSPORT") && h.contains("SSH")),
        "{text}"
    );
    let listed =
        serde_json::from_str::<serde_json::Value>(&ctl_ok(c, &["--json", "nodes"]).await).unwrap();
    for (node, (transport, ssh)) in c.nodes.iter().zip(&reach) {
        let row: Vec<&str> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&node.name.as_str()))
            .unwrap_or_else(|| panic!("{} is not listed:\n{text}", node.name));
        assert_eq!(row.get(2), Some(transport), "{}: {text}", node.name);
        assert_eq!(
            row.get(4).copied(),
            Some(ssh.as_deref().unwrap_or("-")),
            "{}: {text}",
            node.name
        );
        let json = listed
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == node.name.as_str()))
            .unwrap_or_else(|| panic!("{} is not listed: {listed}", node.name));
        assert_eq!(json["transport"], *transport, "{json}");
        assert_eq!(json["ssh"].as_str(), ssh.as_deref(), "{json}");
    }

    // The fallback of the auto node shows in the progress and the history.
    let auto = &c.nodes[3].name;
    assert!(
        out.stdout.contains(auto.as_str()) && out.stdout.contains("over SSH"),
        "rollout output does not mention the fallback:\n{}",
        out.stdout
    );
    let history = ctl_ok(c, &["--json", "history", CERT]).await;
    assert!(history.contains("fallback"), "history: {history}");
    assert!(c.coordinator_log().contains("over SSH"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_by_the_scheduler_journals_its_fallback_to_ssh() {
    // Due as soon as it is issued; the renewal distributes.
    let renew_soon =
        "after_issue = \"distribute\"\n\n[renewal]\nshare_left = 0.9999999\nmax_jitter_secs = 0\n";
    let (c, _sshd, name) = second_node_auto_with_agent_down(renew_soon).await;
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}\n{}", out.stdout, out.stderr, c.logs());

    let renewal = eventually(
        "a renewal by the scheduler",
        Duration::from_secs(90),
        || async {
            let out = c.ctl(&["--json", "history", CERT]).await.ok()?;
            let ops = out.last_json().as_array()?.clone();
            ops.into_iter().find(|o| {
                o["by"] == "renewal scheduler"
                    && o["outcome"].as_str().is_some_and(|r| r != "running")
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(renewal["outcome"], "ok", "{renewal:#}");
    let fallback = renewal["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "fallback")
        .unwrap_or_else(|| panic!("no fallback step: {renewal:#}"));
    assert_eq!(fallback["node"], name.as_str(), "{renewal:#}");
    assert!(
        fallback["detail"].as_str().unwrap().contains("over SSH"),
        "{renewal:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_takes_an_auto_nodes_tokens_off_over_ssh_and_says_so() {
    let (mut c, _sshd, name) = second_node_auto_with_agent_down("").await;
    // Killed with every token placed: node 1's went over SSH, into its
    // webroot, where no agent will ever drop them.
    let newest = crash::newest_operation(&c).await;
    crash::kill_at(&mut c, "placed", &["issue", CERT]).await;
    assert!(
        !c.nodes[1].webroot_files().is_empty(),
        "no token in node 1's webroot after the kill\n{}",
        c.logs()
    );

    let history = crash::restart_and_recover(&mut c, newest).await;
    let recovery = &history[0];
    assert_eq!(recovery["kind"], "recovery", "{history:#?}");
    assert_eq!(recovery["outcome"], "ok", "{history:#?}");
    let fallback = recovery["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "fallback" && s["node"] == name.as_str())
        .unwrap_or_else(|| panic!("no fallback step for {name}: {recovery:#}"));
    assert!(
        fallback["detail"].as_str().unwrap().contains("over SSH"),
        "{recovery:#}"
    );
    for node in &c.nodes {
        assert!(
            node.webroot_files().is_empty(),
            "node {}: webroot files left: {:?}",
            node.name,
            node.webroot_files()
        );
    }
}

/// Two webroot nodes behind nginx with `coordinator_extra` in the
/// coordinator's config; node 1 is `auto`, its agent stopped, its host key
/// trusted. Returns its sshd and name.
async fn second_node_auto_with_agent_down(coordinator_extra: &str) -> (Cluster, Sshd, String) {
    certfleet_tests::cluster::ensure_ssl_cert_group().unwrap();
    let mut c = Cluster::start(ClusterSpec {
        nodes: 2,
        http01: Http01::WebrootNginx,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: coordinator_extra.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let sshd = c.start_sshd(1).await.unwrap();
    c.write_node_spec(1, NGINX_TARGETS).unwrap();
    make_auto_with_agent_down(&mut c, 1, &sshd).await;
    let name = c.nodes[1].name.clone();
    ctl_ok(&c, &["node", "trust-host", &name, "--yes"]).await;
    (c, sshd, name)
}

/// Node 2 as an SSH-only node of its own cluster, its host key not yet
/// trusted.
async fn ssh_only_untrusted() -> (Cluster, Sshd) {
    ssh_only_untrusted_with(NGINX_TARGETS).await
}

/// [`ssh_only_untrusted`], with `targets` on every node.
async fn ssh_only_untrusted_with(targets: &str) -> (Cluster, Sshd) {
    certfleet_tests::cluster::ensure_ssl_cert_group().unwrap();
    let mut c = Cluster::start(ClusterSpec {
        nodes: 3,
        http01: Http01::WebrootNginx,
        agent_certificates: targets.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let sshd = c.start_sshd(2).await.unwrap();
    c.write_node_spec(2, targets).unwrap();
    make_ssh_only(&mut c, 2, &sshd.destination()).await;
    (c, sshd)
}

#[tokio::test(flavor = "multi_thread")]
async fn host_keys_are_checked_strictly_and_a_wrong_user_key_is_named() {
    let (c, mut sshd) = ssh_only_untrusted().await;
    let name = c.nodes[2].name.clone();
    let fp = sshd.fingerprint().unwrap();

    // Unknown: refused, naming the node, the host and the fingerprint.
    let out = c.issue().await.unwrap();
    assert_ne!(out.code, 0);
    let all = format!("{}{}", out.stdout, out.stderr);
    let host = format!("[{}]:{}", sshd.addr.ip(), sshd.addr.port());
    assert!(
        all.contains(&name) && all.contains(&host) && all.contains(&fp),
        "{all}"
    );
    assert!(all.contains("not trusted"), "{all}");

    // trust-host without a terminal and without --yes records nothing.
    let out = c.ctl(&["node", "trust-host", &name]).await.unwrap();
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&fp),
        "the fingerprint is shown: {}",
        out.stdout
    );
    // A pinned fingerprint that is not the node's records nothing either.
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let out = c
        .ctl(&["node", "trust-host", &name, "--fingerprint", wrong])
        .await
        .unwrap();
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains(&fp), "{}", out.stderr);
    let known = c.state_dir.join("ssh/known_hosts");
    assert!(
        !std::fs::read_to_string(&known)
            .unwrap_or_default()
            .contains(&host)
    );

    ctl_ok(&c, &["node", "trust-host", &name, "--fingerprint", &fp]).await;
    let out = c.issue().await.unwrap();
    assert_eq!(
        out.code,
        0,
        "issue once trusted: {}\n{}\n{}",
        out.stdout,
        out.stderr,
        c.logs()
    );

    // Changed: the node presents another key now; refused, naming it.
    sshd.change_host_key().await.unwrap();
    kill_masters(&c);
    let new_fp = sshd.fingerprint().unwrap();
    assert_ne!(new_fp, fp);
    let out = c.issue().await.unwrap();
    assert_ne!(out.code, 0);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("CHANGED") && all.contains(&new_fp) && all.contains(&name),
        "{all}"
    );

    // Trusted again, but certfleet's key is not authorized: a clear error.
    ctl_ok(&c, &["node", "trust-host", &name, "--fingerprint", &new_fp]).await;
    std::fs::write(sshd.dir.join("authorized_keys"), "").unwrap();
    kill_masters(&c);
    let out = c.issue().await.unwrap();
    assert_ne!(out.code, 0);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("refused certfleet's key") && all.contains("authorized_keys"),
        "{all}"
    );
}

/// Ends the coordinator's ssh masters, so the next call connects anew.
fn kill_masters(c: &Cluster) {
    certfleet_coordinator::ssh::clean_control_dir(&c.state_dir.join("ssh/ctl"));
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_metacharacters_in_paths_arrive_intact_and_run_nothing() {
    let (c, _sshd) = ssh_only_untrusted().await;
    let name = c.nodes[2].name.clone();
    let fp = _sshd.fingerprint().unwrap();
    ctl_ok(&c, &["node", "trust-host", &name, "--fingerprint", &fp]).await;
    let node = &c.nodes[2];
    let canary = node.dir.join("pwned");
    let odd_dir = format!(
        "{}/odd $(touch {}) `touch {}`; x",
        node.dir.display(),
        canary.display(),
        canary.display()
    );
    let targets = format!(
        r#"
[[certificates]]
name = "cn"
[[certificates.files]]
content = "fullchain"
path = "{odd_dir}/it's \"here\" & $HOME | *.pem"
[[certificates.files]]
content = "privkey"
path = "{odd_dir}/key;rm -rf x.pem"
group = "ssl-cert"
mode = "0640"
"#
    );
    c.write_node_spec(2, &targets).unwrap();
    let out = c.issue().await.unwrap();
    assert_eq!(
        out.code,
        0,
        "issue: {}\n{}\n{}",
        out.stdout,
        out.stderr,
        c.logs()
    );
    ctl_ok(&c, &["distribute", CERT]).await;
    let v = live_sha(&c);
    let chain =
        std::fs::read_to_string(format!("{odd_dir}/it's \"here\" & $HOME | *.pem")).unwrap();
    let key = std::fs::read_to_string(format!("{odd_dir}/key;rm -rf x.pem")).unwrap();
    assert_eq!(
        Bundle::parse(&chain, Some(&key), &[])
            .unwrap()
            .leaf_sha256_hex(),
        v
    );
    assert!(!canary.exists(), "a path's $(...) or `...` ran on the node");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlinked_target_directory_is_refused_over_ssh() {
    let (c, sshd) = ssh_only_untrusted().await;
    let name = c.nodes[2].name.clone();
    ctl_ok(
        &c,
        &[
            "node",
            "trust-host",
            &name,
            "--fingerprint",
            &sshd.fingerprint().unwrap(),
        ],
    )
    .await;
    let node = &c.nodes[2];
    let elsewhere = node.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(node.dir.join("ssl")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, node.dir.join("ssl/private")).unwrap();
    c.write_node_spec(2, NGINX_TARGETS).unwrap();
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let out = c.ctl(&["distribute", CERT]).await.unwrap();
    assert_ne!(out.code, 0);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("symlink") && all.contains(&name), "{all}");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "wrote through the symlink"
    );
}

/// The ssh master processes whose control socket is under `dir`.
fn masters_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.starts_with("ssh ") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_mid_rollout_leaves_no_ssh_master_after_restart() {
    // Services that restart without a web server, so the rollout gets past
    // the agent nodes to the SSH node's slow one.
    let (files, _) = NGINX_TARGETS
        .split_once("[[certificates.services]]")
        .unwrap();
    let service = |restart: &str, timeout: u32| {
        format!(
            "{files}[[certificates.services]]\nname = \"web\"\ncheck = [\"true\"]\nrestart = {restart}\ntimeout_secs = {timeout}\n"
        )
    };
    let (mut c, sshd) = ssh_only_untrusted_with(&service(r#"["true"]"#, 5)).await;
    let name = c.nodes[2].name.clone();
    ctl_ok(
        &c,
        &[
            "node",
            "trust-host",
            &name,
            "--fingerprint",
            &sshd.fingerprint().unwrap(),
        ],
    )
    .await;
    // A slow restart on the SSH node keeps the rollout in flight.
    c.write_node_spec(2, &service(r#"["sleep", "30"]"#, 60))
        .unwrap();
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let ctl = bin_ctl(&c, &["rollout", CERT]);
    let control = c.state_dir.join("ssh/ctl");
    eventually("an ssh master", Duration::from_secs(30), || {
        let found = !masters_under(&control).is_empty();
        async move { found.then_some(()) }
    })
    .await
    .unwrap();
    // Mid-rollout: the SSH node's restart is running.
    eventually(
        "the SSH node's slow restart",
        Duration::from_secs(60),
        || {
            let running = slow_restarts();
            async move { (!running.is_empty()).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let pid = c.coordinator.as_ref().unwrap().pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    c.coordinator.as_mut().unwrap().kill();
    drop(ctl);
    let orphans = masters_under(&control);
    assert!(
        !orphans.is_empty(),
        "the test needs a master to outlive the killed coordinator"
    );
    c.start_coordinator().await.unwrap();
    // The restarted coordinator may connect again to heal the rollout; the
    // masters the killed one left must be gone.
    let alive = |pids: &[u32]| -> Vec<u32> {
        pids.iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect()
    };
    eventually(
        "the orphaned ssh masters to end",
        Duration::from_secs(10),
        || {
            let left = alive(&orphans);
            async move { left.is_empty().then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|_| panic!("ssh masters left: {:?}\n{}", alive(&orphans), c.logs()));
    assert!(
        c.coordinator_log()
            .contains("ended ssh master connections left by the last run"),
        "{}",
        c.logs()
    );
}

/// The processes running the slow restart command (`sleep 30`).
fn slow_restarts() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x0030\x00")
        })
        .collect()
}

/// Starts `certfleet ARGS` against `c` in the background.
fn bin_ctl(c: &Cluster, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(certfleet_tests::process::bin("certfleet"))
        .arg("--socket")
        .arg(&c.socket)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Ends the coordinator's ssh masters when a test ends, passed or failed,
/// so none outlives it; declared after the cluster, it runs while the
/// control sockets still exist.
struct EndMasters(PathBuf);

impl Drop for EndMasters {
    fn drop(&mut self) {
        certfleet_coordinator::ssh::clean_control_dir(&self.0);
    }
}

/// The web server's user turns the SSH node's challenge directories into
/// links to root's directory: the coordinator's remote script refuses to
/// follow either, names the link, and writes nothing through it, as the
/// agent does (tests/tests/hostile.rs).
#[tokio::test(flavor = "multi_thread")]
async fn symlinked_challenge_directories_are_refused_over_ssh_and_nothing_outside_changes() {
    let (c, sshd) = ssh_only_untrusted().await;
    let _masters = EndMasters(c.state_dir.join("ssh/ctl"));
    let name = c.nodes[2].name.clone();
    ctl_ok(
        &c,
        &[
            "node",
            "trust-host",
            &name,
            "--fingerprint",
            &sshd.fingerprint().unwrap(),
        ],
    )
    .await;
    let node = &c.nodes[2];
    let webroot = node.webroot.clone().unwrap();
    let target = root_only_dir(&c, "sudoers.d");
    let before = snapshot(&target);

    // acme-challenge is a link.
    as_user(
        "www-data",
        &format!(
            "mkdir {w}/.well-known && ln -s {t} {w}/.well-known/acme-challenge",
            w = webroot.display(),
            t = target.display()
        ),
    );
    let link = webroot.join(".well-known/acme-challenge");
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains(&link.display().to_string())
            && said.contains("symlink")
            && said.contains(&name),
        "the error should name {} on {name}: {said}",
        link.display()
    );
    assert_eq!(snapshot(&target), before, "root's directory changed");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());

    // .well-known itself is a link to a directory that has acme-challenge.
    as_user(
        "www-data",
        &format!(
            "rm -rf {w}/.well-known && ln -s {t} {w}/.well-known",
            w = webroot.display(),
            t = target.display()
        ),
    );
    let link = webroot.join(".well-known");
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains(&format!("{}: is a symlink", link.display())) && said.contains(&name),
        "the error should name {} on {name}: {said}",
        link.display()
    );
    assert_eq!(snapshot(&target), before, "root's directory changed");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());

    // Put right, the next issue works from a webroot without .well-known:
    // the script makes both directories 0755 so the web server can serve
    // the tokens, and removes the tokens afterwards.
    as_user("www-data", &format!("rm {}", link.display()));
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}\n{}", out.stdout, out.stderr, c.logs());
    for d in [".well-known", ".well-known/acme-challenge"] {
        let meta = std::fs::symlink_metadata(webroot.join(d)).unwrap();
        assert!(meta.is_dir(), "{d}");
        assert_eq!(meta.mode() & 0o7777, 0o755, "{d}");
    }
    assert!(
        node.webroot_files().is_empty(),
        "{:?}",
        node.webroot_files()
    );
    assert_eq!(snapshot(&target), before, "root's directory changed");
}

/// The login of the sudo scenario: a system user whose only root power is
/// the remote script.
const SUDO_LOGIN: &str = "certfleet-ssh-test";

/// The repository's remote script, as an admin installs it on a node.
const REMOTE_SH: &str = include_str!("../../coordinator/src/ssh/remote.sh");

/// Runs `cmd`; its standard output, or a panic with its standard error.
fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs Debian's `sudo` when it is missing (`.ci/run` and
/// `deploy/deps.sh` install it up front).
fn ensure_sudo() {
    if Path::new("/usr/bin/sudo").exists() && Path::new("/usr/sbin/visudo").exists() {
        return;
    }
    must(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "sudo"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
}

/// [`SUDO_LOGIN`] on this machine, a copy of the remote script root-owned
/// at a path of this test run's own, and a sudoers drop-in that lets the
/// login run exactly that script as root, as README's SSH section says.
/// All three go on drop, passed or failed.
struct SudoLogin {
    dir: PathBuf,
    script: PathBuf,
    staged: PathBuf,
    sudoers: PathBuf,
}

impl SudoLogin {
    fn install() -> Self {
        ensure_sudo();
        let tag = std::process::id();
        let dir = PathBuf::from(format!("/usr/local/lib/certfleet-test-{tag}"));
        // sudo skips a drop-in whose name holds a dot: the staged copy is
        // inert until visudo passed it and it is renamed.
        let login = Self {
            script: dir.join("remote.sh"),
            dir,
            staged: PathBuf::from(format!("/etc/sudoers.d/.certfleet-ssh-test-{tag}")),
            sudoers: PathBuf::from(format!("/etc/sudoers.d/certfleet-ssh-test-{tag}")),
        };
        // No password to log in with, but not locked: with `UsePAM no`
        // sshd turns away a locked (`!`) account even with a good key.
        if nix::unistd::User::from_name(SUDO_LOGIN).unwrap().is_none() {
            must(Command::new("useradd").args([
                "--system",
                "--shell",
                "/bin/sh",
                "--home-dir",
                "/",
                "--no-create-home",
                "--password",
                "*",
                SUDO_LOGIN,
            ]));
        } else {
            must(Command::new("usermod").args([
                "--shell",
                "/bin/sh",
                "--password",
                "*",
                SUDO_LOGIN,
            ]));
        }
        std::fs::create_dir_all(&login.dir).unwrap();
        std::fs::set_permissions(&login.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&login.script, REMOTE_SH).unwrap();
        std::os::unix::fs::chown(&login.script, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&login.script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            &login.staged,
            format!(
                "{SUDO_LOGIN} ALL=(root) NOPASSWD: {}\n",
                login.script.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&login.staged, std::fs::Permissions::from_mode(0o440)).unwrap();
        must(Command::new("visudo").arg("-cf").arg(&login.staged));
        std::fs::rename(&login.staged, &login.sudoers).unwrap();
        login
    }
}

impl Drop for SudoLogin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.staged);
        let _ = std::fs::remove_file(&self.sudoers);
        let _ = std::fs::remove_dir_all(&self.dir);
        // -f: a session of the login may still be winding down.
        let _ = Command::new("userdel").args(["-f", SUDO_LOGIN]).output();
    }
}

/// Runs `command` on the node behind `sshd` over a real ssh login as
/// `user`, with certfleet's key and its known_hosts.
fn ssh_as(c: &Cluster, sshd: &Sshd, user: &str, command: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            c.state_dir.join("ssh/known_hosts").display()
        ))
        .args(["-o", "IdentitiesOnly=yes", "-i"])
        .arg(c.state_dir.join("ssh/id_ed25519"))
        .arg("-p")
        .arg(sshd.addr.port().to_string())
        .args(["-l", user])
        .arg(sshd.addr.ip().to_string())
        .args(["--", command])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// A node whose SSH login is not root: the coordinator reaches the remote
/// script through `sudo -n` (`[ssh] sudo_script`), and issue, distribute
/// and rollout work as with root, while the login can run nothing else as
/// root.
#[tokio::test(flavor = "multi_thread")]
async fn a_login_other_than_root_works_through_sudo_and_may_run_only_the_script() {
    let login = SudoLogin::install();
    certfleet_tests::cluster::ensure_ssl_cert_group().unwrap();
    let mut c = Cluster::start(ClusterSpec {
        nodes: 3,
        http01: Http01::WebrootNginx,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: format!("\n[ssh]\nsudo_script = \"{}\"\n", login.script.display()),
        ..Default::default()
    })
    .await
    .unwrap();
    let sshd = c.start_sshd(2).await.unwrap();
    let _masters = EndMasters(c.state_dir.join("ssh/ctl"));
    c.write_node_spec(2, NGINX_TARGETS).unwrap();
    let dest = format!("{SUDO_LOGIN}@{}:{}", sshd.addr.ip(), sshd.addr.port());
    make_ssh_only(&mut c, 2, &dest).await;
    let name = c.nodes[2].name.clone();
    let fp = sshd.fingerprint().unwrap();
    ctl_ok(&c, &["node", "trust-host", &name, "--fingerprint", &fp]).await;

    // The login really is not root, and sudo lets it run the script and
    // nothing else: not a shell, not /bin/true.
    let id = ssh_as(&c, &sshd, SUDO_LOGIN, "id -u");
    let uid = String::from_utf8_lossy(&id.stdout).trim().to_owned();
    assert!(
        id.status.success() && !uid.is_empty() && uid != "0",
        "id -u as {SUDO_LOGIN}: {uid:?} {}\n{}",
        String::from_utf8_lossy(&id.stderr),
        sshd.log()
    );
    let allowed = ssh_as(
        &c,
        &sshd,
        SUDO_LOGIN,
        &format!("sudo -n {} hash </dev/null", login.script.display()),
    );
    assert!(
        allowed.status.success(),
        "the sudoers rule should allow the script: {}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    for other in [
        "sudo -n /bin/true",
        "sudo -n /bin/sh -c true",
        "sudo -n -i true",
    ] {
        let out = ssh_as(&c, &sshd, SUDO_LOGIN, other);
        assert!(
            !out.status.success(),
            "{SUDO_LOGIN} could run `{other}`: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("password is required"),
            "`{other}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Issue (tokens placed over ssh+sudo), distribute, serve.
    let out = c.issue().await.unwrap();
    assert_eq!(
        out.code,
        0,
        "issue: {}\n{}\n{}",
        out.stdout,
        out.stderr,
        c.logs()
    );
    ctl_ok(&c, &["distribute", CERT]).await;
    let _nginx = c.serve_tls().await.unwrap();
    let v1 = live_sha(&c);
    for node in &c.nodes {
        assert_eq!(
            served(&c, node).await,
            v1,
            "node {} after distribute",
            node.name
        );
    }

    // Version 2, rolled out: the restart runs as root through the script.
    let out = c.issue().await.unwrap();
    assert_eq!(out.code, 0, "issue: {}\n{}", out.stdout, out.stderr);
    let v2 = live_sha(&c);
    assert_ne!(v2, v1);
    ctl_ok(&c, &["rollout", CERT]).await;
    for node in &c.nodes {
        assert_eq!(
            served(&c, node).await,
            v2,
            "node {} after rollout",
            node.name
        );
    }
    let node = &c.nodes[2];
    let key = node.dir.join("ssl/private/server.key");
    let cert = node.dir.join("ssl/certs/cn.pem");
    assert_eq!(
        owner_group_mode(&key),
        (0, ssl_cert_gid(), 0o640),
        "{}",
        key.display()
    );
    assert_eq!(owner_group_mode(&cert), (0, 0, 0o644), "{}", cert.display());
    let chain = std::fs::read_to_string(&cert).unwrap();
    let pem = std::fs::read_to_string(&key).unwrap();
    assert_eq!(
        Bundle::parse(&chain, Some(&pem), &[])
            .unwrap()
            .leaf_sha256_hex(),
        v2
    );
    assert!(
        node.webroot_files().is_empty(),
        "{:?}",
        node.webroot_files()
    );

    // The listing shows the login the node is reached with.
    let listed = ctl_ok(&c, &["nodes"]).await;
    assert!(
        listed.lines().any(|l| l.starts_with(&format!("{name} "))
            && l.contains(" ssh ")
            && l.contains(&dest)),
        "{listed}"
    );
}
