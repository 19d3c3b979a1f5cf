//! Progress of one operation, as the admin API streams it to the CLI.

use tokio::sync::mpsc;

/// The phase of an order an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Order,
    Placement,
    SelfCheck,
    Validation,
    Finalize,
    Store,
    Cleanup,
    Distribute,
    Restart,
    Rollback,
}

/// One step of an operation, for a human or a `--json` consumer.
#[derive(Debug, Clone)]
pub struct Event {
    pub stage: Stage,
    /// The node this concerns, if any.
    pub node: Option<String>,
    pub ok: bool,
    pub message: String,
    /// Set on the event that opens a stage over nodes: how many.
    pub nodes: Option<usize>,
}

/// Where an operation reports its progress. Reporting never fails the
/// operation: a client that hung up just stops receiving.
#[derive(Clone)]
pub struct Progress(Option<mpsc::UnboundedSender<Event>>);

impl Progress {
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    /// Progress that goes nowhere (benchmarks, library callers).
    pub fn discard() -> Self {
        Self(None)
    }

    pub fn step(&self, stage: Stage, message: impl Into<String>) {
        self.send(Event {
            stage,
            node: None,
            ok: true,
            message: message.into(),
            nodes: None,
        });
    }

    /// Opens a stage that concerns `nodes` nodes, so a terminal can count
    /// `restart 212/1000 nodes`.
    pub fn begin(&self, stage: Stage, nodes: usize, message: impl Into<String>) {
        self.send(Event {
            stage,
            node: None,
            ok: true,
            message: message.into(),
            nodes: Some(nodes),
        });
    }

    pub fn node(&self, stage: Stage, node: &str, ok: bool, message: impl Into<String>) {
        self.send(Event {
            stage,
            node: Some(node.to_owned()),
            ok,
            message: message.into(),
            nodes: None,
        });
    }

    fn send(&self, event: Event) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event);
        }
    }
}

/// Watching a flow's progress as it runs, for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::Event;

    /// Runs `operation` to its end and returns its output with every event
    /// of `rx`, each with when it arrived on tokio's clock (paused in the
    /// tests that call this, so the times are exact). Events are taken as
    /// soon as they are sent, before the operation is polled again.
    pub(crate) async fn timed<T>(
        operation: impl Future<Output = T>,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> (T, Vec<(Duration, Event)>) {
        let start = tokio::time::Instant::now();
        let mut events = Vec::new();
        tokio::pin!(operation);
        let out = loop {
            tokio::select! {
                biased;
                Some(e) = rx.recv() => events.push((start.elapsed(), e)),
                out = &mut operation => break out,
            }
        };
        while let Ok(e) = rx.try_recv() {
            events.push((start.elapsed(), e));
        }
        (out, events)
    }
}
