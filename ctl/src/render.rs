//! How the CLI shows things: indicatif on a terminal, plain lines when
//! piped, one JSON object per line with `--json`.

use std::io::IsTerminal;

use certfleet_proto::pb;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::output::{errln, outln};

fn stage_name(stage: pb::Stage) -> &'static str {
    match stage {
        pb::Stage::Unspecified => "unspecified",
        pb::Stage::Order => "order",
        pb::Stage::Placement => "placement",
        pb::Stage::SelfCheck => "self-check",
        pb::Stage::Validation => "validation",
        pb::Stage::Finalize => "finalize",
        pb::Stage::Store => "store",
        pb::Stage::Cleanup => "cleanup",
        pb::Stage::Distribute => "distribute",
        pb::Stage::Restart => "restart",
        pb::Stage::Rollback => "rollback",
        pb::Stage::Waiting => "wait",
        pb::Stage::Done => "done",
        pb::Stage::Failed => "failed",
    }
}

fn certificate_json(c: &pb::Certificate) -> serde_json::Value {
    let mut v = json!({
        "name": c.name,
        "version": c.version,
        "sans": c.sans,
        "serial": c.serial,
        "not_after": date(c.not_after_unix),
        "not_after_unix": c.not_after_unix,
        "days_left": c.days_left,
        "sha256": c.sha256,
        "live_dir": c.live_dir,
    });
    if !c.order_url.is_empty() {
        v["order_url"] = json!(c.order_url);
    }
    if c.next_renewal_unix != 0 || c.renewal_running {
        v["next_renewal"] = json!(next_renewal(c));
        v["next_renewal_unix"] = json!(c.next_renewal_unix);
    }
    if !c.last_renewal_outcome.is_empty() {
        v["last_renewal"] = json!(date(c.last_renewal_unix));
        v["last_renewal_outcome"] = json!(c.last_renewal_outcome);
    }
    if let Some(t) = &c.timings {
        v["timings_ms"] = json!({
            "total": t.total_ms,
            "ca": t.ca_ms,
            "placement_and_self_check": t.placement_ms,
            "cleanup": t.cleanup_ms,
        });
    }
    v
}

fn date(unix: i64) -> String {
    certfleet_proto::clock::rfc3339(unix)
}

