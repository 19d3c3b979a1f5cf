//! Renewing certificates without an admin: when each one is due, and the
//! loop that renews it then.
//!
//! - A certificate is due when [`Policy::share_left`] of its lifetime is
//!   left (a third by default, as Let's Encrypt advises). [`Policy::due_at`]
//!   also takes the CA's ARI window (RFC 9773 §4.2: a random time in it;
//!   a window already past means due now). The scheduler asks the CA for
//!   each certificate's window ([`Renew::window`]) at most once per the
//!   CA's `Retry-After` (clamped by [`ARI_MIN_RECHECK`] and
//!   [`ARI_MAX_RECHECK`]), all certificates at once and bounded by
//!   [`ARI_TIMEOUT`], so a slow CA never holds the loop for long. A CA that
//!   offers no `renewalInfo` (Pebble 2.4) is noted once and not asked
//!   again: renewals fall back to the share of lifetime left.
//! - Due times are moved earlier by a random share of [`MAX_JITTER`] (at most
//!   [`JITTER_SHARE`] of the lifetime), so a fleet of certificates issued
//!   together does not renew in one burst.
//! - After a failure the next attempt waits [`RETRY_DELAYS`] (1 min, 10 min,
//!   100 min), then [`RETRY_EVERY`] (12 h): never faster, as the CA asks of
//!   clients that run unattended.
//! - [`Scheduler`] runs one renewal per certificate at a time: a wake-up
//!   that finds a certificate's renewal already running does nothing, so two
//!   timers never renew it twice. (The fleet's operation lock also keeps a
//!   renewal and an admin's `issue` apart.)
//! - Each pass reads the configured certificates and policy afresh
//!   ([`Renew::names`], [`Renew::policy`]), so a reloaded config is followed
//!   from the next pass: an added certificate is tracked once issued, a
//!   removed one is dropped, due times move with a new policy.
//!
//! The scheduler only decides *when*; *what* a renewal does (the same order
//! as `certfleet issue`, then the certificate's `after_issue` policy) is the
//! [`Renew`] implementation's business, so the timing is tested here with a
//! fake and a paused clock.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Default share of a certificate's lifetime left when it is renewed.
pub const DEFAULT_SHARE_LEFT: f64 = 1.0 / 3.0;
/// Delays after the first, second and third failure in a row.
pub const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(6000),
];
/// Delay after every later failure.
pub const RETRY_EVERY: Duration = Duration::from_secs(12 * 3600);
/// Most a due time is moved earlier to spread renewals.
pub const MAX_JITTER: Duration = Duration::from_secs(3600);
/// Most a due time is moved earlier, as a share of the lifetime (so a
/// short-lived certificate is not renewed at half its life).
pub const JITTER_SHARE: f64 = 0.01;
/// Longest the loop sleeps before looking again, so a wall clock that
/// jumps is noticed.
pub const MAX_SLEEP: Duration = Duration::from_secs(600);
/// Longest one pass asks the CA for renewal windows (every certificate's
/// request runs at once, within this).
pub const ARI_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest wait before asking for a certificate's window again, whatever
/// the CA's `Retry-After` says (a zero or missing one must not make the
/// scheduler poll the CA at every wake-up).
pub const ARI_MIN_RECHECK: Duration = Duration::from_secs(60);
/// Longest wait before asking again: a window the CA moves (a revocation
/// ahead, RFC 9773 §1) is seen within a day.
pub const ARI_MAX_RECHECK: Duration = Duration::from_secs(86_400);
/// Wait before asking again after the CA failed to answer.
pub const ARI_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(3600);

/// A certificate's validity, seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// The CA's suggested renewal window (ARI), seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

/// The CA's word on a certificate's renewal (ARI), as [`Renew::window`]
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ari {
    /// The suggested window, and how long until asking again.
    Window {
        window: Window,
        retry_after: Duration,
    },
    /// The CA's directory offers no `renewalInfo`.
    Unsupported,
    /// The CA did not answer, or not in a way certfleet reads.
    Failed(String),
}

/// The window in instant-acme's answer, as Unix seconds.
pub fn window_from(info: &instant_acme::RenewalInfo) -> Window {
    Window {
        start: info.suggested_window.start.unix_timestamp(),
        end: info.suggested_window.end.unix_timestamp(),
    }
}

/// How long until asking the CA for a window again, given its
/// `Retry-After`: within [`ARI_MIN_RECHECK`] and [`ARI_MAX_RECHECK`].
pub fn ari_recheck_in(retry_after: Duration) -> Duration {
    retry_after.clamp(ARI_MIN_RECHECK, ARI_MAX_RECHECK)
}

/// When certificates are renewed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Renew when this share of the lifetime is left (0 < share < 1).
    pub share_left: f64,
    /// Most a due time is moved earlier ([`MAX_JITTER`] by default).
    pub max_jitter: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            share_left: DEFAULT_SHARE_LEFT,
            max_jitter: MAX_JITTER,
        }
    }
}

impl Policy {
    /// When a certificate with `validity` is due. `ari` is the CA's window
    /// when it offers one; `jitter` is a random number in `[0, 1)`.
    pub fn due_at(&self, validity: Validity, ari: Option<Window>, jitter: f64) -> i64 {
        let jitter = jitter.clamp(0.0, 1.0);
        if let Some(w) = ari.filter(|w| w.end >= w.start) {
            return w.start + ((w.end - w.start) as f64 * jitter) as i64;
        }
        let lifetime = (validity.not_after - validity.not_before).max(0);
        let base = validity.not_after - (lifetime as f64 * self.share_left) as i64;
        let span = (lifetime as f64 * JITTER_SHARE).min(self.max_jitter.as_secs_f64());
        base - (span * jitter) as i64
    }
}

/// How long to wait after `failures` failures in a row (at least one).
pub fn retry_delay(failures: u32) -> Duration {
    let i = failures.max(1) as usize - 1;
    RETRY_DELAYS.get(i).copied().unwrap_or(RETRY_EVERY)
}

