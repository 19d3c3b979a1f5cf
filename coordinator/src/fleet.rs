//! The cluster as every operation sees it: the config, the node registry,
//! the certificate store, a transport to each node, and one lock per
//! certificate.
//!
//! The config is a snapshot that [`Fleet::reload`] swaps (SIGHUP): an
//! operation reads it once, through [`Fleet::spec`] or [`Fleet::config`],
//! and keeps that [`Arc`] to its end, so a reload never changes a setting
//! under a flow in progress; the next operation sees the new one. Sections
//! bound at start (listeners, the ACME account, the state directory…) stay
//! as they were until a restart ([`Reloaded::needs_restart`]).
//!
//! [`Fleet::nodes`] turns a certificate's spec into the nodes that serve
//! it, each with its transport. Transports come from a [`Connect`], so the
//! flows in `distribute`, `rollout` and `issue` never know whether they
//! talk gRPC to an agent or to the fake the unit tests use.
//!
//! [`OperationLocks`] lets one operation (issue, distribute, restart,
//! rollout) run per certificate at a time: two rollouts would restart the
//! same nodes at once, and an issue during a rollout would change the live
//! version under it. The flows take an [`OperationGuard`] as proof that the
//! caller holds the certificate's lock; the admin API takes it for every
//! request (`admin::stream_operation`).

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use certfleet_proto::clock;
use tokio::sync::Notify;

use crate::challenge::{FanOut, FleetNode};
use crate::config::{CertificateSpec, Config, Node, RenewalConfig, Running};
use crate::db::{Db, DbError, NodeState};
use crate::error::ErrorKind;
use crate::journal::Journal;
use crate::notify::Notifier;
use crate::store::{Store, StoreError, Stored};
use crate::transport::{Connect, ConnectError};

/// Why a certificate or the nodes that serve it cannot be worked on.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("no certificate named {0:?} in the config")]
    UnknownCertificate(String),
    #[error("certificate {0} has not been issued yet: run `certfleet issue {0}`")]
    NotIssued(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] DbError),
    #[error(
        "certificate {cert} names node {node}, which is not registered (see `certfleet nodes`)"
    )]
    UnknownNode { cert: String, node: String },
    #[error("certificate {cert} names node {node}, which is {state}, not active")]
    NodeNotActive {
        cert: String,
        node: String,
        state: NodeState,
    },
    #[error("no active node serves certificate {0}: register nodes with `certfleet node add`")]
    NoNodes(String),
    #[error("node {node}: registry holds an unusable address: {reason}")]
    NodeAddress { node: String, reason: String },
    #[error("setting up the connection to node {node}: {source}")]
    Connect {
        node: String,
        #[source]
        source: ConnectError,
    },
}

impl FleetError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Store(_) | Self::Registry(_) => ErrorKind::Store,
            Self::Connect { .. } => ErrorKind::Internal,
            Self::UnknownCertificate(_)
            | Self::NotIssued(_)
            | Self::UnknownNode { .. }
            | Self::NodeNotActive { .. }
            | Self::NoNodes(_)
            | Self::NodeAddress { .. } => ErrorKind::Config,
        }
    }
}

/// A node's transport kept between operations, and when it was last
/// handed out.
struct Cached {
    node: FleetNode,
    used: Instant,
}

/// The cluster's shared state. One per coordinator.
pub struct Fleet {
    /// The running config; swapped whole by [`Fleet::reload`].
    config: Running,
    db: Arc<Db>,
    store: Arc<Store>,
    connect: Box<dyn Connect>,
    /// One transport per node, reused across operations; rebuilt when the
    /// registry's address for the node changes, dropped when it is removed
    /// or has been idle for `placement.idle_connection` (`close_idle`).
    transports: Mutex<HashMap<String, Cached>>,
    locks: OperationLocks,
    /// Where mail to the administrators goes.
    notifier: Notifier,
    /// Notified by each [`Fleet::reload`] that applied something.
    reloaded: Notify,
}

