//! Bringing a certbot lineage in as version 1 of a configured certificate,
//! so an admin coming from a certbot setup (DataONE's, say) starts from
//! the certificate they already serve instead of a new order.
//!
//! The CLI reads the lineage on the admin's side (`live/NAME/` and
//! `renewal/NAME.conf`) and sends its PEM files and domains; this module
//! decides which configured certificate it becomes ([`target`]), and
//! stores it under that certificate's lock ([`import`]) once it holds up:
//!
//! - the chain parses, is in order and its leaf covers every configured
//!   name of the certificate ([`Bundle::parse`]);
//! - the key is the leaf's key (a lineage whose key was swapped or whose
//!   files come from two renewals would serve nothing);
//! - the leaf has not expired;
//! - the certificate has no version yet. Import only starts a history:
//!   renumbering or replacing versions the nodes may already have would
//!   make `distribute` and rollback lie about what a version is.
//!
//! Nothing is written before every check passed. The renewal scheduler
//! picks the new version up from the store like one `issue` made.

use std::collections::BTreeSet;
use std::fmt;

use certfleet_proto::bundle::{Bundle, InvalidBundle};

use crate::config::{CertificateSpec, Config};
use crate::error::ErrorKind;
use crate::fleet::{Fleet, FleetError, OperationGuard};
use crate::store::{StoreError, Stored};

/// A certbot lineage as the CLI read it.
pub struct Lineage {
    /// certbot's name for it (`live/<name>`).
    pub name: String,
    /// `fullchain.pem`: the leaf, then its chain.
    pub fullchain_pem: String,
    /// `privkey.pem`.
    pub privkey_pem: String,
    /// The domains `renewal/<name>.conf` lists (or the leaf's names when it
    /// lists none), in its order.
    pub domains: Vec<String>,
}

/// Never the key.
impl fmt::Debug for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lineage")
            .field("name", &self.name)
            .field("domains", &self.domains)
            .finish_non_exhaustive()
    }
}

/// Why a lineage was not imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "lineage {lineage:?} names no domains; pass --certificate NAME to say which configured certificate it is"
    )]
    NoDomains { lineage: String },
    #[error(
        "lineage {lineage:?} covers {domains}, and no configured certificate has exactly these names (configured: {configured}); pass --certificate NAME, or add a [[certificates]] entry with these sans to the coordinator's config"
    )]
    NoMatch {
        lineage: String,
        domains: String,
        configured: String,
    },
    #[error(
        "lineage {lineage:?} covers {domains}, which several configured certificates have ({matching}); pass --certificate NAME to choose one"
    )]
    Ambiguous {
        lineage: String,
        domains: String,
        matching: String,
    },
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("lineage {lineage:?} cannot be certificate {certificate}: {source}")]
    Invalid {
        lineage: String,
        certificate: String,
        #[source]
        source: InvalidBundle,
    },
    #[error(
        "lineage {lineage:?} expired at {not_after} (Unix time); renew it with certbot first, or order a new version with `certfleet issue {certificate}`"
    )]
    Expired {
        lineage: String,
        certificate: String,
        not_after: i64,
    },
    #[error(
        "certificate {certificate} already has version {latest} in the store; import only brings a lineage in as version 1 of a certificate that has none. Order a new version with `certfleet issue {certificate}` instead"
    )]
    AlreadyStored { certificate: String, latest: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImportError {
    /// Everything but the store's failure is the admin's to fix.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fleet(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::NoDomains { .. }
            | Self::NoMatch { .. }
            | Self::Ambiguous { .. }
            | Self::Invalid { .. }
            | Self::Expired { .. }
            | Self::AlreadyStored { .. } => ErrorKind::Config,
        }
    }
}

/// DNS names compare without case (RFC 4343).
fn name_set(names: &[String]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_ascii_lowercase()).collect()
}

/// The configured certificate `lineage` becomes: the one named by
/// `certificate` when given, else the only one whose names are exactly the
/// lineage's domains (in any order and case).
pub fn target<'c>(
    config: &'c Config,
    certificate: Option<&str>,
    lineage: &Lineage,
) -> Result<&'c CertificateSpec, ImportError> {
    if let Some(name) = certificate {
        return config
            .certificate(name)
            .ok_or_else(|| FleetError::UnknownCertificate(name.to_owned()).into());
    }
    if lineage.domains.is_empty() {
        return Err(ImportError::NoDomains {
            lineage: lineage.name.clone(),
        });
    }
    let wanted = name_set(&lineage.domains);
    let matching: Vec<&CertificateSpec> = config
        .certificates
        .iter()
        .filter(|c| name_set(&c.sans) == wanted)
        .collect();
    let domains = lineage.domains.join(", ");
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(ImportError::NoMatch {
            lineage: lineage.name.clone(),
            domains,
            configured: describe(config.certificates.iter()),
        }),
        several => Err(ImportError::Ambiguous {
            lineage: lineage.name.clone(),
            domains,
            matching: describe(several.iter().copied()),
        }),
    }
}

/// "cn (cn.example.org, a.example.org); web (web.example.org)"
fn describe<'c>(specs: impl Iterator<Item = &'c CertificateSpec>) -> String {
    let list: Vec<String> = specs
        .map(|c| format!("{} ({})", c.name, c.sans.join(", ")))
        .collect();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join("; ")
    }
}

