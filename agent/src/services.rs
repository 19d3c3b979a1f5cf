//! Restarting the services that use a certificate, and proving what they
//! serve.
//!
//! For each service, in the config's order: run its check (never restart a
//! service whose config is broken), run its restart, then connect to each
//! of its verify endpoints until every one serves the expected leaf or the
//! service's timeout passes. Commands are argv from this agent's config, run
//! without a shell.
//!
//! Each of those steps is bounded by the service's `timeout_secs`. A command
//! that outlives it is killed together with everything it started (its
//! process group), and so is one still running when the call is dropped
//! because the coordinator gave up. A restart is thus bounded by its
//! services' own timeouts, and the gRPC server adds no limit of its own.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::warn;

use crate::config::Service;

/// Bytes of a failed command's output kept for the report.
const OUTPUT_TAIL: usize = 800;
/// How long to wait for a killed command to be reaped before leaving it to
/// tokio's reaper.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between verify probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Probes in a row that must all see the expected leaf. A reload hands
/// new connections to new workers while old ones wind down (nginx, apache),
/// so one good handshake can come before the last old one.
const VERIFY_CONSECUTIVE: u32 = 3;
/// Longest one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one endpoint served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub service: String,
    pub address: String,
    pub result: Result<String, String>,
}

/// How one service fared.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub service: String,
    /// "check", "restart" or "verify".
    pub step: &'static str,
    pub ok: bool,
    pub detail: String,
    pub served: Vec<Served>,
}

/// Restarts `services` in order. Stops at the first failure unless
/// `keep_going` (used when rolling back, to put every service back).
pub async fn restart_all(
    services: &[Service],
    expected: &str,
    keep_going: bool,
) -> (bool, Vec<Outcome>) {
    let mut outcomes = Vec::with_capacity(services.len());
    let mut all_ok = true;
    for service in services {
        let outcome = restart_one(service, expected).await;
        all_ok &= outcome.ok;
        let failed = !outcome.ok;
        outcomes.push(outcome);
        if failed && !keep_going {
            break;
        }
    }
    (all_ok, outcomes)
}

