//! A guard against the CA's rate limits, checked before an order is placed.
//!
//! Let's Encrypt refuses, for hours or days, an account that passes its
//! limits; a coordinator renewing unattended must not walk into them. Two
//! limits matter for one cluster certificate, counted from the
//! coordinator's own order history:
//!
//! - [`DUPLICATE_LIMIT`] certificates for the exact same set of names per
//!   [`DUPLICATE_WINDOW`] (7 days);
//! - [`FAILED_VALIDATION_LIMIT`] failed validations per name per
//!   [`FAILED_VALIDATION_WINDOW`] (1 hour).
//!
//! An order that would pass one is refused with the time it becomes
//! possible; `--force` (on `certfleet issue` and `renew`) skips the guard.
//! The history is the journal's (`Db::past_orders`): every order an
//! operation of the certificate placed at the production CA, dry runs
//! left out. The order (`issue.rs`) checks before it asks the CA for
//! anything, after storing a rescued certificate (which needs no order).

use std::collections::BTreeSet;

use certfleet_proto::clock::rfc3339;

/// Certificates for one exact set of names the CA issues per window.
pub const DUPLICATE_LIMIT: usize = 5;
/// Seconds of the duplicate-certificate window.
pub const DUPLICATE_WINDOW: i64 = 7 * 86_400;
/// Failed validations of one name the CA accepts per window.
pub const FAILED_VALIDATION_LIMIT: usize = 5;
/// Seconds of the failed-validation window.
pub const FAILED_VALIDATION_WINDOW: i64 = 3600;

/// One earlier order, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastOrder {
    /// When it was placed, Unix seconds.
    pub at: i64,
    /// Every name it asked for.
    pub names: BTreeSet<String>,
    pub outcome: PastOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PastOutcome {
    /// The CA issued a certificate.
    Issued,
    /// The CA tried these names and failed to validate them.
    ValidationFailed(BTreeSet<String>),
    /// Anything else (stopped before the CA validated, cancelled).
    Other,
}

/// Why an order is refused, and when it becomes possible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limited {
    #[error(
        "{count} certificates for exactly these names were issued in the last 7 days, the CA's limit is {DUPLICATE_LIMIT}; the next is possible at {} (use --force to order anyway)", rfc3339(*allowed_at)
    )]
    Duplicate { count: usize, allowed_at: i64 },
    #[error(
        "{name} failed validation {count} times in the last hour, the CA's limit is {FAILED_VALIDATION_LIMIT}; fix the cause, and ordering is possible again at {} (use --force to order anyway)", rfc3339(*allowed_at)
    )]
    FailedValidations {
        name: String,
        count: usize,
        allowed_at: i64,
    },
}

impl Limited {
    /// When the order becomes possible, Unix seconds.
    pub fn allowed_at(&self) -> i64 {
        match self {
            Self::Duplicate { allowed_at, .. } | Self::FailedValidations { allowed_at, .. } => {
                *allowed_at
            }
        }
    }
}