impl Fleet {
    pub fn new(config: Arc<Config>, db: Arc<Db>, store: Store, connect: Box<dyn Connect>) -> Self {
        let config = Running::new(config);
        Self {
            notifier: Notifier::new(&config, Arc::clone(&db)),
            config,
            locks: OperationLocks::journaled(Arc::clone(&db)),
            db,
            store: Arc::new(store),
            connect,
            transports: Mutex::default(),
            reloaded: Notify::new(),
        }
    }

    /// The running config, as a snapshot: a caller that reads several
    /// settings binds it once, so they all come from the same config.
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn locks(&self) -> &OperationLocks {
        &self.locks
    }

    /// Mail to the administrators.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The store, for a context that keeps its own handle (the issuer).
    pub(crate) fn shared_store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The configured certificate `name`, with the config it was read from.
    pub fn spec(&self, name: &str) -> Result<Spec, FleetError> {
        let config = self.config();
        let index = config
            .certificates
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| FleetError::UnknownCertificate(name.to_owned()))?;
        Ok(Spec { config, index })
    }

    /// The version of certificate `name` that `live/` points at, if one
    /// was issued.
    pub fn live(&self, name: &str) -> Result<Option<Stored>, FleetError> {
        Ok(self.store.live(name)?)
    }

    /// The live version of certificate `name`, which must have been issued.
    pub fn issued(&self, name: &str) -> Result<Stored, FleetError> {
        self.live(name)?
            .ok_or_else(|| FleetError::NotIssued(name.to_owned()))
    }

    /// Drops the transports no operation holds and none has asked for in
    /// `idle`: their connections close. A coordinator idle between renewals
    /// then holds no connection (at 1,000 agents, open channels were most
    /// of its memory); the next operation connects again. Returns how many
    /// were dropped.
    pub fn close_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut transports = self.transports.lock().expect("transport map poisoned");
        let before = transports.len();
        transports.retain(|_, c| {
            Arc::strong_count(&c.node.transport) > 1 || now.duration_since(c.used) < idle
        });
        before - transports.len()
    }

    /// Closes idle connections (`close_idle`) every half of
    /// `placement.idle_connection` (as the config says at each pass) until
    /// `stop`.
    pub async fn close_idle_until(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let idle = self.config().placement.idle_connection;
            tokio::select! {
                () = tokio::time::sleep(idle / 2) => {}
                () = stop.cancelled() => return,
            }
            let closed = self.close_idle(idle);
            if closed > 0 {
                tracing::debug!(closed, "closed idle node connections");
            }
        }
    }

    /// Puts `new` in force for every operation that starts from now on:
    /// its live sections, with the running config's sections that are
    /// bound at start ([`sections`]). An operation in progress keeps the
    /// snapshot it took. Says which changed sections were applied and
    /// which wait for a restart.
    pub fn reload(&self, new: Config) -> Reloaded {
        let reloaded = self.config.update(|running| {
            let mut reloaded = Reloaded::default();
            for (name, takes, changed) in sections(running, &new) {
                match (changed, takes) {
                    (false, _) => {}
                    (true, Takes::Live) => reloaded.applied.push(name),
                    (true, Takes::AtRestart) => reloaded.needs_restart.push(name),
                }
            }
            let merged = (!reloaded.applied.is_empty()).then(|| merge(running, new));
            (merged, reloaded)
        });
        if !reloaded.applied.is_empty() {
            self.reloaded.notify_one();
        }
        reloaded
    }

    /// Returns after the next reload that applied something (or at once if
    /// one did since the last call), so the renewal scheduler looks at the
    /// certificates and the policy again without waiting for its next pass.
    pub async fn reloaded(&self) {
        self.reloaded.notified().await;
    }

    /// Stops using `node`'s transport (the node was removed or re-added).
    pub fn forget_node(&self, node: &str) {
        self.transports
            .lock()
            .expect("transport map poisoned")
            .remove(node);
    }

    /// The nodes that serve `spec`, in rollout order, from the registry:
    /// those the spec lists, or else every active one. Only active nodes are
    /// ever contacted.
    pub fn nodes(&self, spec: &CertificateSpec) -> Result<Vec<FleetNode>, FleetError> {
        let records = self.db.nodes()?;
        let names: Vec<&str> = match &spec.nodes {
            Some(list) => list.iter().map(String::as_str).collect(),
            None => records
                .iter()
                .filter(|r| r.state == NodeState::Active)
                .map(|r| r.name.as_str())
                .collect(),
        };
        if names.is_empty() {
            return Err(FleetError::NoNodes(spec.name.clone()));
        }
        let mut transports = self.transports.lock().expect("transport map poisoned");
        let mut fleet = Vec::with_capacity(names.len());
        for name in names {
            let record =
                records
                    .iter()
                    .find(|r| r.name == name)
                    .ok_or_else(|| FleetError::UnknownNode {
                        cert: spec.name.clone(),
                        node: name.to_owned(),
                    })?;
            if record.state != NodeState::Active {
                return Err(FleetError::NodeNotActive {
                    cert: spec.name.clone(),
                    node: name.to_owned(),
                    state: record.state,
                });
            }
            let address = |reason: String| FleetError::NodeAddress {
                node: name.to_owned(),
                reason,
            };
            let node = Node {
                name: name.to_owned(),
                agent: crate::ssh::agent_address(&record.agent, &record.reach)
                    .map_err(|e| address(format!("{}: {e}", record.agent)))?,
                http01: record
                    .http01
                    .parse()
                    .map_err(|e| address(format!("{}: {e}", record.http01)))?,
                transport: record.reach.transport,
                ssh: record.reach.ssh.clone(),
            };
            if let Some(known) = transports.get_mut(name)
                && known.node.node == node
            {
                known.used = Instant::now();
                fleet.push(known.node.clone());
                continue;
            }
            let transport = self
                .connect
                .connect(&node)
                .map_err(|source| FleetError::Connect {
                    node: name.to_owned(),
                    source,
                })?;
            let fleet_node = FleetNode { node, transport };
            transports.insert(
                name.to_owned(),
                Cached {
                    node: fleet_node.clone(),
                    used: Instant::now(),
                },
            );
            fleet.push(fleet_node);
        }
        Ok(fleet)
    }
}

