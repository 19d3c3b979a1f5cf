//! The coordinator's records, in an embedded SQLite database
//! (`<state>/certfleet.db`, mode 0600): registered nodes, join tokens (only
//! a hash of each secret), what each node has installed, rollouts and their
//! steps, the journal of every operation (`journal`), and the audit log of
//! admin requests.
//!
//! Calls are short and synchronous behind one mutex. Every commit is
//! synced to the disk before it returns, except the per-node records a
//! fan-out writes by the thousand (`Db::with_unsynced`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, ToSql, Transaction, params};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ErrorKind;

mod approvals;
mod journal;
mod metrics;
mod outbox;

pub use self::journal::{JournalStep, OperationRecord};
pub use self::outbox::{NewMail, OutboxMail};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    http01 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'active', 'removed')),
    cert_serial TEXT,
    cert_not_after INTEGER NOT NULL DEFAULT 0,
    last_contact INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL REFERENCES nodes(name),
    secret_sha256 BLOB NOT NULL,
    expires INTEGER NOT NULL,
    used INTEGER
);
CREATE TABLE IF NOT EXISTS installed (
    node TEXT NOT NULL,
    certificate TEXT NOT NULL,
    version INTEGER NOT NULL,
    leaf_sha256 TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (node, certificate)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY,
    certificate TEXT NOT NULL,
    version INTEGER NOT NULL,
    started INTEGER NOT NULL,
    finished INTEGER,
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS rollout_steps (
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    at INTEGER NOT NULL,
    node TEXT NOT NULL,
    step TEXT NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY,
    certificate TEXT NOT NULL,
    kind TEXT NOT NULL,
    by TEXT NOT NULL,
    started INTEGER NOT NULL,
    finished INTEGER,
    outcome TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    order_url TEXT NOT NULL DEFAULT '',
    names TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS operations_by_certificate ON operations (certificate, id);
CREATE TABLE IF NOT EXISTS operation_steps (
    operation INTEGER NOT NULL REFERENCES operations(id),
    at INTEGER NOT NULL,
    step TEXT NOT NULL,
    node TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operation_steps_by_operation ON operation_steps (operation);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    uid INTEGER,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    certificate TEXT NOT NULL,
    version INTEGER NOT NULL,
    serial TEXT NOT NULL,
    names TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    step TEXT NOT NULL CHECK (step IN ('distribute', 'rollout', 'restart')),
    plan TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    reminded INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'rejected', 'expired', 'superseded')),
    decided_by TEXT NOT NULL DEFAULT '',
    decided INTEGER NOT NULL DEFAULT 0,
    comment TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '',
    secret_sha256 BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_by_state ON approvals (state, certificate);
-- The outbox (`outbox::SCHEMA`) follows.
"#;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("making {path} private (0600): {source}")]
    Mode {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "node {0} is already registered and active; `certfleet node remove {0}` first to join it again"
    )]
    Active(String),
    #[error("no node named {0}")]
    UnknownNode(String),
}

impl DbError {
    /// A node that is not in the state a request needs is the admin's to
    /// fix; anything else is the database failing.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Sqlite { .. } | Self::Mode { .. } => ErrorKind::Store,
            Self::Active(_) | Self::UnknownNode(_) => ErrorKind::Config,
        }
    }
}

/// Where a registered node is in its life. Stored as its [`name`]
/// (`nodes.state`), and shown by `certfleet nodes` the same way.
///
/// [`name`]: NodeState::name
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Registered with a join token; it has not joined yet.
    Pending,
    /// Joined: it holds a node certificate, and operations reach it.
    Active,
    /// Removed: its certificate is refused, and nothing contacts it.
    Removed,
}

impl NodeState {
    const ALL: [Self; 3] = [Self::Pending, Self::Active, Self::Removed];

    /// The state's name, as the registry stores it and the CLI shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Removed => "removed",
        }
    }

    /// The state named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl ToSql for NodeState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.name()))
    }
}

/// The schema's CHECK constraint keeps other values out; one that got in
/// anyway is an error, not a guess.
impl FromSql for NodeState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = value.as_str()?;
        Self::from_name(name)
            .ok_or_else(|| FromSqlError::Other(format!("unknown node state {name:?}").into()))
    }
}

