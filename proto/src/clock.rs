//! Wall-clock time as certfleet stores and shows it.
//!
//! Every time certfleet keeps (the registry, certificate lifetimes, who
//! holds an operation's lock) is whole seconds since the Unix epoch, an
//! `i64` as SQLite and X.509 parsers hand it back. People see it as
//! RFC 3339 in UTC.

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Seconds since the Unix epoch. A clock set before 1970 reads 0.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `unix` (seconds) as an RFC 3339 UTC time, `2026-11-18T11:06:40Z`, or
/// the number itself if it is out of range.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_this_code_was_written() {
        assert!(now() > 1_795_000_000);
    }

    #[test]
    fn rfc3339_is_utc_or_the_number() {
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(i64::MAX), i64::MAX.to_string());
    }
}