/// How the last attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Renewed,
    /// A new version was stored, but what followed (distribute, rollout)
    /// failed: not retried as an order, shown to the admins.
    RenewedButNotRolledOut(String),
    Failed(String),
}

/// A renewal that stored a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub validity: Validity,
    /// Why its `after_issue` step failed, if it did.
    pub problem: Option<String>,
}

/// What the scheduler knows of one certificate, as `certfleet
/// certificates` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// When the next attempt is due (Unix seconds).
    pub next: i64,
    /// Failures in a row since the last success.
    pub failures: u32,
    /// When the last attempt started, and how it ended.
    pub last: Option<(i64, Outcome)>,
    /// An attempt is under way.
    pub running: bool,
    /// The live certificate's validity, as last seen.
    pub validity: Option<Validity>,
    /// The CA's renewal window for it (ARI), when it gave one.
    pub ari: Option<Window>,
    /// When to ask the CA for the window again (Unix seconds; 0: at the
    /// next pass).
    pub ari_next_check: i64,
}

/// A boxed future, for [`Renew`]'s object-safe methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a renewal does; the coordinator's implementation runs the order and
/// the certificate's `after_issue` policy.
pub trait Renew: Send + Sync + 'static {
    /// Renews `name`; what was stored, or why no new version was.
    fn renew<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Renewed, String>>;

    /// The validity of `name`'s live certificate, if it has one (an admin
    /// may have issued a new one by hand since the scheduler looked).
    fn current(&self, _name: &str) -> Option<Validity> {
        None
    }

    /// Every certificate there is to renew (tracked once it has a live
    /// version).
    fn names(&self) -> Vec<String> {
        Vec::new()
    }

    /// The CA's renewal window for `name`'s live certificate (ARI). The
    /// scheduler bounds the wait ([`ARI_TIMEOUT`]) and caches the answer.
    fn window<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Ari> {
        Box::pin(async { Ari::Unsupported })
    }

    /// The renewals of `name` that failed in a row before this scheduler
    /// started, as recorded elsewhere (the journal): how many, when the
    /// last one started and why it failed. A restarted coordinator keeps
    /// its backoff instead of ordering again at once.
    fn past_failures(&self, _name: &str) -> Option<PastFailures> {
        None
    }

    /// The policy as configured now, read at every pass (a reloaded config
    /// changes it); `None`: the one the scheduler was made with stays.
    fn policy(&self) -> Option<Policy> {
        None
    }
}

/// Renewals of one certificate that failed in a row, as a restarted
/// scheduler finds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastFailures {
    pub count: u32,
    /// When the last one started (Unix seconds).
    pub last: i64,
    pub reason: String,
}

/// The wall clock, seconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> i64;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        certfleet_proto::clock::now()
    }
}

/// Renews certificates as they come due.
pub struct Scheduler<R: Renew, C: Clock> {
    renewer: Arc<R>,
    clock: C,
    /// The renewer's latest [`Renew::policy`] (`adopt_policy`).
    policy: Mutex<Policy>,
    entries: Mutex<BTreeMap<String, Entry>>,
    changed: Notify,
    jitter: Box<dyn Fn() -> f64 + Send + Sync>,
    /// The CA said it offers no ARI: not asked again (and logged once).
    ari_unsupported: AtomicBool,
}

