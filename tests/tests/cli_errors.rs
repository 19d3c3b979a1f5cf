//! What an admin reads when something is wrong: every error names what
//! failed, the reason below it in words, and what to do where that is
//! known; a config error exits 2; a reader that stops early ends the CLI
//! quietly; daemon logs in files carry no colour codes, and
//! `--log-format json` gives one JSON object per line.
//!
//! The harness always passes `--socket`; the tests here run the CLI
//! themselves where the way it finds the socket is the point.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Http01, node_name};
use certfleet_tests::net::wait_listening;
use certfleet_tests::process::{Proc, bin, eventually};

/// What one CLI run left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `certfleet` as `user` (root if `None`) with `args` and `env`,
/// without the harness's `--socket` and without any socket or config
/// variable inherited from the test's own environment.
fn certfleet(user: Option<&str>, env: &[(&str, &Path)], args: &[&str]) -> Run {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(bin("certfleet"));
            c
        }
        None => Command::new(bin("certfleet")),
    };
    cmd.env_remove("CERTFLEET_SOCKET")
        .env_remove("CERTFLEET_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdin(Stdio::null());
    let out = cmd.output().expect("running certfleet");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// No escape sequence anywhere in a log file.
fn assert_plain(name: &str, log: &str) {
    assert!(!log.is_empty(), "{name}: empty log");
    assert!(!log.contains("\x1b["), "{name} has colour codes:\n{log}");
}

/// Every line of a log is a JSON object with a level and a message, and
/// there is at least one.
fn assert_json_lines(name: &str, log: &str) {
    assert!(!log.trim().is_empty(), "{name}: empty log");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line:?}"));
        assert!(v.is_object(), "{name}: {line}");
        assert!(v["level"].is_string(), "{name}: no level: {line}");
        assert!(v["message"].is_string(), "{name}: no message: {line}");
    }
}

#[test]
fn without_a_socket_the_cli_asks_whether_the_coordinator_runs() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let run = certfleet(None, &[], &["--socket", path_arg(&socket), "nodes"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "certfleet: connect {}: no such file or directory (is certfleet-coordinator running? socket path from --socket)\n",
            socket.display()
        )
    );
    let run = certfleet(None, &[("CERTFLEET_SOCKET", &socket)], &["nodes"]);
    assert!(
        run.stderr
            .ends_with("(is certfleet-coordinator running? socket path from CERTFLEET_SOCKET)\n"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_finds_the_socket_in_the_config_and_says_why_it_cannot_use_it() {
    // The certificate names a node that is never registered.
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        coordinator_extra: format!("nodes = [\"{}\", \"cn-nope-1\"]\n", node_name(0)),
        ..Default::default()
    })
    .await
    .unwrap();
    let config = cluster.config_path.clone();
    let socket = cluster.socket.clone();

    // The coordinator's own config names the socket, by option or variable.
    let by_option = certfleet(
        None,
        &[],
        &["--config", path_arg(&config), "--json", "nodes"],
    );
    assert_eq!(by_option.code, 0, "{by_option:?}");
    assert!(by_option.stdout.contains(&node_name(0)), "{by_option:?}");
    let by_env = certfleet(None, &[("CERTFLEET_CONFIG", &config)], &["--json", "nodes"]);
    assert_eq!(by_env.code, 0, "{by_env:?}");
    assert_eq!(by_env.stdout, by_option.stdout);
    // A config named but missing, or not readable, is a config error.
    let missing = cluster.dir.path().join("missing.toml");
    let run = certfleet(None, &[], &["--config", path_arg(&missing), "nodes"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "certfleet: reading {} (from --config) for admin_socket: no such file or directory\n",
            missing.display()
        )
    );
    // The harness's config is root's and 0640, like a config holding a secret.
    let run = certfleet(Some("nobody"), &[("CERTFLEET_CONFIG", &config)], &["nodes"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "certfleet: reading {} (from CERTFLEET_CONFIG) for admin_socket: permission denied (let group certfleet read it, or name the socket with --socket or CERTFLEET_SOCKET)\n",
            config.display()
        )
    );

    // The socket is 0660: others may not connect.
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let run = certfleet(
        Some("nobody"),
        &[],
        &["--socket", path_arg(&socket), "nodes"],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "certfleet: connect {}: permission denied (add yourself to group certfleet)\n",
            socket.display()
        )
    );

    // A reader that has seen enough closes the pipe: no panic, exit 0.
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new(bin("certfleet"))
        .args(["--socket", path_arg(&socket), "--json", "certificates"])
        .stdout(Stdio::from(write))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // The same through a shell, as an admin types it.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} --socket {} --json certificates | head -c1",
            bin("certfleet").display(),
            socket.display()
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );

    // A certificate naming a node that was never registered is a config
    // error, named with the node.
    let out = cluster.ctl(&["issue", CERT]).await.unwrap();
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("certificate cn names node cn-nope-1, which is not registered"),
        "{out:?}"
    );

    // A coordinator that died leaves its socket behind: nobody listens.
    let mut cluster = cluster;
    cluster.coordinator.take().unwrap().kill();
    assert!(socket.exists());
    let run = certfleet(None, &[], &["--config", path_arg(&config), "nodes"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "certfleet: connect {}: connection refused (is certfleet-coordinator running? socket path from admin_socket in {})\n",
            socket.display(),
            config.display()
        )
    );
}

