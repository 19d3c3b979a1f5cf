//! Running an operation (issue, distribute, restart, rollout) under its
//! certificate's lock, and streaming its progress to the client.
//!
//! Once started, an operation keeps running if the client hangs up:
//! abandoning an order half-way would leave tokens placed and an
//! authorization pending for nothing. While another operation holds the
//! lock, a request fails as busy, naming the holder, or with `wait` waits
//! for it.

use std::future::Future;

use certfleet_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::convert::{event_to_pb, failure_event};
use crate::error::ErrorKind;
use crate::fleet::{Holder, OperationGuard, OperationLocks};
use crate::progress::Progress;

/// Events buffered for a slow client before the order waits on it.
const EVENT_BUFFER: usize = 256;

/// A stream of an operation's events, ending with its DONE or FAILED event.
pub(super) type EventStream = ReceiverStream<Result<pb::IssueEvent, Status>>;

type EventSender = mpsc::Sender<Result<pb::IssueEvent, Status>>;

/// Runs `operation` in its own task once it holds the certificate's lock
/// for `holder`, and streams its progress, then the event it ends with.
///
/// Once started, the operation keeps running if the client hangs up. While
/// another operation holds the lock, this one fails as busy, or with `wait`
/// waits for it (a client that hangs up while waiting cancels it). One that
/// panics ends with a FAILED event like any other failure; the lock and any
/// rollout record it held are released as the panic unwinds.
pub(super) fn stream_operation<F, Fut>(
    locks: OperationLocks,
    holder: Holder,
    wait: bool,
    operation: F,
) -> EventStream
where
    F: FnOnce(OperationGuard, Progress) -> Fut + Send + 'static,
    Fut: Future<Output = pb::IssueEvent> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let Some(op) = lock(&locks, holder, wait, &tx).await else {
            return;
        };
        let what = op.holder().clone();
        let journal = op.journal().clone();
        let (progress, mut events) = Progress::channel();
        // A node reached over SSH because its agent was down is journaled
        // and shown in this operation's progress.
        let fallbacks = crate::ssh::record_fallbacks(
            journal.clone(),
            progress.clone(),
            operation(op, progress),
        );
        let task = tokio::spawn(fallbacks);
        while let Some(event) = events.recv().await {
            // A client that hung up does not stop the operation.
            let _ = tx.send(Ok(event_to_pb(event))).await;
        }
        let last = task.await.unwrap_or_else(|e| ended_abnormally(&what, e));
        journal.finish(&outcome(&last));
        let _ = tx.send(Ok(last)).await;
    });
    ReceiverStream::new(rx)
}

/// The journal's outcome for an operation that ended with `last`: "ok",
/// or "failed: " and why.
fn outcome(last: &pb::IssueEvent) -> String {
    match (&last.failure, last.stage()) {
        (_, pb::Stage::Done) => "ok".to_owned(),
        (Some(f), _) => format!("failed: {}", f.message),
        (None, _) => format!("failed: {}", last.message),
    }
}

/// Takes the certificate's lock for `holder`, waiting for it with `wait`.
/// `None` when the operation must not run; `tx` has been told why.
async fn lock(
    locks: &OperationLocks,
    holder: Holder,
    wait: bool,
    tx: &EventSender,
) -> Option<OperationGuard> {
    if !wait {
        return match locks.try_acquire(holder) {
            Ok(op) => Some(op),
            Err(busy) => {
                let event = failure_event(busy.kind(), &[], busy.to_string());
                let _ = tx.send(Ok(event)).await;
                None
            }
        };
    }
    let waiting = |current: &Holder| {
        // A fresh stream has room for these few lines.
        let _ = tx.try_send(Ok(pb::IssueEvent {
            stage: pb::Stage::Waiting.into(),
            ok: true,
            message: format!("waiting for {current}"),
            ..Default::default()
        }));
    };
    let (operation, certificate) = (holder.operation, holder.certificate.clone());
    tokio::select! {
        op = locks.acquire(holder, waiting) => Some(op),
        () = tx.closed() => {
            tracing::info!(%operation, certificate, "client hung up while waiting; not started");
            None
        }
    }
}

