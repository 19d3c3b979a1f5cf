//! Healing at start: what an operation left when the coordinator was
//! stopped in it (killed, crashed, the machine lost power).
//!
//! The journal (`crate::journal`) holds every operation that never got an
//! outcome, and how far each got. For each, oldest first, under its
//! certificate's lock and as an operation of its own ("recovery", shown by
//! `certfleet history`):
//!
//! 1. The interrupted operation is closed as "interrupted".
//! 2. Tokens it journaled as being placed come off every node.
//! 3. An order not yet stored is finished if the CA still allows it:
//!    a pending order is authorized again, a ready one finalized, a
//!    finalized one's certificate fetched again from the order URL and
//!    stored with the key saved before its CSR. An order the CA no longer
//!    allows is abandoned, and a new one placed once.
//! 4. A renewal then does what the certificate's `after_issue` says, or,
//!    when its `approval` policy holds that step back, asks for approval
//!    as the renewal would have.
//! 5. A distribution cut off is run again (installing is idempotent). A
//!    rollout cut off is resumed after the last verified node, or, with
//!    `recovery.rollout = "rollback"`, every node is put back on the
//!    version the nodes it had not restarted still serve.
//!
//! A recovery the coordinator was stopped in is healed as the operation it
//! was healing, with the steps of both ([`what_to_heal`]).

use std::sync::Arc;

use certfleet_proto::challenge::Token;
use tracing::{info, warn};

use crate::config::{AfterIssue, RolloutRecovery};
use crate::db::{JournalStep, OperationRecord};
use crate::fleet::{Fleet, Holder, Operation, OperationGuard};
use crate::issue::{Issuer, Start, pending_key_path};
use crate::journal::step;
use crate::progress::Progress;

/// Heals the operations in `interrupted` ([`interrupted`]); returns how many.
pub async fn recover(fleet: &Arc<Fleet>, issuer: &Issuer, interrupted: Interrupted) -> usize {
    let Interrupted(interrupted) = interrupted;
    if let Err(e) = fleet
        .db()
        .close_running_rollouts(certfleet_proto::clock::now())
    {
        warn!(error = %e, "cannot close the rollouts the coordinator was stopped in");
    }
    for record in &interrupted {
        recover_one(fleet, issuer, record).await;
    }
    interrupted.len()
}

/// The operations a stopped run left without an outcome, read before this
/// run serves any request: one an admin starts while recovery runs is
/// this run's own, never an interrupted one.
pub struct Interrupted(Vec<OperationRecord>);

/// Reads what the last run left (see [`Interrupted`]). Call it before the
/// admin API serves.
pub fn interrupted(fleet: &Fleet) -> Interrupted {
    match fleet.db().unfinished_operations() {
        Ok(ops) => Interrupted(ops),
        Err(e) => {
            warn!(error = %e, "cannot read the journal; nothing healed");
            Interrupted(Vec::new())
        }
    }
}

/// What the journal says an interrupted operation had done.
struct Trail<'a>(&'a [JournalStep]);

impl Trail<'_> {
    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.step == name)
    }

    /// The tokens placed and not yet removed.
    fn tokens_left(&self) -> Vec<Token> {
        let placing = self.0.iter().rposition(|s| s.step == step::PLACING);
        let removed = self.0.iter().rposition(|s| s.step == step::TOKENS_REMOVED);
        match (placing, removed) {
            (Some(p), r) if r.is_none_or(|r| r < p) => self.0[p]
                .detail
                .split_whitespace()
                .filter_map(|t| Token::parse(t).ok())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The nodes with `name` journaled for them.
    fn nodes(&self, name: &str) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .0
            .iter()
            .filter(|s| s.step == name && !s.node.is_empty())
            .map(|s| s.node.clone())
            .collect();
        nodes.dedup();
        nodes
    }

    fn last(&self) -> &str {
        self.0.last().map_or("its start", |s| s.step.as_str())
    }
}

async fn recover_one(fleet: &Arc<Fleet>, issuer: &Issuer, record: &OperationRecord) {
    let db = fleet.db();
    let steps = db.operation_steps(record.id).unwrap_or_default();
    let interrupted = format!(
        "interrupted after step \"{}\": the coordinator stopped",
        Trail(&steps).last()
    );
    if let Err(e) = db.finish_operation(record.id, &interrupted, certfleet_proto::clock::now()) {
        warn!(error = %e, operation = record.id, "cannot close the interrupted operation");
    }
    let holder = Holder::new(Operation::Recover, &record.certificate, None);
    let op = fleet.locks().acquire(holder, |_| {}).await;
    let (progress, mut events) = Progress::channel();
    let certificate = record.certificate.clone();
    let log = tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            info!(
                certificate,
                node = e.node,
                ok = e.ok,
                "recovery: {}",
                e.message
            );
        }
    });
    let (healed, steps) = what_to_heal(db, record, steps);
    let healer = Healer {
        fleet,
        issuer,
        op: &op,
        progress: &progress,
        record: &healed,
        trail: Trail(&steps),
    };
    // A node reached over SSH because its agent was down is journaled in
    // this recovery, as in an operation an admin runs.
    let healed_run =
        crate::ssh::record_fallbacks(op.journal().clone(), progress.clone(), healer.heal());
    let outcome = match healed_run.await {
        Ok(what) => {
            info!(certificate = record.certificate, operation = record.id, %what, "recovered");
            "ok".to_owned()
        }
        Err(e) => {
            warn!(certificate = record.certificate, operation = record.id, error = %e, "recovery failed");
            format!("failed: {e}")
        }
    };
    op.journal().finish(&outcome);
    drop(progress);
    let _ = log.await;
    // The key saved for the interrupted order is stored or useless now.
    let _ = std::fs::remove_file(pending_key_path(&fleet.config().state_dir, healed.id));
}