/// Why a join token was refused. The secret is never part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("join token is malformed: expected <id>.<secret>")]
    Malformed,
    #[error("join token {0} is unknown")]
    Unknown(String),
    #[error("join token {0} was already used")]
    Used(String),
    #[error("join token {0} has expired")]
    Expired(String),
    #[error("join token {0}: wrong secret")]
    WrongSecret(String),
    #[error("join token {id}: node {node} is {state}, not waiting to join")]
    NodeState {
        id: String,
        node: String,
        state: NodeState,
    },
}

/// Why a node's certificate renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewRefusal {
    #[error("node {0} is not registered")]
    Unknown(String),
    #[error("node {node} is {state}; its certificate is no longer accepted")]
    NotActive { node: String, state: NodeState },
    #[error("node {0} has no certificate on record; join it again")]
    NoCertificate(String),
    #[error(
        "node {node} presented certificate serial {presented}, but its current certificate is serial {current}: a superseded identity (the node was removed and joined again, or has renewed since) cannot renew"
    )]
    Superseded {
        node: String,
        presented: String,
        current: String,
    },
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub agent: String,
    pub http01: String,
    pub state: NodeState,
    pub cert_not_after: i64,
    pub last_contact: i64,
    /// How the coordinator reaches it (`nodes.transport`, `nodes.ssh`).
    pub reach: crate::ssh::NodeReach,
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutOutcome {
    /// Every node serves the version.
    Ok,
    /// A node failed, was rolled back, and the rollout stopped there.
    Halted,
    /// The rollout stopped without reaching an outcome: it panicked or
    /// its task went away.
    Failed,
}

impl RolloutOutcome {
    const ALL: [Self; 3] = [Self::Ok, Self::Halted, Self::Failed];

    /// As stored in `rollouts.outcome` and shown by `certfleet status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Halted => "halted",
            Self::Failed => "failed",
        }
    }
}

impl FromSql for RolloutOutcome {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = value.as_str()?;
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == name)
            .ok_or_else(|| FromSqlError::Other(format!("unknown rollout outcome {name:?}").into()))
    }
}

/// The latest rollout of a certificate, without its steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSummary {
    pub id: i64,
    /// The version it restarted the services onto.
    pub version: u32,
    /// `None` while it runs.
    pub outcome: Option<RolloutOutcome>,
}

impl RolloutSummary {
    /// The outcome's name, or "running".
    pub fn state(&self) -> &'static str {
        self.outcome.map_or("running", RolloutOutcome::as_str)
    }
}

/// What a node last reported installed for a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub node: String,
    pub version: u32,
    pub leaf_sha256: String,
    /// When it was recorded, seconds since the Unix epoch.
    pub at: i64,
}

/// One recorded step of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutStep {
    pub node: String,
    pub step: String,
    pub ok: bool,
    pub detail: String,
}

/// One admin request, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: i64,
    /// The caller's uid (SO_PEERCRED); `None` for a node's own request.
    pub uid: Option<u32>,
    pub action: String,
    pub detail: String,
}

