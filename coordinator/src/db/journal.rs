//! The journal's tables: one row per operation on a certificate, and its
//! steps, each written before the work it names (`crate::journal`).

use std::collections::BTreeSet;

use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};
use crate::journal::step::{ISSUED as STEP_ISSUED, VALIDATION_FAILED as STEP_VALIDATION_FAILED};
use crate::ratelimit::{PastOrder, PastOutcome};

/// One operation as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationRecord {
    pub id: i64,
    pub certificate: String,
    /// `Operation`'s name: "issue", "renewal", "rollout", ...
    pub kind: String,
    /// "uid 1000", "renewal scheduler", "recovery".
    pub by: String,
    pub started: i64,
    pub finished: Option<i64>,
    /// `None` while it runs, or when the coordinator stopped in it.
    pub outcome: Option<String>,
    /// The version it produced or worked on; 0 if none.
    pub version: u32,
    pub order_url: String,
    /// The names ordered, space-separated; empty for no order.
    pub names: String,
}

/// One journaled step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalStep {
    pub at: i64,
    pub step: String,
    pub node: String,
    pub detail: String,
}

const OPERATION_COLUMNS: &str =
    "id, certificate, kind, by, started, finished, outcome, version, order_url, names";

fn row_to_operation(r: &rusqlite::Row<'_>) -> rusqlite::Result<OperationRecord> {
    Ok(OperationRecord {
        id: r.get(0)?,
        certificate: r.get(1)?,
        kind: r.get(2)?,
        by: r.get(3)?,
        started: r.get(4)?,
        finished: r.get(5)?,
        outcome: r.get(6)?,
        version: r.get(7)?,
        order_url: r.get(8)?,
        names: r.get(9)?,
    })
}

impl Db {
    /// Opens an operation's record; returns its id.
    pub fn begin_operation(
        &self,
        certificate: &str,
        kind: &str,
        by: &str,
        now: i64,
    ) -> Result<i64, DbError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO operations (certificate, kind, by, started) VALUES (?1, ?2, ?3, ?4)",
                params![certificate, kind, by, now],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Journals one step. An operation's own steps (`node` empty) are
    /// synced before this returns; one node's steps are not
    /// (`Db::with_unsynced`): the next synced commit carries them.
    pub fn journal_step(
        &self,
        operation: i64,
        step: &str,
        node: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), DbError> {
        let insert = |c: &mut rusqlite::Connection| {
            c.execute(
                "INSERT INTO operation_steps (operation, at, step, node, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![operation, now, step, node, detail],
            )
        };
        if node.is_empty() {
            self.with(insert)?;
        } else {
            self.with_unsynced(insert)?;
        }
        Ok(())
    }

