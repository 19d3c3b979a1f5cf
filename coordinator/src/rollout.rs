//! `certfleet restart` and `rollout`: getting the new certificate into the
//! services that use it, one batch of nodes at a time, proving each node
//! serves it before touching the next batch.
//!
//! Per batch of nodes (the certificate's `restart_batch`, 1 by default),
//! each node's agent checks, restarts and verifies its services in its own
//! configured order. A node that fails is rolled back to the previous
//! version, its services restarted again and verified to serve that
//! version, and the rollout halts: later batches are never touched. Every
//! step is recorded, so `status` (and later mail) can say what happened. The
//! rollout's row in the database always gets an outcome, even when the
//! rollout panics (`Record`).

use std::time::Duration;

use futures::future::join_all;
use tracing::{info, warn};

use crate::challenge::FleetNode;
use crate::db::{Db, DbError, RolloutOutcome};
use crate::distribute::{DistributeError, distribute};
use crate::error::ErrorKind;
use crate::fleet::{Fleet, FleetError, OperationGuard};
use crate::journal::{Journal, JournalError, step};
use crate::progress::{Progress, Stage};
use crate::transport::{NodeInstall, RestartReport, TransportError};
use certfleet_proto::clock::now;

/// Longest a node's whole restart (every service's check, restart and
/// verify) may take before the coordinator counts it as failed.
pub const NODE_RESTART_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Why a restart or rollout could not start, or where it halted.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Registry(#[from] DbError),
    #[error(transparent)]
    Distribute(#[from] DistributeError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(
        "cannot tell which version to roll back to: {0}; roll back by hand with `certfleet distribute --version N` and `certfleet restart`"
    )]
    NoRollbackTarget(String),
    #[error(
        "rollout halted at node {node}: service {service}, step {step}: {detail}\n  rollback: {rollback}\n  untouched: {}",
        if untouched.is_empty() { "none".to_owned() } else { untouched.join(", ") }
    )]
    Halted {
        node: String,
        service: String,
        step: String,
        detail: String,
        rollback: Rollback,
        untouched: Vec<String>,
    },
}

impl RolloutError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fleet(e) => e.kind(),
            Self::Registry(e) => e.kind(),
            Self::Distribute(e) => e.kind(),
            Self::Journal(e) => e.kind(),
            Self::NoRollbackTarget(_) | Self::Halted { .. } => ErrorKind::Rollout,
        }
    }

    /// The nodes at fault, when there are any.
    pub fn nodes(&self) -> Vec<&str> {
        match self {
            Self::Halted { node, .. } => vec![node.as_str()],
            Self::Distribute(e) => e.nodes(),
            Self::Fleet(_) | Self::Registry(_) | Self::Journal(_) | Self::NoRollbackTarget(_) => {
                Vec::new()
            }
        }
    }
}

/// What rolling a failed node back achieved.
#[derive(Debug)]
pub enum Rollback {
    /// The node failed before anything on it was restarted (its precheck):
    /// there was nothing to roll back.
    NotNeeded,
    /// Every endpoint of the node serves the previous version again.
    Restored {
        node: String,
        version: u32,
        endpoints: usize,
    },
    /// The previous version could not be reinstalled.
    ReinstallFailed(TransportError),
    /// The previous version was reinstalled, but the services could not be
    /// restarted on it.
    RestartFailed { version: u32, error: TransportError },
    /// The services were restarted, but not every endpoint serves the
    /// previous version: `seen` says what each one does.
    NotServed {
        node: String,
        version: u32,
        leaf_sha256: String,
        seen: Vec<String>,
    },
}