/// `--verbose`: every event on its own line with full fingerprints. Set
/// once by `main` from the global flag, before any stream is shown.
static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn set_verbose(on: bool) {
    VERBOSE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// How many hex digits of a SHA-256 fingerprint are shown without
/// `--verbose`: enough to tell versions apart at a glance, as git's short
/// hashes are.
pub(crate) const SHORT_FINGERPRINT: usize = 12;

/// Shows an operation's stream as it arrives:
/// - `--json`: every event as one object per line;
/// - on a terminal: one counter line per stage, updated in place, with a
///   bar once the stage has said how many nodes it concerns
///   (`restart 212/1000 nodes, 1 failed`), and a line only for what needs
///   the admin's eye: failures, rollbacks, waits and the outcome, so a
///   1,000-node rollout prints a few lines rather than thousands;
/// - otherwise (piped, `--verbose`): one line per event, as logs and
///   scripts read them; fingerprints are cut to [`SHORT_FINGERPRINT`]
///   digits unless `--verbose`.
pub(crate) struct IssueView {
    json: bool,
    verbose: bool,
    /// The compact view, on a terminal.
    compact: Option<(ProgressBar, Compact)>,
    /// Whether the status line shows a bar (the stage's total is known)
    /// rather than only a spinner.
    bar: bool,
}

/// The status line without a total to count towards.
const SPINNER_TEMPLATE: &str = "{spinner} {elapsed} {msg}";
/// The status line of a stage whose node count is known.
const BAR_TEMPLATE: &str = "{spinner} {elapsed} [{bar:30}] {msg}";

impl IssueView {
    pub(crate) fn new(json: bool) -> Self {
        let verbose = VERBOSE.load(std::sync::atomic::Ordering::Relaxed);
        let terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        let compact = (!json && !verbose && terminal).then(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(ProgressStyle::with_template(SPINNER_TEMPLATE).expect("static template"));
            pb.enable_steady_tick(std::time::Duration::from_millis(100));
            (pb, Compact::default())
        });
        Self {
            json,
            verbose,
            compact,
            bar: false,
        }
    }

    pub(crate) fn event(&mut self, e: &pb::IssueEvent) {
        let stage = e.stage();
        if self.json {
            outln!("{}", event_json(e));
            return;
        }
        match stage {
            pb::Stage::Done => {
                self.finish();
                match &e.issued {
                    Some(c) => issued_text(c),
                    None => outln!("{}", e.message),
                }
            }
            pb::Stage::Failed => {
                self.finish();
                errln!("error: {}", e.message);
                if let Some(f) = &e.failure {
                    if !f.acme_type.is_empty() {
                        errln!("  CA problem type:   {}", f.acme_type);
                        errln!("  CA problem detail: {}", f.acme_detail);
                    }
                    if !f.order_url.is_empty() {
                        errln!("  order: {}", f.order_url);
                    }
                }
            }
            _ => match &mut self.compact {
                Some((pb, compact)) => {
                    for line in compact.event(e) {
                        pb.println(line);
                    }
                    let counts = compact.counts();
                    if counts.is_some() != self.bar {
                        self.bar = counts.is_some();
                        let template = if self.bar {
                            BAR_TEMPLATE
                        } else {
                            SPINNER_TEMPLATE
                        };
                        pb.set_style(
                            ProgressStyle::with_template(template).expect("static template"),
                        );
                    }
                    if let Some((heard, total)) = counts {
                        pb.set_length(total);
                        pb.set_position(heard.min(total));
                    }
                    pb.set_message(compact.status());
                }
                None => outln!("{}", event_line(e, self.verbose)),
            },
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some((pb, compact)) = self.compact.take() {
            if let Some(line) = compact.summary() {
                pb.println(line);
            }
            pb.finish_and_clear();
        }
    }
}

/// One event as a line: `[restart] ok cn-unm-1: serves version 2`.
fn event_line(e: &pb::IssueEvent, verbose: bool) -> String {
    let mark = if e.ok { "ok " } else { "ERR" };
    let message = if verbose {
        std::borrow::Cow::Borrowed(e.message.as_str())
    } else {
        short_fingerprints(&e.message)
    };
    let stage = stage_name(e.stage());
    if e.node.is_empty() {
        format!("[{stage}] {mark} {message}")
    } else {
        format!("[{stage}] {mark} {}: {message}", e.node)
    }
}

/// `text` with every 64-hex-digit SHA-256 cut to its first
/// [`SHORT_FINGERPRINT`] digits.
fn short_fingerprints(text: &str) -> std::borrow::Cow<'_, str> {
    const LEN: usize = 64;
    let bytes = text.as_bytes();
    let mut out = String::new();
    let (mut copied, mut i) = (0, 0);
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if run == LEN {
            out.push_str(&text[copied..i + SHORT_FINGERPRINT]);
            copied = i + LEN;
        }
        i += run.max(1);
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// The terminal's view of a stream: a tally per stage, and the lines that
/// need the admin's eye. Kept apart from the terminal so a test can count
/// what it prints.
#[derive(Default)]
struct Compact {
    /// The stage being counted, if it concerns nodes.
    current: Option<Tally>,
    /// The latest step message of the stage (no node).
    step: String,
}

/// Nodes heard from in one stage, and which of them failed.
struct Tally {
    stage: pb::Stage,
    /// How many nodes the stage concerns, when its opening event said.
    total: Option<u32>,
    nodes: std::collections::HashSet<String>,
    failed: std::collections::HashSet<String>,
}

impl Tally {
    fn new(stage: pb::Stage, total: Option<u32>) -> Self {
        Self {
            stage,
            total,
            nodes: Default::default(),
            failed: Default::default(),
        }
    }

    /// `restart 212/1000 nodes, 1 failed`; without a total,
    /// `restart 212 nodes`.
    fn line(&self) -> String {
        let stage = stage_name(self.stage);
        let heard = self.nodes.len();
        let mut line = match self.total {
            Some(total) => format!("{stage} {heard}/{total} nodes"),
            None if heard == 1 => format!("{stage} 1 node"),
            None => format!("{stage} {heard} nodes"),
        };
        if !self.failed.is_empty() {
            line.push_str(&format!(", {} failed", self.failed.len()));
        }
        line
    }
}

impl Compact {
    /// Takes one event; returns the lines to print above the status line.
    fn event(&mut self, e: &pb::IssueEvent) -> Vec<String> {
        let stage = e.stage();
        let mut lines = Vec::new();
        // An opening event starts a new count, even of the stage being
        // counted (a rollback's restarts after the rollout's).
        let opens = e.nodes > 0;
        if opens || self.current.as_ref().is_some_and(|t| t.stage != stage) {
            lines.extend(self.summary());
            self.current = None;
        }
        let eye = !e.ok || matches!(stage, pb::Stage::Rollback | pb::Stage::Waiting);
        if opens {
            self.current = Some(Tally::new(stage, Some(e.nodes)));
        } else if e.node.is_empty() {
            self.step = short_fingerprints(&e.message).into_owned();
        } else {
            let tally = self.current.get_or_insert_with(|| Tally::new(stage, None));
            tally.nodes.insert(e.node.clone());
            if !e.ok {
                tally.failed.insert(e.node.clone());
            }
        }
        if eye {
            lines.push(event_line(e, false));
        }
        lines
    }

    /// The status line: the stage's tally, or its latest step.
    fn status(&self) -> String {
        match &self.current {
            Some(t) => t.line(),
            None => self.step.clone(),
        }
    }

    /// The line a finished stage leaves behind.
    fn summary(&self) -> Option<String> {
        self.current.as_ref().map(Tally::line)
    }

    /// (nodes heard from, nodes the stage concerns), for the bar, when the
    /// stage being counted said how many it concerns.
    fn counts(&self) -> Option<(u64, u64)> {
        let t = self.current.as_ref()?;
        Some((t.nodes.len() as u64, u64::from(t.total?)))
    }
}

/// One event of a stream, for `--json`.
fn event_json(e: &pb::IssueEvent) -> serde_json::Value {
    let mut v = json!({
        "stage": stage_name(e.stage()),
        "ok": e.ok,
        "message": e.message,
    });
    if !e.node.is_empty() {
        v["node"] = json!(e.node);
    }
    if e.nodes > 0 {
        v["nodes"] = json!(e.nodes);
    }
    if let Some(c) = &e.issued {
        v["certificate"] = certificate_json(c);
    }
    if let Some(f) = &e.failure {
        v["error"] = json!({
            "kind": f.kind,
            "message": f.message,
            "node": f.node,
            "acme_type": f.acme_type,
            "acme_detail": f.acme_detail,
            "order_url": f.order_url,
        });
    }
    v
}

/// Where a stored version lives and what it is, one line each.
fn certificate_lines(c: &pb::Certificate) {
    outln!("  live:     {}", c.live_dir);
    outln!("  names:    {}", c.sans.join(", "));
    outln!("  serial:   {}", c.serial);
    outln!(
        "  expires:  {} ({} days)",
        date(c.not_after_unix),
        c.days_left
    );
    outln!("  sha256:   {}", c.sha256);
}

/// The certificate an order issued.
fn issued_text(c: &pb::Certificate) {
    outln!("issued {} version {}", c.name, c.version);
    certificate_lines(c);
    if let Some(t) = &c.timings {
        outln!(
            "  took:     {} ms (CA {} ms, placement+self-check {} ms, cleanup {} ms)",
            t.total_ms,
            t.ca_ms,
            t.placement_ms,
            t.cleanup_ms
        );
    }
}

pub(crate) fn certificates(certs: &[pb::Certificate], json: bool) {
    if json {
        let list: Vec<_> = certs.iter().map(certificate_json).collect();
        outln!("{}", json!(list));
        return;
    }
    if certs.is_empty() {
        outln!("no certificates yet; run `certfleet issue <name>`");
        return;
    }
    outln!(
        "{:<20} {:>7} {:<40} {:<25} {:>9}  {:<25} NAMES",
        "NAME",
        "VERSION",
        "SERIAL",
        "NOT AFTER",
        "DAYS LEFT",
        "NEXT RENEWAL"
    );
    for c in certs {
        outln!(
            "{:<20} {:>7} {:<40} {:<25} {:>9}  {:<25} {}",
            c.name,
            c.version,
            c.serial,
            date(c.not_after_unix),
            c.days_left,
            next_renewal(c),
            c.sans.join(",")
        );
        if !c.last_renewal_outcome.is_empty() {
            outln!(
                "{:<20} last renewal {}: {}",
                "",
                date(c.last_renewal_unix),
                c.last_renewal_outcome
            );
        }
    }
}

/// When `c` renews next, in words.
fn next_renewal(c: &pb::Certificate) -> String {
    if c.renewal_running {
        "renewing now".into()
    } else if c.next_renewal_unix == 0 {
        "-".into()
    } else {
        date(c.next_renewal_unix)
    }
}

pub(crate) fn node_added(name: &str, r: &pb::AddNodeResponse, json: bool) {
    if json {
        outln!(
            "{}",
            json!({
                "node": name,
                "token": r.token,
                "ca_pin": r.ca_pin,
                "expires": date(r.expires_unix),
                "expires_unix": r.expires_unix,
                "join_command": r.join_command,
            })
        );
        return;
    }
    if r.token.is_empty() {
        outln!("registered node {name}, reached over SSH (no agent to join)");
        outln!("next: `certfleet node trust-host {name}` to check and record its host key");
        return;
    }
    outln!("registered node {name}");
    outln!(
        "  join token: {} (one use, expires {})",
        r.token,
        date(r.expires_unix)
    );
    outln!("  CA pin:     {}", r.ca_pin);
    // The command reads the token from standard input: given as an
    // argument, it would show in the node's process list.
    outln!("run on {name}, and paste the join token when it asks for it:");
    outln!("  {}", r.join_command);
}

pub(crate) fn nodes(nodes: &[pb::NodeInfo], json: bool) {
    let when = |t: i64| if t == 0 { "never".to_owned() } else { date(t) };
    if json {
        let list: Vec<_> = nodes
            .iter()
            .map(|n| {
                json!({
                    "name": n.name,
                    "agent": n.agent,
                    "http01": n.http01,
                    "transport": n.transport,
                    "ssh": (!n.ssh.is_empty()).then_some(&n.ssh),
                    "state": n.state,
                    "cert_not_after": (n.cert_not_after_unix != 0).then(|| date(n.cert_not_after_unix)),
                    "last_contact": (n.last_contact_unix != 0).then(|| date(n.last_contact_unix)),
                })
            })
            .collect();
        outln!("{}", json!(list));
        return;
    }
    if nodes.is_empty() {
        outln!("no nodes yet; run `certfleet node add <name> --agent <ip:port>`");
        return;
    }
    outln!(
        "{:<20} {:<8} {:<9} {:<22} {:<30} {:<25} {:<25}",
        "NAME",
        "STATE",
        "TRANSPORT",
        "AGENT",
        "SSH",
        "CERT NOT AFTER",
        "LAST CONTACT"
    );
    // `-` for an empty column, so every row has every column, for the eye
    // and for `awk`.
    fn or_dash(s: &str) -> &str {
        if s.is_empty() { "-" } else { s }
    }
    for n in nodes {
        outln!(
            "{:<20} {:<8} {:<9} {:<22} {:<30} {:<25} {:<25}",
            n.name,
            n.state,
            or_dash(&n.transport),
            or_dash(&n.agent),
            or_dash(&n.ssh),
            when(n.cert_not_after_unix),
            when(n.last_contact_unix)
        );
    }
}

/// `certfleet status`: exit 1 when any node is not serving the live version.
pub(crate) fn status(s: &pb::StatusResponse, json: bool) -> crate::Outcome {
    let all_ok = !s.nodes.is_empty() && s.nodes.iter().all(|n| serving_live(s, n));
    if json {
        outln!("{}", status_json(s, all_ok));
    } else {
        status_text(s);
    }
    if all_ok {
        crate::Outcome::Ok
    } else {
        crate::Outcome::Failed
    }
}

/// Whether `n` answered, holds the live version intact, and serves it on
/// every endpoint.
fn serving_live(s: &pb::StatusResponse, n: &pb::NodeCertificateStatus) -> bool {
    n.error.is_empty()
        && n.version == s.live_version
        && n.intact
        && n.served.iter().all(|e| e.leaf_sha256 == s.live_sha256)
}

fn status_json(s: &pb::StatusResponse, all_ok: bool) -> serde_json::Value {
    let nodes: Vec<_> = s.nodes.iter().map(|n| node_status_json(s, n)).collect();
    let steps: Vec<_> = s
        .last_rollout_steps
        .iter()
        .map(|step| {
            json!({
                "node": step.node,
                "step": step.step,
                "ok": step.ok,
                "detail": step.detail,
            })
        })
        .collect();
    json!({
        "live_version": s.live_version,
        "live_sha256": s.live_sha256,
        "last_rollout": s.last_rollout,
        "last_rollout_version": s.last_rollout_version,
        "last_rollout_steps": steps,
        "all_serving_live": all_ok,
        "nodes": nodes,
    })
}

fn node_status_json(s: &pb::StatusResponse, n: &pb::NodeCertificateStatus) -> serde_json::Value {
    json!({
        "node": n.node,
        "version": n.version,
        "sha256": n.leaf_sha256,
        "intact": n.intact,
        "days_left": n.days_left,
        "serving_live": serving_live(s, n),
        "error": (!n.error.is_empty()).then_some(&n.error),
        "problem": (!n.problem.is_empty()).then_some(&n.problem),
        "served": n.served.iter().map(|e| json!({
            "service": e.service,
            "address": e.address,
            "sha256": e.leaf_sha256,
            "error": (!e.error.is_empty()).then_some(&e.error),
        })).collect::<Vec<_>>(),
        "recorded": (n.recorded_version != 0).then(|| json!({
            "version": n.recorded_version,
            "at": date(n.recorded_unix),
        })),
    })
}

fn status_text(s: &pb::StatusResponse) {
    let live = match s.live_version {
        0 => "not issued (no live version in the store)".to_owned(),
        v => format!("live version {v} (sha256 {})", short(&s.live_sha256)),
    };
    outln!(
        "{live}; last rollout: {}",
        if s.last_rollout.is_empty() {
            "none"
        } else {
            &s.last_rollout
        }
    );
    outln!(
        "{:<20} {:>7} {:<16} {:<7} {:>9}  SERVED",
        "NODE",
        "VERSION",
        "ON DISK",
        "INTACT",
        "DAYS LEFT"
    );
    for n in &s.nodes {
        node_status_text(s, n);
    }
    rollout_steps_text(s);
}

/// One node's row, and the lines under it.
fn node_status_text(s: &pb::StatusResponse, n: &pb::NodeCertificateStatus) {
    if !n.error.is_empty() {
        // The coordinator's error names the agent's address and says what
        // happened ("unreachable", "refused", ...).
        outln!("{:<20} {}", n.node, n.error);
        if n.recorded_version != 0 {
            outln!(
                "{:<20} last recorded: version {} installed {}",
                "",
                n.recorded_version,
                date(n.recorded_unix)
            );
        }
        return;
    }
    let served: Vec<String> = n
        .served
        .iter()
        .map(|e| {
            let what = if !e.error.is_empty() {
                format!("error: {}", e.error)
            } else if e.leaf_sha256 == s.live_sha256 {
                format!("{} (live)", short(&e.leaf_sha256))
            } else {
                format!("{} (NOT live)", short(&e.leaf_sha256))
            };
            format!("{} {} {what}", e.service, e.address)
        })
        .collect();
    outln!(
        "{:<20} {:>7} {:<16} {:<7} {:>9}  {}",
        n.node,
        n.version,
        short(&n.leaf_sha256),
        if n.intact { "yes" } else { "NO" },
        n.days_left,
        served.join("; ")
    );
    if !n.problem.is_empty() {
        outln!("{:<20} files: {}", "", n.problem);
    }
}

/// The most characters of a failed step's detail `status` shows on a
/// terminal; `--json` has all of it.
const MAX_STEP_DETAIL: usize = 300;

/// The last rollout's steps, one line per node (per run of steps on one
/// node, when a batch's nodes took turns): each step and whether it
/// worked, with what went wrong where it did not.
fn rollout_steps_text(s: &pb::StatusResponse) {
    if s.last_rollout_steps.is_empty() {
        return;
    }
    outln!(
        "last rollout, of version {} ({}), step by step:",
        s.last_rollout_version,
        s.last_rollout
    );
    for run in s.last_rollout_steps.chunk_by(|a, b| a.node == b.node) {
        let steps: Vec<String> = run
            .iter()
            .map(|step| {
                if step.ok {
                    format!("{} ok", step.step)
                } else {
                    format!("{} FAILED ({})", step.step, one_line(&step.detail))
                }
            })
            .collect();
        outln!("{:<20} {}", run[0].node, steps.join(", "));
    }
}

/// `text` on one line, whitespace collapsed, cut at [`MAX_STEP_DETAIL`]
/// characters.
fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MAX_STEP_DETAIL) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}

