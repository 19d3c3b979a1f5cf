//! `certfleet restart`, `rollout` and `status`: getting the new certificate
//! into the services that use it, one node at a time, proving each node
//! serves it before touching the next.
//!
//! Per batch of nodes (the certificate's `restart_batch`, 1 by default),
//! each node's agent checks, restarts and verifies its services in its own
//! configured order. A node that fails is rolled back to the previous
//! version, its services restarted again and verified to serve that
//! version, and the rollout halts: later nodes are never touched. Every
//! step is recorded, so `status` and later mail can say what happened.

use std::time::Duration;

use futures::future::join_all;
use tracing::{info, warn};

use crate::challenge::FleetNode;
use crate::db::now;
use crate::distribute::{DistributeError, distribute};
use crate::issue::{IssueError, Issuer};
use crate::progress::{Progress, Stage};
use crate::store::StoreError;
use crate::transport::{NodeCertificate, RestartReport, TransportError};

/// Longest a node's whole restart (every service's check, restart and
/// verify) may take before the coordinator counts it as failed.
pub const NODE_RESTART_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Setup(#[from] IssueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("certificate {0} has not been issued yet: run `certfleet issue {0}`")]
    NotIssued(String),
    #[error(transparent)]
    Distribute(#[from] DistributeError),
    #[error(
        "rollout halted at node {node}: service {service}, step {step}: {detail}\n  rollback: {rollback}\n  untouched: {}",
        if untouched.is_empty() { "none".to_owned() } else { untouched.join(", ") }
    )]
    Halted {
        node: String,
        service: String,
        step: String,
        detail: String,
        rollback: String,
        untouched: Vec<String>,
    },
}

/// A completed restart.
#[derive(Debug)]
pub struct Restarted {
    pub version: u32,
    pub nodes: Vec<String>,
}

/// Where a node failed.
struct NodeFailure {
    service: String,
    step: String,
    detail: String,
}

impl NodeFailure {
    fn from_report(report: &RestartReport) -> Self {
        match report.services.iter().find(|s| !s.ok) {
            Some(s) => Self {
                service: s.service.clone(),
                step: s.step.clone(),
                detail: s.detail.clone(),
            },
            None => Self {
                service: "-".into(),
                step: "restart".into(),
                detail: "the node reported failure without a failing service".into(),
            },
        }
    }

    fn transport(step: &str, e: &TransportError) -> Self {
        Self {
            service: "-".into(),
            step: step.into(),
            detail: e.to_string(),
        }
    }
}

struct Run<'a> {
    issuer: &'a Issuer,
    name: &'a str,
    progress: &'a Progress,
    rollout: i64,
}

impl Run<'_> {
    fn record(&self, node: &str, step: &str, ok: bool, detail: &str) {
        if let Err(e) = self
            .issuer
            .db()
            .rollout_step(self.rollout, node, step, ok, detail, now())
        {
            warn!(error = %e, "cannot record a rollout step");
        }
    }

    /// Restarts one node; `Err` says where it failed.
    async fn node(&self, n: &FleetNode, version: u32, expected: &str) -> Result<(), NodeFailure> {
        let name = &n.node.name;
        // Never restart onto files that are not the version being rolled out.
        let status = n
            .transport
            // The version on disk is enough here; verify probes afterwards.
            .certificate_status(self.name, false)
            .await
            .map_err(|e| NodeFailure::transport("precheck", &e))?;
        if status.version != version || status.leaf_sha256 != expected || !status.intact {
            return Err(NodeFailure {
                service: "-".into(),
                step: "precheck".into(),
                detail: format!(
                    "node has version {} ({}) installed, not version {version}: run `certfleet distribute {}` first",
                    status.version,
                    if status.intact {
                        "intact"
                    } else {
                        &status.problem
                    },
                    self.name
                ),
            });
        }
        let report = tokio::time::timeout(
            NODE_RESTART_TIMEOUT,
            n.transport.restart_services(self.name, expected, false),
        )
        .await
        .map_err(|_| {
            NodeFailure::transport("restart", &TransportError::Timeout(NODE_RESTART_TIMEOUT))
        })?
        .map_err(|e| NodeFailure::transport("restart", &e))?;
        for s in &report.services {
            let line = format!(
                "{}: {} {}: {}",
                s.service,
                s.step,
                if s.ok { "ok" } else { "FAILED" },
                s.detail
            );
            self.progress.node(Stage::Restart, name, s.ok, line.clone());
            self.record(name, &format!("{}:{}", s.service, s.step), s.ok, &s.detail);
        }
        if report.ok {
            Ok(())
        } else {
            Err(NodeFailure::from_report(&report))
        }
    }

    /// Puts a failed node back on its previous version and proves it
    /// serves it; returns a sentence for the report.
    async fn roll_back(&self, n: &FleetNode) -> String {
        let name = &n.node.name;
        let previous = match n.transport.rollback_certificate(self.name).await {
            Ok(p) => p,
            Err(e) => {
                let line = format!("FAILED to reinstall the previous version: {e}");
                self.progress
                    .node(Stage::Rollback, name, false, line.clone());
                self.record(name, "rollback", false, &line);
                return line;
            }
        };
        self.progress.node(
            Stage::Rollback,
            name,
            true,
            format!("reinstalled version {}", previous.version),
        );
        let line = match n
            .transport
            .restart_services(self.name, &previous.leaf_sha256, true)
            .await
        {
            Ok(report) => {
                let served: Vec<_> = report.services.iter().flat_map(|s| &s.served).collect();
                let all = !served.is_empty()
                    && served
                        .iter()
                        .all(|s| s.result.as_deref() == Ok(previous.leaf_sha256.as_str()));
                if all {
                    format!(
                        "node {name} serves version {} again ({} endpoint(s) verified)",
                        previous.version,
                        served.len()
                    )
                } else {
                    let seen: Vec<String> = served
                        .iter()
                        .map(|s| match &s.result {
                            Ok(sha) => format!("{} serves {sha}", s.address),
                            Err(e) => format!("{}: {e}", s.address),
                        })
                        .collect();
                    format!(
                        "FAILED: node {name} does not serve version {} ({}): {}",
                        previous.version,
                        previous.leaf_sha256,
                        seen.join("; ")
                    )
                }
            }
            Err(e) => format!(
                "FAILED to restart services on version {}: {e}",
                previous.version
            ),
        };
        let ok = !line.starts_with("FAILED");
        self.progress.node(Stage::Rollback, name, ok, line.clone());
        self.record(name, "rollback", ok, &line);
        line
    }
}

