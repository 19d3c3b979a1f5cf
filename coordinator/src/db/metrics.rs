//! The few aggregate reads the `/metrics` endpoint needs (`crate::metrics`),
//! answered by SQLite rather than by loading rows.

use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};

impl Db {
    /// When rollout `id` started and, once it ended, when it finished
    /// (Unix seconds).
    pub fn rollout_times(&self, id: i64) -> Result<Option<(i64, Option<i64>)>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT started, finished FROM rollouts WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    /// How many mails wait in the outbox, and when the oldest was queued.
    pub fn outbox_waiting(&self) -> Result<(u64, Option<i64>), DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*), MIN(created) FROM outbox WHERE sent IS NULL",
                [],
                |r| Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get(1)?)),
            )
        })
    }
}