/// What `certfleet revoke` revoked.
pub(crate) fn revoked(name: &str, reason: &str, r: &pb::RevokeResponse, json: bool) {
    let reason = if reason.is_empty() {
        "unspecified"
    } else {
        reason
    };
    if json {
        outln!(
            "{}",
            json!({
                "revoked": name,
                "version": r.version,
                "serial": r.serial,
                "reason": reason,
            })
        );
        return;
    }
    outln!(
        "revoked {name} version {} (serial {}) at the CA, reason {reason}",
        r.version,
        r.serial
    );
}

/// The ACME account; `done` says what was just changed, if anything.
pub(crate) fn account(a: &pb::AccountInfo, done: Option<&str>, json: bool) {
    if json {
        let mut v = json!({
            "url": a.url,
            "directory": a.directory,
            "contacts": a.contacts,
            "status": a.status,
            "key_thumbprint": a.key_thumbprint,
        });
        if let Some(done) = done {
            v["done"] = json!(done);
        }
        outln!("{v}");
        return;
    }
    if let Some(done) = done {
        outln!("{done}");
    }
    outln!("account:        {}", a.url);
    outln!("directory:      {}", a.directory);
    let contacts = if a.contacts.is_empty() {
        "none".to_owned()
    } else {
        a.contacts.join(", ")
    };
    outln!("contacts:       {contacts}");
    outln!("status:         {}", a.status);
    outln!("key thumbprint: {}", a.key_thumbprint);
}