impl<R: Renew, C: Clock> Scheduler<R, C> {
    /// `jitter` returns a random number in `[0, 1)`.
    pub fn new(
        renewer: Arc<R>,
        clock: C,
        policy: Policy,
        jitter: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> Self {
        Self {
            renewer,
            clock,
            policy: Mutex::new(policy),
            entries: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            jitter: Box::new(jitter),
            ari_unsupported: AtomicBool::new(false),
        }
    }

    /// Tracks `name`, whose current certificate has `validity` (`None`: it
    /// has none yet, so it is due now).
    pub fn track(&self, name: &str, validity: Option<Validity>, ari: Option<Window>) {
        let next = match validity {
            Some(v) => self.policy().due_at(v, ari, (self.jitter)()),
            None => self.clock.now(),
        };
        let mut entries = self.entries.lock().expect("renewal entries poisoned");
        let entry = entries.entry(name.to_owned()).or_insert_with(|| Entry {
            name: name.to_owned(),
            next,
            failures: 0,
            last: None,
            running: false,
            validity,
            ari,
            ari_next_check: 0,
        });
        if !entry.running {
            entry.next = next;
            entry.ari = ari;
        }
        drop(entries);
        self.changed.notify_one();
    }

    /// Re-reads each tracked certificate's live validity and moves its due
    /// time if a version was issued by hand in the meantime. [`Self::run`]
    /// does this at every wake-up; public so a benchmark can time one pass.
    pub fn refresh(&self) {
        self.adopt_policy();
        for name in self.renewer.names() {
            let tracked = self
                .entries
                .lock()
                .expect("renewal entries poisoned")
                .contains_key(&name);
            if !tracked && let Some(v) = self.renewer.current(&name) {
                self.track(&name, Some(v), None);
                if let Some(past) = self.renewer.past_failures(&name) {
                    self.resume_backoff(&name, past);
                }
            }
        }
        let names: Vec<String> = {
            let entries = self.entries.lock().expect("renewal entries poisoned");
            entries.keys().cloned().collect()
        };
        for name in names {
            let Some(v) = self.renewer.current(&name) else {
                // Deleted from the store (or from the config) since: there
                // is nothing to renew until it is issued again.
                let mut entries = self.entries.lock().expect("renewal entries poisoned");
                if entries.get(&name).is_some_and(|e| !e.running) {
                    entries.remove(&name);
                }
                continue;
            };
            let mut entries = self.entries.lock().expect("renewal entries poisoned");
            let Some(e) = entries.get_mut(&name) else {
                continue;
            };
            // A version issued by hand since: due by its lifetime, and a
            // pending retry of a failed renewal is no longer needed.
            if e.validity != Some(v) && !e.running {
                e.next = self.policy().due_at(v, None, (self.jitter)());
                e.failures = 0;
                // The window was the old certificate's: ask for the new one's.
                e.ari = None;
                e.ari_next_check = 0;
            }
            e.validity = Some(v);
        }
    }

    fn policy(&self) -> Policy {
        *self.policy.lock().expect("renewal policy poisoned")
    }

    /// Takes the renewer's policy if it changed (a reload), and moves the
    /// due time of every certificate that is neither renewing nor waiting
    /// out a failure's backoff to where the new policy puts it.
    fn adopt_policy(&self) {
        let Some(new) = self.renewer.policy() else {
            return;
        };
        {
            let mut policy = self.policy.lock().expect("renewal policy poisoned");
            if *policy == new {
                return;
            }
            *policy = new;
        }
        tracing::info!(share_left = new.share_left, max_jitter = ?new.max_jitter, "renewal policy changed: due times moved");
        let mut entries = self.entries.lock().expect("renewal entries poisoned");
        for e in entries.values_mut() {
            if let Some(v) = e.validity
                && !e.running
                && e.failures == 0
            {
                e.next = new.due_at(v, e.ari, (self.jitter)());
            }
        }
    }

    /// Picks up the backoff of renewals that failed before this scheduler
    /// started: the next attempt waits as it would have.
    fn resume_backoff(&self, name: &str, past: PastFailures) {
        let mut entries = self.entries.lock().expect("renewal entries poisoned");
        let Some(e) = entries.get_mut(name) else {
            return;
        };
        if past.count == 0 || e.running {
            return;
        }
        e.failures = past.count;
        e.next = e
            .next
            .max(past.last + retry_delay(past.count).as_secs() as i64);
        e.last = Some((past.last, Outcome::Failed(past.reason)));
    }

    /// Asks the CA for the renewal window of every certificate whose cached
    /// answer is due for a recheck, all at once, for at most
    /// [`ARI_TIMEOUT`], and moves due times into the windows it gives. Once
    /// the CA says it offers no ARI, never asks again.
    pub async fn refresh_windows(&self) {
        if self.ari_unsupported.load(AtomicOrdering::Relaxed) {
            return;
        }
        let now = self.clock.now();
        let ask: Vec<String> = {
            let entries = self.entries.lock().expect("renewal entries poisoned");
            entries
                .values()
                .filter(|e| !e.running && e.validity.is_some() && e.ari_next_check <= now)
                .map(|e| e.name.clone())
                .collect()
        };
        if ask.is_empty() {
            return;
        }
        let answers = futures::future::join_all(ask.iter().map(|name| async move {
            let answer = tokio::time::timeout(ARI_TIMEOUT, self.renewer.window(name))
                .await
                .unwrap_or_else(|_| {
                    Ari::Failed(format!("no answer within {} s", ARI_TIMEOUT.as_secs()))
                });
            (name, answer)
        }))
        .await;
        let now = self.clock.now();
        let mut entries = self.entries.lock().expect("renewal entries poisoned");
        for (name, answer) in answers {
            let Some(e) = entries.get_mut(name) else {
                continue;
            };
            match answer {
                Ari::Window {
                    window,
                    retry_after,
                } => {
                    e.ari_next_check = now + ari_recheck_in(retry_after).as_secs() as i64;
                    if e.ari != Some(window)
                        && !e.running
                        && e.failures == 0
                        && let Some(v) = e.validity
                    {
                        e.next = self.policy().due_at(v, Some(window), (self.jitter)());
                        tracing::info!(
                            certificate = name,
                            start = window.start,
                            end = window.end,
                            next = e.next,
                            "renewal window from the CA (ARI)"
                        );
                    }
                    e.ari = Some(window);
                }
                Ari::Unsupported => {
                    if !self.ari_unsupported.swap(true, AtomicOrdering::Relaxed) {
                        tracing::info!(
                            "the CA offers no renewal information (ARI, RFC 9773): certificates renew when their configured share of lifetime is left"
                        );
                    }
                    return;
                }
                Ari::Failed(why) => {
                    e.ari_next_check = now + ARI_RETRY_AFTER_FAILURE.as_secs() as i64;
                    tracing::warn!(certificate = name, %why, retry_in = ?ARI_RETRY_AFTER_FAILURE, "cannot read the renewal window from the CA (ARI); keeping the due time");
                }
            }
        }
    }

    /// Whether the CA was found to offer no ARI.
    pub fn ari_unsupported(&self) -> bool {
        self.ari_unsupported.load(AtomicOrdering::Relaxed)
    }

    /// Looks at the store again now (an admin issued a version by hand).
    pub fn wake(&self) {
        self.changed.notify_one();
    }

    /// Every tracked certificate, by name.
    pub fn entries(&self) -> Vec<Entry> {
        let entries = self.entries.lock().expect("renewal entries poisoned");
        entries.values().cloned().collect()
    }

    /// Starts every due renewal that is not already running; returns how
    /// many started.
    pub fn start_due(self: &Arc<Self>) -> usize {
        let now = self.clock.now();
        let due: Vec<String> = {
            let mut entries = self.entries.lock().expect("renewal entries poisoned");
            entries
                .values_mut()
                .filter(|e| !e.running && e.next <= now)
                .map(|e| {
                    e.running = true;
                    e.name.clone()
                })
                .collect()
        };
        for name in &due {
            let this = Arc::clone(self);
            let name = name.clone();
            tokio::spawn(async move { this.attempt(&name, now).await });
        }
        due.len()
    }

    async fn attempt(&self, name: &str, started: i64) {
        tracing::info!(certificate = name, "renewal due: renewing");
        // In a task of its own, so a renewal that panics is a failure
        // retried on the schedule, not an entry left `running` for ever
        // (never renewed again, and listed as renewing now).
        let (renewer, owned) = (Arc::clone(&self.renewer), name.to_owned());
        let result = tokio::spawn(async move { renewer.renew(&owned).await })
            .await
            .unwrap_or_else(|e| Err(format!("the renewal stopped: {e}")));
        let now = self.clock.now();
        let mut entries = self.entries.lock().expect("renewal entries poisoned");
        let Some(entry) = entries.get_mut(name) else {
            return;
        };
        entry.running = false;
        match result {
            Ok(renewed) => {
                entry.failures = 0;
                entry.validity = Some(renewed.validity);
                // Never back to back, even for a certificate that is due
                // as soon as it is issued.
                let soonest = now + RETRY_DELAYS[0].as_secs() as i64;
                entry.next = self
                    .policy()
                    .due_at(renewed.validity, None, (self.jitter)())
                    .max(soonest);
                entry.ari = None;
                entry.ari_next_check = 0;
                let outcome = match renewed.problem {
                    None => Outcome::Renewed,
                    Some(p) => Outcome::RenewedButNotRolledOut(p),
                };
                entry.last = Some((started, outcome));
                tracing::info!(certificate = name, next = entry.next, "renewed");
            }
            Err(reason) => {
                entry.failures += 1;
                let delay = retry_delay(entry.failures);
                entry.next = now + delay.as_secs() as i64;
                tracing::warn!(certificate = name, failures = entry.failures, retry_in = ?delay, %reason, "renewal failed");
                entry.last = Some((started, Outcome::Failed(reason)));
            }
        }
        drop(entries);
        self.changed.notify_one();
    }

    /// Seconds until the next attempt that is not running, capped at
    /// [`MAX_SLEEP`]. Public so a benchmark can time it.
    pub fn sleep_for(&self) -> Duration {
        let now = self.clock.now();
        let entries = self.entries.lock().expect("renewal entries poisoned");
        entries
            .values()
            .filter(|e| !e.running)
            .map(|e| Duration::from_secs(e.next.saturating_sub(now).max(0) as u64))
            .min()
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP)
    }