/// A configured certificate and the config snapshot it was read from. A
/// flow reads its certificate and every setting it uses through one of
/// these, so a reload while it runs never mixes two configs.
#[derive(Clone)]
pub struct Spec {
    config: Arc<Config>,
    /// Its place in `config.certificates`.
    index: usize,
}

impl Spec {
    /// The config this certificate was read from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The fan-out limits of `[placement]`.
    pub fn fan_out(&self) -> FanOut {
        let p = &self.config.placement;
        FanOut {
            concurrency: p.concurrency,
            node_timeout: p.node_timeout,
        }
    }
}

impl Deref for Spec {
    type Target = CertificateSpec;

    fn deref(&self) -> &CertificateSpec {
        &self.config.certificates[self.index]
    }
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// What [`Fleet::reload`] did with the sections that changed, named as the
/// file names them (`[placement]`, `[[certificates]]`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// In force for every operation that starts from now on.
    pub applied: Vec<&'static str>,
    /// Kept as they were: a restart applies them.
    pub needs_restart: Vec<&'static str>,
}

/// Whether a reload applies a section, or only a restart does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    /// Read by each operation or each pass of a loop.
    Live,
    /// Bound at start: a listener, the ACME account, a task that was
    /// spawned (or not) for it, a directory prepared for it.
    AtRestart,
}

