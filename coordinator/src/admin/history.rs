//! `certfleet history`: a certificate's journaled operations, newest first.

use certfleet_proto::pb;
use tonic::Status;

use super::convert::refusal;
use crate::db::{JournalStep, OperationRecord};
use crate::fleet::Fleet;

/// Operations shown when the request does not say how many.
const DEFAULT_LIMIT: u32 = 20;
/// The most operations one request returns.
const MAX_LIMIT: u32 = 1000;

/// `certificate`'s latest operations with their steps.
pub(super) fn history(
    fleet: &Fleet,
    r: &pb::HistoryRequest,
) -> Result<pb::HistoryResponse, Status> {
    fleet
        .spec(&r.certificate)
        .map_err(|e| refusal(e.kind(), e))?;
    let limit = match r.limit {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    };
    let db = fleet.db();
    let records = db
        .operations(&r.certificate, limit)
        .map_err(|e| refusal(e.kind(), e))?;
    let mut operations = Vec::with_capacity(records.len());
    for record in records {
        let steps = db
            .operation_steps(record.id)
            .map_err(|e| refusal(e.kind(), e))?;
        operations.push(operation_to_pb(record, steps));
    }
    Ok(pb::HistoryResponse { operations })
}

fn operation_to_pb(r: OperationRecord, steps: Vec<JournalStep>) -> pb::Operation {
    pb::Operation {
        id: r.id,
        kind: r.kind,
        by: r.by,
        started_unix: r.started,
        finished_unix: r.finished.unwrap_or(0),
        // No outcome while the coordinator runs: it is under way (one a
        // stopped coordinator left is closed as interrupted at start).
        outcome: r.outcome.unwrap_or_else(|| "running".to_owned()),
        version: r.version,
        order_url: r.order_url,
        steps: steps
            .into_iter()
            .map(|s| pb::OperationStep {
                at_unix: s.at,
                step: s.step,
                node: s.node,
                detail: s.detail,
            })
            .collect(),
    }
}
