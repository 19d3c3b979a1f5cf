//! Approvals: a person says yes before a new version goes further.
//!
//! A certificate's `approval` policy says where a renewal (or a manual
//! `certfleet issue`) stops once the new version is stored:
//!
//! - `"none"` (the default): nothing stops; the renewal runs its
//!   `after_issue` as before, and a manual issue only stores.
//! - `"distribute"`: nothing is distributed until approved; approving runs
//!   the certificate's `after_issue` (distribute, or distribute and
//!   restart node by node). Needs `after_issue` other than `"none"`.
//! - `"rollout"`: the version is distributed at once, the restart waits;
//!   approving runs the restart. Needs `after_issue = "rollout"`.
//!
//! A manual `certfleet issue` of a certificate with a policy continues
//! exactly as its renewal would, up to the step that waits. A hand-run
//! `certfleet distribute`, `restart` or `rollout` is an admin's own
//! decision and is never held.
//!
//! Each stop is a [`Request`] in the state database: a short id an admin
//! can type, the version, serial, names and not-after, the nodes in the
//! order the step touches them ([`Request::batches`]), when it was made and
//! when it expires (`[approval] expires_after_secs`,
//! [`DEFAULT_EXPIRES_AFTER`]). A newer version's request supersedes the
//! certificate's older pending one: only the newest version can be
//! approved, and the older request says it was superseded.
//!
//! A request is decided once, by the first of:
//!
//! - `certfleet approve ID` / `certfleet reject ID` over the admin socket
//!   (who: the caller's Unix uid);
//! - the one-time link in the approval mail (`web`), whose token is the
//!   capability: [`TOKEN_BYTES`] random bytes, kept only as a SHA-256 and
//!   compared in constant time, good for one decision (who: "the one-time
//!   link", with the remote address);
//! - expiry: [`watch`] refuses a request whose time is up and mails that,
//!   after mailing a reminder at half-time.
//!
//! Approving runs the held step under the certificate's lock (waiting for
//! an operation under way), only while the request's version is still the
//! live one. Rejecting runs nothing: the nodes keep what they have and the
//! version stays stored. Every request and decision goes into the audit
//! trail.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::clock::{now, rfc3339};
use serde::Deserialize;

use crate::config::{AfterIssue, CertificateSpec};
use crate::db::DbError;
use crate::distribute::{DistributeError, Distributed};
use crate::error::ErrorKind;
use crate::fleet::{Fleet, FleetError, Holder, Operation, OperationGuard};
use crate::notify::{Mail, Notifier};
use crate::progress::{Progress, Stage};
use crate::rollout::{Restarted, RolloutError};
use crate::store::Stored;

/// How long a request waits for a decision unless the config says.
pub const DEFAULT_EXPIRES_AFTER: Duration = Duration::from_secs(72 * 3600);
/// The shortest `[approval] expires_after_secs` (tests use a few seconds).
pub const MIN_EXPIRES_AFTER: Duration = Duration::from_secs(1);
/// The longest `[approval] expires_after_secs`.
pub const MAX_EXPIRES_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);
/// Random bytes in a link's token: 256 bits, well past the 128 a guess
/// must beat.
pub const TOKEN_BYTES: usize = 32;
/// The longest comment kept with a decision.
pub const MAX_COMMENT_CHARS: usize = 500;
/// The longest [`watch`] sleeps before looking again, so a wall clock that
/// jumps is noticed.
pub const MAX_WATCH_SLEEP: Duration = Duration::from_secs(60);
/// Characters of a request id: no 0/o, 1/l/i, so it reads aloud and types
/// without mistakes.
const ID_ALPHABET: &[u8] = b"23456789abcdefghjkmnpqrstuvwxyz";
/// Characters of a request id, besides the dash in its middle.
const ID_CHARS: usize = 8;

/// Wakes [`watch`] when a request is made, so its reminder and expiry are
/// planned at once rather than at the next [`MAX_WATCH_SLEEP`]. One
/// coordinator runs per process; a spare wake-up costs one look.
static REQUESTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// A certificate's `approval` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    None,
    Distribute,
    Rollout,
}

impl Policy {
    /// `certificates[i].approval`, checked against the certificate's
    /// `after_issue` (a policy must hold back a step that exists).
    pub fn parse(value: Option<&str>, after: AfterIssue) -> Result<Self, String> {
        let policy = match value.unwrap_or("none") {
            "none" => Self::None,
            "distribute" => Self::Distribute,
            "rollout" => Self::Rollout,
            other => {
                return Err(format!(
                    "{other:?} is not one of \"none\", \"distribute\", \"rollout\""
                ));
            }
        };
        match (policy, after) {
            (Self::Distribute, AfterIssue::None) => Err(
                "\"distribute\" holds back the after_issue step, but after_issue = \"none\" has none: set after_issue to \"distribute\" or \"rollout\"".into(),
            ),
            (Self::Rollout, AfterIssue::None | AfterIssue::Distribute) => Err(
                "\"rollout\" holds back the restart, which only after_issue = \"rollout\" does: set after_issue = \"rollout\", or approval = \"distribute\"".into(),
            ),
            _ => Ok(policy),
        }
    }
}