impl Rollback {
    /// Whether the node is back where it was before the rollout.
    pub fn ok(&self) -> bool {
        matches!(self, Self::NotNeeded | Self::Restored { .. })
    }
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotNeeded => f.write_str("not needed: nothing on the node was restarted"),
            Self::Restored {
                node,
                version,
                endpoints,
            } => write!(
                f,
                "node {node} serves version {version} again ({endpoints} endpoint(s) verified)"
            ),
            Self::ReinstallFailed(e) => {
                write!(f, "FAILED to reinstall the previous version: {e}")
            }
            Self::RestartFailed { version, error } => {
                write!(
                    f,
                    "FAILED to restart services on version {version}: {error}"
                )
            }
            Self::NotServed {
                node,
                version,
                leaf_sha256,
                seen,
            } => write!(
                f,
                "FAILED: node {node} does not serve version {version} ({leaf_sha256}): {}",
                seen.join("; ")
            ),
        }
    }
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
    /// False when the node failed before anything on it was restarted
    /// (the precheck): there is nothing to roll back.
    restarted: bool,
    /// True when the failed step is already among the recorded steps (a
    /// service's step from the node's report).
    recorded: bool,
}

impl NodeFailure {
    fn from_report(report: &RestartReport) -> Self {
        match report.services.iter().find(|s| !s.ok) {
            Some(s) => Self {
                service: s.service.clone(),
                step: s.step.clone(),
                detail: s.detail.clone(),
                restarted: true,
                recorded: true,
            },
            None => Self {
                service: "-".into(),
                step: "restart".into(),
                detail: "the node reported failure without a failing service".into(),
                restarted: true,
                recorded: false,
            },
        }
    }

    fn transport(step: &str, e: &TransportError, restarted: bool) -> Self {
        Self {
            service: "-".into(),
            step: step.into(),
            detail: e.to_string(),
            restarted,
            recorded: false,
        }
    }
}

/// The first failed node of a batch, and what its rollback achieved.
struct Halt {
    node: String,
    failure: NodeFailure,
    rollback: Rollback,
}

impl Halt {
    /// The error a rollout that halted here ends with; `untouched` are the
    /// nodes it never restarted.
    fn into_error(self, untouched: Vec<String>) -> RolloutError {
        RolloutError::Halted {
            node: self.node,
            service: self.failure.service,
            step: self.failure.step,
            detail: self.failure.detail,
            rollback: self.rollback,
            untouched,
        }
    }
}

/// A rollout's row in the database. One dropped without an outcome (the
/// rollout panicked, or its task was dropped) records
/// [`RolloutOutcome::Failed`], so no rollout stays "running" for ever.
struct Record<'a> {
    db: &'a Db,
    id: i64,
    finished: bool,
}

impl<'a> Record<'a> {
    fn start(db: &'a Db, certificate: &str, version: u32) -> Result<Self, DbError> {
        Ok(Self {
            db,
            id: db.start_rollout(certificate, version, now())?,
            finished: false,
        })
    }

    fn step(&self, node: &str, step: &str, ok: bool, detail: &str) {
        if let Err(e) = self.db.rollout_step(self.id, node, step, ok, detail, now()) {
            warn!(error = %e, "cannot record a rollout step");
        }
    }

    fn finish(mut self, outcome: RolloutOutcome) {
        self.close(outcome);
    }

    fn close(&mut self, outcome: RolloutOutcome) {
        self.finished = true;
        if let Err(e) = self.db.finish_rollout(self.id, outcome, now()) {
            warn!(error = %e, rollout = self.id, "cannot record the rollout's outcome");
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.finished {
            warn!(
                rollout = self.id,
                "rollout ended without an outcome; recording it as failed"
            );
            self.close(RolloutOutcome::Failed);
        }
    }
}

struct Run<'a> {
    name: &'a str,
    version: u32,
    /// The live version's leaf SHA-256, which every node must end up serving.
    expected: String,
    progress: &'a Progress,
    record: &'a Record<'a>,
    /// Each node's restart is journaled before it starts, and its
    /// verification after (`recovery` resumes after the verified ones).
    journal: &'a Journal,
}

