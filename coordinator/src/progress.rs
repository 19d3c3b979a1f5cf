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
        self.send(stage, None, true, message.into());
    }

    pub fn node(&self, stage: Stage, node: &str, ok: bool, message: impl Into<String>) {
        self.send(stage, Some(node.to_owned()), ok, message.into());
    }

    fn send(&self, stage: Stage, node: Option<String>, ok: bool, message: String) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Event {
                stage,
                node,
                ok,
                message,
            });
        }
    }
}