/// Starts `bin` with `args` and its log in `log`, replacing `old`.
fn respawn(name: &str, old: Option<Proc>, bin_name: &str, args: &[&str], log: &Path) -> Proc {
    if let Some(mut old) = old {
        old.kill();
    }
    let mut cmd = Command::new(bin(bin_name));
    cmd.args(args);
    Proc::spawn(name, cmd, log).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_down_and_an_untrusted_ca_are_named_with_their_cause() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        ..Default::default()
    })
    .await
    .unwrap();

    // An agent that is down: its line names its address and the reason,
    // each once.
    let down = &cluster.nodes[1];
    let (name, addr) = (down.name.clone(), down.grpc);
    cluster.nodes[1].stop_agent();
    let out = cluster.ctl(&["status", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("no line for {name}: {out:?}"));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>().join(" "),
        format!("{name} ({addr}): unreachable: connection refused")
    );

    // Daemons writing to a file (as under systemd) write no colour codes.
    assert_plain("coordinator log", &cluster.coordinator_log());
    let agent_log = std::fs::read_to_string(cluster.nodes[0].dir.join("agent.log")).unwrap();
    assert_plain("agent log", &agent_log);

    // The coordinator again, logging JSON, and without the CA's root.
    let config = std::fs::read_to_string(&cluster.config_path).unwrap();
    let without_root: String = config
        .lines()
        .filter(|l| !l.starts_with("extra_roots"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(
        config, without_root,
        "the harness's config sets extra_roots"
    );
    std::fs::write(&cluster.config_path, without_root).unwrap();
    let log = cluster.dir.path().join("coordinator/coordinator-json.log");
    let config_arg = cluster.config_path.display().to_string();
    cluster.coordinator = Some(respawn(
        "certfleet-coordinator (json)",
        cluster.coordinator.take(),
        "certfleet-coordinator",
        &["--config", &config_arg, "--log-format", "json"],
        &log,
    ));
    let socket = cluster.socket.clone();
    eventually("the admin socket", Duration::from_secs(20), || {
        let socket = socket.clone();
        async move {
            tokio::net::UnixStream::connect(&socket)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await
    .unwrap();
    cluster.nodes[0].stop_agent();
    let node0 = &cluster.nodes[0];
    let agent_log = node0.dir.join("agent-json.log");
    let agent_config = node0.config_path.display().to_string();
    let _agent = respawn(
        "certfleet-agent (json)",
        None,
        "certfleet-agent",
        &["--config", &agent_config, "--log-format", "json"],
        &agent_log,
    );
    wait_listening(cluster.nodes[0].grpc, Duration::from_secs(20))
        .await
        .unwrap();

    let out = cluster.ctl(&["issue", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(
            "invalid peer certificate: UnknownIssuer (the CA's certificate is not trusted here: for a private CA or Pebble, set acme.extra_roots to its root certificate)"
        ),
        "{out:?}"
    );
    assert_json_lines("coordinator log", &read(&log));
    assert_json_lines("agent log", &read(&agent_log));
    assert!(
        read(&log).contains("set acme.extra_roots"),
        "{}",
        read(&log)
    );
}

fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webroot_the_web_server_does_not_serve_gets_a_hint() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        http01: Http01::WebrootNginx,
        ..Default::default()
    })
    .await
    .unwrap();
    // The agent writes tokens into a directory nginx does not serve.
    let node = &cluster.nodes[0];
    let served = node.webroot.clone().unwrap();
    let elsewhere = node.dir.join("other-webroot");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = std::fs::read_to_string(&node.config_path).unwrap();
    let moved = config.replace(
        &format!("webroot = \"{}\"", served.display()),
        &format!("webroot = \"{}\"", elsewhere.display()),
    );
    assert_ne!(config, moved);
    std::fs::write(&node.config_path, moved).unwrap();
    cluster.nodes[0].start_agent().await.unwrap();

    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    let last = out.last_json();
    assert_eq!(last["error"]["kind"], "self_check", "{out:?}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("node {} (", node_name(0))),
        "{message}"
    );
    assert!(
        message.ends_with(
            "got 404 Not Found (webroot mode: is `<webroot>/.well-known/acme-challenge/` served and readable by the web server user?)"
        ),
        "{message}"
    );
}