impl Run<'_> {
    /// Prechecks every node of `batch` at once (`precheck`), in its order.
    async fn prechecks(&self, batch: &[FleetNode]) -> Vec<Result<(), NodeFailure>> {
        join_all(batch.iter().map(|n| self.precheck(n))).await
    }

    /// Restarts the nodes of `batches` batch by batch. Each batch's
    /// prechecks (read-only) run while the batch before it restarts, so a
    /// node-by-node rollout does not wait for one more round trip per node.
    /// Returns the first halt, and the nodes of the batches never started.
    async fn batches(
        &self,
        batches: &[&[FleetNode]],
        done: &mut Vec<String>,
    ) -> Result<(), (Halt, Vec<String>)> {
        let Some(first) = batches.first() else {
            return Ok(());
        };
        let mut checked = self.prechecks(first).await;
        for (i, batch) in batches.iter().enumerate() {
            let next = async {
                match batches.get(i + 1) {
                    Some(next) => self.prechecks(next).await,
                    None => Vec::new(),
                }
            };
            let (result, next_checked) = futures::join!(self.batch(batch, checked, done), next);
            if let Err(halt) = result {
                // Whatever the batch size, the untouched nodes are exactly
                // the later batches.
                let untouched = batches[i + 1..]
                    .iter()
                    .flat_map(|b| b.iter())
                    .map(|n| n.node.name.clone())
                    .collect();
                return Err((halt, untouched));
            }
            checked = next_checked;
        }
        Ok(())
    }

    /// Restarts one batch concurrently, each node whose precheck (in
    /// `checked`, in the batch's order) passed. Nodes that succeed join
    /// `done`; if any fails, every failed node is rolled back and the first
    /// is reported.
    async fn batch(
        &self,
        batch: &[FleetNode],
        checked: Vec<Result<(), NodeFailure>>,
        done: &mut Vec<String>,
    ) -> Result<(), Halt> {
        let results = join_all(
            batch
                .iter()
                .zip(checked)
                .map(|(n, checked)| self.node(n, checked)),
        )
        .await;
        let mut failed = Vec::new();
        for (n, result) in batch.iter().zip(results) {
            let name = &n.node.name;
            match result {
                Ok(()) => {
                    let line = format!("serves version {}", self.version);
                    self.progress.node(Stage::Restart, name, true, line);
                    done.push(name.clone());
                }
                Err(f) => {
                    let line = format!("service {}, step {}: {}", f.service, f.step, f.detail);
                    self.progress.node(Stage::Restart, name, false, line);
                    if !f.recorded {
                        self.record.step(name, &f.step, false, &f.detail);
                    }
                    failed.push((n, f));
                }
            }
        }
        let mut halt = None;
        for (n, failure) in failed {
            let rollback = if failure.restarted {
                self.roll_back(n).await
            } else {
                Rollback::NotNeeded
            };
            halt.get_or_insert(Halt {
                node: n.node.name.clone(),
                failure,
                rollback,
            });
        }
        halt.map_or(Ok(()), Err)
    }

    /// Restarts one node whose precheck gave `checked`; `Err` says where it
    /// failed.
    async fn node(
        &self,
        n: &FleetNode,
        checked: Result<(), NodeFailure>,
    ) -> Result<(), NodeFailure> {
        checked?;
        let journal_failed = |e: JournalError| NodeFailure {
            service: "-".into(),
            step: "journal".into(),
            detail: e.to_string(),
            restarted: false,
            recorded: false,
        };
        let version = format!("version {}", self.version);
        self.journal
            .step(step::RESTARTING, &n.node.name, &version)
            .map_err(journal_failed)?;
        let report = tokio::time::timeout(
            NODE_RESTART_TIMEOUT,
            n.transport
                .restart_services(self.name, &self.expected, false),
        )
        .await
        .map_err(|_| {
            let e = TransportError::Timeout(NODE_RESTART_TIMEOUT);
            NodeFailure::transport("restart", &e, true)
        })?
        .map_err(|e| NodeFailure::transport("restart", &e, true))?;
        for s in &report.services {
            let line = format!(
                "{}: {} {}: {}",
                s.service,
                s.step,
                if s.ok { "ok" } else { "FAILED" },
                s.detail
            );
            self.progress.node(Stage::Restart, &n.node.name, s.ok, line);
            let step = format!("{}:{}", s.service, s.step);
            self.record.step(&n.node.name, &step, s.ok, &s.detail);
        }
        if report.ok {
            if let Err(e) = self.journal.step(step::VERIFIED, &n.node.name, &version) {
                warn!(error = %e, node = n.node.name, "verified, but the journal does not say so");
            }
            Ok(())
        } else {
            Err(NodeFailure::from_report(&report))
        }
    }

    /// Never restarts onto files that are not the version being rolled out.
    /// The version on disk is enough here; the restart's verify probes.
    async fn precheck(&self, n: &FleetNode) -> Result<(), NodeFailure> {
        let status = n
            .transport
            .certificate_status(self.name, false)
            .await
            .map_err(|e| NodeFailure::transport("precheck", &e, false))?;
        if status.version == self.version && status.leaf_sha256 == self.expected && status.intact {
            return Ok(());
        }
        Err(NodeFailure {
            service: "-".into(),
            step: "precheck".into(),
            detail: format!(
                "node has version {} ({}) installed, not version {}: run `certfleet distribute {}` first",
                status.version,
                if status.intact {
                    "intact"
                } else {
                    &status.problem
                },
                self.version,
                self.name
            ),
            restarted: false,
            recorded: false,
        })
    }

    /// Puts a failed node back on its previous version and proves it
    /// serves it.
    async fn roll_back(&self, n: &FleetNode) -> Rollback {
        let name = &n.node.name;
        let rollback = match n.transport.rollback_certificate(self.name).await {
            Ok(previous) => {
                self.progress.node(
                    Stage::Rollback,
                    name,
                    true,
                    format!("reinstalled version {}", previous.version),
                );
                let restarted = n
                    .transport
                    .restart_services(self.name, &previous.leaf_sha256, true)
                    .await;
                match restarted {
                    Ok(report) => serves_previous(name, previous, &report),
                    Err(error) => Rollback::RestartFailed {
                        version: previous.version,
                        error,
                    },
                }
            }
            Err(e) => Rollback::ReinstallFailed(e),
        };
        let line = rollback.to_string();
        self.progress
            .node(Stage::Rollback, name, rollback.ok(), &line);
        self.record.step(name, "rollback", rollback.ok(), &line);
        if let Err(e) = self.journal.step(step::ROLLED_BACK, name, &line) {
            warn!(error = %e, node = name, "cannot journal the rollback");
        }
        rollback
    }
}

