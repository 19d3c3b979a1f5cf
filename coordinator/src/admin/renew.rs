//! `certfleet renew` and the options `issue` shares with it: which
//! certificates are due, and one event stream for all of them.
//!
//! Each certificate runs exactly as the scheduler's renewal does
//! (`renewal::FleetRenewer::renew_under`: the order, then its
//! `after_issue`), under its own lock, one after the other, so the stream
//! reads as one certificate's steps after another's. Each certificate's
//! part opens with an event naming it and ends with its own DONE or
//! FAILED event; every message of its events starts with its name. A
//! certificate that is not due says so in one step event and orders
//! nothing.

use std::sync::Arc;

use certfleet_proto::clock::rfc3339;
use certfleet_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::convert;
use super::stream::{EventStream, stream_operation};
use crate::error::ErrorKind;
use crate::fleet::{Fleet, Holder, Operation};
use crate::issue::{IssueError, IssueOptions};
use crate::renewal::{FleetRenewer, FleetScheduler, RenewRun, Validity};

/// Events buffered for a slow client before the renewals wait on it.
const EVENT_BUFFER: usize = 256;

/// The options of an `issue` or `renew` request, refused as a config
/// error when a dry run is asked for and no staging CA is configured.
pub(super) fn options(fleet: &Fleet, force: bool, dry_run: bool) -> Result<IssueOptions, Status> {
    if dry_run && fleet.config().acme.staging_directory.is_none() {
        let e = IssueError::NoStagingDirectory;
        return Err(convert::refusal(e.kind(), e));
    }
    Ok(IssueOptions { force, dry_run })
}

/// The lock an order with `options` takes: a dry run is journaled as one,
/// so the rate-limit guard never counts it.
pub(super) fn operation(options: IssueOptions, otherwise: Operation) -> Operation {
    if options.dry_run {
        Operation::DryRun
    } else {
        otherwise
    }
}

/// When `name` comes due, if that is after `now`; `None` when it is due
/// (or has no live version yet, so renewing it is its first order). The
/// scheduler's plan when it runs (it knows the CA's ARI window and a
/// retry's backoff), else the configured share of lifetime without jitter.
pub(super) fn not_due_until(
    fleet: &Fleet,
    renewals: Option<&FleetScheduler>,
    name: &str,
    now: i64,
) -> Option<i64> {
    let planned = renewals.and_then(|s| s.entries().into_iter().find(|e| e.name == name));
    let next = match planned {
        Some(e) if !e.running => e.next,
        Some(_) => return None,
        None => {
            let live = fleet.live(name).ok()??;
            let validity = Validity {
                not_before: live.bundle.not_before,
                not_after: live.bundle.not_after,
            };
            fleet.config().renewal.policy.due_at(validity, None, 0.0)
        }
    };
    (next > now).then_some(next)
}

/// What one certificate of a `renew` request does.
pub(super) struct Plan {
    pub name: String,
    /// `Some(t)`: not due until `t`, so nothing is ordered.
    pub not_due_until: Option<i64>,
}

/// Runs `plans` one after the other, each under its own lock, as one
/// stream; wakes the scheduler afterwards so it plans from the new
/// versions.
pub(super) fn renew_all(
    renewer: FleetRenewer,
    renewals: Option<Arc<FleetScheduler>>,
    plans: Vec<Plan>,
    options: IssueOptions,
    uid: Option<u32>,
    wait: bool,
) -> EventStream {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let renewer = Arc::new(renewer);
    tokio::spawn(async move {
        for plan in plans {
            let name = plan.name;
            if let Some(until) = plan.not_due_until {
                let message = format!(
                    "{name}: not due until {}; nothing ordered (--force renews it now)",
                    rfc3339(until)
                );
                let _ = tx.send(Ok(step(message))).await;
                continue;
            }
            let why = match (options.dry_run, options.force) {
                (true, _) => "dry run against the staging CA",
                (false, true) => "forced",
                (false, false) => "due",
            };
            let _ = tx.send(Ok(step(format!("{name}: renewing ({why})")))).await;
            let holder = Holder::new(operation(options, Operation::Renew), &name, uid);
            let locks = renewer.fleet.locks().clone();
            let this = Arc::clone(&renewer);
            let mut events =
                stream_operation(locks, holder, wait, move |op, progress| async move {
                    let run = this.renew_under(&op, &progress, options).await;
                    renew_run_to_pb(op.certificate(), run)
                });
            while let Some(event) = events.next().await {
                let event = event.map(|e| prefixed(&name, e));
                if tx.send(event).await.is_err() {
                    // The client hung up: the certificate under way
                    // finishes (stream_operation keeps it running), the
                    // ones after it are not started.
                    return;
                }
            }
            if let Some(s) = &renewals {
                s.wake();
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A step event that concerns no node and no stage of an order.
fn step(message: String) -> pb::IssueEvent {
    pb::IssueEvent {
        stage: pb::Stage::Order.into(),
        ok: true,
        message,
        ..Default::default()
    }
}

/// `event` with its message naming the certificate it belongs to.
fn prefixed(name: &str, mut event: pb::IssueEvent) -> pb::IssueEvent {
    event.message = format!("{name}: {}", event.message);
    if let Some(f) = &mut event.failure {
        f.message = format!("{name}: {}", f.message);
    }
    event
}

/// The last event of one certificate's renewal.
pub(super) fn renew_run_to_pb(name: &str, run: RenewRun) -> pb::IssueEvent {
    let problem = run.problem();
    match run {
        RenewRun::Failed(failed) => convert::issue_failed_to_pb(&failed),
        RenewRun::DryRun(dry) => convert::dry_run_to_pb(name, &dry),
        RenewRun::Issued {
            issued,
            problem: None,
            ..
        } => convert::issued_to_pb(&issued),
        RenewRun::Issued {
            problem: Some((kind, _)),
            ..
        } => convert::failure_event(kind, &[], problem.unwrap_or_default()),
    }
}

/// The error kind of a renew request naming no certificate while none is
/// configured.
pub(super) fn nothing_configured() -> Status {
    convert::refusal(
        ErrorKind::Config,
        "no certificates are configured: add a [[certificates]] section to the coordinator's config",
    )
}