/// `[approval]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApprovalConfig {
    expires_after_secs: Option<u64>,
}

/// `[approval]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalConfig {
    /// How long a request waits for a decision.
    pub expires_after: Duration,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        Self {
            expires_after: DEFAULT_EXPIRES_AFTER,
        }
    }
}

/// Checks `[approval]`; an error is (key, reason).
pub fn validate_config(raw: RawApprovalConfig) -> Result<ApprovalConfig, (String, String)> {
    let expires_after = match raw.expires_after_secs {
        None => DEFAULT_EXPIRES_AFTER,
        Some(s) => {
            let d = Duration::from_secs(s);
            if !(MIN_EXPIRES_AFTER..=MAX_EXPIRES_AFTER).contains(&d) {
                return Err((
                    "approval.expires_after_secs".into(),
                    format!(
                        "{s} must be between {} and {} (72 hours, 259200, by default)",
                        MIN_EXPIRES_AFTER.as_secs(),
                        MAX_EXPIRES_AFTER.as_secs()
                    ),
                ));
            }
            d
        }
    };
    Ok(ApprovalConfig { expires_after })
}

/// What approving a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Put the version on every node (`after_issue = "distribute"`).
    Distribute,
    /// Distribute, then restart batch by batch (`after_issue = "rollout"`).
    Rollout,
    /// Restart batch by batch; the version was distributed already.
    Restart,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Self::Distribute => "distribute",
            Self::Rollout => "rollout",
            Self::Restart => "restart",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Distribute, Self::Rollout, Self::Restart]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// The operation approving it runs, as the lock and the journal name it.
    pub fn operation(self) -> Operation {
        match self {
            Self::Distribute => Operation::Distribute,
            Self::Rollout => Operation::Rollout,
            Self::Restart => Operation::Restart,
        }
    }

    /// What it does, for a person: "distribute version 3 to every node".
    pub fn describe(self, version: u32) -> String {
        match self {
            Self::Distribute => format!(
                "put version {version} on every node (services keep the old one until restarted)"
            ),
            Self::Rollout => format!(
                "put version {version} on every node, then restart the services batch by batch, proving each serves it"
            ),
            Self::Restart => format!(
                "restart the services batch by batch onto version {version} (already on every node), proving each serves it"
            ),
        }
    }

    /// Whether the nodes' order matters (they are restarted in batches).
    fn restarts(self) -> bool {
        !matches!(self, Self::Distribute)
    }
}

/// The step `spec`'s policy holds back after a version is stored; `None`
/// when nothing waits.
pub fn held_back(spec: &CertificateSpec) -> Option<Step> {
    match (spec.approval, spec.after_issue) {
        (Policy::None, _) | (_, AfterIssue::None) => None,
        (Policy::Distribute, AfterIssue::Distribute) => Some(Step::Distribute),
        (Policy::Distribute, AfterIssue::Rollout) => Some(Step::Rollout),
        (Policy::Rollout, AfterIssue::Rollout) => Some(Step::Restart),
        // The config refuses this pair; should one get here, nothing is
        // held back that the policy does not name.
        (Policy::Rollout, AfterIssue::Distribute) => None,
    }
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Approved,
    Rejected,
    Expired,
    /// A newer version's request took its place.
    Superseded,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Superseded => "superseded",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Approved,
            Self::Rejected,
            Self::Expired,
            Self::Superseded,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// One request for approval, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Short and typeable: "k7f9-x2mq".
    pub id: String,
    pub certificate: String,
    pub version: u32,
    /// The leaf's serial, lowercase hex.
    pub serial: String,
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
    pub step: Step,
    /// The nodes in the order the step touches them, batch by batch (one
    /// batch of all nodes for a distribution, which has no order).
    pub batches: Vec<Vec<String>>,
    pub created: i64,
    pub expires: i64,
    /// The half-time reminder went out.
    pub reminded: bool,
    pub state: State,
    /// "uid 1000", "the one-time link (from 10.0.0.5)", "the coordinator".
    pub decided_by: String,
    pub decided: i64,
    pub comment: String,
    /// How the approved step ended: "running", "ok", "failed: …".
    pub outcome: String,
}

impl Request {
    /// When the reminder is due: half-way to expiry.
    pub fn remind_at(&self) -> i64 {
        self.created + (self.expires - self.created) / 2
    }
}

/// A link's token: the request's id, a dot, and the secret. Secret:
/// `Debug` does not show it, and it is only ever stored hashed.
pub struct LinkToken(String);

impl LinkToken {
    /// A new token for request `id`.
    fn new(id: &str) -> Self {
        use base64::Engine;
        let mut secret = [0u8; TOKEN_BYTES];
        crate::pki::random(&mut secret);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        Self(format!("{id}.{secret}"))
    }

    /// The token as it goes into the link.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LinkToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkToken(<redacted>)")
    }
}

/// A token from a link, split into the request's id and the secret; `None`
/// for anything not shaped like one.
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let id_ok =
        id.len() == ID_CHARS + 1 && id.bytes().all(|b| b == b'-' || ID_ALPHABET.contains(&b));
    let secret_ok = (40..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some((id, secret))
}

/// SHA-256 of a token's secret part, as stored.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret.as_bytes()).into()
}

