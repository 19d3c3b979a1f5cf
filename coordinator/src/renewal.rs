//! Renewing certificates without an admin: when each one is due, and the
//! loop that renews it then.
//!
//! - A certificate is due when [`Policy::share_left`] of its lifetime is
//!   left (a third by default, as Let's Encrypt advises). [`Policy::due_at`]
//!   also takes the CA's ARI window (RFC 9773: a random time in it), but the
//!   daemon does not fetch one yet (the CA it is tested against, Pebble 2.4,
//!   offers none).
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
//!
//! The scheduler only decides *when*; *what* a renewal does (the same order
//! as `certfleet issue`, then the certificate's `after_issue` policy) is the
//! [`Renew`] implementation's business, so the timing is tested here with a
//! fake and a paused clock.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
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
    policy: Policy,
    entries: Mutex<BTreeMap<String, Entry>>,
    changed: Notify,
    jitter: Box<dyn Fn() -> f64 + Send + Sync>,
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
            policy,
            entries: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            jitter: Box::new(jitter),
        }
    }

    /// Tracks `name`, whose current certificate has `validity` (`None`: it
    /// has none yet, so it is due now).
    pub fn track(&self, name: &str, validity: Option<Validity>, ari: Option<Window>) {
        let next = match validity {
            Some(v) => self.policy.due_at(v, ari, (self.jitter)()),
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
        });
        if !entry.running {
            entry.next = next;
        }
        drop(entries);
        self.changed.notify_one();
    }

    /// Re-reads each tracked certificate's live validity and moves its due
    /// time if a version was issued by hand in the meantime.
    fn refresh(&self) {
        for name in self.renewer.names() {
            let tracked = self
                .entries
                .lock()
                .expect("renewal entries poisoned")
                .contains_key(&name);
            if !tracked && let Some(v) = self.renewer.current(&name) {
                self.track(&name, Some(v), None);
            }
        }
        let names: Vec<String> = {
            let entries = self.entries.lock().expect("renewal entries poisoned");
            entries.keys().cloned().collect()
        };
        for name in names {
            let Some(v) = self.renewer.current(&name) else {
                continue;
            };
            let mut entries = self.entries.lock().expect("renewal entries poisoned");
            let Some(e) = entries.get_mut(&name) else {
                continue;
            };
            // A version issued by hand since: due by its lifetime, and a
            // pending retry of a failed renewal is no longer needed.
            if e.validity != Some(v) && !e.running {
                e.next = self.policy.due_at(v, None, (self.jitter)());
                e.failures = 0;
            }
            e.validity = Some(v);
        }
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
        let result = self.renewer.renew(name).await;
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
                entry.next = self.policy.due_at(renewed.validity, None, (self.jitter)());
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
    /// [`MAX_SLEEP`].
    fn sleep_for(&self) -> Duration {
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

impl FleetRenewer {
    async fn renew_now(&self, name: &str) -> Result<Renewed, String> {
        use crate::config::AfterIssue;
        use crate::fleet::{Holder, Operation};
        let progress = crate::progress::Progress::discard();
        let op = self
            .fleet
            .locks()
            .try_acquire(Holder::new(Operation::Renew, name, None))
            .map_err(|busy| busy.to_string())?;
        let issued = self
            .issuer
            .issue(&op, &progress)
            .await
            .map_err(|failed| failed.error.to_string())?;
        let bundle = &issued.stored.bundle;
        let validity = Validity {
            not_before: bundle.not_before,
            not_after: bundle.not_after,
        };
        let after = self
            .fleet
            .spec(name)
            .map(|s| s.after_issue)
            .unwrap_or_default();
        let done = match after {
            AfterIssue::None => Ok(()),
            AfterIssue::Distribute => {
                crate::distribute::distribute(&self.fleet, &op, None, &[], &progress)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            AfterIssue::Rollout => crate::rollout::rollout(&self.fleet, &op, &progress)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        // The new version is stored either way: the next attempt is due by
        // its lifetime, and the failure is reported, not retried as an order.
        if let Err(e) = &done {
            tracing::warn!(certificate = name, version = issued.stored.version, error = %e, "renewed, but the after_issue step failed");
        }
        Ok(Renewed {
            validity,
            problem: done.err().map(|e| {
                format!(
                    "version {} stored, {after:?} failed: {e}",
                    issued.stored.version
                )
            }),
        })
    }
}

impl Renew for FleetRenewer {
    fn renew<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Renewed, String>> {
        Box::pin(self.renew_now(name))
    }

    fn names(&self) -> Vec<String> {
        let certificates = &self.fleet.config().certificates;
        certificates.iter().map(|c| c.name.clone()).collect()
    }

    fn current(&self, name: &str) -> Option<Validity> {
        let live = self.fleet.live(name).ok()??;
        Some(Validity {
            not_before: live.bundle.not_before,
            not_after: live.bundle.not_after,
        })
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
                Ok(Renewed {
                    validity: Validity {
                        not_before: now,
                        not_after: now + 90 * DAY,
                    },
                    problem: None,
                })
            })
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