/// Whether an order for `names` at `now` stays within the CA's limits,
/// given the orders in `history` (any order).
pub fn check(now: i64, names: &BTreeSet<String>, history: &[PastOrder]) -> Result<(), Limited> {
    let mut issued: Vec<i64> = history
        .iter()
        .filter(|o| o.outcome == PastOutcome::Issued && &o.names == names)
        .filter(|o| o.at > now - DUPLICATE_WINDOW)
        .map(|o| o.at)
        .collect();
    if issued.len() >= DUPLICATE_LIMIT {
        issued.sort_unstable();
        // A slot frees when the oldest of the last LIMIT leaves the window.
        let oldest = issued[issued.len() - DUPLICATE_LIMIT];
        return Err(Limited::Duplicate {
            count: issued.len(),
            allowed_at: oldest + DUPLICATE_WINDOW,
        });
    }
    for name in names {
        let mut failed: Vec<i64> = history
            .iter()
            .filter(|o| o.at > now - FAILED_VALIDATION_WINDOW)
            .filter(|o| matches!(&o.outcome, PastOutcome::ValidationFailed(n) if n.contains(name)))
            .map(|o| o.at)
            .collect();
        if failed.len() >= FAILED_VALIDATION_LIMIT {
            failed.sort_unstable();
            let oldest = failed[failed.len() - FAILED_VALIDATION_LIMIT];
            return Err(Limited::FailedValidations {
                name: name.clone(),
                count: failed.len(),
                allowed_at: oldest + FAILED_VALIDATION_WINDOW,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn order(at: i64, n: &[&str], outcome: PastOutcome) -> PastOrder {
        PastOrder {
            at,
            names: names(n),
            outcome,
        }
    }

    #[test]
    fn the_sixth_identical_certificate_in_a_week_is_refused_until_a_slot_frees() {
        let set = ["cn.example.org", "cn-ucsb-1.example.org"];
        let day = 86_400;
        let history: Vec<PastOrder> = (0..5)
            .map(|i| order(1_000_000 + i * day, &set, PastOutcome::Issued))
            .collect();
        let now = 1_000_000 + 5 * day;
        let err = check(now, &names(&set), &history).unwrap_err();
        assert_eq!(err.allowed_at(), 1_000_000 + 7 * day);
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(err.to_string().contains("1970-01-19T"), "{err}");
        // Another set of names is not affected; nor are failed orders.
        assert!(check(now, &names(&set[..1]), &history).is_ok());
        let mut four = history[1..].to_vec();
        four.push(order(now - 10, &set, PastOutcome::Other));
        assert!(check(now, &names(&set), &four).is_ok());
        // A week after the first, a slot is free again.
        assert!(check(1_000_000 + 7 * day + 1, &names(&set), &history).is_ok());
    }

    /// The guard as the order wires it: the journal's orders, read back
    /// by `Db::past_orders`, into [`check`].
    #[test]
    fn five_orders_journaled_as_issued_refuse_the_sixth_and_a_dry_run_does_not_count() {
        use crate::db::Db;
        use crate::error::ErrorKind;
        use crate::issue::IssueError;
        use crate::journal::step::ISSUED;
        let db = Db::in_memory().unwrap();
        let sans = vec![
            "cn.example.org".to_owned(),
            "cn-ucsb-1.example.org".to_owned(),
        ];
        let journal = |kind: &str, at: i64| {
            let id = db.begin_operation("cn", kind, "uid 0", at).unwrap();
            db.set_operation_order(id, &format!("https://ca.test/order/{id}"), &sans)
                .unwrap();
            db.journal_step(id, ISSUED, "", "", at + 5).unwrap();
        };
        let start = 1_000_000;
        for i in 0..4 {
            journal(
                if i % 2 == 0 { "issue" } else { "renewal" },
                start + i * 3600,
            );
        }
        journal("dry-run", start + 5 * 3600);
        let now = start + 6 * 3600;
        let names: BTreeSet<String> = sans.iter().cloned().collect();
        let since = now - DUPLICATE_WINDOW;
        let history = db.past_orders("cn", since).unwrap();
        assert!(
            check(now, &names, &history).is_ok(),
            "four real orders and a dry run"
        );
        journal("issue", start + 5 * 3600 + 60);
        let history = db.past_orders("cn", since).unwrap();
        let limited = check(now, &names, &history).unwrap_err();
        assert_eq!(limited.allowed_at(), start + DUPLICATE_WINDOW);
        // As the order reports it: its own kind, the time, and the way past.
        let error = IssueError::RateLimited(limited);
        assert_eq!(error.kind(), ErrorKind::RateLimited);
        let message = error.to_string();
        assert!(
            message.contains("possible at 1970-01-19T13:46:40Z") && message.contains("--force"),
            "{message}"
        );
        // Another certificate's orders are its own.
        assert!(db.past_orders("other", since).unwrap().is_empty());
    }

    #[test]
    fn five_failed_validations_of_a_name_in_an_hour_stop_the_next_order() {
        let set = ["cn.example.org", "cn-unm-1.example.org"];
        let failed = || PastOutcome::ValidationFailed(names(&["cn-unm-1.example.org"]));
        let history: Vec<PastOrder> = (0..5)
            .map(|i| order(10_000 + i * 60, &set, failed()))
            .collect();
        let err = check(10_400, &names(&set), &history).unwrap_err();
        assert!(
            matches!(&err, Limited::FailedValidations { name, count: 5, allowed_at: 13_600 } if name == "cn-unm-1.example.org"),
            "{err:?}"
        );
        assert!(check(13_601, &names(&set), &history).is_ok());
    }
}
