//! Failed join attempts, counted per source address.
//!
//! A join token's secret is long and random, so guessing it is hopeless;
//! what a flood of wrong tokens costs is a database lookup and a log line
//! each. So each source gets a window that opens at its first failed
//! attempt: after `limit` failures in it, the source's join attempts are
//! refused before anything else is looked at, until the window has passed.
//!
//! Logging is rate limited the same way. Of a window's attempts, the
//! caller logs only the first failure and the first refusal (the tracker
//! says which those are); the others are counted, and when the window
//! ends the tracker hands back one [`Summary`] of them.
//!
//! The tracker never reads a clock or logs: every call takes `now`, and
//! what should be logged is returned, so its tests drive time explicitly.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Sources tracked at once. When a new one would pass this, the windows that
/// have ended are dropped and then, if still full, the oldest window: a flood
/// from many addresses costs bounded memory.
pub const MAX_TRACKED_SOURCES: usize = 4096;

/// Where join attempts come from, as the throttle counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(Ipv4Addr),
    /// An IPv6 /64, given by its first address: one host usually holds a
    /// whole /64 to pick addresses from.
    V6Net(Ipv6Addr),
    /// The connection had no peer address (never over TCP). All such
    /// attempts share one count rather than escape counting.
    Unknown,
}

/// Bits of an IPv6 address that make up the counted /64.
const V6_NET_MASK: u128 = !0 << 64;

impl Source {
    pub fn of(addr: Option<IpAddr>) -> Self {
        match addr.map(|a| a.to_canonical()) {
            Some(IpAddr::V4(v4)) => Self::V4(v4),
            Some(IpAddr::V6(v6)) => Self::V6Net(Ipv6Addr::from(u128::from(v6) & V6_NET_MASK)),
            None => Self::Unknown,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(v4) => write!(f, "{v4}"),
            Self::V6Net(net) => write!(f, "{net}/64"),
            Self::Unknown => f.write_str("an unknown address"),
        }
    }
}

/// A join attempt refused because its source failed too often.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many failed join attempts from {from}; try again in {} s", .retry_after.as_secs())]
pub struct Throttled {
    pub from: Source,
    /// When the source's window ends, rounded up to whole seconds.
    pub retry_after: Duration,
    /// This is the window's first refusal: log it. Later ones are counted
    /// into the window's [`Summary`].
    pub first: bool,
}

/// The attempts of one ended window that were counted but not logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub source: Source,
    pub attempts: u32,
    pub window: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} more failed join attempts from {} in the last {} s",
            self.attempts,
            self.source,
            self.window.as_secs()
        )
    }
}

/// One source's window.
#[derive(Debug)]
struct Window {
    start: Instant,
    failures: u32,
    refused: u32,
    /// Failures and refusals not logged one by one.
    unlogged: u32,
}

/// Failed join attempts per source, with at most [`MAX_TRACKED_SOURCES`]
/// windows open.
#[derive(Debug)]
pub struct JoinThrottle {
    limit: u32,
    window: Duration,
    capacity: usize,
    sources: HashMap<Source, Window>,
    ended: Vec<Summary>,
}

impl JoinThrottle {
    /// Refuses a source's attempts once it has failed `limit` times in a
    /// `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self::with_capacity(limit, window, MAX_TRACKED_SOURCES)
    }

    fn with_capacity(limit: u32, window: Duration, capacity: usize) -> Self {
        Self {
            limit,
            window,
            capacity,
            sources: HashMap::new(),
            ended: Vec::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether an attempt from `source` at `now` may go on.
    pub fn admit(&mut self, source: Source, now: Instant) -> Result<(), Throttled> {
        self.end_if_passed(source, now);
        let window = self.window;
        let Some(w) = self.sources.get_mut(&source) else {
            return Ok(());
        };
        if w.failures < self.limit {
            return Ok(());
        }
        let first = w.refused == 0;
        w.refused += 1;
        if !first {
            w.unlogged += 1;
        }
        let left = (w.start + window).saturating_duration_since(now);
        Err(Throttled {
            from: source,
            retry_after: Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0)),
            first,
        })
    }

    /// Counts a failed attempt from `source` at `now`. Returns whether it
    /// is the first of the source's window, the one to log.
    pub fn failed(&mut self, source: Source, now: Instant) -> bool {
        self.end_if_passed(source, now);
        if !self.sources.contains_key(&source) {
            self.make_room(now);
        }
        let w = self.sources.entry(source).or_insert(Window {
            start: now,
            failures: 0,
            refused: 0,
            unlogged: 0,
        });
        w.failures += 1;
        let first = w.failures == 1;
        if !first {
            w.unlogged += 1;
        }
        first
    }

    /// Ends every window that has passed by `now`.
    pub fn expire(&mut self, now: Instant) {
        let window = self.window;
        let ended = &mut self.ended;
        self.sources.retain(|&source, w| {
            let open = now < w.start + window;
            if !open {
                ended.extend(summary(source, w, window));
            }
            open
        });
    }

    /// The summaries of the windows ended since the last call, to log.
    pub fn take_summaries(&mut self) -> Vec<Summary> {
        std::mem::take(&mut self.ended)
    }

    fn end_if_passed(&mut self, source: Source, now: Instant) {
        if let Some(w) = self.sources.get(&source)
            && now >= w.start + self.window
        {
            let w = self.sources.remove(&source).expect("just found");
            self.ended.extend(summary(source, &w, self.window));
        }
    }

    /// Frees a slot for one more source.
    fn make_room(&mut self, now: Instant) {
        if self.sources.len() < self.capacity {
            return;
        }
        self.expire(now);
        if self.sources.len() < self.capacity {
            return;
        }
        let oldest = self
            .sources
            .iter()
            .min_by_key(|(_, w)| w.start)
            .map(|(&source, _)| source);
        if let Some(source) = oldest {
            let w = self.sources.remove(&source).expect("just found");
            self.ended.extend(summary(source, &w, self.window));
        }
    }
}

