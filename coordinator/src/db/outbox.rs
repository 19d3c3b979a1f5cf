//! The outbox: every mail to the administrators, written before any
//! attempt to send it, and marked sent once the SMTP server took it
//! (`crate::mail` delivers; `crate::notify` enqueues).

use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};

/// The table, appended to the database's schema.
pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    certificate TEXT NOT NULL,
    subject TEXT NOT NULL,
    recipients TEXT NOT NULL,
    text_body TEXT NOT NULL,
    html_body TEXT NOT NULL,
    dedup TEXT UNIQUE,
    created INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    sent INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_waiting ON outbox (next_attempt) WHERE sent IS NULL;
"#;

/// A mail to put in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMail<'a> {
    /// The `Message-ID` it is sent with, on every attempt: a copy sent
    /// twice (see `crate::mail`) is recognisably the same message.
    pub message_id: &'a str,
    pub certificate: &'a str,
    pub subject: &'a str,
    pub recipients: &'a [String],
    pub text: &'a str,
    pub html: &'a str,
    /// A key that makes the mail be queued at most once (an expiry
    /// warning's node, leaf and day); `None`: always queued.
    pub dedup: Option<&'a str>,
}

/// A mail in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMail {
    pub id: i64,
    pub message_id: String,
    pub certificate: String,
    pub subject: String,
    pub recipients: Vec<String>,
    pub text: String,
    pub html: String,
    /// When it was queued, seconds since the Unix epoch.
    pub created: i64,
    /// SMTP attempts that failed so far.
    pub attempts: u32,
    /// When the next attempt is due (while it waits).
    pub next_attempt: i64,
    /// Why the last attempt failed; empty if none did.
    pub last_error: String,
    /// When the SMTP server accepted it; `None` while it waits.
    pub sent: Option<i64>,
}

const COLUMNS: &str = "id, message_id, certificate, subject, recipients, text_body, html_body, \
                       created, attempts, next_attempt, last_error, sent";

fn row_to_mail(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxMail> {
    let recipients: String = r.get(4)?;
    Ok(OutboxMail {
        id: r.get(0)?,
        message_id: r.get(1)?,
        certificate: r.get(2)?,
        subject: r.get(3)?,
        recipients: recipients.lines().map(str::to_owned).collect(),
        text: r.get(5)?,
        html: r.get(6)?,
        created: r.get(7)?,
        attempts: r.get(8)?,
        next_attempt: r.get(9)?,
        last_error: r.get(10)?,
        sent: r.get(11)?,
    })
}

impl Db {
    /// Queues `mail`, due now. Returns its id, or `None` when a mail with
    /// the same `dedup` key was queued before.
    pub fn enqueue_mail(&self, mail: &NewMail<'_>, now: i64) -> Result<Option<i64>, DbError> {
        self.with(|c| {
            let inserted = c.execute(
                "INSERT OR IGNORE INTO outbox (message_id, certificate, subject, recipients, \
                 text_body, html_body, dedup, created, next_attempt) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
                params![
                    mail.message_id,
                    mail.certificate,
                    mail.subject,
                    mail.recipients.join("\n"),
                    mail.text,
                    mail.html,
                    mail.dedup,
                    now
                ],
            )?;
            Ok((inserted == 1).then(|| c.last_insert_rowid()))
        })
    }

    /// Mail not yet sent whose next attempt is due at `now` (every waiting
    /// mail when `now` is `None`), oldest first, at most `limit`.
    pub fn due_mail(&self, now: Option<i64>, limit: usize) -> Result<Vec<OutboxMail>, DbError> {
        self.with(|c| {
            let mut s = c.prepare(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE sent IS NULL AND (?1 IS NULL OR next_attempt <= ?1) \
                 ORDER BY id LIMIT ?2"
            ))?;
            let rows = s.query_map(params![now, limit as i64], row_to_mail)?;
            rows.collect()
        })
    }

    /// When the earliest waiting mail is due, if any waits.
    pub fn next_mail_due(&self) -> Result<Option<i64>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT MIN(next_attempt) FROM outbox WHERE sent IS NULL",
                [],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
        })
    }

    /// The SMTP server accepted mail `id`.
    pub fn mail_sent(&self, id: i64, now: i64) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE outbox SET sent = ?2, last_error = '' WHERE id = ?1",
                params![id, now],
            )
            .map(|_| ())
        })
    }

    /// An attempt to send mail `id` failed with `error`; the next is due at
    /// `next_attempt`.
    pub fn mail_failed(&self, id: i64, error: &str, next_attempt: i64) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt = ?3 \
                 WHERE id = ?1",
                params![id, error, next_attempt],
            )
            .map(|_| ())
        })
    }

    /// Every waiting mail, then the `sent` most recently sent, newest
    /// first within each.
    pub fn outbox(&self, sent: usize) -> Result<Vec<OutboxMail>, DbError> {
        self.with(|c| {
            let mut waiting = c.prepare(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE sent IS NULL ORDER BY id DESC"
            ))?;
            let mut out: Vec<OutboxMail> = waiting
                .query_map([], row_to_mail)?
                .collect::<Result<_, _>>()?;
            let mut done = c.prepare(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE sent IS NOT NULL ORDER BY sent DESC, id DESC LIMIT ?1"
            ))?;
            for m in done.query_map(params![sent as i64], row_to_mail)? {
                out.push(m?);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail<'a>(recipients: &'a [String], dedup: Option<&'a str>) -> NewMail<'a> {
        NewMail {
            message_id: "<1@test>",
            certificate: "cn",
            subject: "s",
            recipients,
            text: "t",
            html: "<p>t</p>",
            dedup,
        }
    }

    #[test]
    fn a_mail_waits_until_sent_and_its_failures_are_kept() {
        let db = Db::in_memory().unwrap();
        let to = vec!["a@example.org".to_owned(), "b@example.org".to_owned()];
        let id = db.enqueue_mail(&mail(&to, None), 100).unwrap().unwrap();
        let due = db.due_mail(Some(100), 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].recipients, to);
        db.mail_failed(id, "connection refused", 130).unwrap();
        assert!(db.due_mail(Some(129), 10).unwrap().is_empty());
        // A restart's first pass takes every waiting mail.
        assert_eq!(db.due_mail(None, 10).unwrap().len(), 1);
        assert_eq!(db.next_mail_due().unwrap(), Some(130));
        let listed = db.outbox(10).unwrap();
        assert_eq!(
            (listed[0].attempts, listed[0].last_error.as_str()),
            (1, "connection refused")
        );
        db.mail_sent(id, 131).unwrap();
        assert!(db.due_mail(None, 10).unwrap().is_empty());
        assert_eq!(db.next_mail_due().unwrap(), None);
        assert_eq!(db.outbox(10).unwrap()[0].sent, Some(131));
    }

    #[test]
    fn a_deduplicated_mail_is_queued_once() {
        let db = Db::in_memory().unwrap();
        let to = vec!["a@example.org".to_owned()];
        let key = Some("expiry cn n1 ab 2025-01-01");
        assert!(db.enqueue_mail(&mail(&to, key), 1).unwrap().is_some());
        assert!(db.enqueue_mail(&mail(&to, key), 2).unwrap().is_none());
        assert!(db.enqueue_mail(&mail(&to, None), 3).unwrap().is_some());
        assert_eq!(db.outbox(0).unwrap().len(), 2);
    }
}