/// Whether every endpoint of `node` serves `previous` again after the
/// rollback's restart.
fn serves_previous(node: &str, previous: NodeInstall, report: &RestartReport) -> Rollback {
    let served: Vec<_> = report.services.iter().flat_map(|s| &s.served).collect();
    let all = !served.is_empty()
        && served
            .iter()
            .all(|s| s.result.as_deref() == Ok(previous.leaf_sha256.as_str()));
    if all {
        return Rollback::Restored {
            node: node.to_owned(),
            version: previous.version,
            endpoints: served.len(),
        };
    }
    Rollback::NotServed {
        node: node.to_owned(),
        version: previous.version,
        leaf_sha256: previous.leaf_sha256,
        seen: served
            .iter()
            .map(|s| match &s.result {
                Ok(sha) => format!("{} serves {sha}", s.address),
                Err(e) => format!("{}: {e}", s.address),
            })
            .collect(),
    }
}

/// Restarts the certificate's services batch by batch onto the live
/// version. The caller holds the certificate's lock.
pub async fn restart(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
) -> Result<Restarted, RolloutError> {
    restart_except(fleet, op, progress, &[]).await
}

/// Restarts like [`restart`], but leaves out the nodes in `verified`: a
/// rollout resumed after a crash (`recovery`) does not restart again the
/// nodes it had already proved serve the live version.
pub async fn restart_except(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
    verified: &[String],
) -> Result<Restarted, RolloutError> {
    let name = op.certificate();
    let spec = fleet.spec(name)?;
    let live = fleet.issued(name)?;
    let mut nodes = fleet.nodes(&spec)?;
    nodes.retain(|n| !verified.contains(&n.node.name));
    let journal = op.journal();
    journal.version(live.version)?;
    let record = Record::start(fleet.db(), name, live.version)?;
    let run = Run {
        name,
        version: live.version,
        expected: live.bundle.leaf_sha256_hex(),
        progress,
        record: &record,
        journal,
    };
    progress.begin(
        Stage::Restart,
        nodes.len(),
        format!(
            "version {} onto {} nodes, {} at a time",
            live.version,
            nodes.len(),
            spec.restart_batch
        ),
    );
    let mut done = Vec::with_capacity(nodes.len());
    let batches: Vec<&[FleetNode]> = nodes.chunks(spec.restart_batch).collect();
    if let Err((halt, untouched)) = run.batches(&batches, &mut done).await {
        record.finish(RolloutOutcome::Halted);
        warn!(certificate = name, node = %halt.node, "rollout halted");
        return Err(halt.into_error(untouched));
    }
    record.finish(RolloutOutcome::Ok);
    info!(
        certificate = name,
        version = live.version,
        nodes = done.len(),
        "rollout complete"
    );
    Ok(Restarted {
        version: live.version,
        nodes: done,
    })
}