async fn restart_one(service: &Service, expected: &str) -> Outcome {
    let fail = |step, detail: String, served| Outcome {
        service: service.name.clone(),
        step,
        ok: false,
        detail,
        served,
    };
    if let Some(check) = &service.check
        && let Err(detail) = run(check, service.timeout).await
    {
        // The running service keeps its old config and certificate: say
        // what it serves, but do not restart it.
        return fail("check", detail, probe_all(service).await);
    }
    if let Err(detail) = run(&service.restart, service.timeout).await {
        return fail("restart", detail, probe_all(service).await);
    }
    if service.verify.is_empty() {
        return Outcome {
            service: service.name.clone(),
            step: "restart",
            ok: true,
            detail: "restarted; no verify endpoint configured".into(),
            served: Vec::new(),
        };
    }
    let deadline = tokio::time::Instant::now() + service.timeout;
    let mut good = 0;
    loop {
        let served = probe_all(service).await;
        let wrong: Vec<String> = served
            .iter()
            .filter(|s| s.result.as_deref() != Ok(expected))
            .map(|s| match &s.result {
                Ok(sha) => format!("{} served {sha}", s.address),
                Err(e) => format!("{}: {e}", s.address),
            })
            .collect();
        good = if wrong.is_empty() { good + 1 } else { 0 };
        if good >= VERIFY_CONSECUTIVE {
            return Outcome {
                service: service.name.clone(),
                step: "verify",
                ok: true,
                detail: format!("{} endpoint(s) serve {expected}", served.len()),
                served,
            };
        }
        if !wrong.is_empty() && tokio::time::Instant::now() >= deadline {
            return fail(
                "verify",
                format!(
                    "after {}, expected {expected}: {}",
                    limit(service.timeout),
                    wrong.join("; ")
                ),
                served,
            );
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Runs `argv` without a shell, within `timeout`, in a process group of its
/// own. If it outlives `timeout`, or the call running it is dropped, the
/// whole group is killed: a restart command often starts others (`sh -c`,
/// init scripts), and they must not go on changing the service after the
/// agent has reported on it.
async fn run(argv: &[String], timeout: Duration) -> Result<(), String> {
    let shown = argv.join(" ");
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("`{shown}` could not run: {e}"))?;
    let group = ProcessGroup::of(&child, &shown);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // The output first, then the exit: until the leader is reaped, its id
    // (the group's) cannot be reused, so the group can still be killed if
    // something it started holds the output open past the limit.
    let finished = async {
        let (stdout, stderr) = tokio::join!(read_tail(stdout), read_tail(stderr));
        let status = child.wait().await;
        group.reaped();
        (status, stdout, stderr)
    };
    let (status, stdout, stderr) = match tokio::time::timeout(timeout, finished).await {
        Ok(done) => done,
        Err(_) => {
            group.kill();
            // SIGKILL cannot be caught; this only waits out a process stuck
            // in the kernel. Past that, tokio reaps it when it goes.
            let _ = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
            return Err(format!(
                "`{shown}` timed out after {}; its process group was killed",
                limit(timeout)
            ));
        }
    };
    let status = status.map_err(|e| format!("`{shown}`: waiting for it failed: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&stdout));
    Err(format!(
        "`{shown}` failed ({status}): {}",
        tail(text.trim(), OUTPUT_TAIL)
    ))
}

/// "120 s (timeout_secs = 120)": a service's limit as its config spells it.
fn limit(timeout: Duration) -> String {
    let secs = timeout.as_secs();
    format!("{secs} s (timeout_secs = {secs})")
}

/// Reads `pipe` to its end, keeping at least its last `2 * OUTPUT_TAIL`
/// bytes, so a chatty command cannot fill the agent's memory. Dropping
/// bytes may split a character; twice the tail keeps the split well before
/// the part reported.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 4 * OUTPUT_TAIL {
            kept.drain(..kept.len() - 2 * OUTPUT_TAIL);
        }
    }
    kept
}

/// The last `max` bytes of `text` or fewer, starting on a character
/// boundary: command output is anyone's language.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// A command's process group (the command leads it: `process_group(0)`).
///
/// It is killed with SIGKILL by [`ProcessGroup::kill`] on timeout, and on
/// drop when the call running the command is dropped: the coordinator's
/// deadline passed or its connection went. `kill_on_drop` alone reaches only
/// the direct child, not what it started. Once the leader is reaped its id
/// may be reused, so from then on nothing is signalled; that also leaves
/// alone whatever a command that succeeded started in its group (a daemon
/// that did not detach).
struct ProcessGroup {
    id: Option<Pid>,
    command: String,
    /// True until the leader is reaped or the group killed.
    live: AtomicBool,
}

impl ProcessGroup {
    fn of(child: &tokio::process::Child, command: &str) -> Self {
        // `id()` is `None` only once the child has been reaped.
        let id = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        Self {
            id,
            command: command.to_owned(),
            live: AtomicBool::new(id.is_some()),
        }
    }

    /// The leader has been reaped: its id is no longer ours to signal.
    fn reaped(&self) {
        self.live.store(false, Ordering::SeqCst);
    }

    /// Kills every process in the group; false if the leader was already
    /// reaped (or the group already killed).
    fn kill(&self) -> bool {
        let (Some(id), true) = (self.id, self.live.swap(false, Ordering::SeqCst)) else {
            return false;
        };
        if let Err(e) = killpg(id, Signal::SIGKILL) {
            // ESRCH: every member has exited, the leader still unreaped.
            if e != nix::errno::Errno::ESRCH {
                warn!(command = %self.command, error = %e, "could not kill the process group");
            }
        }
        true
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.kill() {
            warn!(
                command = %self.command,
                "the call was dropped while the command ran; killed its process group"
            );
        }
    }
}

/// What every endpoint of `service` serves now.
pub async fn probe_all(service: &Service) -> Vec<Served> {
    let probes = service.verify.iter().map(|e| async move {
        let result = certfleet_proto::node_spec::served_leaf(e, PROBE_TIMEOUT).await;
        Served {
            service: service.name.clone(),
            address: e.address.clone(),
            result,
        }
    });
    futures::future::join_all(probes).await
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const EXPECTED: &str = "00";

    fn service(name: &str, restart: &[&str], timeout: Duration) -> Service {
        Service {
            name: name.to_owned(),
            check: None,
            restart: restart.iter().map(|a| (*a).to_owned()).collect(),
            timeout,
            verify: Vec::new(),
        }
    }

    fn pid_in(file: &Path) -> u32 {
        std::fs::read_to_string(file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Whether `pid` has died. Its parent is gone, so a zombie waits for
    /// init to reap it, which the agent does not control: that counts as
    /// dead.
    fn dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    async fn assert_dies(pid: u32, what: &str) {
        for _ in 0..100 {
            if dead(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what} (pid {pid}) is still running");
    }

    /// A restart that starts a child of its own (`sleep 30 &`), writing
    /// the shell's and the child's pids to `dir`.
    fn forking_restart(dir: &Path) -> String {
        format!(
            "echo $$ > {0}/sh.pid; sleep 30 & echo $! > {0}/child.pid; sleep 30",
            dir.display()
        )
    }

    #[tokio::test]
    async fn a_command_that_outlives_its_timeout_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let script = forking_restart(dir.path());
        let slow = service("tomcat9", &["sh", "-c", &script], Duration::from_secs(1));
        let started = std::time::Instant::now();
        let (ok, outcomes) = restart_all(&[slow], EXPECTED, false).await;
        assert!(!ok);
        assert!(started.elapsed() < Duration::from_secs(10));
        let o = &outcomes[0];
        assert_eq!(
            (o.service.as_str(), o.step, o.ok),
            ("tomcat9", "restart", false)
        );
        assert!(
            o.detail.contains("timed out after 1 s (timeout_secs = 1)")
                && o.detail.contains("its process group was killed")
                && o.detail.contains("sleep 30 &"),
            "{}",
            o.detail
        );
        assert_dies(pid_in(&dir.path().join("sh.pid")), "the command").await;
        assert_dies(pid_in(&dir.path().join("child.pid")), "the command's child").await;
    }

    #[tokio::test]
    async fn a_child_left_holding_the_output_is_killed_at_the_limit() {
        // The shell exits at once; its child keeps the shell's stdout.
        let dir = tempfile::tempdir().unwrap();
        let script = format!("sleep 30 & echo $! > {}/child.pid", dir.path().display());
        let leaky = service("apache2", &["sh", "-c", &script], Duration::from_secs(1));
        let (ok, outcomes) = restart_all(&[leaky], EXPECTED, false).await;
        assert!(!ok);
        assert!(
            outcomes[0].detail.contains("timed out after 1 s"),
            "{}",
            outcomes[0].detail
        );
        assert_dies(pid_in(&dir.path().join("child.pid")), "the command's child").await;
    }

    #[tokio::test]
    async fn a_check_that_times_out_is_reported_as_the_check() {
        let mut slow = service("postgres", &["true"], Duration::from_secs(1));
        slow.check = Some(vec!["sleep".into(), "30".into()]);
        let (ok, outcomes) = restart_all(&[slow], EXPECTED, false).await;
        assert!(!ok);
        assert_eq!(outcomes[0].step, "check");
        assert!(
            outcomes[0]
                .detail
                .starts_with("`sleep 30` timed out after 1 s (timeout_secs = 1)"),
            "{}",
            outcomes[0].detail
        );
    }

    #[tokio::test]
    async fn a_dropped_call_kills_the_command_group() {
        let dir = tempfile::tempdir().unwrap();
        let script = forking_restart(dir.path());
        let slow = service("tomcat9", &["sh", "-c", &script], Duration::from_secs(120));
        let child = dir.path().join("child.pid");
        let services = [slow];
        let call = restart_all(&services, EXPECTED, false);
        // The coordinator gives up (or goes away) while the restart runs.
        let waited = tokio::time::timeout(Duration::from_millis(500), call).await;
        assert!(
            waited.is_err(),
            "the restart should still have been running"
        );
        assert!(child.exists(), "the command never started its child");
        assert_dies(pid_in(&dir.path().join("sh.pid")), "the command").await;
        assert_dies(pid_in(&child), "the command's child").await;
    }

    #[tokio::test]
    async fn a_command_that_finishes_in_time_succeeds() {
        let quick = service(
            "nginx",
            &["sh", "-c", "echo reloading"],
            Duration::from_secs(5),
        );
        let (ok, outcomes) = restart_all(&[quick], EXPECTED, false).await;
        assert!(ok, "{outcomes:?}");
    }

    #[tokio::test]
    async fn non_ascii_output_of_a_failed_command_is_cut_at_a_character() {
        // 3000 two-byte characters and one ASCII byte: the last
        // OUTPUT_TAIL bytes start inside a character.
        let script = "printf 'é%.0s' $(seq 3000) >&2; printf x; exit 3";
        let failing = service("apache2", &["sh", "-c", script], Duration::from_secs(5));
        let (ok, outcomes) = restart_all(&[failing], EXPECTED, false).await;
        assert!(!ok);
        let detail = &outcomes[0].detail;
        assert!(detail.contains("failed (exit status: 3)"), "{detail}");
        assert!(detail.ends_with("éééx"), "{detail}");
        assert!(!detail.contains('\u{fffd}'), "{detail}");
    }

    #[test]
    fn tail_never_splits_a_character() {
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aé", 2), "é");
        assert_eq!(tail("aé", 3), "aé");
        assert_eq!(tail("日本語", 4), "語");
        assert_eq!(tail("ok", 800), "ok");
        let long = "ü".repeat(1000) + "!";
        let cut = tail(&long, OUTPUT_TAIL);
        assert!(cut.len() <= OUTPUT_TAIL && cut.len() >= OUTPUT_TAIL - 1);
        assert!(cut.ends_with("ü!"));
    }
}