/// Stores `lineage` as version 1 of the certificate `op` holds the lock
/// of, after checking it (see the module's docs); `now` is the Unix time
/// its expiry is checked against.
pub fn import(
    fleet: &Fleet,
    op: &OperationGuard,
    lineage: &Lineage,
    now: i64,
) -> Result<Stored, ImportError> {
    let name = op.certificate();
    let spec = fleet.spec(name)?;
    let bundle = Bundle::parse(
        &lineage.fullchain_pem,
        Some(&lineage.privkey_pem),
        &spec.sans,
    )
    .map_err(|source| ImportError::Invalid {
        lineage: lineage.name.clone(),
        certificate: name.to_owned(),
        source,
    })?;
    if bundle.not_after <= now {
        return Err(ImportError::Expired {
            lineage: lineage.name.clone(),
            certificate: name.to_owned(),
            not_after: bundle.not_after,
        });
    }
    // Checked under the lock, so no issue can store a version in between.
    let latest = fleet.store().latest_version(name)?;
    if latest > 0 {
        return Err(ImportError::AlreadyStored {
            certificate: name.to_owned(),
            latest,
        });
    }
    let (version, live_dir) = fleet.store().save(name, &bundle, &lineage.privkey_pem)?;
    tracing::info!(
        certificate = name,
        lineage = lineage.name,
        version,
        serial = bundle.serial,
        "imported a certbot lineage"
    );
    Ok(Stored {
        name: name.to_owned(),
        version,
        bundle,
        live_dir,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::db::Db;
    use crate::fleet::{Holder, Operation};
    use crate::store::Store;
    use crate::transport::fake::FakeNodes;

    const NOW: i64 = 1_800_000_000;

    struct Bench {
        state: tempfile::TempDir,
        fleet: Fleet,
    }

    fn bench() -> Bench {
        let state = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
state_dir = "{}"
[acme]
directory = "https://localhost:14000/dir"
[enrollment]
listen = "127.0.0.1:7444"
[[certificates]]
name = "cn"
sans = ["cn.example.org", "a.example.org"]
[[certificates]]
name = "web"
sans = ["web.example.org"]
"#,
            state.path().display()
        );
        let config = Config::from_toml_str(&text, "test.toml").unwrap();
        let fleet = Fleet::new(
            Arc::new(config),
            Arc::new(Db::in_memory().unwrap()),
            Store::open(state.path()).unwrap(),
            Box::new(FakeNodes::default()),
        );
        Bench { state, fleet }
    }

    /// A self-signed lineage for `names`; the key is another one with
    /// `mismatched`.
    fn lineage(names: &[&str], mismatched: bool) -> Lineage {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names.clone())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key = if mismatched {
            rcgen::KeyPair::generate().unwrap()
        } else {
            key
        };
        Lineage {
            name: names[0].clone(),
            fullchain_pem: cert.pem(),
            privkey_pem: key.serialize_pem(),
            domains: names,
        }
    }

    fn lock(fleet: &Fleet, name: &str) -> OperationGuard {
        fleet
            .locks()
            .try_acquire(Holder::new(Operation::Import, name, Some(1000)))
            .unwrap()
    }

    #[test]
    fn the_target_is_the_certificate_with_the_same_names() {
        let b = bench();
        let config = &b.fleet.config();
        let l = lineage(&["A.example.org", "cn.example.org"], false);
        assert_eq!(target(config, None, &l).unwrap().name, "cn");
        assert_eq!(target(config, Some("web"), &l).unwrap().name, "web");
        let e = target(config, Some("nope"), &l).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let l = lineage(&["cn.example.org"], false);
        let e = target(config, None, &l).unwrap_err().to_string();
        assert!(e.contains("cn.example.org"), "{e}");
        assert!(
            e.contains("cn (cn.example.org, a.example.org); web (web.example.org)"),
            "{e}"
        );
        assert!(e.contains("--certificate"), "{e}");
    }

    #[test]
    fn a_lineage_becomes_version_1() {
        let b = bench();
        let l = lineage(&["cn.example.org", "a.example.org"], false);
        let op = lock(&b.fleet, "cn");
        let stored = import(&b.fleet, &op, &l, NOW).unwrap();
        assert_eq!(stored.version, 1);
        let live = b.fleet.store().live("cn").unwrap().unwrap();
        assert_eq!(live.version, 1);
        assert_eq!(live.bundle.leaf_sha256, stored.bundle.leaf_sha256);
        let key = std::fs::read_to_string(b.state.path().join("live/cn/privkey.pem")).unwrap();
        assert_eq!(key, l.privkey_pem);
        // Once there is a version, import refuses.
        let again = import(&b.fleet, &op, &l, NOW).unwrap_err();
        assert!(matches!(
            again,
            ImportError::AlreadyStored { latest: 1, .. }
        ));
        assert!(again.to_string().contains("certfleet issue cn"), "{again}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_and_nothing_stored() {
        let b = bench();
        let l = lineage(&["cn.example.org", "a.example.org"], true);
        let op = lock(&b.fleet, "cn");
        let e = import(&b.fleet, &op, &l, NOW).unwrap_err();
        assert!(
            matches!(
                e,
                ImportError::Invalid {
                    source: InvalidBundle::KeyMismatch,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("does not match"), "{e}");
        assert_eq!(b.fleet.store().latest_version("cn").unwrap(), 0);
        assert!(!b.state.path().join("archive/cn").exists());
    }

    #[test]
    fn a_lineage_missing_a_configured_name_or_expired_is_refused() {
        let b = bench();
        let op = lock(&b.fleet, "cn");
        let l = lineage(&["cn.example.org"], false);
        let e = import(&b.fleet, &op, &l, NOW).unwrap_err();
        assert!(e.to_string().contains("a.example.org"), "{e}");
        let l = lineage(&["cn.example.org", "a.example.org"], false);
        // rcgen's default validity ends in 4096.
        let e = import(&b.fleet, &op, &l, 100_000_000_000).unwrap_err();
        assert!(matches!(e, ImportError::Expired { .. }), "{e:?}");
        assert_eq!(b.fleet.store().latest_version("cn").unwrap(), 0);
    }
}