pub struct Db {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Db {
    pub fn open(state_dir: &Path) -> Result<Self, DbError> {
        let path = state_dir.join("certfleet.db");
        let err = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // Each commit synced before it returns, except where `with_unsynced`
        // says otherwise.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        conn.execute_batch(outbox::SCHEMA).map_err(err)?;
        add_reach_columns(&conn).map_err(err)?;
        // WAL mode keeps recent writes (join token hashes, the audit log) in
        // -wal and -shm beside the database: as private as the database.
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", path.display()));
            if side.exists() {
                std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600)).map_err(
                    |source| DbError::Mode {
                        path: side.clone(),
                        source,
                    },
                )?;
            }
        }
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// A database in memory, for unit tests (no file, no fsync).
    #[cfg(test)]
    pub(crate) fn in_memory() -> Result<Self, DbError> {
        let path = PathBuf::from(":memory:");
        let err = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_in_memory().map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        conn.execute_batch(outbox::SCHEMA).map_err(err)?;
        add_reach_columns(&conn).map_err(err)?;
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, DbError> {
        // A panic elsewhere while the lock was held leaves the connection
        // usable (an open transaction rolls back when dropped), and a
        // failed rollout must still be recorded while a panic unwinds.
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).map_err(|source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Like [`Self::with`], but the commit is not synced to the disk before
    /// it returns (`synchronous = NORMAL` for this write; every other write
    /// is `FULL`). In WAL mode it survives the coordinator being killed,
    /// and a power cut once the next synced commit has followed, which
    /// syncs the whole WAL. For the per-node records a fan-out writes by
    /// the thousand: a sync each was most of a 1,000-node distribute, and
    /// each blocked a runtime thread while it waited on the disk.
    fn with_unsynced<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, DbError> {
        self.with(|c| {
            c.pragma_update(None, "synchronous", "NORMAL")?;
            let result = f(c);
            c.pragma_update(None, "synchronous", "FULL")?;
            result
        })
    }

    /// Registers (or re-registers a pending or removed) node with a new join
    /// token whose secret hashes to `secret`'s SHA-256.
    pub fn add_node(
        &self,
        node: &NodeRecord,
        token_id: &str,
        secret: &str,
        expires: i64,
        now: i64,
    ) -> Result<(), DbError> {
        let existing = self.node(&node.name)?;
        if existing.is_some_and(|n| n.state == NodeState::Active) {
            return Err(DbError::Active(node.name.clone()));
        }
        let hash = Sha256::digest(secret.as_bytes()).to_vec();
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO nodes (name, agent, http01, state, created, transport, ssh)
                 VALUES (?1, ?2, ?3, ?5, ?4, ?6, ?7)
                 ON CONFLICT(name) DO UPDATE SET agent = ?2, http01 = ?3, state = ?5,
                     cert_serial = NULL, cert_not_after = 0, transport = ?6, ssh = ?7",
                params![
                    node.name,
                    node.agent,
                    node.http01,
                    now,
                    NodeState::Pending,
                    node.reach.transport.as_str(),
                    node.reach.ssh_column()
                ],
            )?;
            // Earlier unused tokens for the node stop working.
            tx.execute(
                "DELETE FROM join_tokens WHERE node = ?1 AND used IS NULL",
                params![node.name],
            )?;
            tx.execute(
                "INSERT INTO join_tokens (id, node, secret_sha256, expires) VALUES (?1, ?2, ?3, ?4)",
                params![token_id, node.name, hash, expires],
            )?;
            tx.commit()
        })
    }

    /// Checks and uses up a join token; returns the node it was made for.
    pub fn consume_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Result<String, JoinRefusal>, DbError> {
        let Some((id, secret)) = token.split_once('.') else {
            return Ok(Err(JoinRefusal::Malformed));
        };
        let hash = Sha256::digest(secret.as_bytes());
        self.with(|c| {
            let tx = c.transaction()?;
            let row = tx
                .query_row(
                    "SELECT t.node, t.secret_sha256, t.expires, t.used, n.state
                     FROM join_tokens t JOIN nodes n ON n.name = t.node WHERE t.id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, NodeState>(4)?,
                        ))
                    },
                )
                .optional()?;
            let id = id.to_owned();
            let Some((node, stored, expires, used, state)) = row else {
                return Ok(Err(JoinRefusal::Unknown(id)));
            };
            if !bool::from(stored.ct_eq(hash.as_slice())) {
                return Ok(Err(JoinRefusal::WrongSecret(id)));
            }
            if used.is_some() {
                return Ok(Err(JoinRefusal::Used(id)));
            }
            if now >= expires {
                return Ok(Err(JoinRefusal::Expired(id)));
            }
            if state != NodeState::Pending {
                return Ok(Err(JoinRefusal::NodeState { id, node, state }));
            }
            tx.execute(
                "UPDATE join_tokens SET used = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            tx.commit()?;
            Ok(Ok(node))
        })
    }

    /// Records the certificate a node now holds and makes it active.
    pub fn activate(
        &self,
        node: &str,
        serial: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET state = ?5, cert_serial = ?2, cert_not_after = ?3, last_contact = ?4
                 WHERE name = ?1",
                params![node, serial, not_after, now, NodeState::Active],
            )
        })?;
        Ok(())
    }

    /// Checks that `node` may renew while presenting the certificate with
    /// serial `presented` (hex): the node is active and that certificate is
    /// the one recorded at its last join or renewal.
    pub fn check_renewal(
        &self,
        node: &str,
        presented: &str,
    ) -> Result<Result<(), RenewRefusal>, DbError> {
        self.with(|c| renewal_refusal(c, node, presented).map(|r| r.map_or(Ok(()), Err)))
    }

    /// Records `node`'s renewed certificate in place of the one with serial
    /// `presented`, if that is still its current one: a removal or a new
    /// join since [`Db::check_renewal`] wins over the renewal.
    pub fn renew(
        &self,
        node: &str,
        presented: &str,
        serial: &str,
        not_after: i64,
        now: i64,
    ) -> Result<Result<(), RenewRefusal>, DbError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Some(refusal) = renewal_refusal(&tx, node, presented)? {
                return Ok(Err(refusal));
            }
            tx.execute(
                "UPDATE nodes SET cert_serial = ?2, cert_not_after = ?3, last_contact = ?4
                 WHERE name = ?1",
                params![node, serial, not_after, now],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    pub fn remove(&self, node: &str) -> Result<(), DbError> {
        let changed = self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE nodes SET state = ?2 WHERE name = ?1",
                params![node, NodeState::Removed],
            )?;
            tx.execute(
                "DELETE FROM join_tokens WHERE node = ?1 AND used IS NULL",
                params![node],
            )?;
            tx.commit()?;
            Ok(n)
        })?;
        if changed == 0 {
            return Err(DbError::UnknownNode(node.to_owned()));
        }
        Ok(())
    }

    /// Registers a node reached over SSH only: it has no agent to join, so
    /// it is active at once (it is used once its host key is trusted).
    pub fn add_ssh_node(&self, node: &NodeRecord, now: i64) -> Result<(), DbError> {
        let existing = self.node(&node.name)?;
        if existing.is_some_and(|n| n.state == NodeState::Active) {
            return Err(DbError::Active(node.name.clone()));
        }
        self.with(|c| {
            c.execute(
                "INSERT INTO nodes (name, agent, http01, state, created, transport, ssh)
                 VALUES (?1, ?2, ?3, ?5, ?4, ?6, ?7)
                 ON CONFLICT(name) DO UPDATE SET agent = ?2, http01 = ?3, state = ?5,
                     cert_serial = NULL, cert_not_after = 0, transport = ?6, ssh = ?7",
                params![
                    node.name,
                    node.agent,
                    node.http01,
                    now,
                    NodeState::Active,
                    node.reach.transport.as_str(),
                    node.reach.ssh_column()
                ],
            )
        })?;
        Ok(())
    }

    /// Changes how `node` is reached.
    pub fn set_reach(&self, node: &str, reach: &crate::ssh::NodeReach) -> Result<(), DbError> {
        let changed = self.with(|c| {
            c.execute(
                "UPDATE nodes SET transport = ?2, ssh = ?3 WHERE name = ?1",
                params![node, reach.transport.as_str(), reach.ssh_column()],
            )
        })?;
        if changed == 0 {
            return Err(DbError::UnknownNode(node.to_owned()));
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT name, agent, http01, state, cert_not_after, last_contact, transport, ssh FROM nodes WHERE name = ?1",
                params![name],
                row_to_node,
            )
            .optional()
        })
    }

    /// Records what each node reported installed for `certificate`:
    /// (node, version, leaf SHA-256), and that each node answered.
    pub fn record_installs(
        &self,
        certificate: &str,
        installs: &[(String, u32, String)],
        now: i64,
    ) -> Result<(), DbError> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare(
                    "INSERT INTO installed (node, certificate, version, leaf_sha256, at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(node, certificate) DO UPDATE SET version = ?3, leaf_sha256 = ?4, at = ?5",
                )?;
                for (node, version, sha) in installs {
                    stmt.execute(params![node, certificate, version, sha, now])?;
                }
                stmt.finalize()?;
            }
            touch(&tx, installs.iter().map(|(n, _, _)| n.as_str()), now)?;
            tx.commit()
        })
    }

    /// What each node last reported installed for `certificate`, by node.
    pub fn installs(&self, certificate: &str) -> Result<Vec<Installed>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT node, version, leaf_sha256, at FROM installed WHERE certificate = ?1 ORDER BY node",
            )?;
            let rows = stmt.query_map(params![certificate], |r| {
                Ok(Installed {
                    node: r.get(0)?,
                    version: r.get(1)?,
                    leaf_sha256: r.get(2)?,
                    at: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Starts a rollout record; returns its id.
    pub fn start_rollout(&self, certificate: &str, version: u32, now: i64) -> Result<i64, DbError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO rollouts (certificate, version, started) VALUES (?1, ?2, ?3)",
                params![certificate, version, now],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn rollout_step(
        &self,
        rollout: i64,
        node: &str,
        step: &str,
        ok: bool,
        detail: &str,
        now: i64,
    ) -> Result<(), DbError> {
        self.with_unsynced(|c| {
            c.execute(
                "INSERT INTO rollout_steps (rollout, at, node, step, ok, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![rollout, now, node, step, ok, detail],
            )
        })?;
        Ok(())
    }

    pub fn finish_rollout(
        &self,
        rollout: i64,
        outcome: RolloutOutcome,
        now: i64,
    ) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE rollouts SET finished = ?2, outcome = ?3 WHERE id = ?1",
                params![rollout, now, outcome.as_str()],
            )
        })?;
        Ok(())
    }

    /// The state of the latest rollout of `certificate` ("ok", "halted",
    /// "failed", or "running" while it runs), if there was one.
    pub fn last_rollout(&self, certificate: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .latest_rollout(certificate)?
            .map(|r| r.state().to_owned()))
    }

    /// The latest rollout of `certificate`, if there was one.
    pub fn latest_rollout(&self, certificate: &str) -> Result<Option<RolloutSummary>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, version, outcome FROM rollouts WHERE certificate = ?1 ORDER BY id DESC LIMIT 1",
                params![certificate],
                |r| {
                    Ok(RolloutSummary {
                        id: r.get(0)?,
                        version: r.get(1)?,
                        outcome: r.get(2)?,
                    })
                },
            )
            .optional()
        })
    }

    /// The steps of a rollout, in order: (node, step, ok, detail).
    pub fn rollout_steps(&self, rollout: i64) -> Result<Vec<RolloutStep>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT node, step, ok, detail FROM rollout_steps WHERE rollout = ?1 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![rollout], |r| {
                Ok(RolloutStep {
                    node: r.get(0)?,
                    step: r.get(1)?,
                    ok: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Every registered node, in the order they were registered (the
    /// default rollout order).
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, agent, http01, state, cert_not_after, last_contact, transport, ssh FROM nodes ORDER BY rowid",
            )?;
            let rows = stmt.query_map([], row_to_node)?;
            rows.collect()
        })
    }

    pub fn audit(
        &self,
        uid: Option<u32>,
        action: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO audit (at, uid, action, detail) VALUES (?1, ?2, ?3, ?4)",
                params![now, uid, action, detail],
            )
        })?;
        Ok(())
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT at, uid, action, detail FROM audit ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok(AuditEntry {
                    at: r.get(0)?,
                    uid: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }
}