/// Puts a rollout cut off by a crash back where it started (`recovery`,
/// with `recovery.rollout = "rollback"`): the version every node served
/// before is the one the nodes it never restarted still serve. That version
/// goes back onto every node's disk, and the nodes in `restarted` are
/// restarted onto it and proved to serve it. Says what it did.
pub async fn roll_back_nodes(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
    restarted: &[String],
) -> Result<String, RolloutError> {
    let name = op.certificate();
    let spec = fleet.spec(name)?;
    let nodes = fleet.nodes(&spec)?;
    let (back, untouched): (Vec<FleetNode>, Vec<FleetNode>) = nodes
        .into_iter()
        .partition(|n| restarted.contains(&n.node.name));
    if untouched.is_empty() {
        return Ok(
            "every node had already been restarted onto the live version; nothing to roll back"
                .to_owned(),
        );
    }
    let (version, expected) = served_before(fleet, name, &untouched).await?;
    let all: Vec<String> = back
        .iter()
        .chain(&untouched)
        .map(|n| n.node.name.clone())
        .collect();
    distribute(fleet, op, Some(version), &all, progress).await?;
    let record = Record::start(fleet.db(), name, version)?;
    let run = Run {
        name,
        version,
        expected,
        progress,
        record: &record,
        journal: op.journal(),
    };
    progress.begin(
        Stage::Restart,
        back.len(),
        match back.len() {
            1 => format!("rolling 1 node back onto version {version}"),
            n => format!("rolling {n} nodes back onto version {version}"),
        },
    );
    let mut done = Vec::new();
    if let Err((halt, _)) = run.batches(&[&back], &mut done).await {
        record.finish(RolloutOutcome::Halted);
        return Err(halt.into_error(Vec::new()));
    }
    record.finish(RolloutOutcome::Ok);
    for node in &done {
        let line = format!("serves version {version} again");
        if let Err(e) = op.journal().step(step::ROLLED_BACK, node, &line) {
            warn!(error = %e, node, "cannot journal the rollback");
        }
    }
    Ok(format!(
        "rolled back to version {version}, which the untouched nodes serve: on every node's disk, and {} restarted node(s) serve it again",
        done.len()
    ))
}