/// Recoveries followed back at most, in [`what_to_heal`].
const MAX_RECOVERIES: usize = 16;

/// What healing `record` means: `record` and its `steps`; or, for a
/// recovery the coordinator was stopped in, the operation that recovery
/// was healing (followed back through recoveries of recoveries), with
/// every step journaled for it since, oldest first. So a rollout whose
/// resumption was cut off in its turn is resumed again, after the nodes
/// either run verified, rather than only distributed.
fn what_to_heal(
    db: &crate::db::Db,
    record: &OperationRecord,
    mut steps: Vec<JournalStep>,
) -> (OperationRecord, Vec<JournalStep>) {
    let mut record = record.clone();
    for _ in 0..MAX_RECOVERIES {
        if record.kind != Operation::Recover.to_string() {
            break;
        }
        let Some(earlier) = healed_id(&steps).and_then(|id| db.operation(id).ok().flatten()) else {
            break;
        };
        let mut trail = db.operation_steps(earlier.id).unwrap_or_default();
        trail.append(&mut steps);
        (record, steps) = (earlier, trail);
    }
    (record, steps)
}

/// The operation a recovery healed, from the note it journals first
/// ([`healing_note`]).
fn healed_id(steps: &[JournalStep]) -> Option<i64> {
    let first = steps.iter().find(|s| s.step == step::RECOVERED)?;
    let rest = first.detail.strip_prefix("operation #")?;
    rest.split(' ').next()?.parse().ok()
}

/// A recovery's first note: which operation it heals, and where that one
/// stopped.
fn healing_note(r: &OperationRecord, last: &str) -> String {
    format!(
        "operation #{} ({} by {}, started {}) was interrupted after \"{last}\"",
        r.id,
        r.kind,
        r.by,
        certfleet_proto::clock::rfc3339(r.started),
    )
}

struct Healer<'a> {
    fleet: &'a Arc<Fleet>,
    issuer: &'a Issuer,
    op: &'a OperationGuard,
    progress: &'a Progress,
    record: &'a OperationRecord,
    trail: Trail<'a>,
}

