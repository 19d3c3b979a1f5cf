//! The coordinator's results as the admin API sends them: domain types to
//! protobuf.
//!
//! A failure's [`ErrorKind`] becomes the wire's `Failure.kind` in
//! [`kind_name`], and a refused request's status code in [`refusal`]: one
//! place each, whatever error the kind came from.

use std::fmt::Display;

use certfleet_proto::pb;
use tonic::Status;

use crate::db::{NodeRecord, RolloutStep};
use crate::distribute::{DistributeError, Distributed};
use crate::error::ErrorKind;
use crate::issue::{Failed, Issued};
use crate::progress::{Event, Stage};
use crate::rollout::{Restarted, RolloutError};
use crate::status::{FleetStatus, NodeStatus};
use crate::store::Stored;

/// A kind as the wire names it (`Failure.kind`). The CLI exits 2 for
/// "config", as for every usage or config error.
pub(super) fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Config => "config",
        ErrorKind::Busy => "busy",
        ErrorKind::Node => "node",
        ErrorKind::SelfCheck => "self_check",
        ErrorKind::Acme => "acme",
        ErrorKind::Certificate => "certificate",
        ErrorKind::Store => "store",
        ErrorKind::Rollout => "rollout",
        ErrorKind::Internal => "internal",
        ErrorKind::RateLimited => "rate_limited",
    }
}

/// A request refused before it did anything, with a status code that
/// keeps the kind: the CLI exits 2 for FAILED_PRECONDITION, as for a
/// config error.
pub(super) fn refusal(kind: ErrorKind, error: impl Display) -> Status {
    let code = match kind {
        ErrorKind::Config => tonic::Code::FailedPrecondition,
        ErrorKind::Busy | ErrorKind::Rollout => tonic::Code::Aborted,
        ErrorKind::Node | ErrorKind::SelfCheck | ErrorKind::Acme | ErrorKind::Certificate => {
            tonic::Code::Unavailable
        }
        ErrorKind::Store | ErrorKind::Internal => tonic::Code::Internal,
        ErrorKind::RateLimited => tonic::Code::ResourceExhausted,
    };
    Status::new(code, error.to_string())
}