/// Restarts the certificate's services node by node onto the live version.
pub async fn restart(
    issuer: &Issuer,
    name: &str,
    progress: &Progress,
) -> Result<Restarted, RolloutError> {
    let spec = issuer
        .config()
        .certificate(name)
        .ok_or_else(|| IssueError::UnknownCertificate(name.to_owned()))?;
    let live = issuer
        .store()
        .live(name)?
        .ok_or_else(|| RolloutError::NotIssued(name.to_owned()))?;
    let (version, expected) = (live.version, live.bundle.leaf_sha256_hex());
    let nodes = issuer.fleet(spec)?;
    let rollout = issuer
        .db()
        .start_rollout(name, version, now())
        .map_err(IssueError::from)?;
    let run = Run {
        issuer,
        name,
        progress,
        rollout,
    };
    let mut done = Vec::with_capacity(nodes.len());
    for (b, batch) in nodes.chunks(spec.restart_batch).enumerate() {
        let results = join_all(batch.iter().map(|n| run.node(n, version, &expected))).await;
        let mut failure = None;
        for (n, result) in batch.iter().zip(results) {
            match result {
                Ok(()) => {
                    progress.node(
                        Stage::Restart,
                        &n.node.name,
                        true,
                        format!("serves version {version}"),
                    );
                    done.push(n.node.name.clone());
                }
                Err(f) => {
                    progress.node(
                        Stage::Restart,
                        &n.node.name,
                        false,
                        format!("service {}, step {}: {}", f.service, f.step, f.detail),
                    );
                    run.record(&n.node.name, &f.step, false, &f.detail);
                    if failure.is_none() {
                        failure = Some((n, f));
                    }
                }
            }
        }
        if let Some((n, f)) = failure {
            // Every failed node in the batch goes back; report the first.
            let mut rollback = String::new();
            for m in batch.iter().filter(|m| !done.contains(&m.node.name)) {
                let line = run.roll_back(m).await;
                if m.node.name == n.node.name {
                    rollback = line;
                }
            }
            let untouched: Vec<String> = nodes[(b + 1) * spec.restart_batch..]
                .iter()
                .map(|n| n.node.name.clone())
                .collect();
            let _ = issuer.db().finish_rollout(rollout, "halted", now());
            warn!(certificate = name, node = %n.node.name, "rollout halted");
            return Err(RolloutError::Halted {
                node: n.node.name.clone(),
                service: f.service,
                step: f.step,
                detail: f.detail,
                rollback,
                untouched,
            });
        }
    }
    let _ = issuer.db().finish_rollout(rollout, "ok", now());
    info!(
        certificate = name,
        version,
        nodes = done.len(),
        "rollout complete"
    );
    Ok(Restarted {
        version,
        nodes: done,
    })
}

/// Distribute the live version, then restart.
pub async fn rollout(
    issuer: &Issuer,
    name: &str,
    progress: &Progress,
) -> Result<Restarted, RolloutError> {
    distribute(issuer, name, None, &[], progress).await?;
    restart(issuer, name, progress).await
}

/// One node's view, for `certfleet status`.
#[derive(Debug)]
pub struct NodeStatus {
    pub node: String,
    pub result: Result<NodeCertificate, String>,
}

/// Asks every node serving `name` what it has and serves.
pub async fn status(
    issuer: &Issuer,
    name: &str,
) -> Result<(Option<(u32, String)>, Vec<NodeStatus>), RolloutError> {
    let spec = issuer
        .config()
        .certificate(name)
        .ok_or_else(|| IssueError::UnknownCertificate(name.to_owned()))?;
    let live = issuer
        .store()
        .live(name)?
        .map(|s| (s.version, s.bundle.leaf_sha256_hex()));
    let nodes = issuer.fleet(spec)?;
    let results = issuer
        .fan_out()
        .run(&nodes, |n| n.transport.certificate_status(name, true))
        .await;
    let mut out: Vec<NodeStatus> = results
        .into_iter()
        .map(|(n, r)| NodeStatus {
            node: n.node.name.clone(),
            result: match r {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(format!("({}): {e}", n.node.agent)),
                None => Err(format!("({}): no answer in time", n.node.agent)),
            },
        })
        .collect();
    let order = |name: &str| nodes.iter().position(|n| n.node.name == name);
    out.sort_by_key(|s| order(&s.node));
    Ok((live, out))
}
