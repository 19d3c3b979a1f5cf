//! The approval requests' table (`crate::approval`). A link's secret is
//! kept only as its SHA-256, compared in constant time; every change of
//! state is one conditional UPDATE, so an admin, the page and the expiry
//! watch racing for one request leave exactly one decision.

use rusqlite::{OptionalExtension, params};
use subtle::ConstantTimeEq;

use super::{Db, DbError};
use crate::approval::{Decided, Request, State, Step};

/// Who marks a request superseded or expired.
const BY_COORDINATOR: &str = "the coordinator";

const COLUMNS: &str = "id, certificate, version, serial, names, not_after, step, plan, created, \
     expires, reminded, state, decided_by, decided, comment, outcome";

fn row_to_request(r: &rusqlite::Row<'_>) -> rusqlite::Result<Request> {
    let text = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("not an approval {what}").into(),
        )
    };
    let step = text(6)?;
    let state = text(11)?;
    Ok(Request {
        id: text(0)?,
        certificate: text(1)?,
        version: r.get(2)?,
        serial: text(3)?,
        names: text(4)?.split_whitespace().map(str::to_owned).collect(),
        not_after: r.get(5)?,
        step: Step::from_name(&step).ok_or_else(|| bad(6, "step"))?,
        batches: plan_from_text(&text(7)?),
        created: r.get(8)?,
        expires: r.get(9)?,
        reminded: r.get(10)?,
        state: State::from_name(&state).ok_or_else(|| bad(11, "state"))?,
        decided_by: text(12)?,
        decided: r.get(13)?,
        comment: text(14)?,
        outcome: text(15)?,
    })
}

/// Batches as stored: nodes joined by ",", batches by ";" (node names
/// hold neither).
fn plan_to_text(batches: &[Vec<String>]) -> String {
    batches
        .iter()
        .map(|b| b.join(","))
        .collect::<Vec<_>>()
        .join(";")
}

fn plan_from_text(text: &str) -> Vec<Vec<String>> {
    text.split(';')
        .filter(|b| !b.is_empty())
        .map(|b| b.split(',').map(str::to_owned).collect())
        .collect()
}

impl DbError {
    /// A uniqueness or other constraint refused the write.
    pub(crate) fn is_constraint(&self) -> bool {
        matches!(
            self,
            Self::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } if e.code == rusqlite::ErrorCode::ConstraintViolation
        )
    }
}