    /// Renews certificates as they come due, until `stop`.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            self.refresh();
            tokio::select! {
                () = &mut stop => return,
                () = self.refresh_windows() => {}
            }
            self.start_due();
            let wait = self.sleep_for();
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
                () = self.changed.notified() => {}
            }
        }
    }
}

/// The coordinator's renewals: an order exactly as `certfleet issue`
/// runs it, then what the certificate's `after_issue` says, all under the
/// certificate's operation lock (a renewal finding an admin's operation
/// under way fails and is retried on the usual schedule).
pub struct FleetRenewer {
    pub fleet: Arc<crate::fleet::Fleet>,
    pub issuer: Arc<crate::issue::Issuer>,
}

/// What one renewal under its certificate's lock did.
pub enum RenewRun {
    /// The order failed; nothing was stored.
    Failed(crate::issue::Failed),
    /// A dry run: the staging CA issued a certificate, nothing was stored.
    DryRun(crate::issue::DryRun),
    /// A new version was stored, then the certificate's `after_issue` ran;
    /// `problem` is how that failed, if it did.
    Issued {
        issued: crate::issue::Issued,
        after: crate::config::AfterIssue,
        problem: Option<(crate::error::ErrorKind, String)>,
    },
}

impl RenewRun {
    /// "version 3 stored, Rollout failed: …", for a renewal whose
    /// `after_issue` failed.
    pub fn problem(&self) -> Option<String> {
        match self {
            Self::Issued {
                issued,
                after,
                problem: Some((_, e)),
            } => Some(format!(
                "version {} stored, {after:?} failed: {e}",
                issued.stored.version
            )),
            _ => None,
        }
    }
}

impl FleetRenewer {
    /// A renewal of the certificate `op` holds the lock of, reporting to
    /// `progress`: the order (`options` says whether past the rate-limit
    /// guard, or as a dry run), then, for a stored version, what the
    /// certificate's `after_issue` says. `certfleet renew` runs this too.
    pub async fn renew_under(
        &self,
        op: &crate::fleet::OperationGuard,
        progress: &crate::progress::Progress,
        options: crate::issue::IssueOptions,
    ) -> RenewRun {
        use crate::config::AfterIssue;
        use crate::fleet::Operation;
        use crate::issue::Ordered;
        let name = op.certificate();
        let issued = match self.issuer.issue_with(op, progress, options).await {
            Ok(Ordered::Issued(issued)) => issued,
            Ok(Ordered::DryRun(dry)) => return RenewRun::DryRun(dry),
            Err(failed) => {
                // A dry run's failure is for the admin watching it, not
                // for everyone's inbox (as with `issue --dry-run`).
                if !options.dry_run {
                    crate::notify::issue_failed(&self.fleet, name, Operation::Renew, &failed);
                }
                return RenewRun::Failed(failed);
            }
        };
        crate::notify::issued(&self.fleet, Operation::Renew, &issued.stored);
        let spec = self.fleet.spec(name).ok();
        let after = spec.as_ref().map(|s| s.after_issue).unwrap_or_default();
        // A certificate with an approval policy stops here, at the step
        // its policy holds back, until a person decides (`approval`).
        let held = spec.as_deref().and_then(crate::approval::held_back);
        let problem = match (held, after) {
            (Some(step), _) => {
                crate::approval::request(&self.fleet, op, progress, &issued.stored, step)
                    .await
                    .err()
                    .map(|e| (e.kind(), e.to_string()))
            }
            (None, AfterIssue::None) => None,
            (None, AfterIssue::Distribute) => {
                crate::distribute::distribute(&self.fleet, op, None, &[], progress)
                    .await
                    .err()
                    .map(|e| {
                        crate::notify::distribute_failed(&self.fleet, name, &e);
                        (e.kind(), e.to_string())
                    })
            }
            (None, AfterIssue::Rollout) => {
                match crate::rollout::rollout(&self.fleet, op, progress).await {
                    Ok(done) => {
                        crate::notify::rolled_out(&self.fleet, name, Operation::Rollout, &done);
                        None
                    }
                    Err(e) => {
                        crate::notify::rollout_failed(&self.fleet, name, Operation::Rollout, &e);
                        Some((e.kind(), e.to_string()))
                    }
                }
            }
        };
        if let Some((_, e)) = &problem {
            tracing::warn!(certificate = name, version = issued.stored.version, error = %e, "renewed, but the after_issue step failed");
        }
        RenewRun::Issued {
            issued,
            after,
            problem,
        }
    }