/// Every section of the config, how a reload takes it, and whether it
/// differs between `old` and `new`. Compared through `Debug`, which every
/// section derives and which shows every field (secrets redacted); nothing
/// here is printed. [`merge`] must agree with the `Takes` column.
fn sections(old: &Config, new: &Config) -> [(&'static str, Takes, bool); 14] {
    use Takes::{AtRestart, Live};
    let differ =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    [
        ("state_dir", AtRestart, old.state_dir != new.state_dir),
        (
            "admin_socket",
            AtRestart,
            old.admin_socket != new.admin_socket,
        ),
        ("[acme]", AtRestart, differ(&old.acme, &new.acme)),
        ("[placement]", Live, differ(&old.placement, &new.placement)),
        (
            "[enrollment]",
            AtRestart,
            differ(&old.enrollment, &new.enrollment),
        ),
        // The scheduler reads its policy at each pass; whether it runs at
        // all is decided at start.
        ("[renewal]", Live, old.renewal.policy != new.renewal.policy),
        (
            "renewal.enabled",
            AtRestart,
            old.renewal.enabled != new.renewal.enabled,
        ),
        // Read when the coordinator starts, so applied means: used by the
        // next start's recovery.
        ("[recovery]", Live, old.recovery != new.recovery),
        (
            "[[certificates]]",
            Live,
            differ(&old.certificates, &new.certificates),
        ),
        ("[approval]", Live, differ(&old.approval, &new.approval)),
        ("[web]", AtRestart, differ(&old.web, &new.web)),
        // The SMTP client and the delivery and expiry tasks are made at
        // start; each certificate's own recipients are live.
        ("[mail]", AtRestart, differ(&old.mail, &new.mail)),
        ("[ssh]", AtRestart, differ(&old.ssh, &new.ssh)),
        ("[metrics]", AtRestart, differ(&old.metrics, &new.metrics)),
    ]
}

/// `new`'s live sections over `running`'s restart-only ones ([`sections`]).
/// `new` is taken apart whole, so a section added to [`Config`] does not
/// compile until it is sorted here.
fn merge(running: &Config, new: Config) -> Config {
    let Config {
        state_dir: _,
        admin_socket: _,
        acme: _,
        placement,
        enrollment: _,
        renewal,
        recovery,
        certificates,
        approval,
        web: _,
        mail: _,
        ssh: _,
        metrics: _,
    } = new;
    Config {
        placement,
        renewal: RenewalConfig {
            enabled: running.renewal.enabled,
            policy: renewal.policy,
        },
        recovery,
        certificates,
        approval,
        ..running.clone()
    }
}

/// What an operation does to a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Issue,
    /// The coordinator's own renewal: an issue, then the certificate's
    /// `after_issue`.
    Renew,
    Distribute,
    Restart,
    Rollout,
    /// An order against the staging directory; nothing is stored.
    DryRun,
    Revoke,
    Delete,
    Import,
    /// Healing what an operation the coordinator was stopped in left.
    Recover,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Issue => "issue",
            Self::Renew => "renewal",
            Self::Distribute => "distribute",
            Self::Restart => "restart",
            Self::Rollout => "rollout",
            Self::DryRun => "dry-run",
            Self::Revoke => "revoke",
            Self::Delete => "delete",
            Self::Import => "import",
            Self::Recover => "recovery",
        })
    }
}

/// An operation on a certificate and who started it: what a caller who
/// finds the certificate busy is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub operation: Operation,
    pub certificate: String,
    /// When it took the lock, seconds since the Unix epoch.
    pub started: i64,
    /// The admin's uid (the socket's SO_PEERCRED), when known.
    pub uid: Option<u32>,
    /// Who asked when it was no local user: e.g. "the one-time link (from
    /// 192.0.2.7:51234)".
    pub by: Option<String>,
}

impl Holder {
    /// `operation` of `certificate`, asked for now by `uid`.
    pub fn new(operation: Operation, certificate: &str, uid: Option<u32>) -> Self {
        Self {
            operation,
            certificate: certificate.to_owned(),
            started: clock::now(),
            uid,
            by: None,
        }
    }

    /// The same operation, asked for by `by` rather than a local user.
    pub fn by(mut self, by: impl Into<String>) -> Self {
        self.by = Some(by.into());
        self
    }
}