/// A fresh request id: "k7f9-x2mq".
fn new_id() -> String {
    let mut bytes = [0u8; ID_CHARS];
    crate::pki::random(&mut bytes);
    let mut id = String::with_capacity(ID_CHARS + 1);
    for (i, b) in bytes.iter().enumerate() {
        if i == ID_CHARS / 2 {
            id.push('-');
        }
        // 256 is not a multiple of the alphabet's size: the first few
        // characters are slightly likelier, which costs an id nothing.
        id.push(ID_ALPHABET[usize::from(*b) % ID_ALPHABET.len()] as char);
    }
    id
}

/// Who decided a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decider {
    /// An admin over the socket; the uid from SO_PEERCRED, when known.
    Admin(Option<u32>),
    /// Whoever holds the mailed link, from this address.
    Link(std::net::SocketAddr),
}

impl Decider {
    fn uid(&self) -> Option<u32> {
        match self {
            Self::Admin(uid) => *uid,
            Self::Link(_) => None,
        }
    }
}

impl fmt::Display for Decider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin(Some(uid)) => write!(f, "uid {uid}"),
            Self::Admin(None) => f.write_str("an unknown user"),
            Self::Link(addr) => write!(f, "the one-time link (from {})", addr.ip()),
        }
    }
}

/// Approve or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Reject,
}

impl Verdict {
    fn state(self) -> State {
        match self {
            Self::Approve => State::Approved,
            Self::Reject => State::Rejected,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Reject => "reject",
        }
    }
}

/// Why a request could not be made, decided or carried out.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no approval request {0:?}: `certfleet approvals` lists them")]
    Unknown(String),
    #[error("approval request {id} is {} already ({by}{}); nothing to do", state.name(), if comment.is_empty() { String::new() } else { format!(": {comment}") })]
    Decided {
        id: String,
        state: State,
        by: String,
        comment: String,
    },
    #[error(
        "approval request {id} expired at {}; it is refused: `certfleet distribute` or `rollout` {certificate} runs the step by hand",
        rfc3339(*expires)
    )]
    Expired {
        id: String,
        certificate: String,
        expires: i64,
    },
    #[error("comment is {0} characters; at most {MAX_COMMENT_CHARS} are kept")]
    CommentTooLong(usize),
    #[error(
        "approval request {id} is for version {version} of {certificate}, but version {live} is live now; nothing was run"
    )]
    NotLive {
        id: String,
        certificate: String,
        version: u32,
        live: u32,
    },
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Distribute(Box<DistributeError>),
    #[error(transparent)]
    Rollout(Box<RolloutError>),
}

impl From<DistributeError> for ApprovalError {
    fn from(e: DistributeError) -> Self {
        Self::Distribute(Box::new(e))
    }
}

impl From<RolloutError> for ApprovalError {
    fn from(e: RolloutError) -> Self {
        Self::Rollout(Box::new(e))
    }
}

impl ApprovalError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unknown(_)
            | Self::Decided { .. }
            | Self::Expired { .. }
            | Self::CommentTooLong(_)
            | Self::NotLive { .. } => ErrorKind::Config,
            Self::Fleet(e) => e.kind(),
            Self::Db(e) => e.kind(),
            Self::Distribute(e) => e.kind(),
            Self::Rollout(e) => e.kind(),
        }
    }

    pub fn nodes(&self) -> Vec<&str> {
        match self {
            Self::Distribute(e) => e.nodes(),
            Self::Rollout(e) => e.nodes(),
            _ => Vec::new(),
        }
    }
}

/// A request just made, and its link (when the page is configured).
#[derive(Debug)]
pub struct Created {
    pub request: Request,
    pub link: Option<String>,
    /// The ids of the certificate's older pending requests it superseded.
    pub superseded: Vec<String>,
}