    async fn renew_now(&self, name: &str) -> Result<Renewed, String> {
        use crate::fleet::{Holder, Operation};
        let progress = crate::progress::Progress::discard();
        let op = self
            .fleet
            .locks()
            .try_acquire(Holder::new(Operation::Renew, name, None))
            .map_err(|busy| busy.to_string())?;
        let options = crate::issue::IssueOptions::default();
        // A node reached over SSH because its agent was down is journaled
        // in this renewal, as in one an admin runs.
        let run = crate::ssh::record_fallbacks(
            op.journal().clone(),
            progress.clone(),
            self.renew_under(&op, &progress, options),
        )
        .await;
        let problem = run.problem();
        match run {
            RenewRun::Failed(failed) => {
                let why = failed.error.to_string();
                op.journal().finish(&format!("failed: {why}"));
                Err(why)
            }
            RenewRun::DryRun(_) => Err("a dry run stores nothing".into()),
            // The new version is stored either way: the next attempt is due
            // by its lifetime, and a failed after_issue is reported, not
            // retried as an order.
            RenewRun::Issued { issued, .. } => {
                match &problem {
                    None => op.journal().finish("ok"),
                    Some(p) => op.journal().finish(&format!("failed: {p}")),
                }
                let bundle = &issued.stored.bundle;
                Ok(Renewed {
                    validity: Validity {
                        not_before: bundle.not_before,
                        not_after: bundle.not_after,
                    },
                    problem,
                })
            }
        }
    }
}

impl Renew for FleetRenewer {
    fn renew<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
        Box::pin(self.renew_now(name))
    }

    /// From the journal: the scheduler's renewals of `name` that failed
    /// since the last version was stored, newest first.
    fn past_failures(&self, name: &str) -> Option<PastFailures> {
        let ops = self.fleet.db().operations(name, 100).ok()?;
        let mut past: Option<PastFailures> = None;
        for op in ops {
            let failed = op
                .outcome
                .as_deref()
                .and_then(|o| o.strip_prefix("failed: "));
            match (op.kind.as_str(), failed) {
                // A version was stored: the backoff starts over after it.
                ("renewal" | "issue" | "import", _) if op.version > 0 => break,
                ("renewal", Some(reason)) => {
                    let p = past.get_or_insert_with(|| PastFailures {
                        count: 0,
                        last: op.started,
                        reason: reason.to_owned(),
                    });
                    p.count += 1;
                }
                ("renewal", None) => break,
                _ => {}
            }
        }
        past
    }

    fn names(&self) -> Vec<String> {
        let config = self.fleet.config();
        config.certificates.iter().map(|c| c.name.clone()).collect()
    }

    /// `None` also for a certificate a reload took out of the config: it
    /// is no longer renewed, though its versions stay in the store.
    fn current(&self, name: &str) -> Option<Validity> {
        self.fleet.spec(name).ok()?;
        let live = self.fleet.live(name).ok()??;
        Some(Validity {
            not_before: live.bundle.not_before,
            not_after: live.bundle.not_after,
        })
    }

    fn window<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Ari> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        Box::pin(async move {
            let live = match self.fleet.live(name) {
                Ok(Some(live)) => live,
                Ok(None) => return Ari::Failed(format!("{name} has no live version")),
                Err(e) => return Ari::Failed(e.to_string()),
            };
            let leaf = match CertificateDer::from_pem_slice(live.bundle.leaf_pem.as_bytes()) {
                Ok(leaf) => leaf,
                Err(e) => return Ari::Failed(format!("{name}'s live leaf: {e}")),
            };
            match self.issuer.acme().renewal_info(&leaf).await {
                Ok(Some((info, retry_after))) => Ari::Window {
                    window: window_from(&info),
                    retry_after,
                },
                Ok(None) => Ari::Unsupported,
                Err(e) => Ari::Failed(e.to_string()),
            }
        })
    }

    fn policy(&self) -> Option<Policy> {
        Some(self.fleet.config().renewal.policy)
    }
}

/// The scheduler the daemon runs.
pub type FleetScheduler = Scheduler<FleetRenewer, SystemClock>;

/// A scheduler tracking every configured certificate that has a live
/// version (a certificate never issued waits for an admin's first
/// `certfleet issue`).
pub fn fleet_scheduler(renewer: FleetRenewer, policy: Policy) -> Arc<FleetScheduler> {
    let scheduler = Arc::new(Scheduler::new(
        Arc::new(renewer),
        SystemClock,
        policy,
        jitter,
    ));
    scheduler.refresh();
    scheduler
}

