//! `certfleet approvals`, `approve` and `reject` (`crate::approval`), and
//! the approval a manual `issue` asks for.
//!
//! Approving streams the held step's progress like `rollout` does, under
//! the certificate's lock; while another operation holds it, approving
//! waits (the decision is made already, so it must not fail as busy).

use std::sync::Arc;

use certfleet_proto::pb;
use tonic::Status;

use super::convert::{self, failure_event, refusal};
use super::stream::{EventStream, stream_operation};
use crate::approval::{self, ApprovalError, Decider, Ran, Request, Verdict};
use crate::fleet::{Fleet, Holder, OperationGuard};
use crate::progress::Progress;
use crate::store::Stored;

/// Decided requests `approvals` shows unless asked for another number.
const DEFAULT_RECENT: u32 = 10;

pub(super) fn list(fleet: &Fleet, recent: u32) -> Result<pb::ListApprovalsResponse, Status> {
    let recent = if recent == 0 { DEFAULT_RECENT } else { recent };
    let approvals = fleet
        .db()
        .approvals(recent)
        .map_err(|e| refusal(e.kind(), e))?
        .iter()
        .map(request_to_pb)
        .collect();
    Ok(pb::ListApprovalsResponse { approvals })
}

/// Approves `id` for `uid`, then runs its step under the lock, streaming.
pub(super) fn approve(
    fleet: Arc<Fleet>,
    r: pb::DecideApprovalRequest,
    uid: Option<u32>,
) -> Result<EventStream, Status> {
    let decider = Decider::Admin(uid);
    let request = approval::decide(&fleet, &r.id, &decider, Verdict::Approve, &r.comment, None)
        .map_err(|e| refusal(e.kind(), e))?;
    let holder = Holder::new(request.step.operation(), &request.certificate, uid);
    let locks = fleet.locks().clone();
    Ok(stream_operation(
        locks,
        holder,
        true,
        move |op, progress| async move {
            let ran = approval::run_approved(&fleet, &op, &progress, &request).await;
            ran_to_pb(&request.certificate, ran)
        },
    ))
}

pub(super) fn reject(
    fleet: &Fleet,
    r: pb::DecideApprovalRequest,
    uid: Option<u32>,
) -> Result<pb::DecideApprovalResponse, Status> {
    let request = approval::decide(
        fleet,
        &r.id,
        &Decider::Admin(uid),
        Verdict::Reject,
        &r.comment,
        None,
    )
    .map_err(|e| refusal(e.kind(), e))?;
    Ok(pb::DecideApprovalResponse {
        approval: Some(request_to_pb(&request)),
    })
}

/// After a manual issue stored `stored`: asks for approval of the step the
/// certificate's policy holds back, as its renewal would; `None` when
/// nothing is held back or when that worked, else the failure event.
pub(super) async fn after_issue(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
    stored: &Stored,
) -> Option<pb::IssueEvent> {
    let spec = fleet.spec(op.certificate()).ok()?;
    let step = approval::held_back(&spec)?;
    let e = approval::request(fleet, op, progress, stored, step)
        .await
        .err()?;
    Some(failure_event(
        e.kind(),
        &e.nodes(),
        format!(
            "version {} stored, but asking for approval failed: {e}",
            stored.version
        ),
    ))
}

/// The last event of an approved step.
fn ran_to_pb(name: &str, ran: Result<Ran, ApprovalError>) -> pb::IssueEvent {
    match ran {
        Ok(Ran::Distributed(d)) => convert::distributed_to_pb(name, Ok(d)),
        Ok(Ran::Restarted(r)) => convert::restarted_to_pb(name, Ok(r)),
        Err(ApprovalError::Distribute(e)) => convert::distributed_to_pb(name, Err(*e)),
        Err(ApprovalError::Rollout(e)) => convert::restarted_to_pb(name, Err(*e)),
        Err(e) => failure_event(e.kind(), &e.nodes(), e.to_string()),
    }
}

fn request_to_pb(r: &Request) -> pb::Approval {
    pb::Approval {
        id: r.id.clone(),
        certificate: r.certificate.clone(),
        version: r.version,
        serial: r.serial.clone(),
        names: r.names.clone(),
        not_after_unix: r.not_after,
        step: r.step.name().to_owned(),
        batches: r
            .batches
            .iter()
            .map(|b| pb::ApprovalBatch { nodes: b.clone() })
            .collect(),
        created_unix: r.created,
        expires_unix: r.expires,
        reminded: r.reminded,
        state: r.state.name().to_owned(),
        decided_by: r.decided_by.clone(),
        decided_unix: r.decided,
        comment: r.comment.clone(),
        outcome: r.outcome.clone(),
    }
}