/// Holds `step` of the version `stored` for a person's approval: for a
/// restart, distributes it first; then stores the request (superseding the
/// certificate's older pending one), audits it, reports it to `progress`
/// and mails the administrators. The caller holds the certificate's lock.
pub async fn request(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
    stored: &Stored,
    step: Step,
) -> Result<Created, ApprovalError> {
    if step == Step::Restart {
        crate::distribute::distribute(fleet, op, Some(stored.version), &[], progress).await?;
    }
    let spec = fleet.spec(op.certificate())?;
    let nodes: Vec<String> = fleet
        .nodes(&spec)?
        .into_iter()
        .map(|n| n.node.name)
        .collect();
    let batches = if step.restarts() {
        nodes
            .chunks(spec.restart_batch)
            .map(<[String]>::to_vec)
            .collect()
    } else {
        vec![nodes]
    };
    let created = now();
    let expires_after = spec.config().approval.expires_after.as_secs() as i64;
    let mut request = Request {
        id: new_id(),
        certificate: stored.name.clone(),
        version: stored.version,
        serial: stored.bundle.serial.clone(),
        names: stored.bundle.sans.clone(),
        not_after: stored.bundle.not_after,
        step,
        batches,
        created,
        expires: created + expires_after,
        reminded: false,
        state: State::Pending,
        decided_by: String::new(),
        decided: 0,
        comment: String::new(),
        outcome: String::new(),
    };
    // An id taken already (one in 31^8) gets another draw.
    let mut attempts = 0;
    let (token, superseded) = loop {
        let token = LinkToken::new(&request.id);
        let secret = token.0.split_once('.').map(|(_, s)| s).unwrap_or_default();
        match fleet.db().insert_approval(&request, &secret_hash(secret)) {
            Ok(superseded) => break (token, superseded),
            Err(e) if attempts < 3 && e.is_constraint() => {
                attempts += 1;
                request.id = new_id();
            }
            Err(e) => return Err(e.into()),
        }
    };
    audit(
        fleet,
        None,
        "approval requested",
        &format!(
            "request {} certificate {} version {} step {}{}",
            request.id,
            request.certificate,
            request.version,
            step.name(),
            if superseded.is_empty() {
                String::new()
            } else {
                format!("; supersedes {}", superseded.join(", "))
            }
        ),
    );
    let link = spec
        .config()
        .web
        .as_ref()
        .map(|w| format!("{}/approve/{}", w.base_url, token.reveal()));
    progress.step(
        Stage::Store,
        format!(
            "version {} waits for approval before it is {}: `certfleet approve {}` (request expires {})",
            request.version,
            match step {
                Step::Distribute | Step::Rollout => "distributed",
                Step::Restart => "restarted into the services",
            },
            request.id,
            rfc3339(request.expires)
        ),
    );
    tracing::info!(
        certificate = request.certificate,
        version = request.version,
        id = request.id,
        step = step.name(),
        "approval requested"
    );
    fleet.notifier().send(requested_mail(
        fleet.notifier(),
        &request,
        link.as_deref(),
        &superseded,
    ));
    REQUESTED.notify_one();
    Ok(Created {
        request,
        link,
        superseded,
    })
}

/// Decides request `id` for `decider`. A link's decision carries the
/// link's `secret`, which must match (in constant time). Nothing runs
/// here: an approval's step runs with [`run_approved`] under the lock.
pub fn decide(
    fleet: &Fleet,
    id: &str,
    decider: &Decider,
    verdict: Verdict,
    comment: &str,
    secret: Option<&str>,
) -> Result<Request, ApprovalError> {
    let comment = comment.trim();
    let chars = comment.chars().count();
    if chars > MAX_COMMENT_CHARS {
        return Err(ApprovalError::CommentTooLong(chars));
    }
    let decided = fleet.db().decide_approval(
        id,
        verdict.state(),
        &decider.to_string(),
        comment,
        secret.map(secret_hash).as_ref(),
        now(),
    )?;
    let request = decided_or_refused(id, decided)?;
    audit(
        fleet,
        decider.uid(),
        verdict.verb(),
        &format!(
            "request {} certificate {} version {} step {} by {decider}{}",
            request.id,
            request.certificate,
            request.version,
            request.step.name(),
            if comment.is_empty() {
                String::new()
            } else {
                format!("; comment: {comment}")
            }
        ),
    );
    tracing::info!(
        id = request.id,
        certificate = request.certificate,
        version = request.version,
        by = %decider,
        verdict = verdict.verb(),
        "approval request decided"
    );
    Ok(request)
}

/// What deciding found, as the database answers it.
#[derive(Debug)]
pub enum Decided {
    /// Decided now; the request as it is after.
    Now(Request),
    /// No such request, or (for a link) a secret that does not match.
    Unknown,
    /// Not pending any more.
    Already(Request),
    /// Still pending, but its time is up ([`watch`] refuses it shortly).
    Expired(Request),
}

fn decided_or_refused(id: &str, decided: Decided) -> Result<Request, ApprovalError> {
    match decided {
        Decided::Now(r) => Ok(r),
        Decided::Unknown => Err(ApprovalError::Unknown(id.to_owned())),
        Decided::Already(r) if r.state == State::Expired => Err(ApprovalError::Expired {
            id: r.id,
            certificate: r.certificate,
            expires: r.expires,
        }),
        Decided::Already(r) => Err(ApprovalError::Decided {
            id: r.id,
            state: r.state,
            by: r.decided_by,
            comment: r.comment,
        }),
        Decided::Expired(r) => Err(ApprovalError::Expired {
            id: r.id,
            certificate: r.certificate,
            expires: r.expires,
        }),
    }
}

/// What an approved step did.
#[derive(Debug)]
pub enum Ran {
    Distributed(Distributed),
    Restarted(Restarted),
}

/// Runs the step `request` (approved) held back, while its version is
/// still the live one, and records how it ended. The caller holds the
/// certificate's lock.
pub async fn run_approved(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
    request: &Request,
) -> Result<Ran, ApprovalError> {
    let ran = run_step(fleet, op, progress, request).await;
    // The same mail a hand-run rollout sends.
    let operation = request.step.operation();
    match &ran {
        Ok(Ran::Restarted(done)) => {
            crate::notify::rolled_out(fleet, &request.certificate, operation, done)
        }
        Err(ApprovalError::Rollout(e)) => {
            crate::notify::rollout_failed(fleet, &request.certificate, operation, e)
        }
        _ => {}
    }
    let outcome = match &ran {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("failed: {e}"),
    };
    if let Err(e) = fleet.db().approval_outcome(&request.id, &outcome) {
        tracing::warn!(id = request.id, error = %e, "cannot record the approved step's outcome");
    }
    ran
}