fn summary(source: Source, w: &Window, window: Duration) -> Option<Summary> {
    (w.unlogged > 0).then_some(Summary {
        source,
        attempts: w.unlogged,
        window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn v4(last: u8) -> Source {
        Source::of(Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))))
    }

    #[test]
    fn a_source_is_refused_after_the_limit_until_its_window_ends() {
        let t0 = Instant::now();
        let mut throttle = JoinThrottle::new(3, WINDOW);
        let (a, b) = (v4(1), v4(2));
        for i in 0..3 {
            let now = t0 + Duration::from_secs(i);
            assert_eq!(throttle.admit(a, now), Ok(()));
            assert_eq!(throttle.failed(a, now), i == 0, "only the first is logged");
        }
        let refused = throttle
            .admit(a, t0 + Duration::from_millis(10_500))
            .unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(50));
        assert!(refused.first);
        assert_eq!(
            refused.to_string(),
            "too many failed join attempts from 192.0.2.1; try again in 50 s"
        );
        let again = throttle.admit(a, t0 + Duration::from_secs(59)).unwrap_err();
        assert!(!again.first, "later refusals are only counted");
        assert_eq!(again.retry_after, Duration::from_secs(1));
        // Another source is not affected.
        assert_eq!(throttle.admit(b, t0 + Duration::from_secs(30)), Ok(()));
        assert!(throttle.take_summaries().is_empty(), "the window is open");

        // The window ends: admitted again, with one summary of what was not
        // logged (two failures, one refusal).
        assert_eq!(throttle.admit(a, t0 + WINDOW), Ok(()));
        let summaries = throttle.take_summaries();
        assert_eq!(
            summaries,
            [Summary {
                source: a,
                attempts: 3,
                window: WINDOW
            }]
        );
        assert_eq!(
            summaries[0].to_string(),
            "3 more failed join attempts from 192.0.2.1 in the last 60 s"
        );
        // A new window starts with the next failure, logged again.
        assert!(throttle.failed(a, t0 + WINDOW));
        assert!(throttle.take_summaries().is_empty());
    }

    #[test]
    fn expire_ends_every_passed_window_and_summarises_only_unlogged_attempts() {
        let t0 = Instant::now();
        let mut throttle = JoinThrottle::new(5, WINDOW);
        throttle.failed(v4(1), t0);
        throttle.failed(v4(2), t0);
        throttle.failed(v4(2), t0);
        throttle.failed(v4(3), t0 + Duration::from_secs(30));
        throttle.failed(v4(3), t0 + Duration::from_secs(30));
        throttle.expire(t0 + Duration::from_secs(59));
        assert!(throttle.take_summaries().is_empty());
        throttle.expire(t0 + WINDOW);
        // v4(1) failed once, and that was logged: nothing to sum up.
        assert_eq!(
            throttle.take_summaries(),
            [Summary {
                source: v4(2),
                attempts: 1,
                window: WINDOW
            }]
        );
        assert_eq!(throttle.sources.len(), 1, "v4(3)'s window is still open");
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest_window() {
        let t0 = Instant::now();
        let mut throttle = JoinThrottle::with_capacity(1, WINDOW, 3);
        for i in 1..=3 {
            let now = t0 + Duration::from_secs(i.into());
            throttle.failed(v4(i), now);
            throttle.admit(v4(i), now).unwrap_err();
            throttle.admit(v4(i), now).unwrap_err();
        }
        throttle.failed(v4(4), t0 + Duration::from_secs(4));
        assert_eq!(throttle.sources.len(), 3);
        assert_eq!(throttle.admit(v4(1), t0 + Duration::from_secs(5)), Ok(()));
        assert!(throttle.admit(v4(2), t0 + Duration::from_secs(5)).is_err());
        // The evicted window's count is not lost.
        assert_eq!(
            throttle.take_summaries(),
            [Summary {
                source: v4(1),
                attempts: 1,
                window: WINDOW
            }]
        );
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(Some(a)), Source::of(Some(b)));
        assert_ne!(Source::of(Some(a)), Source::of(Some(c)));
        assert_eq!(Source::of(Some(a)).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(Source::of(Some(mapped)), v4(7));
        assert_eq!(Source::of(None).to_string(), "an unknown address");
    }
}