impl Db {
    /// Stores a new pending request whose link secret hashes to
    /// `secret_sha256`, superseding the certificate's pending ones; returns
    /// the ids it superseded.
    pub fn insert_approval(
        &self,
        r: &Request,
        secret_sha256: &[u8; 32],
    ) -> Result<Vec<String>, DbError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let superseded: Vec<String> = {
                let mut stmt = tx.prepare(
                    "UPDATE approvals SET state = 'superseded', decided = ?2, decided_by = ?3, \
                     comment = ?4 WHERE certificate = ?1 AND state = 'pending' RETURNING id",
                )?;
                let comment = format!("superseded by version {} (request {})", r.version, r.id);
                let rows = stmt.query_map(
                    params![r.certificate, r.created, BY_COORDINATOR, comment],
                    |row| row.get(0),
                )?;
                rows.collect::<Result<_, _>>()?
            };
            tx.execute(
                "INSERT INTO approvals (id, certificate, version, serial, names, not_after, step, \
                 plan, created, expires, reminded, state, decided_by, decided, comment, outcome, \
                 secret_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, 'pending', '', \
                 0, '', '', ?11)",
                params![
                    r.id,
                    r.certificate,
                    r.version,
                    r.serial,
                    r.names.join(" "),
                    r.not_after,
                    r.step.name(),
                    plan_to_text(&r.batches),
                    r.created,
                    r.expires,
                    secret_sha256.as_slice(),
                ],
            )?;
            tx.commit()?;
            Ok(superseded)
        })
    }

    /// The request `id`, if there is one.
    pub fn approval(&self, id: &str) -> Result<Option<Request>, DbError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
                [id],
                row_to_request,
            )
            .optional()
        })
    }

    /// The request `id` if `secret` is its link's: compared in constant
    /// time. `None` for an unknown id and a wrong secret alike.
    pub fn approval_by_secret(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
    ) -> Result<Option<Request>, DbError> {
        self.with(|c| {
            let found: Option<Vec<u8>> = c
                .query_row(
                    "SELECT secret_sha256 FROM approvals WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            let matches = found.is_some_and(|stored| bool::from(stored.ct_eq(secret_sha256)));
            if !matches {
                return Ok(None);
            }
            c.query_row(
                &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
                [id],
                row_to_request,
            )
            .optional()
        })
    }

    /// Every pending request, oldest first.
    pub fn pending_approvals(&self) -> Result<Vec<Request>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM approvals WHERE state = 'pending' ORDER BY created, id"
            ))?;
            let rows = stmt.query_map([], row_to_request)?;
            rows.collect()
        })
    }

    /// Every pending request (oldest first), then the `recent` last decided
    /// ones (newest first).
    pub fn approvals(&self, recent: u32) -> Result<Vec<Request>, DbError> {
        let mut all = self.pending_approvals()?;
        let decided: Vec<Request> = self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM approvals WHERE state != 'pending' \
                 ORDER BY decided DESC, created DESC LIMIT ?1"
            ))?;
            let rows = stmt.query_map([recent], row_to_request)?;
            rows.collect()
        })?;
        all.extend(decided);
        Ok(all)
    }

    /// Decides request `id` if it is pending and its time is not up; a
    /// link's decision must carry the link's secret (`secret_sha256`).
    pub fn decide_approval(
        &self,
        id: &str,
        state: State,
        by: &str,
        comment: &str,
        secret_sha256: Option<&[u8; 32]>,
        now: i64,
    ) -> Result<Decided, DbError> {
        let found = match secret_sha256 {
            Some(secret) => self.approval_by_secret(id, secret)?,
            None => self.approval(id)?,
        };
        let Some(request) = found else {
            return Ok(Decided::Unknown);
        };
        if request.state != State::Pending {
            return Ok(Decided::Already(request));
        }
        if now >= request.expires {
            return Ok(Decided::Expired(request));
        }
        let outcome = if state == State::Approved {
            "running"
        } else {
            ""
        };
        let changed = self.with(|c| {
            c.execute(
                "UPDATE approvals SET state = ?2, decided_by = ?3, decided = ?4, comment = ?5, \
                 outcome = ?6 WHERE id = ?1 AND state = 'pending' AND expires > ?4",
                params![id, state.name(), by, now, comment, outcome],
            )
        })?;
        // Someone else decided between the read and the update.
        let after = self.approval(id)?;
        match after {
            Some(r) if changed == 1 => Ok(Decided::Now(r)),
            Some(r) => Ok(Decided::Already(r)),
            None => Ok(Decided::Unknown),
        }
    }

    /// Marks `id`'s reminder sent; false when it was sent already or the
    /// request is no longer pending.
    pub fn mark_reminded(&self, id: &str) -> Result<bool, DbError> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE approvals SET reminded = 1 WHERE id = ?1 AND state = 'pending' AND reminded = 0",
                [id],
            )
        })?;
        Ok(n == 1)
    }

    /// Refuses `id` as expired; false when it was no longer pending.
    pub fn expire_approval(&self, id: &str, now: i64) -> Result<bool, DbError> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE approvals SET state = 'expired', decided = ?2, decided_by = ?3, \
                 comment = 'no decision before it expired' WHERE id = ?1 AND state = 'pending'",
                params![id, now, BY_COORDINATOR],
            )
        })?;
        Ok(n == 1)
    }

    /// Records how the approved step of `id` ended.
    pub fn approval_outcome(&self, id: &str, outcome: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE approvals SET outcome = ?2 WHERE id = ?1",
                params![id, outcome],
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::secret_hash;

    fn request(id: &str, version: u32, created: i64) -> Request {
        Request {
            id: id.into(),
            certificate: "cn".into(),
            version,
            serial: "0a".into(),
            names: vec!["a.example.org".into(), "b.example.org".into()],
            not_after: 2_000_000_000,
            step: Step::Rollout,
            batches: vec![vec!["n0".into(), "n1".into()], vec!["n2".into()]],
            created,
            expires: created + 100,
            reminded: false,
            state: State::Pending,
            decided_by: String::new(),
            decided: 0,
            comment: String::new(),
            outcome: String::new(),
        }
    }

    #[test]
    fn a_request_reads_back_as_stored_and_a_newer_one_supersedes_it() {
        let db = Db::in_memory().unwrap();
        let first = request("aaaa-aaaa", 2, 1000);
        assert!(
            db.insert_approval(&first, &secret_hash("s1"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(db.approval("aaaa-aaaa").unwrap().unwrap(), first);
        let second = request("bbbb-bbbb", 3, 1010);
        assert_eq!(
            db.insert_approval(&second, &secret_hash("s2")).unwrap(),
            ["aaaa-aaaa"]
        );
        let old = db.approval("aaaa-aaaa").unwrap().unwrap();
        assert_eq!(old.state, State::Superseded);
        assert_eq!(old.comment, "superseded by version 3 (request bbbb-bbbb)");
        let pending = db.pending_approvals().unwrap();
        assert_eq!(pending, [second]);
        let listed = db.approvals(10).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].id, "aaaa-aaaa");
    }

    #[test]
    fn a_link_decides_once_and_only_with_its_secret() {
        let db = Db::in_memory().unwrap();
        db.insert_approval(&request("aaaa-aaaa", 2, 1000), &secret_hash("right"))
            .unwrap();
        let wrong = db
            .decide_approval(
                "aaaa-aaaa",
                State::Approved,
                "link",
                "",
                Some(&secret_hash("wrong")),
                1001,
            )
            .unwrap();
        assert!(matches!(wrong, Decided::Unknown), "{wrong:?}");
        assert!(
            db.approval_by_secret("aaaa-aaaa", &secret_hash("wrong"))
                .unwrap()
                .is_none()
        );
        assert!(
            db.approval_by_secret("aaaa-aaaa", &secret_hash("right"))
                .unwrap()
                .is_some()
        );
        let first = db
            .decide_approval(
                "aaaa-aaaa",
                State::Approved,
                "link",
                "ok",
                Some(&secret_hash("right")),
                1001,
            )
            .unwrap();
        let Decided::Now(r) = first else {
            panic!("{first:?}")
        };
        assert_eq!(
            (r.state, r.decided_by.as_str(), r.outcome.as_str()),
            (State::Approved, "link", "running")
        );
        let replay = db
            .decide_approval(
                "aaaa-aaaa",
                State::Rejected,
                "link",
                "",
                Some(&secret_hash("right")),
                1002,
            )
            .unwrap();
        assert!(
            matches!(replay, Decided::Already(ref r) if r.state == State::Approved),
            "{replay:?}"
        );
    }

    #[test]
    fn an_expired_request_cannot_be_decided_and_is_expired_once() {
        let db = Db::in_memory().unwrap();
        db.insert_approval(&request("aaaa-aaaa", 2, 1000), &secret_hash("s"))
            .unwrap();
        let late = db
            .decide_approval("aaaa-aaaa", State::Approved, "uid 0", "", None, 1100)
            .unwrap();
        assert!(matches!(late, Decided::Expired(_)), "{late:?}");
        assert!(db.mark_reminded("aaaa-aaaa").unwrap());
        assert!(!db.mark_reminded("aaaa-aaaa").unwrap());
        assert!(db.expire_approval("aaaa-aaaa", 1100).unwrap());
        assert!(!db.expire_approval("aaaa-aaaa", 1101).unwrap());
        let r = db.approval("aaaa-aaaa").unwrap().unwrap();
        assert_eq!((r.state, r.reminded), (State::Expired, true));
        assert!(db.pending_approvals().unwrap().is_empty());
    }
}