/// "rollout of cn (started 14:02:11 UTC by uid 1000)"
impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} (started ", self.operation, self.certificate)?;
        match time::OffsetDateTime::from_unix_timestamp(self.started) {
            Ok(t) => write!(f, "{:02}:{:02}:{:02} UTC", t.hour(), t.minute(), t.second())?,
            Err(_) => write!(f, "at {}", self.started)?,
        }
        match (self.uid, self.operation) {
            (Some(uid), _) => write!(f, " by uid {uid})"),
            (None, _) if self.by.is_some() => {
                write!(f, " by {})", self.by.as_deref().unwrap_or_default())
            }
            (None, Operation::Renew) => f.write_str(" by the renewal schedule)"),
            (None, Operation::Recover) => f.write_str(" by the coordinator at start)"),
            (None, _) => f.write_str(" by an unknown user)"),
        }
    }
}

/// A certificate's lock is held by another operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("busy: {0} is running")]
pub struct Busy(pub Holder);

impl Busy {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Busy
    }
}

/// One lock per certificate, shared by every operation on it.
#[derive(Clone, Default)]
pub struct OperationLocks(Arc<LockTable>);

#[derive(Default)]
struct LockTable {
    /// Who holds each certificate that is locked.
    held: Mutex<HashMap<String, Holder>>,
    /// Woken whenever a lock is released.
    released: Notify,
    /// Where each operation that takes a lock is journaled; `None`: not
    /// journaled (unit tests of the locks alone).
    journal: Option<Arc<Db>>,
}

impl LockTable {
    /// The table survives a panic in another holder: it is only ever left
    /// consistent (one insert or one remove per critical section).
    fn held(&self) -> MutexGuard<'_, HashMap<String, Holder>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl OperationLocks {
    /// Locks whose every operation is journaled in `db` from the moment
    /// it takes its lock.
    pub fn journaled(db: Arc<Db>) -> Self {
        Self(Arc::new(LockTable {
            journal: Some(db),
            ..LockTable::default()
        }))
    }

    /// Takes `holder.certificate`'s lock, or says who has it.
    pub fn try_acquire(&self, holder: Holder) -> Result<OperationGuard, Busy> {
        let mut held = self.0.held();
        if let Some(current) = held.get(&holder.certificate) {
            return Err(Busy(current.clone()));
        }
        held.insert(holder.certificate.clone(), holder.clone());
        drop(held);
        let journal = match &self.0.journal {
            Some(db) => Journal::begin(db, &holder),
            None => Journal::off(),
        };
        Ok(OperationGuard {
            locks: self.clone(),
            holder,
            journal,
        })
    }

    /// Takes `holder.certificate`'s lock, waiting for it as long as it
    /// takes. `waiting` hears of each operation waited for, once. An
    /// operation that waited counts as started when it got the lock.
    pub async fn acquire(
        &self,
        mut holder: Holder,
        mut waiting: impl FnMut(&Holder),
    ) -> OperationGuard {
        let mut last: Option<Holder> = None;
        loop {
            if last.is_some() {
                holder.started = clock::now();
            }
            // Made before the attempt, so a release between the attempt
            // and the wait still wakes it.
            let released = self.0.released.notified();
            match self.try_acquire(holder.clone()) {
                Ok(guard) => return guard,
                Err(Busy(current)) => {
                    if last.as_ref() != Some(&current) {
                        waiting(&current);
                        last = Some(current);
                    }
                }
            }
            released.await;
        }
    }
}

/// Proof that the caller holds a certificate's lock; dropping it (also
/// while a panic unwinds) releases the lock.
pub struct OperationGuard {
    locks: OperationLocks,
    holder: Holder,
    journal: Journal,
}

impl OperationGuard {
    pub fn certificate(&self) -> &str {
        &self.holder.certificate
    }

    /// Where this operation's steps are journaled.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }
}

impl std::fmt::Debug for OperationGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OperationGuard").field(&self.holder).finish()
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.locks.0.held().remove(&self.holder.certificate);
        self.locks.0.released.notify_waiters();
    }
}