async fn run_step(
    fleet: &Fleet,
    op: &OperationGuard,
    progress: &Progress,
    request: &Request,
) -> Result<Ran, ApprovalError> {
    let live = fleet.issued(op.certificate())?;
    if live.version != request.version {
        return Err(ApprovalError::NotLive {
            id: request.id.clone(),
            certificate: request.certificate.clone(),
            version: request.version,
            live: live.version,
        });
    }
    progress.step(
        Stage::Store,
        format!(
            "request {} approved by {}: {}",
            request.id,
            request.decided_by,
            request.step.describe(request.version)
        ),
    );
    Ok(match request.step {
        Step::Distribute => Ran::Distributed(
            crate::distribute::distribute(fleet, op, Some(request.version), &[], progress).await?,
        ),
        Step::Rollout => Ran::Restarted(crate::rollout::rollout(fleet, op, progress).await?),
        Step::Restart => Ran::Restarted(crate::rollout::restart(fleet, op, progress).await?),
    })
}

/// Runs an approval decided without a client to stream to (the page) in
/// the background: waits for the certificate's lock, runs the step, and
/// journals how it ended.
pub fn spawn_approved(fleet: Arc<Fleet>, request: Request, decider: &Decider) {
    let mut holder = Holder::new(
        request.step.operation(),
        &request.certificate,
        decider.uid(),
    );
    if let Decider::Link(_) = decider {
        holder = holder.by(decider.to_string());
    }
    tokio::spawn(async move {
        let op = fleet.locks().acquire(holder, |_| {}).await;
        let progress = Progress::discard();
        let ran = crate::ssh::record_fallbacks(
            op.journal().clone(),
            progress.clone(),
            run_approved(&fleet, &op, &progress, &request),
        );
        match ran.await {
            Ok(_) => op.journal().finish("ok"),
            Err(e) => {
                tracing::warn!(id = request.id, certificate = request.certificate, error = %e, "the approved step failed");
                op.journal().finish(&format!("failed: {e}"));
            }
        }
    });
}

/// Writes a request's or decision's line to the audit log.
fn audit(fleet: &Fleet, uid: Option<u32>, action: &str, detail: &str) {
    if let Err(e) = fleet.db().audit(uid, action, detail, now()) {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
}

/// What [`watch`] does to a pending request at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Its time is up: refuse it, and say so by mail.
    Expire,
    /// Half its time is gone: remind the administrators, once.
    Remind,
}

/// What is due for `request` (pending) at `now`.
pub fn due(request: &Request, now: i64) -> Option<Due> {
    if now >= request.expires {
        Some(Due::Expire)
    } else if !request.reminded && now >= request.remind_at() {
        Some(Due::Remind)
    } else {
        None
    }
}

/// How long until something is due for one of `pending` at `now`, at most
/// [`MAX_WATCH_SLEEP`].
pub fn sleep_for(pending: &[Request], now: i64) -> Duration {
    let next = pending
        .iter()
        .map(|r| if r.reminded { r.expires } else { r.remind_at() })
        .min();
    match next {
        Some(t) if t <= now => Duration::ZERO,
        Some(t) => Duration::from_secs((t - now) as u64).min(MAX_WATCH_SLEEP),
        None => MAX_WATCH_SLEEP,
    }
}

/// Reminds at half-time and refuses expired requests until `stop`; a
/// failure to read the database is logged and tried again later.
pub async fn watch(fleet: Arc<Fleet>, stop: impl std::future::Future<Output = ()>) {
    watch_with(&fleet, now, stop).await
}

/// [`watch`] on the clock `clock` (Unix seconds), for tests.
pub async fn watch_with(
    fleet: &Fleet,
    clock: impl Fn() -> i64,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let t = clock();
        let wait = match fleet.db().pending_approvals() {
            Ok(pending) => {
                for r in &pending {
                    act(fleet, r, due(r, t), t);
                }
                let pending = fleet.db().pending_approvals().unwrap_or_default();
                sleep_for(&pending, t).max(Duration::from_secs(1))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the approval requests; looking again soon");
                MAX_WATCH_SLEEP
            }
        };
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
            () = REQUESTED.notified() => {}
        }
    }
}

