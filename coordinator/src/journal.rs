//! The journal: every operation on a certificate, and each of its steps,
//! written to the state database *before* the work the step names.
//!
//! A coordinator killed at any point leaves a record of how far it got:
//! which tokens it may have placed, which ACME order it was in, whether
//! the CA had issued, which nodes a rollout had already verified. On its
//! next start, `recovery` reads every operation left without an outcome and
//! heals it. `certfleet history` shows the same record.
//!
//! An operation's journal is opened when it takes its certificate's lock
//! (`fleet::OperationLocks`), so every flow that holds an
//! `OperationGuard` has one. A step that cannot be written stops the
//! operation before it acts: work the journal does not know of could not
//! be healed.
//!
//! The operation's own steps are on the disk before the work they name;
//! one node's steps (installed, restarting, verified) are written at once
//! but synced with the next of the operation's own, or the next synced
//! write. A coordinator killed keeps them all; a power cut on the primary
//! may lose the latest nodes' steps, which recovery then takes again
//! (a node that already has a version answers "already had"; a restart
//! again restarts a service that already serves the version).
//!
//! Crash tests stop the coordinator at a chosen step: with
//! `CERTFLEET_CRASH_TEST_PAUSE_AT=<step>` in its environment, the first
//! time that step is journaled the coordinator logs "crash test: paused"
//! and stops making progress, for the test to `kill -9` it there.

use std::sync::{Arc, Mutex};

use certfleet_proto::clock::now;

use crate::db::{Db, DbError};
use crate::error::ErrorKind;
use crate::fleet::{Holder, Operation};

/// The steps flows journal, by name. Recovery reads them back.
pub mod step {
    /// Tokens about to be placed on every node; detail: the tokens,
    /// space-separated.
    pub const PLACING: &str = "placing";
    /// Every node serves every token and passed the self-check.
    pub const PLACED: &str = "placed";
    /// The CA was told to validate.
    pub const ANSWERED: &str = "answered";
    /// A name the CA failed to validate; detail: the name.
    pub const VALIDATION_FAILED: &str = "validation failed";
    /// The certificate's key is saved (detail: where); the CSR goes next.
    pub const FINALIZING: &str = "finalizing";
    /// The CA accepted the CSR.
    pub const FINALIZED: &str = "finalized";
    /// The CA issued the certificate and it was downloaded.
    pub const ISSUED: &str = "issued";
    /// Written to the store and made live; detail: the version.
    pub const STORED: &str = "stored";
    /// Tokens taken off the nodes.
    pub const TOKENS_REMOVED: &str = "tokens removed";
    /// A version about to be installed on every node; detail: the version.
    pub const INSTALLING: &str = "installing";
    /// One node has the version installed.
    pub const INSTALLED: &str = "installed";
    /// About to restart one node's services.
    pub const RESTARTING: &str = "restarting";
    /// One node restarted and serves the version.
    pub const VERIFIED: &str = "verified";
    /// One node put back on the version it had.
    pub const ROLLED_BACK: &str = "rolled back";
    /// Recovery: what it found and what it did; detail says.
    pub const RECOVERED: &str = "recovered";
}

/// The environment variable that makes a crash test's pause point.
pub const PAUSE_ENV: &str = "CERTFLEET_CRASH_TEST_PAUSE_AT";

/// The journal could not be written; the operation stops before acting.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot write the journal, so the operation stops before acting (a crash now could not be healed): {0}"
)]
pub struct JournalError(String);

impl JournalError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Store
    }
}

/// One operation's journal. Cheap to clone; every clone writes to the same
/// record. A journal that is off (unit tests without a database) accepts
/// every step and records nothing.
#[derive(Clone)]
pub struct Journal(Option<Arc<Open>>);

struct Open {
    db: Arc<Db>,
    /// The record's id, or why it could not be made.
    id: Result<i64, String>,
    finished: Mutex<bool>,
}

impl Journal {
    /// A journal that records nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// Opens the record of `holder`'s operation.
    pub fn begin(db: &Arc<Db>, holder: &Holder) -> Self {
        let by = match (holder.uid, holder.operation) {
            (Some(uid), _) => format!("uid {uid}"),
            (None, _) if holder.by.is_some() => holder.by.clone().unwrap_or_default(),
            (None, Operation::Renew) => "renewal scheduler".to_owned(),
            (None, Operation::Recover) => "recovery".to_owned(),
            (None, _) => "unknown".to_owned(),
        };
        let kind = holder.operation.to_string();
        let id = db
            .begin_operation(&holder.certificate, &kind, &by, holder.started)
            .map_err(|e| e.to_string());
        if let Err(e) = &id {
            tracing::error!(error = %e, certificate = holder.certificate, "cannot open the journal");
        }
        Self(Some(Arc::new(Open {
            db: Arc::clone(db),
            id,
            finished: Mutex::new(false),
        })))
    }

    /// The record's id, when there is one.
    pub fn id(&self) -> Option<i64> {
        self.0.as_ref().and_then(|o| o.id.as_ref().ok().copied())
    }

    fn write(&self, f: impl FnOnce(&Db, i64) -> Result<(), DbError>) -> Result<(), JournalError> {
        let Some(open) = &self.0 else {
            return Ok(());
        };
        let id = open.id.clone().map_err(JournalError)?;
        f(&open.db, id).map_err(|e| JournalError(e.to_string()))
    }

    /// Journals `step` (on `node`, or the whole operation when empty)
    /// before it is taken.
    pub fn step(&self, step: &str, node: &str, detail: &str) -> Result<(), JournalError> {
        self.write(|db, id| db.journal_step(id, step, node, detail, now()))?;
        pause_if_asked(step);
        Ok(())
    }

    /// Journals the ACME order the operation created and the names it asks for.
    pub fn order(&self, url: &str, names: &[String]) -> Result<(), JournalError> {
        self.write(|db, id| db.set_operation_order(id, url, names))
    }

    /// Journals the version the operation produced or works on.
    pub fn version(&self, version: u32) -> Result<(), JournalError> {
        self.write(|db, id| db.set_operation_version(id, version))
    }

    /// Closes the record with "ok" or "failed: " and why, as `result` says.
    pub fn finish_with<T, E: std::fmt::Display>(&self, result: &Result<T, E>) {
        match result {
            Ok(_) => self.finish("ok"),
            Err(e) => self.finish(&format!("failed: {e}")),
        }
    }

    /// Closes the record with `outcome` ("ok", "failed: …"). Only the first
    /// outcome counts. Best effort: the work is done either way.
    pub fn finish(&self, outcome: &str) {
        let Some(open) = &self.0 else {
            return;
        };
        let mut finished = open.finished.lock().unwrap_or_else(|e| e.into_inner());
        if *finished {
            return;
        }
        *finished = true;
        if let Err(e) = self.write(|db, id| db.finish_operation(id, outcome, now())) {
            tracing::warn!(error = %e, "cannot record the operation's outcome");
        }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Journal").field(&self.id()).finish()
    }
}

/// A crash test's pause point (see the module's doc).
fn pause_if_asked(step: &str) {
    static PAUSED: std::sync::Once = std::sync::Once::new();
    let Ok(at) = std::env::var(PAUSE_ENV) else {
        return;
    };
    if at != step || PAUSED.is_completed() {
        return;
    }
    PAUSED.call_once(|| {});
    tracing::warn!(step, "crash test: paused after journaling this step");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