/// A fleet of fake nodes for unit tests: every flow runs against it
/// without root, a CA or any process.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use certfleet_proto::bundle::Bundle;
    use tempfile::TempDir;

    use super::{Fleet, Holder, Operation, OperationGuard};
    use crate::config::Config;
    use crate::db::{Db, NodeRecord, NodeState};
    use crate::store::Store;
    use crate::transport::fake::FakeNodes;

    /// The most nodes a test fleet has.
    pub(crate) const MAX_TEST_NODES: usize = 7;

    /// A certificate "cn" with versions 1 and 2 in a store, live at 2, and
    /// [`MAX_TEST_NODES`] active nodes `n0`… in a registry.
    pub(crate) struct Bench {
        pub(crate) db: Arc<Db>,
        pub(crate) fakes: FakeNodes,
        /// (version, leaf SHA-256) of versions 1 and 2.
        pub(crate) v1: (u32, String),
        pub(crate) v2: (u32, String),
        state: TempDir,
    }

    pub(crate) fn node_name(i: usize) -> String {
        format!("n{i}")
    }

    fn bundle() -> (Bundle, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans = vec!["cn.example.org".to_owned()];
        let cert = rcgen::CertificateParams::new(sans.clone())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key_pem = key.serialize_pem();
        (
            Bundle::parse(&cert.pem(), Some(&key_pem), &sans).unwrap(),
            key_pem,
        )
    }

    impl Bench {
        pub(crate) fn new() -> Self {
            // The store fsyncs every file; in memory that costs nothing.
            let shm = std::path::Path::new("/dev/shm");
            let state = if shm.is_dir() {
                tempfile::tempdir_in(shm).unwrap()
            } else {
                tempfile::tempdir().unwrap()
            };
            let store = Store::open(state.path()).unwrap();
            let mut versions = Vec::new();
            for _ in 0..2 {
                let (b, key) = bundle();
                let (v, _) = store.save("cn", &b, &key).unwrap();
                versions.push((v, b.leaf_sha256_hex()));
            }
            let db = Arc::new(Db::in_memory().unwrap());
            for i in 0..MAX_TEST_NODES {
                let record = NodeRecord {
                    name: node_name(i),
                    agent: format!("127.0.0.{}:7443", i + 2),
                    http01: format!("127.0.0.{}", i + 2),
                    state: NodeState::Pending,
                    cert_not_after: 0,
                    last_contact: 0,
                    reach: Default::default(),
                };
                db.add_node(&record, &format!("t{i}"), "secret", i64::MAX, 0)
                    .unwrap();
                db.activate(&record.name, "01", 0, 0).unwrap();
            }
            let v2 = versions.pop().unwrap();
            let v1 = versions.pop().unwrap();
            Self {
                db,
                fakes: FakeNodes::default(),
                v1,
                v2,
                state,
            }
        }

        /// A fleet whose certificate "cn" is served by the first `nodes`
        /// nodes, restarted `batch` at a time. Every node starts with
        /// version 2 installed (version 1 before it) and nothing failing.
        pub(crate) fn fleet(&self, nodes: usize, batch: usize) -> Fleet {
            let names: Vec<String> = (0..nodes).map(node_name).collect();
            let text = format!(
                r#"
state_dir = "{}"
[acme]
directory = "https://localhost:14000/dir"
[enrollment]
listen = "127.0.0.1:7444"
[[certificates]]
name = "cn"
sans = ["cn.example.org"]
nodes = {}
restart_batch = {batch}
"#,
                self.state.path().display(),
                serde_json::to_string(&names).unwrap()
            );
            let config = Config::from_toml_str(&text, "test.toml").unwrap();
            self.fakes
                .reset(&names, &[self.v1.clone(), self.v2.clone()]);
            Fleet::new(
                Arc::new(config),
                Arc::clone(&self.db),
                Store::open(self.state.path()).unwrap(),
                Box::new(self.fakes.clone()),
            )
        }
    }

    /// Takes "cn"'s lock for `operation`, as the admin API would.
    pub(crate) fn lock(fleet: &Fleet, operation: Operation) -> OperationGuard {
        fleet
            .locks()
            .try_acquire(Holder::new(operation, "cn", Some(1000)))
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 2024-01-01T14:02:11Z.
    const STARTED: i64 = 1_704_117_731;

    #[test]
    fn a_transport_no_operation_holds_is_dropped_once_idle_and_made_again_when_needed() {
        let bench = testing::Bench::new();
        let fleet = bench.fleet(3, 1);
        let spec = fleet.spec("cn").unwrap();
        let held = fleet.nodes(&spec).unwrap();
        let again = fleet.nodes(&spec).unwrap();
        assert!(
            Arc::ptr_eq(&held[0].transport, &again[0].transport),
            "reused"
        );
        drop(again);
        assert_eq!(
            fleet.close_idle(Duration::ZERO),
            0,
            "an operation holds them"
        );
        let weak = Arc::downgrade(&held[0].transport);
        drop(held);
        assert_eq!(
            fleet.close_idle(Duration::from_secs(60)),
            0,
            "used just now"
        );
        assert_eq!(fleet.close_idle(Duration::ZERO), 3);
        assert!(
            weak.upgrade().is_none(),
            "nothing holds it: its connection closes"
        );
        let fresh = fleet.nodes(&spec).unwrap();
        assert_eq!(fresh.len(), 3, "connected again when needed");
        assert_eq!(fleet.close_idle(Duration::ZERO), 0);
    }

    fn holder(operation: Operation, certificate: &str) -> Holder {
        Holder {
            operation,
            certificate: certificate.into(),
            started: STARTED,
            uid: Some(1000),
            by: None,
        }
    }

    #[test]
    fn a_second_operation_is_told_who_holds_the_certificate() {
        let locks = OperationLocks::default();
        let first = locks.try_acquire(holder(Operation::Rollout, "cn")).unwrap();
        let busy = locks
            .try_acquire(holder(Operation::Issue, "cn"))
            .unwrap_err();
        assert_eq!(busy, Busy(holder(Operation::Rollout, "cn")));
        assert_eq!(
            busy.to_string(),
            "busy: rollout of cn (started 14:02:11 UTC by uid 1000) is running"
        );
        // Another certificate is not held up.
        let other = locks.try_acquire(holder(Operation::Issue, "web")).unwrap();
        assert_eq!(other.certificate(), "web");
        drop(first);
        locks.try_acquire(holder(Operation::Issue, "cn")).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_operation_starts_when_the_holder_finishes() {
        let locks = OperationLocks::default();
        let first = locks.try_acquire(holder(Operation::Rollout, "cn")).unwrap();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(first);
        });
        let mut waited_for = Vec::new();
        let second = locks
            .acquire(holder(Operation::Issue, "cn"), |h| {
                waited_for.push(h.to_string())
            })
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(
            waited_for,
            ["rollout of cn (started 14:02:11 UTC by uid 1000)"]
        );
        assert_eq!(second.holder().operation, Operation::Issue);
        // The waiter now holds it.
        assert!(locks.try_acquire(holder(Operation::Restart, "cn")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_take_turns() {
        let locks = OperationLocks::default();
        let first = locks.try_acquire(holder(Operation::Rollout, "cn")).unwrap();
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let locks = locks.clone();
            waiters.push(tokio::spawn(async move {
                let guard = locks
                    .acquire(holder(Operation::Restart, "cn"), |_| {})
                    .await;
                let start = tokio::time::Instant::now();
                tokio::time::sleep(Duration::from_secs(10)).await;
                drop(guard);
                start
            }));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(first);
        let mut starts = Vec::new();
        for w in waiters {
            starts.push(w.await.unwrap());
        }
        // One after another, never two at once.
        starts.sort();
        for pair in starts.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_secs(10), "{starts:?}");
        }
    }

    #[tokio::test]
    async fn a_panicking_holder_releases_the_lock() {
        let locks = OperationLocks::default();
        let guard = locks.try_acquire(holder(Operation::Rollout, "cn")).unwrap();
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("a bug in the rollout");
        });
        assert!(task.await.unwrap_err().is_panic());
        locks.try_acquire(holder(Operation::Issue, "cn")).unwrap();
    }

    /// A config unlike the bench's in every section, with "cn" changed
    /// and a certificate "web" added.
    fn every_section_changed() -> Config {
        Config::from_toml_str(
            r#"
state_dir = "/var/lib/certfleet-elsewhere"
admin_socket = "/run/elsewhere/admin.sock"
[acme]
directory = "https://acme.example.org/directory"
[placement]
concurrency = 3
[enrollment]
listen = "127.0.0.1:7445"
[renewal]
enabled = false
share_left = 0.5
[recovery]
rollout = "rollback"
[[certificates]]
name = "cn"
sans = ["cn.example.org"]
restart_batch = 2
[[certificates]]
name = "web"
sans = ["web.example.org"]
[approval]
expires_after_secs = 600
[web]
listen = "127.0.0.1:8443"
base_url = "https://certfleet.example.org:8443"
[mail]
smtp = "smtp://127.0.0.1:25"
from = "certfleet@example.org"
admins = ["admins@example.org"]
[ssh]
connect_timeout_secs = 3
[metrics]
listen = "127.0.0.1:9464"
"#,
            "reloaded.toml",
        )
        .unwrap()
    }

    #[test]
    fn a_reload_applies_what_operations_read_and_keeps_what_is_bound_at_start() {
        let bench = testing::Bench::new();
        let fleet = bench.fleet(3, 1);
        let before = fleet.config();
        let new = every_section_changed();
        let reloaded = fleet.reload(new.clone());
        assert_eq!(
            reloaded,
            Reloaded {
                applied: vec![
                    "[placement]",
                    "[renewal]",
                    "[recovery]",
                    "[[certificates]]",
                    "[approval]"
                ],
                needs_restart: vec![
                    "state_dir",
                    "admin_socket",
                    "[acme]",
                    "[enrollment]",
                    "renewal.enabled",
                    "[web]",
                    "[mail]",
                    "[ssh]",
                    "[metrics]"
                ],
            }
        );
        // What runs now: the new file's applied sections, the running
        // config's others, exactly as `reloaded` says.
        let running = fleet.config();
        for (name, _, changed) in sections(&running, &new) {
            assert_eq!(
                changed,
                reloaded.needs_restart.contains(&name),
                "{name} against the file"
            );
        }
        for (name, _, changed) in sections(&before, &running) {
            assert_eq!(
                changed,
                reloaded.applied.contains(&name),
                "{name} against the old config"
            );
        }
        assert_eq!(fleet.spec("web").unwrap().sans, ["web.example.org"]);
        assert_eq!(fleet.spec("cn").unwrap().fan_out().concurrency, 3);
    }

    #[test]
    fn a_snapshot_taken_before_a_reload_stays_as_it_was() {
        let bench = testing::Bench::new();
        let fleet = bench.fleet(3, 1);
        let spec = fleet.spec("cn").unwrap();
        let config = fleet.config();
        let (batch, concurrency) = (spec.restart_batch, spec.fan_out().concurrency);
        fleet.reload(every_section_changed());
        assert_eq!(
            (spec.restart_batch, spec.fan_out().concurrency),
            (batch, concurrency)
        );
        assert!(config.certificate("web").is_none());
        // The next operation reads the new config.
        assert_eq!(fleet.spec("cn").unwrap().restart_batch, 2);
        // Taken out of the file: gone for the next operation.
        let mut without = every_section_changed();
        without.certificates.retain(|c| c.name != "cn");
        fleet.reload(without);
        assert!(matches!(
            fleet.spec("cn"),
            Err(FleetError::UnknownCertificate(_))
        ));
        assert_eq!(spec.name, "cn", "the flow in progress keeps it");
    }

    #[test]
    fn a_reload_that_changes_nothing_or_only_what_needs_a_restart_swaps_nothing() {
        let bench = testing::Bench::new();
        let fleet = bench.fleet(3, 1);
        let before = fleet.config();
        assert_eq!(fleet.reload((*before).clone()), Reloaded::default());
        let mut new = (*before).clone();
        new.enrollment.advertise = "elsewhere.example.org:7444".into();
        assert_eq!(
            fleet.reload(new),
            Reloaded {
                applied: Vec::new(),
                needs_restart: vec!["[enrollment]"],
            }
        );
        assert!(Arc::ptr_eq(&before, &fleet.config()));
    }
}