/// Records a successful exchange with each of `nodes`.
fn touch<'a>(
    tx: &Transaction<'_>,
    nodes: impl IntoIterator<Item = &'a str>,
    now: i64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare("UPDATE nodes SET last_contact = ?2 WHERE name = ?1")?;
    for node in nodes {
        stmt.execute(params![node, now])?;
    }
    Ok(())
}

fn row_to_node(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    Ok(NodeRecord {
        name: r.get(0)?,
        agent: r.get(1)?,
        http01: r.get(2)?,
        state: r.get(3)?,
        cert_not_after: r.get(4)?,
        last_contact: r.get(5)?,
        reach: crate::ssh::NodeReach::from_columns(
            &r.get::<_, String>(6)?,
            &r.get::<_, String>(7)?,
        )
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, e.into())
        })?,
    })
}

/// Adds `nodes.transport` and `nodes.ssh` to a database made before nodes
/// could be reached over SSH; a new one gets them the same way.
fn add_reach_columns(c: &Connection) -> rusqlite::Result<()> {
    let mut stmt = c.prepare("SELECT name FROM pragma_table_info('nodes')")?;
    let columns: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if !columns.iter().any(|c| c == "transport") {
        c.execute_batch("ALTER TABLE nodes ADD COLUMN transport TEXT NOT NULL DEFAULT 'agent'")?;
    }
    if !columns.iter().any(|c| c == "ssh") {
        c.execute_batch("ALTER TABLE nodes ADD COLUMN ssh TEXT NOT NULL DEFAULT ''")?;
    }
    Ok(())
}