/// Carries out what is `due` for `r`; the database decides the race with
/// an admin's decision (only a pending request is expired).
fn act(fleet: &Fleet, r: &Request, due: Option<Due>, now: i64) {
    let db = fleet.db();
    match due {
        None => {}
        Some(Due::Remind) => match db.mark_reminded(&r.id) {
            Ok(true) => {
                tracing::info!(id = r.id, certificate = r.certificate, "approval reminder");
                fleet.notifier().send(reminder_mail(fleet.notifier(), r));
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(id = r.id, error = %e, "cannot mark the reminder sent"),
        },
        Some(Due::Expire) => match db.expire_approval(&r.id, now) {
            Ok(true) => {
                audit(
                    fleet,
                    None,
                    "approval expired",
                    &format!(
                        "request {} certificate {} version {} step {}: refused",
                        r.id,
                        r.certificate,
                        r.version,
                        r.step.name()
                    ),
                );
                tracing::info!(
                    id = r.id,
                    certificate = r.certificate,
                    "approval request expired"
                );
                fleet.notifier().send(expired_mail(fleet.notifier(), r));
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(id = r.id, error = %e, "cannot expire the request"),
        },
    }
}

/// The facts of a request, one "label: value" per line, for mail and page.
pub fn facts(r: &Request) -> Vec<(&'static str, String)> {
    vec![
        ("Certificate", r.certificate.clone()),
        ("Version", r.version.to_string()),
        ("Serial", r.serial.clone()),
        ("Names", r.names.join(", ")),
        ("Not after", rfc3339(r.not_after)),
        ("On approval", r.step.describe(r.version)),
        ("Request", r.id.clone()),
        ("Expires", rfc3339(r.expires)),
    ]
}

/// The nodes in order, one line per batch: "1. cn-a, cn-b".
pub fn plan_lines(r: &Request) -> Vec<String> {
    if !r.step.restarts() {
        return vec![format!("all at once: {}", r.batches.concat().join(", "))];
    }
    r.batches
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{}. {}", i + 1, b.join(", ")))
        .collect()
}

/// Escapes text for HTML.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A mail about `r`: `intro`, then its facts and plan, the page's link
/// (when there is one) and `outro`, composed as every mail is (the
/// cluster and the certificate first).
fn mail(
    notifier: &Notifier,
    r: &Request,
    subject: String,
    intro: &str,
    link: Option<&str>,
    outro: &str,
) -> Mail {
    let heading = if r.step.restarts() {
        "Restart plan"
    } else {
        "Nodes"
    };
    let mut facts: Vec<(&str, String)> = facts(r)
        .into_iter()
        .filter(|(label, _)| *label != "Certificate")
        .collect();
    facts.push((heading, plan_lines(r).join("\n")));
    let mut paragraphs = vec![intro.to_owned()];
    if let Some(link) = link {
        paragraphs.push(format!("Approve or reject on this page (one use): {link}"));
    }
    if !outro.is_empty() {
        paragraphs.push(outro.to_owned());
    }
    // The subject, capitalized, heads the body.
    let mut title = subject.clone();
    if let Some(first) = title.get(..1) {
        title.replace_range(..1, &first.to_uppercase());
    }
    let mut m = notifier.compose(&r.certificate, subject, &title, &facts, &paragraphs);
    if let Some(link) = link {
        // The link, clickable in the HTML part.
        let shown = html_escape(link);
        m.html = m
            .html
            .replacen(&shown, &format!("<a href=\"{shown}\">{shown}</a>"), 1);
    }
    m
}

/// "approval requested": the facts, the plan, how to approve and until
/// when.
pub fn requested_mail(
    notifier: &Notifier,
    r: &Request,
    link: Option<&str>,
    superseded: &[String],
) -> Mail {
    let mut intro = format!(
        "Version {} of certificate {} is stored and waits for your approval before the coordinator will {}.",
        r.version,
        r.certificate,
        r.step.describe(r.version)
    );
    if !superseded.is_empty() {
        intro.push_str(&format!(
            " It supersedes the older pending request {}, which can no longer be approved.",
            superseded.join(", ")
        ));
    }
    let outro = format!(
        "From the coordinator: certfleet approve {0} [--comment TEXT], or certfleet reject {0}. The request expires at {1}; then it is refused.",
        r.id,
        rfc3339(r.expires)
    );
    mail(
        notifier,
        r,
        format!(
            "approval needed: {} version {} ({})",
            r.certificate,
            r.version,
            r.step.name()
        ),
        &intro,
        link,
        &outro,
    )
}

/// The half-time reminder. The link is in the first mail: its secret is
/// not kept, so it cannot be sent again.
pub fn reminder_mail(notifier: &Notifier, r: &Request) -> Mail {
    let intro = format!(
        "Reminder: version {} of certificate {} still waits for your approval; half of the time to decide is gone.",
        r.version, r.certificate
    );
    let outro = format!(
        "Use the link in the first mail, or from the coordinator: certfleet approve {0}, or certfleet reject {0}. The request expires at {1}.",
        r.id,
        rfc3339(r.expires)
    );
    mail(
        notifier,
        r,
        format!(
            "reminder: approval needed: {} version {}",
            r.certificate, r.version
        ),
        &intro,
        None,
        &outro,
    )
}

/// The request expired: refused, nothing runs.
pub fn expired_mail(notifier: &Notifier, r: &Request) -> Mail {
    let intro = format!(
        "The approval request {} for version {} of certificate {} expired without a decision, so it is refused: nothing was {}.",
        r.id,
        r.version,
        r.certificate,
        if r.step == Step::Restart {
            "restarted"
        } else {
            "distributed"
        }
    );
    let outro = format!(
        "The version stays stored. To go on by hand: certfleet {} {}.",
        r.step.name(),
        r.certificate
    );
    mail(
        notifier,
        r,
        format!("approval expired: {} version {}", r.certificate, r.version),
        &intro,
        None,
        &outro,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(created: i64, ttl: i64) -> Request {
        Request {
            id: new_id(),
            certificate: "cn".into(),
            version: 2,
            serial: "0a1b".into(),
            names: vec!["cn.example.org".into(), "a.example.org".into()],
            not_after: 1_800_000_000,
            step: Step::Rollout,
            batches: vec![vec!["n0".into(), "n1".into()], vec!["n2".into()]],
            created,
            expires: created + ttl,
            reminded: false,
            state: State::Pending,
            decided_by: String::new(),
            decided: 0,
            comment: String::new(),
            outcome: String::new(),
        }
    }

    /// A request for "cn"'s live version 2 on a fleet of fake nodes.
    async fn requested(bench: &crate::fleet::testing::Bench, fleet: &Fleet, step: Step) -> Created {
        let op = crate::fleet::testing::lock(fleet, Operation::Renew);
        let stored = fleet.issued("cn").unwrap();
        request(fleet, &op, &Progress::discard(), &stored, step)
            .await
            .unwrap_or_else(|e| panic!("{e}; {:?}", bench.db.audit_log()))
    }

    #[tokio::test]
    async fn approving_runs_the_held_step_once_and_rejecting_runs_nothing() {
        let bench = crate::fleet::testing::Bench::new();
        let fleet = bench.fleet(3, 2);
        let first = requested(&bench, &fleet, Step::Rollout).await;
        assert_eq!(first.request.batches, [vec!["n0", "n1"], vec!["n2"]]);
        assert_eq!(first.link, None, "no [web], no link");
        // A newer request supersedes it.
        let second = requested(&bench, &fleet, Step::Rollout).await;
        assert_eq!(second.superseded, std::slice::from_ref(&first.request.id));
        let err = decide(
            &fleet,
            &first.request.id,
            &Decider::Admin(Some(7)),
            Verdict::Approve,
            "",
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("superseded"), "{err}");
        // Approve: the rollout runs on every node, batch by batch.
        let id = second.request.id.clone();
        let approved = decide(
            &fleet,
            &id,
            &Decider::Admin(Some(7)),
            Verdict::Approve,
            "looks right",
            None,
        )
        .unwrap();
        assert_eq!(approved.decided_by, "uid 7");
        let op = crate::fleet::testing::lock(&fleet, Operation::Rollout);
        let ran = run_approved(&fleet, &op, &Progress::discard(), &approved)
            .await
            .unwrap();
        assert!(
            matches!(ran, Ran::Restarted(ref r) if r.nodes.len() == 3),
            "{ran:?}"
        );
        drop(op);
        assert_eq!(bench.db.approval(&id).unwrap().unwrap().outcome, "ok");
        // Decided once.
        let again = decide(
            &fleet,
            &id,
            &Decider::Admin(Some(8)),
            Verdict::Reject,
            "",
            None,
        )
        .unwrap_err();
        assert!(
            matches!(
                again,
                ApprovalError::Decided {
                    state: State::Approved,
                    ..
                }
            ),
            "{again}"
        );
        let audit: Vec<String> = bench
            .db
            .audit_log()
            .unwrap()
            .into_iter()
            .map(|a| format!("{:?} {} {}", a.uid, a.action, a.detail))
            .collect();
        assert!(
            audit.iter().any(|a| a.starts_with(&format!("Some(7) approve request {id} certificate cn version 2 step rollout by uid 7; comment: looks right"))),
            "{audit:#?}"
        );

        // Rejected: nothing is installed or restarted.
        let third = requested(&bench, &fleet, Step::Distribute).await;
        let calls = || -> usize {
            (0..3)
                .map(|i| bench.fakes.calls(&format!("n{i}")).len())
                .sum()
        };
        let calls_before = calls();
        let link = Decider::Link("192.0.2.7:55000".parse().unwrap());
        let rejected = decide(&fleet, &third.request.id, &link, Verdict::Reject, "", None).unwrap();
        assert_eq!(rejected.state, State::Rejected);
        assert_eq!(rejected.decided_by, "the one-time link (from 192.0.2.7)");
        assert_eq!(calls(), calls_before);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_reminds_at_half_time_then_refuses_at_expiry() {
        let bench = crate::fleet::testing::Bench::new();
        let fleet = bench.fleet(2, 1);
        let created = requested(&bench, &fleet, Step::Rollout).await;
        let id = created.request.id.clone();
        let t0 = created.request.created;
        let start = tokio::time::Instant::now();
        let clock = move || t0 + start.elapsed().as_secs() as i64;
        let stop = tokio_util::sync::CancellationToken::new();
        let watching = {
            let stop = stop.clone();
            async move { watch_with(&fleet, clock, stop.cancelled_owned()).await }
        };
        let check = async {
            let state = |id: &str| {
                let r = bench.db.approval(id).unwrap().unwrap();
                (r.state, r.reminded)
            };
            let half = DEFAULT_EXPIRES_AFTER / 2;
            tokio::time::sleep(half - Duration::from_secs(5)).await;
            assert_eq!(state(&id), (State::Pending, false));
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(state(&id), (State::Pending, true));
            tokio::time::sleep(half - Duration::from_secs(10)).await;
            assert_eq!(state(&id), (State::Pending, true));
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(state(&id), (State::Expired, true));
            let audit = bench.db.audit_log().unwrap();
            assert!(
                audit
                    .iter()
                    .any(|a| a.action == "approval expired" && a.detail.contains(&id)),
                "{audit:?}"
            );
            stop.cancel();
        };
        tokio::join!(watching, check);
    }

    #[test]
    fn a_policy_must_hold_back_a_step_the_certificate_takes() {
        assert_eq!(Policy::parse(None, AfterIssue::Rollout), Ok(Policy::None));
        assert_eq!(
            Policy::parse(Some("distribute"), AfterIssue::Distribute),
            Ok(Policy::Distribute)
        );
        assert_eq!(
            Policy::parse(Some("rollout"), AfterIssue::Rollout),
            Ok(Policy::Rollout)
        );
        let e = Policy::parse(Some("rollout"), AfterIssue::Distribute).unwrap_err();
        assert!(e.contains("after_issue = \"rollout\""), "{e}");
        let e = Policy::parse(Some("distribute"), AfterIssue::None).unwrap_err();
        assert!(e.contains("after_issue"), "{e}");
        let e = Policy::parse(Some("always"), AfterIssue::Rollout).unwrap_err();
        assert!(e.contains("\"always\""), "{e}");
    }

    #[test]
    fn ids_are_short_and_typeable_and_tokens_long_and_hidden() {
        let id = new_id();
        assert_eq!(id.len(), 9);
        assert_eq!(&id[4..5], "-");
        assert!(!id.contains(['0', 'o', '1', 'l', 'i']), "{id}");
        let token = LinkToken::new(&id);
        let (tid, secret) = split_token(token.reveal()).unwrap();
        assert_eq!(tid, id);
        // 32 bytes in base64url without padding.
        assert_eq!(secret.len(), 43);
        assert_eq!(format!("{token:?}"), "LinkToken(<redacted>)");
        assert_ne!(LinkToken::new(&id).reveal(), token.reveal());
        for bad in [
            "",
            "nodot",
            "abcd-efgh.short",
            "ABCD-EFGH.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "abcd-efgh.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa<a>",
        ] {
            assert!(split_token(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_reminder_is_due_at_half_time_and_expiry_at_the_end() {
        let mut r = pending(1000, 3600);
        assert_eq!(due(&r, 1000), None);
        assert_eq!(due(&r, 2799), None);
        assert_eq!(due(&r, 2800), Some(Due::Remind));
        r.reminded = true;
        assert_eq!(due(&r, 2800), None);
        assert_eq!(due(&r, 4599), None);
        assert_eq!(due(&r, 4600), Some(Due::Expire));
        // A request never reminded still expires (a coordinator down
        // through half-time and expiry refuses it, not reminds).
        r.reminded = false;
        assert_eq!(due(&r, 5000), Some(Due::Expire));
    }

    #[test]
    fn the_watch_sleeps_until_the_next_thing_due() {
        let mut a = pending(1000, 3600);
        let b = pending(1100, 600);
        assert_eq!(sleep_for(&[], 0), MAX_WATCH_SLEEP);
        // b's reminder at 1400.
        assert_eq!(
            sleep_for(&[a.clone(), b.clone()], 1370),
            Duration::from_secs(30)
        );
        assert_eq!(sleep_for(&[a.clone(), b], 1500), Duration::ZERO);
        a.reminded = true;
        assert_eq!(sleep_for(&[a], 4590), Duration::from_secs(10));
    }

    #[test]
    fn the_mail_says_what_where_in_which_order_and_how_to_approve() {
        let r = pending(1_700_000_000, 72 * 3600);
        let link = format!("https://certfleet.example.org:8443/approve/{}.secret", r.id);
        let notifier = Notifier::default();
        let m = requested_mail(&notifier, &r, Some(&link), &["aaaa-bbbb".into()]);
        // Facts are aligned in columns: compare with single spaces.
        let text = squeeze(&m.text);
        assert_eq!(m.subject, "approval needed: cn version 2 (rollout)");
        for needle in [
            "Certificate: cn",
            "Version: 2",
            "Serial: 0a1b",
            "Names: cn.example.org, a.example.org",
            "Not after: 2027-01-15T08:00:00Z",
            "1. n0, n1\n2. n2",
            "Cluster: ",
            &format!("certfleet approve {}", r.id),
            &link,
            "expires at 2023-11-17T22:13:20Z",
            "supersedes the older pending request aaaa-bbbb",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{}", m.text);
        }
        assert!(m.html.contains(&format!("href=\"{link}\"")), "{}", m.html);
        assert!(m.html.contains("n0, n1"), "{}", m.html);
        // No link without the page; the CLI way still there.
        let m = requested_mail(&notifier, &r, None, &[]);
        assert!(!m.text.contains("https://"), "{}", m.text);
        assert!(m.text.contains("certfleet reject"), "{}", m.text);
        let m = expired_mail(&notifier, &r);
        assert!(m.text.contains("refused"), "{}", m.text);
        let m = reminder_mail(&notifier, &r);
        assert!(m.text.contains("half of the time"), "{}", m.text);
    }

    /// `s` with every run of spaces (and the line starts) made one or none.
    fn squeeze(s: &str) -> String {
        s.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