/// The last event of an operation that failed; `nodes` are the nodes at
/// fault, if any.
pub(super) fn failure_event(kind: ErrorKind, nodes: &[&str], message: String) -> pb::IssueEvent {
    let node = nodes.join(",");
    pb::IssueEvent {
        stage: pb::Stage::Failed.into(),
        node: node.clone(),
        ok: false,
        message: message.clone(),
        failure: Some(pb::Failure {
            kind: kind_name(kind).into(),
            message,
            node,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The last event of an operation that succeeded.
fn done_event(message: String) -> pb::IssueEvent {
    pb::IssueEvent {
        stage: pb::Stage::Done.into(),
        ok: true,
        message,
        ..Default::default()
    }
}

fn stage_to_pb(stage: Stage) -> pb::Stage {
    match stage {
        Stage::Order => pb::Stage::Order,
        Stage::Placement => pb::Stage::Placement,
        Stage::SelfCheck => pb::Stage::SelfCheck,
        Stage::Validation => pb::Stage::Validation,
        Stage::Finalize => pb::Stage::Finalize,
        Stage::Store => pb::Stage::Store,
        Stage::Cleanup => pb::Stage::Cleanup,
        Stage::Distribute => pb::Stage::Distribute,
        Stage::Restart => pb::Stage::Restart,
        Stage::Rollback => pb::Stage::Rollback,
    }
}

pub(super) fn event_to_pb(event: Event) -> pb::IssueEvent {
    pb::IssueEvent {
        stage: stage_to_pb(event.stage).into(),
        node: event.node.unwrap_or_default(),
        ok: event.ok,
        message: event.message,
        issued: None,
        failure: None,
        nodes: event
            .nodes
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

pub(super) fn stored_to_pb(stored: &Stored) -> pb::Certificate {
    let now = certfleet_proto::clock::now();
    let bundle = &stored.bundle;
    pb::Certificate {
        name: stored.name.clone(),
        version: stored.version,
        sans: bundle.sans.clone(),
        serial: bundle.serial.clone(),
        not_after_unix: bundle.not_after,
        days_left: days_left(bundle.not_after, now),
        sha256: bundle.leaf_sha256_hex(),
        live_dir: stored.live_dir.display().to_string(),
        order_url: String::new(),
        timings: None,
        ..Default::default()
    }
}

/// Whole days from `now` until `not_after` (negative once it passed).
fn days_left(not_after: i64, now: i64) -> i64 {
    (not_after - now).div_euclid(86_400)
}

/// The last event of an order that succeeded.
pub(super) fn issued_to_pb(issued: &Issued) -> pb::IssueEvent {
    let t = &issued.timings;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let mut certificate = stored_to_pb(&issued.stored);
    certificate.order_url = issued.order_url.clone();
    certificate.timings = Some(pb::Timings {
        total_ms: ms(t.total),
        ca_ms: ms(t.ca),
        placement_ms: ms(t.placement),
        cleanup_ms: ms(t.cleanup),
    });
    pb::IssueEvent {
        issued: Some(certificate),
        ..done_event(format!(
            "issued {} version {} ({} ms)",
            issued.stored.name,
            issued.stored.version,
            ms(t.total)
        ))
    }
}

/// The last event of an order that failed: the CA's problem document,
/// when it refused, goes along unchanged.
pub(super) fn issue_failed_to_pb(failed: &Failed) -> pb::IssueEvent {
    let error = &failed.error;
    let nodes: Vec<&str> = match error {
        crate::issue::IssueError::Nodes { errors, .. } => errors.iter().map(|e| e.node()).collect(),
        _ => Vec::new(),
    };
    let mut event = failure_event(error.kind(), &nodes, error.to_string());
    if let Some(f) = &mut event.failure {
        let problem = error.problem();
        f.acme_type = problem.and_then(|p| p.r#type.clone()).unwrap_or_default();
        f.acme_detail = problem.and_then(|p| p.detail.clone()).unwrap_or_default();
        f.order_url = failed.order_url.clone().unwrap_or_default();
    }
    event
}

pub(super) fn distributed_to_pb(
    name: &str,
    result: Result<Distributed, DistributeError>,
) -> pb::IssueEvent {
    match result {
        Ok(d) => {
            let changed = d.nodes.iter().filter(|(_, i)| i.changed).count();
            done_event(format!(
                "{name} version {} is on all {} nodes ({changed} changed, {} already had it)",
                d.version,
                d.nodes.len(),
                d.nodes.len() - changed
            ))
        }
        Err(e) => failure_event(e.kind(), &e.nodes(), e.to_string()),
    }
}

pub(super) fn restarted_to_pb(
    name: &str,
    result: Result<Restarted, RolloutError>,
) -> pb::IssueEvent {
    match result {
        Ok(r) => done_event(format!(
            "{name} version {} is served by all {} nodes: {}",
            r.version,
            r.nodes.len(),
            r.nodes.join(", ")
        )),
        Err(e) => failure_event(e.kind(), &e.nodes(), e.to_string()),
    }
}

/// `certfleet status`'s answer; days are counted from `now`.
pub(super) fn status_to_pb(status: FleetStatus, now: i64) -> pb::StatusResponse {
    let (live_version, live_sha256) = status.live.unwrap_or_default();
    let (last_rollout, last_rollout_version, last_rollout_steps) = match status.last_rollout {
        Some(r) => (
            r.summary.state().to_owned(),
            r.summary.version,
            r.steps.into_iter().map(step_to_pb).collect(),
        ),
        None => Default::default(),
    };
    pb::StatusResponse {
        live_version,
        live_sha256,
        last_rollout,
        last_rollout_version,
        last_rollout_steps,
        nodes: status
            .nodes
            .into_iter()
            .map(|n| node_status_to_pb(n, now))
            .collect(),
    }
}

fn step_to_pb(step: RolloutStep) -> pb::RolloutStep {
    pb::RolloutStep {
        node: step.node,
        step: step.step,
        ok: step.ok,
        detail: step.detail,
    }
}

fn node_status_to_pb(n: NodeStatus, now: i64) -> pb::NodeCertificateStatus {
    let (recorded_version, recorded_unix) = n.recorded.map_or((0, 0), |r| (r.version, r.at));
    let answered = match n.result {
        Ok(c) => pb::NodeCertificateStatus {
            version: c.version,
            leaf_sha256: c.leaf_sha256,
            intact: c.intact,
            days_left: if c.not_after == 0 {
                0
            } else {
                days_left(c.not_after, now)
            },
            served: c
                .served
                .into_iter()
                .map(|s| pb::ServedEndpoint::from_probe(s.service, s.address, s.result))
                .collect(),
            problem: c.problem,
            ..Default::default()
        },
        Err(error) => pb::NodeCertificateStatus {
            error,
            ..Default::default()
        },
    };
    pb::NodeCertificateStatus {
        node: n.node,
        recorded_version,
        recorded_unix,
        ..answered
    }
}

pub(super) fn node_to_pb(n: NodeRecord) -> pb::NodeInfo {
    pb::NodeInfo {
        name: n.name,
        agent: n.agent,
        state: n.state.name().to_owned(),
        cert_not_after_unix: n.cert_not_after,
        last_contact_unix: n.last_contact,
        http01: n.http01,
        transport: n.reach.transport.as_str().to_owned(),
        ssh: n.reach.ssh_column(),
    }
}

/// What the renewal scheduler plans for a certificate, into its listing.
pub(super) fn renewal_to_pb(c: &mut pb::Certificate, e: &crate::renewal::Entry) {
    use crate::renewal::Outcome;
    c.next_renewal_unix = if e.running { 0 } else { e.next };
    c.renewal_running = e.running;
    if let Some((at, outcome)) = &e.last {
        c.last_renewal_unix = *at;
        c.last_renewal_outcome = match outcome {
            Outcome::Renewed => "renewed".into(),
            Outcome::RenewedButNotRolledOut(why) => format!("renewed, but {why}"),
            Outcome::Failed(why) => format!("failed: {why}"),
        };
    }
}

/// The last event of a delete.
pub(super) fn deleted_to_pb(
    name: &str,
    result: Result<crate::manage::Deleted, crate::manage::ManageError>,
) -> pb::IssueEvent {
    match result {
        Ok(d) => {
            let store = match d.last_version {
                Some(v) => format!("deleted {name} (versions up to {v}) from the store"),
                None => format!("the store held nothing of {name}"),
            };
            let nodes = if d.nodes.is_empty() {
                "; files on nodes were left in place".to_owned()
            } else {
                let kept: usize = d.nodes.iter().map(|(_, r)| r.kept.len()).sum();
                format!(
                    "; removed its files from {} nodes{}",
                    d.nodes.len(),
                    match kept {
                        0 => String::new(),
                        k => format!(" ({k} changed files kept, see above)"),
                    }
                )
            };
            done_event(format!("{store}{nodes}"))
        }
        Err(e) => failure_event(e.kind(), &e.nodes(), e.to_string()),
    }
}

/// The ACME account as `certfleet account` shows it. Never the key.
pub(super) fn account_to_pb(a: crate::acme::AccountSummary) -> pb::AccountInfo {
    pb::AccountInfo {
        url: a.url,
        directory: a.directory,
        contacts: a.contacts,
        status: a.status,
        key_thumbprint: a.key_thumbprint,
    }
}

/// The last event of a dry run: what the staging CA issued, and that
/// nothing was kept.
pub(super) fn dry_run_to_pb(name: &str, dry: &crate::issue::DryRun) -> pb::IssueEvent {
    done_event(format!(
        "dry run of {name} succeeded: the staging CA issued serial {} (order {}) and the chain checks out; nothing was stored, distributed or made live ({} ms)",
        dry.bundle.serial,
        dry.order_url,
        dry.timings.total.as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::db::NodeState;
    use crate::fleet::FleetError;
    use crate::store::StoreError;

    #[test]
    fn every_kind_has_its_own_name_on_the_wire() {
        let names: HashSet<&str> = ErrorKind::ALL.into_iter().map(kind_name).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        // The names clients already match on.
        for (kind, name) in [
            (ErrorKind::Config, "config"),
            (ErrorKind::Busy, "busy"),
            (ErrorKind::Node, "node"),
            (ErrorKind::SelfCheck, "self_check"),
            (ErrorKind::Acme, "acme"),
            (ErrorKind::Certificate, "certificate"),
            (ErrorKind::Store, "store"),
            (ErrorKind::Rollout, "rollout"),
            (ErrorKind::Internal, "internal"),
            (ErrorKind::RateLimited, "rate_limited"),
        ] {
            assert_eq!(kind_name(kind), name);
        }
    }

    #[test]
    fn only_a_config_error_is_refused_as_a_usage_error() {
        for kind in ErrorKind::ALL {
            let code = refusal(kind, "x").code();
            let usage = matches!(
                code,
                tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
            );
            assert_eq!(usage, kind == ErrorKind::Config, "{kind:?}: {code:?}");
        }
    }

    fn failure(event: &pb::IssueEvent) -> (&str, &str) {
        let f = event.failure.as_ref().unwrap();
        (f.kind.as_str(), f.node.as_str())
    }

    #[test]
    fn a_failed_operation_carries_its_kind_and_the_nodes_at_fault() {
        let nodes = DistributeError::Nodes {
            failed: vec![
                ("n0".into(), "unreachable".into()),
                ("n2".into(), "refused".into()),
            ],
            succeeded: 1,
        };
        let event = distributed_to_pb("cn", Err(nodes));
        assert_eq!(event.stage(), pb::Stage::Failed);
        assert_eq!(failure(&event), ("node", "n0,n2"));
        let not_issued = DistributeError::Fleet(FleetError::NotIssued("cn".into()));
        let event = distributed_to_pb("cn", Err(not_issued));
        assert_eq!(failure(&event), ("config", ""));
        // A distribution the store fails is the store's failure, in a
        // rollout too.
        let store = || {
            DistributeError::Store(StoreError {
                path: "/var/lib/certfleet/archive/cn".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            })
        };
        assert_eq!(
            failure(&distributed_to_pb("cn", Err(store()))),
            ("store", "")
        );
        let event = restarted_to_pb("cn", Err(RolloutError::Distribute(store())));
        assert_eq!(failure(&event), ("store", ""));
        let unknown = RolloutError::Fleet(FleetError::UnknownNode {
            cert: "cn".into(),
            node: "cn-nope-1".into(),
        });
        assert_eq!(
            failure(&restarted_to_pb("cn", Err(unknown))),
            ("config", "")
        );
    }

    #[test]
    fn a_node_state_goes_on_the_wire_by_name() {
        let record = NodeRecord {
            name: "n0".into(),
            agent: "127.0.0.2:7443".into(),
            http01: "127.0.0.2".into(),
            state: NodeState::Active,
            cert_not_after: 0,
            last_contact: 0,
            reach: Default::default(),
        };
        assert_eq!(node_to_pb(record).state, "active");
    }
}
