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
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        })
        .unwrap_or_else(|_| unix.to_string())
}

/// Shows an `issue` stream as it arrives.
pub(crate) struct IssueView {
    json: bool,
    spinner: Option<ProgressBar>,
}

impl IssueView {
    pub(crate) fn new(json: bool) -> Self {
        let spinner = (!json && std::io::stderr().is_terminal()).then(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("static template"),
            );
            pb.enable_steady_tick(std::time::Duration::from_millis(100));
            pb
        });
        Self { json, spinner }
    }

    pub(crate) fn event(&mut self, e: &pb::IssueEvent) {
        let stage = e.stage();
        if self.json {
            let mut v = json!({
                "stage": stage_name(stage),
                "ok": e.ok,
                "message": e.message,
            });
            if !e.node.is_empty() {
                v["node"] = json!(e.node);
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
            outln!("{v}");
            return;
        }
        match stage {
            pb::Stage::Done => {
                self.finish();
                if e.issued.is_none() {
                    outln!("{}", e.message);
                }
                if let Some(c) = &e.issued {
                    outln!("issued {} version {}", c.name, c.version);
                    outln!("  live:     {}", c.live_dir);
                    outln!("  names:    {}", c.sans.join(", "));
                    outln!("  serial:   {}", c.serial);
                    outln!(
                        "  expires:  {} ({} days)",
                        date(c.not_after_unix),
                        c.days_left
                    );
                    outln!("  sha256:   {}", c.sha256);
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
            _ => {
                let mark = if e.ok { "ok " } else { "ERR" };
                let line = if e.node.is_empty() {
                    format!("[{}] {mark} {}", stage_name(stage), e.message)
                } else {
                    format!("[{}] {mark} {}: {}", stage_name(stage), e.node, e.message)
                };
                match &self.spinner {
                    Some(pb) => {
                        pb.println(line);
                        pb.set_message(format!("{}…", stage_name(stage)));
                    }
                    None => outln!("{line}"),
                }
            }
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(pb) = self.spinner.take() {
            pb.finish_and_clear();
        }
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
        "{:<20} {:>7} {:<40} {:<25} {:>9}  NAMES",
        "NAME",
        "VERSION",
        "SERIAL",
        "NOT AFTER",
        "DAYS LEFT"
    );
    for c in certs {
        outln!(
            "{:<20} {:>7} {:<40} {:<25} {:>9}  {}",
            c.name,
            c.version,
            c.serial,
            date(c.not_after_unix),
            c.days_left,
            c.sans.join(",")
        );
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
        "{:<20} {:<8} {:<22} {:<25} {:<25}",
        "NAME",
        "STATE",
        "AGENT",
        "CERT NOT AFTER",
        "LAST CONTACT"
    );
    for n in nodes {
        outln!(
            "{:<20} {:<8} {:<22} {:<25} {:<25}",
            n.name,
            n.state,
            n.agent,
            when(n.cert_not_after_unix),
            when(n.last_contact_unix)
        );
    }
}

/// `certfleet status`: exit 1 when any node is not serving the live version.
pub(crate) fn status(s: &pb::StatusResponse, json: bool) -> crate::Outcome {
    let served_ok = |n: &pb::NodeCertificateStatus| {
        n.error.is_empty()
            && n.version == s.live_version
            && n.intact
            && n.served.iter().all(|e| e.leaf_sha256 == s.live_sha256)
    };
    let all_ok = !s.nodes.is_empty() && s.nodes.iter().all(served_ok);
    if json {
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "node": n.node,
                    "version": n.version,
                    "sha256": n.leaf_sha256,
                    "intact": n.intact,
                    "days_left": n.days_left,
                    "serving_live": served_ok(n),
                    "error": (!n.error.is_empty()).then_some(&n.error),
                    "problem": (!n.problem.is_empty()).then_some(&n.problem),
                    "served": n.served.iter().map(|e| json!({
                        "service": e.service,
                        "address": e.address,
                        "sha256": e.leaf_sha256,
                        "error": (!e.error.is_empty()).then_some(&e.error),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        outln!(
            "{}",
            json!({
                "live_version": s.live_version,
                "live_sha256": s.live_sha256,
                "last_rollout": s.last_rollout,
                "all_serving_live": all_ok,
                "nodes": nodes,
            })
        );
    } else {
        outln!(
            "live version {} (sha256 {}); last rollout: {}",
            s.live_version,
            short(&s.live_sha256),
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
            if !n.error.is_empty() {
                // The coordinator's error names the agent's address and
                // says what happened ("unreachable", "refused", ...).
                outln!("{:<20} {}", n.node, n.error);
                continue;
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
    }
    if all_ok {
        crate::Outcome::Ok
    } else {
        crate::Outcome::Failed
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}