    /// Records the ACME order an operation created, and the names it asked for.
    pub fn set_operation_order(
        &self,
        operation: i64,
        order_url: &str,
        names: &[String],
    ) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE operations SET order_url = ?2, names = ?3 WHERE id = ?1",
                params![operation, order_url, names.join(" ")],
            )
        })?;
        Ok(())
    }

    pub fn set_operation_version(&self, operation: i64, version: u32) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE operations SET version = ?2 WHERE id = ?1",
                params![operation, version],
            )
        })?;
        Ok(())
    }

    /// Closes an operation's record with its outcome ("ok", "failed: …",
    /// "interrupted").
    pub fn finish_operation(&self, operation: i64, outcome: &str, now: i64) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE operations SET finished = ?2, outcome = ?3 WHERE id = ?1 AND outcome IS NULL",
                params![operation, now, outcome],
            )
        })?;
        Ok(())
    }

    pub fn operation(&self, id: i64) -> Result<Option<OperationRecord>, DbError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {OPERATION_COLUMNS} FROM operations WHERE id = ?1"),
                params![id],
                row_to_operation,
            )
            .optional()
        })
    }

    /// Operations with no outcome: the ones a stopped coordinator was in.
    /// Oldest first.
    pub fn unfinished_operations(&self) -> Result<Vec<OperationRecord>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {OPERATION_COLUMNS} FROM operations WHERE outcome IS NULL ORDER BY id"
            ))?;
            let rows = stmt.query_map([], row_to_operation)?;
            rows.collect()
        })
    }

    /// `certificate`'s latest `limit` operations, newest first.
    pub fn operations(
        &self,
        certificate: &str,
        limit: u32,
    ) -> Result<Vec<OperationRecord>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {OPERATION_COLUMNS} FROM operations WHERE certificate = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![certificate, limit], row_to_operation)?;
            rows.collect()
        })
    }

    /// An operation's steps, in the order they were journaled.
    pub fn operation_steps(&self, operation: i64) -> Result<Vec<JournalStep>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT at, step, node, detail FROM operation_steps WHERE operation = ?1 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![operation], |r| {
                Ok(JournalStep {
                    at: r.get(0)?,
                    step: r.get(1)?,
                    node: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Closes, as failed, every rollout record a stopped coordinator left
    /// running (its operation is healed by `recovery`).
    pub fn close_running_rollouts(&self, now: i64) -> Result<usize, DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE rollouts SET finished = ?1, outcome = ?2 WHERE outcome IS NULL",
                params![now, super::RolloutOutcome::Failed.as_str()],
            )
        })
    }

    /// The orders `certificate`'s operations placed at the CA since
    /// `since` (dry runs, at the staging CA, excluded), for the rate-limit
    /// guard: what each asked for and how it ended at the CA.
    pub fn past_orders(&self, certificate: &str, since: i64) -> Result<Vec<PastOrder>, DbError> {
        let orders: Vec<(i64, i64, String)> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, started, names FROM operations
                 WHERE certificate = ?1 AND started >= ?2 AND order_url != '' AND kind != 'dry-run'
                 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![certificate, since], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect()
        })?;
        let mut past = Vec::with_capacity(orders.len());
        for (id, at, names) in orders {
            let steps = self.operation_steps(id)?;
            let failed: BTreeSet<String> = steps
                .iter()
                .filter(|s| s.step == STEP_VALIDATION_FAILED)
                .map(|s| s.detail.clone())
                .collect();
            let outcome = if steps.iter().any(|s| s.step == STEP_ISSUED) {
                PastOutcome::Issued
            } else if !failed.is_empty() {
                PastOutcome::ValidationFailed(failed)
            } else {
                PastOutcome::Other
            };
            past.push(PastOrder {
                at,
                names: names.split_whitespace().map(str::to_owned).collect(),
                outcome,
            });
        }
        Ok(past)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_is_unfinished_until_it_has_an_outcome_and_keeps_its_steps_in_order() {
        let db = Db::in_memory().unwrap();
        let id = db.begin_operation("cn", "issue", "uid 0", 100).unwrap();
        db.journal_step(id, "placing", "", "tok1 tok2", 101)
            .unwrap();
        db.journal_step(id, "placed", "", "", 102).unwrap();
        assert_eq!(db.unfinished_operations().unwrap()[0].id, id);
        db.finish_operation(id, "interrupted", 103).unwrap();
        // A second outcome does not overwrite the first.
        db.finish_operation(id, "ok", 104).unwrap();
        assert!(db.unfinished_operations().unwrap().is_empty());
        let op = db.operation(id).unwrap().unwrap();
        assert_eq!(
            (op.outcome.as_deref(), op.finished),
            (Some("interrupted"), Some(103))
        );
        let steps: Vec<String> = db
            .operation_steps(id)
            .unwrap()
            .into_iter()
            .map(|s| s.step)
            .collect();
        assert_eq!(steps, ["placing", "placed"]);
    }

    #[test]
    fn past_orders_say_what_the_ca_did_with_each_and_leave_out_dry_runs() {
        let db = Db::in_memory().unwrap();
        let names = ["a.example".to_owned(), "b.example".to_owned()];
        let issued = db.begin_operation("cn", "issue", "uid 0", 10).unwrap();
        db.set_operation_order(issued, "https://ca/o/1", &names)
            .unwrap();
        db.journal_step(issued, STEP_ISSUED, "", "", 11).unwrap();
        let failed = db
            .begin_operation("cn", "renewal", "renewal scheduler", 20)
            .unwrap();
        db.set_operation_order(failed, "https://ca/o/2", &names)
            .unwrap();
        db.journal_step(failed, STEP_VALIDATION_FAILED, "", "b.example", 21)
            .unwrap();
        let dry = db.begin_operation("cn", "dry-run", "uid 0", 30).unwrap();
        db.set_operation_order(dry, "https://staging/o/3", &names)
            .unwrap();
        let no_order = db.begin_operation("cn", "rollout", "uid 0", 40).unwrap();
        db.finish_operation(no_order, "ok", 41).unwrap();
        let past = db.past_orders("cn", 0).unwrap();
        assert_eq!(past.len(), 2, "{past:?}");
        assert_eq!(past[0].outcome, PastOutcome::Issued);
        assert_eq!(past[0].names, names.iter().cloned().collect());
        assert_eq!(
            past[1].outcome,
            PastOutcome::ValidationFailed(["b.example".to_owned()].into())
        );
        assert!(db.past_orders("cn", 15).unwrap().len() == 1);
        assert!(db.past_orders("other", 0).unwrap().is_empty());
    }
}