/// What `certfleet import` brought in: certbot lineage `lineage`, whose
/// domains came from `domains_from`, as `imported`.
pub(crate) fn imported(
    lineage: &str,
    domains_from: &str,
    imported: Option<pb::Certificate>,
    json: bool,
) {
    let c = imported.unwrap_or_default();
    if json {
        let mut v = certificate_json(&c);
        v["lineage"] = json!(lineage);
        v["domains_from"] = json!(domains_from);
        outln!("{v}");
        return;
    }
    outln!(
        "imported certbot lineage {lineage} as {} version {}",
        c.name,
        c.version
    );
    outln!("  domains:  from {domains_from}");
    certificate_lines(&c);
    outln!(
        "next: `certfleet distribute {0}`, then `certfleet rollout {0}`",
        c.name
    );
}

/// `certfleet history`: one block per operation, newest first, each with
/// who ran it, when, how it ended, and its journaled steps.
pub(crate) fn history(certificate: &str, operations: &[pb::Operation], json: bool) {
    let when = |t: i64| if t == 0 { "-".to_owned() } else { date(t) };
    if json {
        let list: Vec<_> = operations
            .iter()
            .map(|o| {
                json!({
                    "id": o.id,
                    "kind": o.kind,
                    "by": o.by,
                    "started": date(o.started_unix),
                    "finished": (o.finished_unix != 0).then(|| date(o.finished_unix)),
                    "outcome": o.outcome,
                    "version": (o.version != 0).then_some(o.version),
                    "order_url": (!o.order_url.is_empty()).then_some(&o.order_url),
                    "steps": o.steps.iter().map(|s| json!({
                        "at": date(s.at_unix),
                        "step": s.step,
                        "node": (!s.node.is_empty()).then_some(&s.node),
                        "detail": s.detail,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        outln!("{}", json!(list));
        return;
    }
    if operations.is_empty() {
        outln!("nothing has run on {certificate} yet");
        return;
    }
    for o in operations {
        let version = if o.version == 0 {
            String::new()
        } else {
            format!(" version {}", o.version)
        };
        outln!(
            "#{} {}{} by {}: started {}, ended {}: {}",
            o.id,
            o.kind,
            version,
            o.by,
            when(o.started_unix),
            when(o.finished_unix),
            o.outcome
        );
        if !o.order_url.is_empty() {
            outln!("    order {}", o.order_url);
        }
        for s in &o.steps {
            let node = if s.node.is_empty() {
                String::new()
            } else {
                format!(" [{}]", s.node)
            };
            let detail = if s.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", s.detail)
            };
            outln!("    {} {}{}{}", date(s.at_unix), s.step, node, detail);
        }
    }
}

/// `certfleet outbox`: each waiting mail with its attempts and last error,
/// then recently sent mail. Envelopes only: the API never sends bodies.
pub(crate) fn outbox(r: &pb::OutboxResponse, json: bool) {
    let when = |t: i64| (t != 0).then(|| date(t));
    if json {
        for m in &r.mails {
            outln!(
                "{}",
                json!({
                    "id": m.id,
                    "state": if m.sent_unix == 0 { "waiting" } else { "sent" },
                    "certificate": m.certificate,
                    "subject": m.subject,
                    "recipients": m.recipients,
                    "created": date(m.created_unix),
                    "attempts": m.attempts,
                    "next_attempt": when(m.next_attempt_unix),
                    "last_error": (!m.last_error.is_empty()).then_some(&m.last_error),
                    "sent": when(m.sent_unix),
                })
            );
        }
        return;
    }
    if !r.configured {
        outln!("no [mail] section in the coordinator's config: no mail is sent");
    }
    if r.mails.is_empty() {
        outln!("the outbox is empty");
        return;
    }
    for m in &r.mails {
        let state = match when(m.sent_unix) {
            Some(sent) => format!("sent {sent}"),
            None => format!(
                "WAITING, {} failed attempt(s), next {}",
                m.attempts,
                date(m.next_attempt_unix)
            ),
        };
        outln!("#{} {}: {state}", m.id, m.subject);
        outln!(
            "    to {} (queued {})",
            m.recipients.join(", "),
            date(m.created_unix)
        );
        if !m.last_error.is_empty() {
            outln!("    last error: {}", m.last_error);
        }
    }
}

/// One approval request as JSON.
fn approval_json(a: &pb::Approval) -> serde_json::Value {
    json!({
        "id": a.id,
        "state": a.state,
        "certificate": a.certificate,
        "version": a.version,
        "serial": a.serial,
        "names": a.names,
        "not_after": date(a.not_after_unix),
        "step": a.step,
        "batches": a.batches.iter().map(|b| &b.nodes).collect::<Vec<_>>(),
        "created": date(a.created_unix),
        "expires": date(a.expires_unix),
        "reminded": a.reminded,
        "decided_by": (!a.decided_by.is_empty()).then_some(&a.decided_by),
        "decided": (a.decided_unix != 0).then(|| date(a.decided_unix)),
        "comment": (!a.comment.is_empty()).then_some(&a.comment),
        "outcome": (!a.outcome.is_empty()).then_some(&a.outcome),
    })
}

/// `certfleet approvals`: pending requests with their plan and how to
/// decide, then decided ones in a line each.
pub(crate) fn approvals(list: &[pb::Approval], json: bool) {
    if json {
        for a in list {
            outln!("{}", approval_json(a));
        }
        return;
    }
    if list.is_empty() {
        outln!("no approval requests");
        return;
    }
    for a in list {
        if a.state == "pending" {
            outln!(
                "{}  PENDING  {} version {} ({}), serial {}, expires {}",
                a.id,
                a.certificate,
                a.version,
                a.step,
                a.serial,
                date(a.expires_unix)
            );
            outln!("    names: {}", a.names.join(", "));
            outln!("    not after: {}", date(a.not_after_unix));
            for (i, b) in a.batches.iter().enumerate() {
                outln!("    {}. {}", i + 1, b.nodes.join(", "));
            }
            outln!("    certfleet approve {0}   |   certfleet reject {0}", a.id);
        } else {
            let comment = if a.comment.is_empty() {
                String::new()
            } else {
                format!(" ({})", one_line(&a.comment))
            };
            let outcome = if a.outcome.is_empty() {
                String::new()
            } else {
                format!("; {}", one_line(&a.outcome))
            };
            outln!(
                "{}  {}  {} version {} ({}) by {} at {}{comment}{outcome}",
                a.id,
                a.state,
                a.certificate,
                a.version,
                a.step,
                a.decided_by,
                date(a.decided_unix)
            );
        }
    }
}

/// `certfleet reject`.
pub(crate) fn rejected(a: &pb::Approval, json: bool) {
    if json {
        outln!("{}", approval_json(a));
    } else {
        outln!(
            "rejected request {}: {} version {} is not distributed or restarted; it stays stored",
            a.id,
            a.certificate,
            a.version
        );
    }
}

/// `certfleet node set`.
pub(crate) fn node_set(n: &pb::NodeInfo, json: bool) {
    if json {
        outln!(
            "{}",
            json!({ "node": n.name, "transport": n.transport, "ssh": n.ssh, "agent": n.agent })
        );
        return;
    }
    let ssh = if n.ssh.is_empty() { "none" } else { &n.ssh };
    outln!("node {}: transport {}, ssh {ssh}", n.name, n.transport);
}

/// The host keys `certfleet node trust-host` read, before confirming.
pub(crate) fn host_keys(name: &str, r: &pb::TrustHostResponse, json: bool) {
    if json {
        let keys: Vec<_> = r
            .keys
            .iter()
            .map(|k| json!({ "type": k.key_type, "fingerprint": k.fingerprint }))
            .collect();
        outln!("{}", json!({ "node": name, "host": r.host, "keys": keys }));
        return;
    }
    outln!("node {name} ({}) presents:", r.host);
    for k in &r.keys {
        outln!("  {} {}", k.key_type, k.fingerprint);
    }
}

/// A host key recorded by `certfleet node trust-host`.
pub(crate) fn host_trusted(name: &str, r: &pb::TrustHostResponse, fingerprint: &str, json: bool) {
    if json {
        outln!(
            "{}",
            json!({ "node": name, "host": r.host, "trusted": fingerprint, "known_hosts": r.known_hosts })
        );
        return;
    }
    outln!(
        "trusted {fingerprint} for node {name} ({}) in {}",
        r.host,
        r.known_hosts
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stage: pb::Stage, node: &str, ok: bool, message: &str) -> pb::IssueEvent {
        pb::IssueEvent {
            stage: stage.into(),
            node: node.into(),
            ok,
            message: message.into(),
            ..Default::default()
        }
    }

    /// The event that opens a stage over `nodes` nodes.
    fn opening(stage: pb::Stage, nodes: u32, message: &str) -> pb::IssueEvent {
        pb::IssueEvent {
            nodes,
            ..event(stage, "", true, message)
        }
    }

    #[test]
    fn a_thousand_node_rollout_prints_a_line_per_stage_and_per_failure() {
        let sha = "ab".repeat(32);
        let mut view = Compact::default();
        let mut printed = Vec::new();
        let open = opening(pb::Stage::Distribute, 1000, "version 2 to 1000 nodes");
        printed.extend(view.event(&open));
        assert_eq!(view.status(), "distribute 0/1000 nodes");
        for i in 0..1000 {
            let node = format!("node-{i}");
            let line = format!("installed version 2 (leaf sha256 {sha})");
            printed.extend(view.event(&event(pb::Stage::Distribute, &node, true, &line)));
            if i == 499 {
                assert_eq!(view.status(), "distribute 500/1000 nodes");
                assert_eq!(view.counts(), Some((500, 1000)));
            }
        }
        assert_eq!(view.status(), "distribute 1000/1000 nodes");
        let open = opening(
            pb::Stage::Restart,
            1000,
            "version 2 onto 1000 nodes, 1 at a time",
        );
        printed.extend(view.event(&open));
        assert_eq!(view.status(), "restart 0/1000 nodes");
        // One node at a time; the 212th fails, and the rollout halts there.
        for i in 0..212 {
            let node = format!("node-{i}");
            if i == 211 {
                let step = "web: check FAILED: bad config";
                printed.extend(view.event(&event(pb::Stage::Restart, &node, false, step)));
                break;
            }
            let step = "web: verify ok: serves it";
            printed.extend(view.event(&event(pb::Stage::Restart, &node, true, step)));
            let done = "serves version 2";
            printed.extend(view.event(&event(pb::Stage::Restart, &node, true, done)));
        }
        assert_eq!(view.status(), "restart 212/1000 nodes, 1 failed");
        assert_eq!(view.counts(), Some((212, 1000)));
        printed.extend(view.event(&event(
            pb::Stage::Rollback,
            "node-211",
            true,
            "reinstalled version 1",
        )));
        assert_eq!(view.status(), "rollback 1 node");
        assert_eq!(view.counts(), None);
        printed.extend(view.summary());
        assert_eq!(
            printed,
            [
                "distribute 1000/1000 nodes".to_owned(),
                "[restart] ERR node-211: web: check FAILED: bad config".to_owned(),
                "restart 212/1000 nodes, 1 failed".to_owned(),
                "[rollback] ok  node-211: reinstalled version 1".to_owned(),
                "rollback 1 node".to_owned(),
            ]
        );
    }

    #[test]
    fn an_opening_event_starts_a_new_count_even_of_the_same_stage() {
        let mut view = Compact::default();
        let mut printed = Vec::new();
        // Without an opening event, nodes are counted with no total.
        for node in ["n0", "n1"] {
            printed.extend(view.event(&event(pb::Stage::Restart, node, true, "ok")));
        }
        assert_eq!(view.status(), "restart 2 nodes");
        // A recovery's restarts, then its rollback's restarts.
        printed.extend(view.event(&opening(pb::Stage::Restart, 3, "version 2 onto 3 nodes")));
        for node in ["n0", "n1", "n2"] {
            printed.extend(view.event(&event(pb::Stage::Restart, node, true, "ok")));
        }
        // A step of the stage being counted leaves the count alone.
        printed.extend(view.event(&event(pb::Stage::Restart, "", true, "a note")));
        assert_eq!(view.status(), "restart 3/3 nodes");
        let open = opening(pb::Stage::Restart, 2, "rolling 2 nodes back onto version 1");
        printed.extend(view.event(&open));
        assert_eq!(view.status(), "restart 0/2 nodes");
        printed.extend(view.event(&event(pb::Stage::Restart, "n0", true, "ok")));
        printed.extend(view.event(&event(pb::Stage::Restart, "n1", false, "bad")));
        printed.extend(view.summary());
        assert_eq!(
            printed,
            [
                "restart 2 nodes",
                "restart 3/3 nodes",
                "[restart] ERR n1: bad",
                "restart 2/2 nodes, 1 failed",
            ]
        );
    }

    #[test]
    fn an_opening_event_shows_its_count_in_json_and_reads_as_a_step_when_piped() {
        let open = opening(
            pb::Stage::Restart,
            1000,
            "version 2 onto 1000 nodes, 1 at a time",
        );
        let json = event_json(&open);
        assert_eq!(json["nodes"], 1000, "{json}");
        assert_eq!(json["message"], "version 2 onto 1000 nodes, 1 at a time");
        assert!(json.get("node").is_none(), "{json}");
        let node = event(pb::Stage::Restart, "n1", true, "serves version 2");
        assert!(event_json(&node).get("nodes").is_none());
        // Piped or --verbose: a line like any other step's.
        for verbose in [false, true] {
            assert_eq!(
                event_line(&open, verbose),
                "[restart] ok  version 2 onto 1000 nodes, 1 at a time"
            );
            assert_eq!(
                event_line(&node, verbose),
                "[restart] ok  n1: serves version 2"
            );
        }
    }

    #[test]
    fn fingerprints_are_cut_unless_verbose() {
        let sha = "0123456789abcdef".repeat(4);
        let e = event(
            pb::Stage::Distribute,
            "n1",
            true,
            &format!("installed version 2 (leaf sha256 {sha})"),
        );
        assert_eq!(
            event_line(&e, false),
            "[distribute] ok  n1: installed version 2 (leaf sha256 0123456789ab)"
        );
        assert_eq!(
            event_line(&e, true),
            format!("[distribute] ok  n1: installed version 2 (leaf sha256 {sha})")
        );
        // Only whole 64-digit runs are fingerprints.
        assert_eq!(
            short_fingerprints("deadbeef and 65 digits"),
            "deadbeef and 65 digits"
        );
        let long = "a".repeat(65);
        assert_eq!(short_fingerprints(&long), long);
        assert_eq!(
            short_fingerprints(&format!("{sha},{sha}")),
            "0123456789ab,0123456789ab"
        );
    }

    #[test]
    fn a_step_detail_is_one_line_cut_at_a_character() {
        assert_eq!(
            one_line("nginx: [emerg] unknown directive\n  in web.conf:1\n"),
            "nginx: [emerg] unknown directive in web.conf:1"
        );
        let long = "é".repeat(MAX_STEP_DETAIL + 1);
        let cut = one_line(&long);
        assert_eq!(cut.chars().count(), MAX_STEP_DETAIL + 1);
        assert!(cut.ends_with("é…"), "{cut}");
    }
}