/// The last event of an operation whose task panicked or was cancelled.
fn ended_abnormally(what: &Holder, error: tokio::task::JoinError) -> pb::IssueEvent {
    let how = if error.is_panic() {
        let payload = error.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        format!("panicked ({message})")
    } else {
        "was cancelled".to_owned()
    };
    let (operation, certificate) = (what.operation, &what.certificate);
    tracing::error!(%operation, certificate, how, "operation ended abnormally");
    failure_event(
        ErrorKind::Internal,
        &[],
        format!(
            "internal error: the {operation} of {certificate} {how}; it was stopped, and a rollout it started is recorded as failed. This is a bug: the coordinator's log has the details"
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fleet::Operation;
    use crate::progress::Stage;

    /// 2024-01-01T14:02:11Z.
    const STARTED: i64 = 1_704_117_731;

    fn holder(operation: Operation) -> Holder {
        Holder {
            operation,
            certificate: "cn".into(),
            started: STARTED,
            uid: Some(1000),
            by: None,
        }
    }

    /// An operation that ends DONE and says it ran.
    fn done(
        ran: Arc<std::sync::atomic::AtomicBool>,
    ) -> impl FnOnce(OperationGuard, Progress) -> futures::future::Ready<pb::IssueEvent> {
        move |_op, _progress| {
            ran.store(true, std::sync::atomic::Ordering::SeqCst);
            futures::future::ready(pb::IssueEvent {
                stage: pb::Stage::Done.into(),
                ..Default::default()
            })
        }
    }

    async fn events(stream: EventStream) -> Vec<pb::IssueEvent> {
        use tokio_stream::StreamExt;
        stream.map(|e| e.unwrap()).collect().await
    }

    #[tokio::test]
    async fn a_second_operation_on_a_certificate_fails_as_busy() {
        let locks = OperationLocks::default();
        let _rollout = locks.try_acquire(holder(Operation::Rollout)).unwrap();
        let ran = Arc::default();
        let stream = stream_operation(
            locks.clone(),
            holder(Operation::Issue),
            false,
            done(Arc::clone(&ran)),
        );
        let events = events(stream).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].stage(), pb::Stage::Failed);
        let failure = events[0].failure.as_ref().unwrap();
        assert_eq!(failure.kind, "busy");
        assert_eq!(
            failure.message,
            "busy: rollout of cn (started 14:02:11 UTC by uid 1000) is running"
        );
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn with_wait_it_says_what_it_waits_for_and_runs_after() {
        use tokio_stream::StreamExt;
        let locks = OperationLocks::default();
        let rollout = locks.try_acquire(holder(Operation::Rollout)).unwrap();
        let ran = Arc::default();
        let mut stream = stream_operation(
            locks.clone(),
            holder(Operation::Issue),
            true,
            done(Arc::clone(&ran)),
        );
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.stage(), pb::Stage::Waiting);
        assert_eq!(
            first.message,
            "waiting for rollout of cn (started 14:02:11 UTC by uid 1000)"
        );
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        drop(rollout);
        let rest = events(stream).await;
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(rest[0].stage(), pb::Stage::Done);
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        // It released the lock when it ended.
        locks.try_acquire(holder(Operation::Restart)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_hangs_up_while_waiting_cancels_the_operation() {
        use tokio_stream::StreamExt;
        let locks = OperationLocks::default();
        let rollout = locks.try_acquire(holder(Operation::Rollout)).unwrap();
        let ran = Arc::default();
        let mut stream = stream_operation(
            locks.clone(),
            holder(Operation::Issue),
            true,
            done(Arc::clone(&ran)),
        );
        assert_eq!(
            stream.next().await.unwrap().unwrap().stage(),
            pb::Stage::Waiting
        );
        drop(stream);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        drop(rollout);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        locks.try_acquire(holder(Operation::Restart)).unwrap();
    }

    #[tokio::test]
    async fn a_panicking_operation_ends_as_a_failure_and_frees_the_certificate() {
        let locks = OperationLocks::default();
        fn bug() -> pb::IssueEvent {
            panic!("index out of bounds: the len is 3 but the index is 4")
        }
        let stream = stream_operation(
            locks.clone(),
            holder(Operation::Restart),
            false,
            |_op, progress| async move {
                progress.step(Stage::Restart, "restarting");
                bug()
            },
        );
        let events = events(stream).await;
        assert_eq!(events.len(), 2, "{events:?}");
        let last = events.last().unwrap();
        assert_eq!(last.stage(), pb::Stage::Failed);
        let failure = last.failure.as_ref().unwrap();
        assert_eq!(failure.kind, "internal");
        assert!(
            failure.message.starts_with(
                "internal error: the restart of cn panicked (index out of bounds: the len is 3 but the index is 4)"
            ),
            "{}",
            failure.message
        );
        locks.try_acquire(holder(Operation::Rollout)).unwrap();
    }
}