/// A random number in `[0, 1)` from the system's randomness.
fn jitter() -> f64 {
    let mut b = [0u8; 8];
    crate::pki::random(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const DAY: i64 = 86_400;

    fn ninety_days() -> Validity {
        Validity {
            not_before: 1_000_000,
            not_after: 1_000_000 + 90 * DAY,
        }
    }

    #[test]
    fn due_when_a_third_of_the_lifetime_is_left_moved_earlier_by_at_most_the_jitter() {
        let p = Policy::default();
        let v = ninety_days();
        assert_eq!(p.due_at(v, None, 0.0), v.not_before + 60 * DAY);
        for j in [0.0, 0.25, 0.5, 0.999] {
            let due = p.due_at(v, None, j);
            assert!(due <= v.not_before + 60 * DAY, "{j}");
            assert!(
                due >= v.not_before + 60 * DAY - MAX_JITTER.as_secs() as i64,
                "{j}"
            );
        }
        // A 1-hour certificate: jitter at most 1% of it (36 s).
        let short = Validity {
            not_before: 0,
            not_after: 3600,
        };
        assert!(p.due_at(short, None, 0.999) >= 2400 - 36);
    }

    #[test]
    fn inside_the_cas_window_when_it_offers_one() {
        let p = Policy::default();
        let w = Window {
            start: 5_000,
            end: 6_000,
        };
        assert_eq!(p.due_at(ninety_days(), Some(w), 0.0), 5_000);
        assert_eq!(p.due_at(ninety_days(), Some(w), 0.5), 5_500);
        assert!(p.due_at(ninety_days(), Some(w), 0.9999) < 6_000);
    }

    #[test]
    fn retries_after_1_10_100_minutes_then_every_12_hours() {
        let mins: Vec<u64> = (1..=6).map(|f| retry_delay(f).as_secs() / 60).collect();
        assert_eq!(mins, [1, 10, 100, 720, 720, 720]);
    }

    /// A clock that follows tokio's (paused) one from a fixed start.
    struct PausedClock {
        start_unix: i64,
        start: tokio::time::Instant,
    }

    impl Clock for PausedClock {
        fn now(&self) -> i64 {
            self.start_unix + self.start.elapsed().as_secs() as i64
        }
    }

    /// Fails its first `fail` calls, then renews for 90 days from "now".
    struct Fake {
        calls: AtomicU32,
        fail: u32,
        /// The live certificate's validity, as the store would say.
        live: Mutex<Option<Validity>>,
        attempts: Mutex<Vec<i64>>,
        clock: PausedClock,
        takes: Duration,
    }

    impl Renew for Fake {
        fn renew<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
            Box::pin(async move {
                self.attempts.lock().unwrap().push(self.clock.now());
                tokio::time::sleep(self.takes).await;
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= self.fail {
                    return Err(format!("node cn-unm-1 down (attempt {n})"));
                }
                let now = self.clock.now();
                let validity = Validity {
                    not_before: now,
                    not_after: now + 90 * DAY,
                };
                *self.live.lock().unwrap() = Some(validity);
                Ok(Renewed {
                    validity,
                    problem: None,
                })
            })
        }

        fn current(&self, _name: &str) -> Option<Validity> {
            *self.live.lock().unwrap()
        }
    }

    fn scheduler(fail: u32, takes: Duration) -> (Arc<Scheduler<Fake, PausedClock>>, Arc<Fake>) {
        let clock = || PausedClock {
            start_unix: 1_000_000,
            start: tokio::time::Instant::now(),
        };
        let fake = Arc::new(Fake {
            calls: AtomicU32::new(0),
            fail,
            live: Mutex::new(None),
            attempts: Mutex::new(Vec::new()),
            clock: clock(),
            takes,
        });
        let s = Arc::new(Scheduler::new(
            Arc::clone(&fake),
            clock(),
            Policy::default(),
            || 0.0,
        ));
        (s, fake)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_when_due_then_backs_off_1_10_100_minutes_on_failure() {
        let (s, fake) = scheduler(4, Duration::ZERO);
        // Issued 60 days ago for 90: due in 10 s... minus nothing (jitter 0).
        let v = Validity {
            not_before: 1_000_000 - 60 * DAY + 10,
            not_after: 1_000_000 + 30 * DAY + 10,
        };
        *fake.live.lock().unwrap() = Some(v);
        s.track("cn", Some(v), None);
        let stop = Arc::new(Notify::new());
        let run = tokio::spawn({
            let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
            async move { s.run(stop.notified()).await }
        });
        let advance = |secs: u64| tokio::time::advance(Duration::from_secs(secs));
        settle().await;
        assert!(fake.attempts.lock().unwrap().is_empty(), "not due yet");
        for step in [10, 60, 600, 6000, 43_200] {
            advance(step).await;
            settle().await;
        }
        let attempts = fake.attempts.lock().unwrap().clone();
        let gaps: Vec<i64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [60, 600, 6000, 43_200], "{attempts:?}");
        let entry = &s.entries()[0];
        assert_eq!(entry.failures, 0);
        assert_eq!(entry.last.as_ref().unwrap().1, Outcome::Renewed);
        // The next one is due when a third of the new certificate is left.
        assert_eq!(entry.next, *attempts.last().unwrap() + 60 * DAY);
        stop.notify_one();
        run.await.unwrap();
    }

    /// A certificate the store holds (or not: `live` is `None` once it is
    /// deleted), with failures a previous run recorded, renewing into an
    /// already-due certificate.
    struct Restarted {
        live: Mutex<Option<Validity>>,
        past: Option<PastFailures>,
        attempts: Mutex<Vec<i64>>,
        clock: PausedClock,
    }

    impl Renew for Restarted {
        fn renew<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
            Box::pin(async move {
                let now = self.clock.now();
                self.attempts.lock().unwrap().push(now);
                // A certificate due the moment it is issued.
                let validity = Validity {
                    not_before: now - 100,
                    not_after: now + 10,
                };
                *self.live.lock().unwrap() = Some(validity);
                Ok(Renewed {
                    validity,
                    problem: None,
                })
            })
        }

        fn names(&self) -> Vec<String> {
            vec!["cn".to_owned()]
        }

        fn current(&self, _name: &str) -> Option<Validity> {
            *self.live.lock().unwrap()
        }

        fn past_failures(&self, _name: &str) -> Option<PastFailures> {
            self.past.clone()
        }
    }

    fn restarted(
        past: Option<PastFailures>,
    ) -> (Arc<Scheduler<Restarted, PausedClock>>, Arc<Restarted>) {
        let clock = || PausedClock {
            start_unix: 1_000_000,
            start: tokio::time::Instant::now(),
        };
        // Due long ago: only the backoff can hold it back.
        let live = Validity {
            not_before: 1_000_000 - 80 * DAY,
            not_after: 1_000_000 + 10 * DAY,
        };
        let fake = Arc::new(Restarted {
            live: Mutex::new(Some(live)),
            past,
            attempts: Mutex::new(Vec::new()),
            clock: clock(),
        });
        let s = Arc::new(Scheduler::new(
            Arc::clone(&fake),
            clock(),
            Policy::default(),
            || 0.0,
        ));
        (s, fake)
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_scheduler_keeps_the_backoff_of_the_failures_it_finds() {
        // Two failures in a row, the last 5 minutes before this start: the
        // next attempt waits the 10 minutes a second failure earns.
        let (s, fake) = restarted(Some(PastFailures {
            count: 2,
            last: 1_000_000 - 300,
            reason: "node cn-unm-1 down".into(),
        }));
        s.refresh();
        let entry = &s.entries()[0];
        assert_eq!((entry.failures, entry.next), (2, 1_000_000 + 300));
        assert!(matches!(&entry.last, Some((_, Outcome::Failed(r))) if r.contains("cn-unm-1")));
        assert_eq!(s.start_due(), 0, "not before the backoff ends");
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(s.start_due(), 1);
        settle().await;
        assert_eq!(*fake.attempts.lock().unwrap(), [1_000_300]);
        // Without past failures, a certificate that is due renews at once.
        let (s, _) = restarted(None);
        s.refresh();
        assert_eq!(s.start_due(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_deleted_from_the_store_is_no_longer_renewed() {
        let (s, fake) = restarted(Some(PastFailures {
            count: 1,
            last: 1_000_000,
            reason: "x".into(),
        }));
        s.refresh();
        assert_eq!(s.entries().len(), 1);
        *fake.live.lock().unwrap() = None;
        s.refresh();
        assert!(s.entries().is_empty(), "{:?}", s.entries());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(s.start_due(), 0);
    }

    /// A certificate whose configured policy a reload changes.
    struct Reconfigured {
        policy: Mutex<Policy>,
    }

    impl Renew for Reconfigured {
        fn renew<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
            Box::pin(async { Err("never due in this test".to_owned()) })
        }

        fn names(&self) -> Vec<String> {
            vec!["cn".to_owned()]
        }

        fn current(&self, _name: &str) -> Option<Validity> {
            Some(ninety_days())
        }

        fn policy(&self) -> Option<Policy> {
            Some(*self.policy.lock().unwrap())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reloaded_policy_moves_the_due_times_at_the_next_pass() {
        let fake = Arc::new(Reconfigured {
            policy: Mutex::new(Policy::default()),
        });
        let clock = PausedClock {
            start_unix: 1_000_000,
            start: tokio::time::Instant::now(),
        };
        let s = Scheduler::new(Arc::clone(&fake), clock, Policy::default(), || 0.0);
        s.refresh();
        assert_eq!(s.entries()[0].next, 1_000_000 + 60 * DAY);
        let half = Policy {
            share_left: 0.5,
            ..Policy::default()
        };
        *fake.policy.lock().unwrap() = half;
        s.refresh();
        assert_eq!(s.entries()[0].next, 1_000_000 + 45 * DAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_due_as_soon_as_it_is_issued_is_not_renewed_back_to_back() {
        let (s, fake) = restarted(None);
        s.refresh();
        assert_eq!(s.start_due(), 1);
        settle().await;
        let entry = &s.entries()[0];
        assert_eq!(entry.last.as_ref().unwrap().1, Outcome::Renewed);
        assert_eq!(entry.next, 1_000_000 + 60, "at least a minute after");
        assert_eq!(s.start_due(), 0);
        assert_eq!(fake.attempts.lock().unwrap().len(), 1);
    }

    /// A recorded `renewalInfo` response: the example of RFC 9773 §4.2, its
    /// body as the CA sends it...
    const RECORDED_RENEWAL_INFO: &str = r#"{
  "suggestedWindow": {
    "start": "2025-01-02T04:00:00Z",
    "end": "2025-01-03T04:00:00Z"
  },
  "explanationURL": "https://acme.example.com/docs/ari"
}"#;
    /// ...and its `Retry-After` header, in seconds.
    const RECORDED_RETRY_AFTER: u64 = 21_600;
    /// The recorded window's start and end, Unix seconds.
    const WINDOW_START: i64 = 1_735_790_400;
    const WINDOW_END: i64 = 1_735_876_800;

    /// The recorded answer read as the coordinator reads instant-acme's.
    fn recorded() -> Ari {
        let info: instant_acme::RenewalInfo = serde_json::from_str(RECORDED_RENEWAL_INFO).unwrap();
        Ari::Window {
            window: window_from(&info),
            retry_after: Duration::from_secs(RECORDED_RETRY_AFTER),
        }
    }

    /// Answers every window request with `answer`, counting them.
    struct AriFake {
        answer: Ari,
        asks: AtomicU32,
    }

    impl Renew for AriFake {
        fn renew<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
            Box::pin(async { Err("not in this test".to_owned()) })
        }

        fn window<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Ari> {
            self.asks.fetch_add(1, Ordering::SeqCst);
            let answer = self.answer.clone();
            Box::pin(async move { answer })
        }
    }

    /// A scheduler at `now` (Unix seconds) tracking "cn", a 90-day
    /// certificate issued 30 days before the recorded window starts; jitter
    /// is always `jitter`.
    fn ari_scheduler(
        answer: Ari,
        now: i64,
        jitter: f64,
    ) -> (Arc<Scheduler<AriFake, PausedClock>>, Arc<AriFake>) {
        let fake = Arc::new(AriFake {
            answer,
            asks: AtomicU32::new(0),
        });
        let clock = PausedClock {
            start_unix: now,
            start: tokio::time::Instant::now(),
        };
        let s = Arc::new(Scheduler::new(
            Arc::clone(&fake),
            clock,
            Policy::default(),
            move || jitter,
        ));
        let v = Validity {
            not_before: WINDOW_START - 30 * DAY,
            not_after: WINDOW_START + 60 * DAY,
        };
        s.track("cn", Some(v), None);
        (s, fake)
    }

    #[test]
    fn the_recorded_renewal_info_reads_as_its_window_in_unix_seconds() {
        let Ari::Window {
            window,
            retry_after,
        } = recorded()
        else {
            panic!("not a window");
        };
        assert_eq!(
            window,
            Window {
                start: WINDOW_START,
                end: WINDOW_END
            }
        );
        assert_eq!(ari_recheck_in(retry_after), Duration::from_secs(6 * 3600));
        // A CA's Retry-After is clamped both ways.
        assert_eq!(ari_recheck_in(Duration::ZERO), ARI_MIN_RECHECK);
        assert_eq!(
            ari_recheck_in(Duration::from_secs(30 * DAY as u64)),
            ARI_MAX_RECHECK
        );
    }

    #[tokio::test(start_paused = true)]
    async fn due_inside_the_cas_window_by_the_jitter_and_asked_again_only_after_retry_after() {
        let now = WINDOW_START - 10 * DAY;
        let (s, fake) = ari_scheduler(recorded(), now, 0.25);
        // By lifetime alone it would be due a month after the CA's window.
        assert_eq!(s.entries()[0].next, WINDOW_START + 30 * DAY - 900);
        s.refresh_windows().await;
        let e = &s.entries()[0];
        assert_eq!(e.next, WINDOW_START + (WINDOW_END - WINDOW_START) / 4);
        assert_eq!(e.ari_next_check, now + RECORDED_RETRY_AFTER as i64);
        // Within the CA's Retry-After, the cached window is used.
        tokio::time::advance(Duration::from_secs(RECORDED_RETRY_AFTER - 1)).await;
        s.refresh_windows().await;
        assert_eq!(fake.asks.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        s.refresh_windows().await;
        assert_eq!(fake.asks.load(Ordering::SeqCst), 2);
        // The same window again: the due time stays where it was.
        assert_eq!(s.entries()[0].next, e.next);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_already_past_means_due_now() {
        let now = WINDOW_END + 3600;
        let (s, _fake) = ari_scheduler(recorded(), now, 0.9);
        s.refresh_windows().await;
        let e = &s.entries()[0];
        assert!(e.next <= now, "due at {} but it is {now}", e.next);
        assert_eq!(s.sleep_for(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ca_without_ari_is_asked_once_and_renewal_falls_back_to_the_lifetime_share() {
        let now = WINDOW_START - 10 * DAY;
        let (s, fake) = ari_scheduler(Ari::Unsupported, now, 0.0);
        let by_lifetime = s.entries()[0].next;
        for _ in 0..3 {
            s.refresh_windows().await;
            tokio::time::advance(Duration::from_secs(2 * DAY as u64)).await;
        }
        assert_eq!(fake.asks.load(Ordering::SeqCst), 1);
        assert!(s.ari_unsupported());
        assert_eq!(s.entries()[0].next, by_lifetime);
        assert_eq!(by_lifetime, WINDOW_START + 30 * DAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ca_that_fails_to_answer_keeps_the_due_time_and_is_asked_again_in_an_hour() {
        let now = WINDOW_START - 10 * DAY;
        let (s, fake) = ari_scheduler(Ari::Failed("connection refused".into()), now, 0.0);
        let before = s.entries()[0].next;
        s.refresh_windows().await;
        let e = &s.entries()[0];
        assert_eq!(e.next, before);
        assert_eq!(
            e.ari_next_check,
            now + ARI_RETRY_AFTER_FAILURE.as_secs() as i64
        );
        s.refresh_windows().await;
        assert_eq!(fake.asks.load(Ordering::SeqCst), 1);
    }

    /// Panics on its first call (a bug in the order's code), then renews.
    struct PanicsOnce {
        calls: AtomicU32,
    }

    impl Renew for PanicsOnce {
        fn renew<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
            Box::pin(async move {
                if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("a bug in the renewal");
                }
                Ok(Renewed {
                    validity: ninety_days(),
                    problem: None,
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_panics_is_a_failure_retried_on_the_schedule() {
        let clock = PausedClock {
            start_unix: 1_000_000,
            start: tokio::time::Instant::now(),
        };
        let renewer = Arc::new(PanicsOnce {
            calls: AtomicU32::new(0),
        });
        let s = Arc::new(Scheduler::new(renewer, clock, Policy::default(), || 0.0));
        s.track("cn", None, None);
        assert_eq!(s.start_due(), 1);
        settle().await;
        let entry = &s.entries()[0];
        assert!(!entry.running, "a panicked renewal still counts as running");
        assert!(
            matches!(&entry.last, Some((_, Outcome::Failed(why))) if why.contains("panicked")),
            "{entry:?}"
        );
        assert_eq!(entry.next, 1_000_000 + 60);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(s.start_due(), 0, "retried before a minute");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.start_due(), 1);
        settle().await;
        assert_eq!(s.entries()[0].last.as_ref().unwrap().1, Outcome::Renewed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_under_way_is_never_started_twice() {
        let (s, fake) = scheduler(0, Duration::from_secs(30));
        s.track("cn", None, None);
        // Two timers wake at once, then again while the first attempt runs.
        assert_eq!(s.start_due() + s.start_due(), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(s.start_due(), 0);
        tokio::time::advance(Duration::from_secs(30)).await;
        settle().await;
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert!(!s.entries()[0].running);
        assert_eq!(s.start_due(), 0, "renewed: not due for 60 days");
    }
}