/// Why `node` may not renew with the certificate of serial `presented`, if
/// there is a reason.
fn renewal_refusal(
    c: &Connection,
    node: &str,
    presented: &str,
) -> rusqlite::Result<Option<RenewRefusal>> {
    let row = c
        .query_row(
            "SELECT state, cert_serial FROM nodes WHERE name = ?1",
            params![node],
            |r| Ok((r.get::<_, NodeState>(0)?, r.get::<_, Option<String>>(1)?)),
        )
        .optional()?;
    let node = node.to_owned();
    Ok(match row {
        None => Some(RenewRefusal::Unknown(node)),
        Some((state, _)) if state != NodeState::Active => {
            Some(RenewRefusal::NotActive { node, state })
        }
        Some((_, None)) => Some(RenewRefusal::NoCertificate(node)),
        Some((_, Some(current))) if serial_digits(&current) != serial_digits(presented) => {
            Some(RenewRefusal::Superseded {
                node,
                presented: serial_digits(presented),
                current: serial_digits(&current),
            })
        }
        Some(_) => None,
    })
}

/// A hex serial number without its leading zero bytes, in lower case: DER
/// prepends a 0x00 to an INTEGER whose first byte has the high bit set, so
/// the same serial may be written with or without it.
fn serial_digits(hex: &str) -> String {
    let mut digits = hex.to_ascii_lowercase();
    while digits.len() > 2 && digits.starts_with("00") {
        digits.drain(..2);
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            agent: "127.0.0.2:7443".into(),
            http01: "127.0.0.2".into(),
            state: NodeState::Pending,
            cert_not_after: 0,
            last_contact: 0,
            reach: Default::default(),
        }
    }

    #[test]
    fn a_token_works_once_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.add_node(&node("a"), "id1", "s3cret", 100, 0).unwrap();
        assert_eq!(
            db.consume_token("id1.wrong", 10).unwrap(),
            Err(JoinRefusal::WrongSecret("id1".into()))
        );
        assert_eq!(
            db.consume_token("id1.s3cret", 100).unwrap(),
            Err(JoinRefusal::Expired("id1".into()))
        );
        assert_eq!(db.consume_token("id1.s3cret", 10).unwrap(), Ok("a".into()));
        assert_eq!(
            db.consume_token("id1.s3cret", 11).unwrap(),
            Err(JoinRefusal::Used("id1".into()))
        );
        assert_eq!(
            db.consume_token("nope.x", 11).unwrap(),
            Err(JoinRefusal::Unknown("nope".into()))
        );
        assert_eq!(
            db.consume_token("nodot", 11).unwrap(),
            Err(JoinRefusal::Malformed)
        );
        db.activate("a", "01", 1000, 12).unwrap();
        assert!(matches!(
            db.add_node(&node("a"), "id2", "x", 100, 0),
            Err(DbError::Active(_))
        ));
        db.remove("a").unwrap();
        assert_eq!(db.node("a").unwrap().unwrap().state, NodeState::Removed);
        assert!(matches!(db.remove("zz"), Err(DbError::UnknownNode(_))));
        // The secret is stored only as a hash, in the database and its WAL.
        drop(db);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let raw = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!raw.windows(6).any(|w| w == b"s3cret"));
        }
    }

    #[test]
    fn a_node_renews_only_with_its_current_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(
            db.check_renewal("a", "01").unwrap(),
            Err(RenewRefusal::Unknown("a".into()))
        );
        db.add_node(&node("a"), "id1", "s1", 100, 0).unwrap();
        assert!(matches!(
            db.check_renewal("a", "01").unwrap(),
            Err(RenewRefusal::NotActive { state, .. }) if state == NodeState::Pending
        ));
        db.activate("a", "00c1a2", 1000, 1).unwrap();
        // DER's sign byte is not part of the serial.
        assert_eq!(db.check_renewal("a", "c1a2").unwrap(), Ok(()));
        assert_eq!(db.check_renewal("a", "00C1A2").unwrap(), Ok(()));
        assert_eq!(db.renew("a", "c1a2", "7b", 2000, 2).unwrap(), Ok(()));
        assert_eq!(db.node("a").unwrap().unwrap().cert_not_after, 2000);
        // The certificate the renewal replaced is superseded.
        let superseded = db.check_renewal("a", "00c1a2").unwrap().unwrap_err();
        assert_eq!(
            superseded,
            RenewRefusal::Superseded {
                node: "a".into(),
                presented: "c1a2".into(),
                current: "7b".into(),
            }
        );
        assert!(superseded.to_string().contains("superseded identity"));
        // Removed and joined again: the old certificate never comes back,
        // even when its check passed before the removal.
        assert_eq!(db.check_renewal("a", "7b").unwrap(), Ok(()));
        db.remove("a").unwrap();
        db.add_node(&node("a"), "id2", "s2", 100, 3).unwrap();
        db.activate("a", "0d", 1000, 4).unwrap();
        assert!(matches!(
            db.renew("a", "7b", "0e", 3000, 5).unwrap(),
            Err(RenewRefusal::Superseded { .. })
        ));
        assert_eq!(db.check_renewal("a", "0d").unwrap(), Ok(()));
    }

    #[test]
    fn the_database_and_its_wal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.audit(Some(0), "test", "a write, so the WAL exists", 1)
            .unwrap();
        drop(db);
        // Reopened: the side files left by the first run are checked too.
        let db = Db::open(dir.path()).unwrap();
        db.audit(Some(0), "test", "again", 2).unwrap();
        for file in ["certfleet.db", "certfleet.db-wal", "certfleet.db-shm"] {
            let path = dir.path().join(file);
            if let Ok(meta) = std::fs::metadata(&path) {
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
            }
        }
    }

    #[test]
    fn a_node_state_is_stored_by_its_name_and_read_back_typed() {
        for state in NodeState::ALL {
            assert_eq!(NodeState::from_name(state.name()), Some(state));
            assert_eq!(state.to_string(), state.name());
        }
        assert_eq!(NodeState::from_name("Active"), None);
        let db = Db::in_memory().unwrap();
        db.add_node(&node("a"), "id1", "s", 100, 0).unwrap();
        let state = |db: &Db| db.node("a").unwrap().unwrap().state;
        assert_eq!(state(&db), NodeState::Pending);
        db.activate("a", "01", 1000, 1).unwrap();
        assert_eq!(state(&db), NodeState::Active);
        db.remove("a").unwrap();
        assert_eq!(state(&db), NodeState::Removed);
        // A state the code does not know is an error, never a guess.
        db.with(|c| {
            c.execute_batch("PRAGMA ignore_check_constraints = ON; UPDATE nodes SET state = 'gone'")
        })
        .unwrap();
        let err = db.node("a").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Store);
        assert!(
            err.to_string().contains("unknown node state \"gone\""),
            "{err}"
        );
    }

    #[test]
    fn the_latest_rollout_is_running_until_it_has_an_outcome() {
        let db = Db::in_memory().unwrap();
        assert_eq!(db.latest_rollout("cn").unwrap(), None);
        let first = db.start_rollout("cn", 1, 0).unwrap();
        db.finish_rollout(first, RolloutOutcome::Ok, 1).unwrap();
        let id = db.start_rollout("cn", 2, 2).unwrap();
        db.rollout_step(id, "n0", "web:check", false, "web.conf:1", 3)
            .unwrap();
        let latest = db.latest_rollout("cn").unwrap().unwrap();
        assert_eq!(
            (latest.id, latest.version, latest.state()),
            (id, 2, "running")
        );
        assert_eq!(db.last_rollout("cn").unwrap().as_deref(), Some("running"));
        db.finish_rollout(id, RolloutOutcome::Halted, 4).unwrap();
        let latest = db.latest_rollout("cn").unwrap().unwrap();
        assert_eq!(latest.outcome, Some(RolloutOutcome::Halted));
        assert_eq!(
            db.rollout_steps(latest.id).unwrap(),
            [RolloutStep {
                node: "n0".into(),
                step: "web:check".into(),
                ok: false,
                detail: "web.conf:1".into(),
            }]
        );
    }
}