/// The version the `untouched` nodes all serve, and its leaf SHA-256,
/// found among the stored versions by what their endpoints answer.
async fn served_before(
    fleet: &Fleet,
    name: &str,
    untouched: &[FleetNode],
) -> Result<(u32, String), RolloutError> {
    let cannot = |why: String| RolloutError::NoRollbackTarget(why);
    let mut leaves = std::collections::BTreeSet::new();
    for n in untouched {
        let status = n
            .transport
            .certificate_status(name, true)
            .await
            .map_err(|e| cannot(format!("asking node {}: {e}", n.node.name)))?;
        for s in status.served {
            let leaf = s
                .result
                .map_err(|e| cannot(format!("node {} {}: {e}", n.node.name, s.address)))?;
            leaves.insert(leaf);
        }
    }
    let mut leaves = leaves.into_iter();
    let (Some(leaf), None) = (leaves.next(), leaves.next()) else {
        return Err(cannot(
            "the nodes the rollout had not restarted do not all serve one leaf".to_owned(),
        ));
    };
    let live = fleet.issued(name)?.version;
    for version in (1..=live).rev() {
        let Some((chain, _)) = fleet
            .store()
            .read_version(name, version)
            .map_err(FleetError::from)?
        else {
            continue;
        };
        let stored = certfleet_proto::bundle::Bundle::parse(&chain, None, &[]);
        if stored.is_ok_and(|b| b.leaf_sha256_hex() == leaf) {
            return Ok((version, leaf));
        }
    }
    Err(cannot(format!(
        "the untouched nodes serve leaf {leaf}, which is no stored version"
    )))
}