impl Healer<'_> {
    /// Journals what recovery found or did.
    fn note(&self, what: &str) -> Result<(), String> {
        self.op
            .journal()
            .step(step::RECOVERED, "", what)
            .map_err(|e| e.to_string())
    }

    async fn heal(&self) -> Result<String, String> {
        let r = self.record;
        self.note(&healing_note(r, self.trail.last()))?;
        self.remove_tokens().await?;
        let kind = r.kind.as_str();
        let mut done = Vec::new();
        let is_order = kind == Operation::Issue.to_string() || kind == Operation::Renew.to_string();
        let mut new_version = false;
        if is_order && !self.trail.has(step::STORED) {
            new_version = self.finish_order().await?;
        }
        let renewal = kind == Operation::Renew.to_string();
        let spec = self.fleet.spec(&r.certificate).ok();
        let after = spec.as_ref().map(|s| s.after_issue).unwrap_or_default();
        // A renewal whose certificate needs a person's approval stops
        // where the policy says, as it would have without the crash.
        let held = if renewal {
            spec.as_deref().and_then(crate::approval::held_back)
        } else {
            None
        };
        let touched = self.trail.has(step::INSTALLING) || self.trail.has(step::RESTARTING);
        if touched {
            done.push(
                self.heal_rollout(kind, renewal && held.is_none(), after)
                    .await?,
            );
        }
        if renewal && (touched || new_version || self.trail.has(step::STORED)) {
            match held {
                Some(step) => done.push(self.request_approval(step).await?),
                None if !touched => done.push(self.after_issue(after).await?),
                None => {}
            }
        }
        done.retain(|d| !d.is_empty());
        Ok(if done.is_empty() {
            "nothing else to heal".to_owned()
        } else {
            done.join("; ")
        })
    }

    async fn remove_tokens(&self) -> Result<(), String> {
        let tokens = self.trail.tokens_left();
        if tokens.is_empty() {
            return Ok(());
        }
        let spec = self
            .fleet
            .spec(&self.record.certificate)
            .map_err(|e| e.to_string())?;
        let nodes = self.fleet.nodes(&spec).map_err(|e| e.to_string())?;
        crate::challenge::remove_all(&nodes, &tokens, spec.fan_out(), self.progress).await;
        self.op
            .journal()
            .step(
                step::TOKENS_REMOVED,
                "",
                &format!("{} token(s) from {} node(s)", tokens.len(), nodes.len()),
            )
            .map_err(|e| e.to_string())
    }

    /// Finishes the interrupted order, or abandons it and places a new one
    /// once. True when a new version was stored.
    async fn finish_order(&self) -> Result<bool, String> {
        let r = self.record;
        if r.order_url.is_empty() {
            self.note("no order had been created; nothing to finish")?;
            return Ok(false);
        }
        let key_path = pending_key_path(&self.fleet.config().state_dir, r.id);
        let key_pem = std::fs::read_to_string(&key_path).ok();
        let start = Start::Resume {
            order_url: r.order_url.clone(),
            key_pem,
        };
        match self.issuer.order(self.op, self.progress, start).await {
            Ok(issued) => {
                self.note(&format!(
                    "finished order {}: version {} stored",
                    r.order_url, issued.stored.version
                ))?;
                Ok(true)
            }
            Err(failed) => {
                self.note(&format!(
                    "abandoned order {}: {}; placing a new order once",
                    r.order_url, failed.error
                ))?;
                match self.issuer.issue(self.op, self.progress).await {
                    Ok(issued) => {
                        self.note(&format!(
                            "new order {}: version {} stored",
                            issued.order_url, issued.stored.version
                        ))?;
                        Ok(true)
                    }
                    Err(failed) => Err(format!("the new order failed too: {}", failed.error)),
                }
            }
        }
    }

    /// Asks for the approval the certificate's policy requires before
    /// `step`, for the live version.
    async fn request_approval(&self, step: crate::approval::Step) -> Result<String, String> {
        let live = self
            .fleet
            .issued(&self.record.certificate)
            .map_err(|e| e.to_string())?;
        let created = crate::approval::request(self.fleet, self.op, self.progress, &live, step)
            .await
            .map_err(|e| e.to_string())?;
        let what = format!(
            "approval requested ({}) before: {}",
            created.request.id,
            step.describe(live.version)
        );
        self.note(&what)?;
        Ok(what)
    }

    /// What a renewal does once its version is stored.
    async fn after_issue(&self, after: AfterIssue) -> Result<String, String> {
        let (fleet, op, progress) = (self.fleet.as_ref(), self.op, self.progress);
        match after {
            AfterIssue::None => Ok(String::new()),
            AfterIssue::Distribute => crate::distribute::distribute(fleet, op, None, &[], progress)
                .await
                .map(|d| format!("distributed version {}", d.version))
                .map_err(|e| e.to_string()),
            AfterIssue::Rollout => crate::rollout::rollout(fleet, op, progress)
                .await
                .map(|d| format!("rolled out version {}", d.version))
                .map_err(|e| e.to_string()),
        }
    }

    /// A distribution or rollout cut off: run again, resumed after the
    /// verified nodes, or rolled back, as `recovery.rollout` says.
    async fn heal_rollout(
        &self,
        kind: &str,
        renewal: bool,
        after: AfterIssue,
    ) -> Result<String, String> {
        let (fleet, op, progress) = (self.fleet.as_ref(), self.op, self.progress);
        let restarts = kind == Operation::Rollout.to_string()
            || kind == Operation::Restart.to_string()
            || (renewal && after == AfterIssue::Rollout);
        let restarted = self.trail.nodes(step::RESTARTING);
        let policy = fleet.config().recovery.rollout;
        if restarts && policy == RolloutRecovery::Rollback {
            let what = crate::rollout::roll_back_nodes(fleet, op, progress, &restarted)
                .await
                .map_err(|e| e.to_string())?;
            self.note(&what)?;
            return Ok(what);
        }
        if kind != Operation::Restart.to_string() {
            let version = (kind == Operation::Distribute.to_string() && self.record.version > 0)
                .then_some(self.record.version);
            crate::distribute::distribute(fleet, op, version, &[], progress)
                .await
                .map_err(|e| e.to_string())?;
        }
        if !restarts {
            let what = "distributed again to every node".to_owned();
            self.note(&what)?;
            return Ok(what);
        }
        let verified = self.trail.nodes(step::VERIFIED);
        let done = crate::rollout::restart_except(fleet, op, progress, &verified)
            .await
            .map_err(|e| e.to_string())?;
        let what = format!(
            "resumed the rollout of version {}: {} node(s) were verified before the stop, {} restarted now",
            done.version,
            verified.len(),
            done.nodes.len()
        );
        self.note(&what)?;
        Ok(what)
    }
}