/// Distribute the live version, then restart, under one hold of the
/// certificate's lock.
pub async fn rollout(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
) -> Result<Restarted, RolloutError> {
    distribute(fleet, op, None, &[], progress).await?;
    restart(fleet, op, progress).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fleet::Operation;
    use crate::fleet::testing::{Bench, MAX_TEST_NODES, lock, node_name};
    use crate::transport::fake::{Call, Fail};

    /// The calls a node gets when it is restarted onto `expected`.
    fn restarted(expected: &str) -> Vec<Call> {
        vec![
            Call::Status { probe: false },
            Call::Restart {
                expected: expected.to_owned(),
                keep_going: false,
            },
        ]
    }

    /// The calls a node gets when its restart onto `new` fails and it is
    /// rolled back to `previous`.
    fn rolled_back(new: &str, previous: &str) -> Vec<Call> {
        let mut calls = restarted(new);
        calls.push(Call::Rollback);
        calls.push(Call::Restart {
            expected: previous.to_owned(),
            keep_going: true,
        });
        calls
    }

    /// The steps recorded for `node` in the latest rollout: (step, ok).
    fn steps(bench: &Bench, node: &str) -> Vec<(String, bool)> {
        let id = bench.db.latest_rollout("cn").unwrap().unwrap().id;
        let steps = bench.db.rollout_steps(id).unwrap();
        steps
            .into_iter()
            .filter(|s| s.node == node)
            .map(|s| (s.step, s.ok))
            .collect()
    }

    fn last_outcome(bench: &Bench) -> String {
        bench.db.last_rollout("cn").unwrap().unwrap()
    }

    async fn run_restart(fleet: &Fleet) -> Result<Restarted, RolloutError> {
        let op = lock(fleet, Operation::Restart);
        restart(fleet, &op, &Progress::discard()).await
    }

    #[tokio::test(start_paused = true)]
    async fn each_batch_is_prechecked_while_the_one_before_restarts() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        let rtt = Duration::from_millis(10);
        for i in 0..3 {
            bench.fakes.delay(&node_name(i), rtt);
        }
        let start = tokio::time::Instant::now();
        let done = run_restart(&fleet).await.unwrap();
        assert_eq!(done.nodes, ["n0", "n1", "n2"]);
        // n0's precheck, then three restarts, each with the next node's
        // precheck beside it: 4 round trips, not 6.
        assert_eq!(start.elapsed(), rtt * 4);
        for i in 0..3 {
            assert_eq!(bench.fakes.calls(&node_name(i)), restarted(&bench.v2.1));
        }
    }

    #[tokio::test]
    async fn every_node_count_and_batch_size_halts_at_the_failing_batch() {
        let bench = Bench::new();
        let (v1, v2) = (&bench.v1.1, &bench.v2.1);
        for nodes in 1..=MAX_TEST_NODES {
            let names: Vec<String> = (0..nodes).map(node_name).collect();
            for batch in 1..=4 {
                for failing in 0..nodes {
                    let case = format!("{nodes} nodes, batch {batch}, node {failing} fails");
                    let fleet = bench.fleet(nodes, batch);
                    bench.fakes.fail(&names[failing], Fail::Restart);
                    let result = run_restart(&fleet).await;
                    // The failing node's batch runs whole; the next one is
                    // only prechecked, later ones not touched at all.
                    let end = ((failing / batch + 1) * batch).min(nodes);
                    match result {
                        Err(RolloutError::Halted {
                            node,
                            step,
                            rollback,
                            untouched,
                            ..
                        }) => {
                            assert_eq!(node, names[failing], "{case}");
                            assert_eq!(step, "check", "{case}");
                            assert!(
                                rollback.to_string().contains("serves version 1 again"),
                                "{case}"
                            );
                            assert!(matches!(rollback, Rollback::Restored { .. }), "{case}");
                            assert_eq!(untouched, names[end..], "{case}");
                        }
                        other => panic!("{case}: {other:?}"),
                    }
                    for (i, name) in names.iter().enumerate() {
                        let (calls, installed) =
                            (bench.fakes.calls(name), bench.fakes.installed(name));
                        if i == failing {
                            assert_eq!(calls, rolled_back(v2, v1), "{case}: {name}");
                            assert_eq!(installed, bench.v1, "{case}: {name}");
                            assert!(steps(&bench, name).contains(&("rollback".into(), true)));
                        } else if i < end {
                            assert_eq!(calls, restarted(v2), "{case}: {name}");
                            assert_eq!(installed, bench.v2, "{case}: {name}");
                            assert!(steps(&bench, name).contains(&("web:verify".into(), true)));
                        } else if i < end + batch {
                            // Prechecked (read-only) while the failing batch
                            // restarted, never restarted.
                            assert_eq!(
                                calls,
                                [Call::Status { probe: false }],
                                "{case}: {name} was restarted"
                            );
                            assert_eq!(installed, bench.v2, "{case}: {name}");
                            assert_eq!(steps(&bench, name), [], "{case}: {name}");
                        } else {
                            assert_eq!(calls, [], "{case}: {name} was touched");
                            assert_eq!(steps(&bench, name), [], "{case}: {name}");
                        }
                    }
                    assert_eq!(last_outcome(&bench), "halted", "{case}");
                }
            }
        }
    }

    #[tokio::test]
    async fn every_node_count_and_batch_size_restarts_every_node_in_order() {
        let bench = Bench::new();
        for nodes in 1..=MAX_TEST_NODES {
            let names: Vec<String> = (0..nodes).map(node_name).collect();
            for batch in 1..=4 {
                let case = format!("{nodes} nodes, batch {batch}");
                let fleet = bench.fleet(nodes, batch);
                let restarted_nodes = run_restart(&fleet).await.unwrap();
                assert_eq!(restarted_nodes.version, bench.v2.0, "{case}");
                assert_eq!(restarted_nodes.nodes, names, "{case}");
                for name in &names {
                    assert_eq!(bench.fakes.calls(name), restarted(&bench.v2.1), "{case}");
                }
                assert_eq!(last_outcome(&bench), "ok", "{case}");
            }
        }
    }

    #[tokio::test]
    async fn every_failed_node_of_a_batch_is_rolled_back_and_the_first_reported() {
        let bench = Bench::new();
        let fleet = bench.fleet(5, 2);
        bench.fakes.fail("n2", Fail::Restart);
        bench.fakes.fail("n3", Fail::Restart);
        let err = run_restart(&fleet).await.unwrap_err();
        let RolloutError::Halted {
            node, untouched, ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(node, "n2");
        assert_eq!(untouched, &["n4"]);
        for n in ["n2", "n3"] {
            assert_eq!(bench.fakes.calls(n), rolled_back(&bench.v2.1, &bench.v1.1));
        }
        let text = err.to_string();
        assert!(
            text.starts_with("rollout halted at node n2: service web, step check: web.conf:1"),
            "{text}"
        );
        assert!(text.ends_with("untouched: n4"), "{text}");
    }

    #[tokio::test]
    async fn a_node_without_the_version_is_neither_restarted_nor_rolled_back() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        bench.fakes.fail("n1", Fail::Stale);
        let err = run_restart(&fleet).await.unwrap_err();
        let RolloutError::Halted {
            node,
            step,
            detail,
            rollback,
            untouched,
            ..
        } = err
        else {
            panic!("{err:?}");
        };
        assert_eq!((node.as_str(), step.as_str()), ("n1", "precheck"));
        assert!(
            detail.contains("run `certfleet distribute cn` first"),
            "{detail}"
        );
        assert!(rollback.to_string().starts_with("not needed"), "{rollback}");
        assert!(matches!(rollback, Rollback::NotNeeded));
        assert_eq!(untouched, ["n2"]);
        assert_eq!(bench.fakes.calls("n1"), [Call::Status { probe: false }]);
        assert_eq!(bench.fakes.installed("n1"), bench.v2);
    }

    #[tokio::test]
    async fn each_step_is_recorded_once() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        bench.fakes.fail("n0", Fail::Stale);
        run_restart(&fleet).await.unwrap_err();
        assert_eq!(steps(&bench, "n0"), [("precheck".into(), false)]);
        let fleet = bench.fleet(3, 1);
        bench.fakes.fail("n1", Fail::Restart);
        run_restart(&fleet).await.unwrap_err();
        assert_eq!(steps(&bench, "n0"), [("web:verify".into(), true)]);
        assert_eq!(
            steps(&bench, "n1"),
            [("web:check".into(), false), ("rollback".into(), true)]
        );
        assert_eq!(steps(&bench, "n2"), []);
    }

    #[tokio::test]
    async fn a_rollback_that_fails_is_reported_as_failed() {
        let bench = Bench::new();
        let fleet = bench.fleet(2, 2);
        bench.fakes.fail("n1", Fail::Restart);
        bench.fakes.fail("n1", Fail::Rollback);
        let err = run_restart(&fleet).await.unwrap_err();
        let RolloutError::Halted { rollback, .. } = err else {
            panic!("{err:?}");
        };
        assert!(
            rollback
                .to_string()
                .starts_with("FAILED to reinstall the previous version: refused"),
            "{rollback}"
        );
        assert!(!rollback.ok());
        assert!(steps(&bench, "n1").contains(&("rollback".into(), false)));
        assert_eq!(last_outcome(&bench), "halted");
    }

    #[tokio::test]
    async fn a_panicking_restart_is_recorded_as_failed_and_frees_the_certificate() {
        let bench = Bench::new();
        let fleet = Arc::new(bench.fleet(3, 1));
        bench.fakes.fail("n1", Fail::Panic);
        let op = lock(&fleet, Operation::Restart);
        let task = {
            let fleet = Arc::clone(&fleet);
            tokio::spawn(async move { restart(&fleet, &op, &Progress::discard()).await })
        };
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(last_outcome(&bench), "failed");
        assert_eq!(bench.fakes.calls("n2"), []);
        // The next operation may run.
        let op = lock(&fleet, Operation::Rollout);
        drop(op);
    }

    #[tokio::test]
    async fn rollout_restarts_nothing_when_distribution_fails() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        bench.fakes.fail("n1", Fail::Install);
        let op = lock(&fleet, Operation::Rollout);
        let err = rollout(&fleet, &op, &Progress::discard())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RolloutError::Distribute(DistributeError::Nodes { failed, .. })
                if failed.len() == 1 && failed[0].0 == "n1"),
            "{err:?}"
        );
        for n in ["n0", "n1", "n2"] {
            assert_eq!(bench.fakes.calls(n), [Call::Install(2)], "{n}");
        }
    }

    #[tokio::test]
    async fn rollout_distributes_then_restarts() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 2);
        let op = lock(&fleet, Operation::Rollout);
        let done = rollout(&fleet, &op, &Progress::discard()).await.unwrap();
        assert_eq!(done.nodes, ["n0", "n1", "n2"]);
        let mut expected = vec![Call::Install(2)];
        expected.extend(restarted(&bench.v2.1));
        for n in ["n0", "n1", "n2"] {
            assert_eq!(bench.fakes.calls(n), expected, "{n}");
        }
        assert_eq!(last_outcome(&bench), "ok");
    }
}
