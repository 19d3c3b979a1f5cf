//! Taking a certificate back: revoking a stored version at the CA, and
//! deleting a certificate from the store (and, when asked, from the nodes).
//!
//! Both run under the certificate's lock ([`Operation::Revoke`],
//! [`Operation::Delete`]), so neither races an order or a rollout of the
//! same certificate.
//!
//! A delete removes the nodes' files before the store's: when a node
//! cannot be reached, nothing is taken from the store, and the same
//! `certfleet delete --from-nodes` can simply be run again (a node that
//! already removed its files has nothing left to remove). Numbering goes on
//! after a delete; `store::Store::delete` says why.
//!
//! [`Operation::Revoke`]: crate::fleet::Operation::Revoke
//! [`Operation::Delete`]: crate::fleet::Operation::Delete

use certfleet_proto::bundle::Bundle;
use instant_acme::{RevocationReason, RevocationRequest};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::acme::{AccountError, AcmeAccount, nonce_retry};
use crate::error::ErrorKind;
use crate::fleet::{Fleet, FleetError, OperationGuard};
use crate::progress::{Progress, Stage};
use crate::store::StoreError;
use crate::transport::NodeRemoval;

/// The revocation reasons of RFC 5280 §5.3.1, by the names it gives them.
/// Code 7 is unused there.
pub const REASONS: [(&str, RevocationReason); 10] = [
    ("unspecified", RevocationReason::Unspecified),
    ("keyCompromise", RevocationReason::KeyCompromise),
    ("cACompromise", RevocationReason::CaCompromise),
    ("affiliationChanged", RevocationReason::AffiliationChanged),
    ("superseded", RevocationReason::Superseded),
    (
        "cessationOfOperation",
        RevocationReason::CessationOfOperation,
    ),
    ("certificateHold", RevocationReason::CertificateHold),
    ("removeFromCRL", RevocationReason::RemoveFromCrl),
    ("privilegeWithdrawn", RevocationReason::PrivilegeWithdrawn),
    ("aACompromise", RevocationReason::AaCompromise),
];

/// Why a revoke or a delete failed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(
        "--reason {given:?}: not an RFC 5280 revocation reason; use one of: {}",
        REASONS.map(|(name, _)| name).join(", ")
    )]
    UnknownReason { given: String },
    #[error(
        "certificate {name} has no version {version} in the store (the newest is {latest}); see `certfleet certificates`"
    )]
    NoVersion {
        name: String,
        version: u32,
        latest: u32,
    },
    #[error("certificate {name} version {version} in the store cannot be read: {reason}")]
    Unreadable {
        name: String,
        version: u32,
        reason: String,
    },
    #[error("revoking certificate {name} version {version} (serial {serial}): {source}")]
    Revoke {
        name: String,
        version: u32,
        serial: String,
        source: Box<AccountError>,
    },
    #[error(
        "removing certificate {name} from nodes failed, so the store still holds it; run the delete again once they answer:\n{}",
        .failed.iter().map(|(node, why)| format!("node {node}: {why}")).collect::<Vec<_>>().join("\n")
    )]
    Nodes {
        name: String,
        failed: Vec<(String, String)>,
    },
}

impl ManageError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fleet(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Account(e) => e.kind(),
            Self::Revoke { source, .. } => source.kind(),
            Self::UnknownReason { .. } | Self::NoVersion { .. } => ErrorKind::Config,
            Self::Unreadable { .. } => ErrorKind::Store,
            Self::Nodes { .. } => ErrorKind::Node,
        }
    }

    /// The nodes at fault, if any.
    pub fn nodes(&self) -> Vec<&str> {
        match self {
            Self::Nodes { failed, .. } => failed.iter().map(|(n, _)| n.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

/// The reason named `given` (RFC 5280's names, in any case); `None` for
/// an empty one, which sends no reason (the CA takes it as unspecified).
pub fn parse_reason(given: &str) -> Result<Option<RevocationReason>, ManageError> {
    if given.is_empty() {
        return Ok(None);
    }
    REASONS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(given))
        .map(|(_, reason)| Some(reason.clone()))
        .ok_or_else(|| ManageError::UnknownReason {
            given: given.to_owned(),
        })
}

/// A version revoked at the CA.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub version: u32,
    /// The leaf's serial, lowercase hex.
    pub serial: String,
}

/// Revokes `version` (default: the live one) of the certificate `op`
/// holds the lock of, at the CA, with the account that orders.
pub async fn revoke(
    fleet: &Fleet,
    acme: &AcmeAccount,
    op: &OperationGuard,
    version: Option<u32>,
    reason: Option<RevocationReason>,
) -> Result<Revoked, ManageError> {
    let name = op.certificate();
    fleet.spec(name)?;
    let (version, bundle) = stored_version(fleet, name, version)?;
    let unreadable = |reason: String| ManageError::Unreadable {
        name: name.to_owned(),
        version,
        reason,
    };
    let leaf = CertificateDer::from_pem_slice(bundle.leaf_pem.as_bytes())
        .map_err(|e| unreadable(e.to_string()))?;
    let failed = |source: AccountError| ManageError::Revoke {
        name: name.to_owned(),
        version,
        serial: bundle.serial.clone(),
        source: Box::new(source),
    };
    let account = acme.get().await.map_err(|e| failed(e.into()))?;
    let request = RevocationRequest {
        certificate: &leaf,
        reason,
    };
    let config = fleet.config();
    let deadline = Instant::now() + config.acme.ca_timeout;
    nonce_retry!(deadline, account.revoke(&request).await).map_err(|source| {
        failed(AccountError::Ca {
            url: account.id().to_owned(),
            directory: config.acme.directory.clone(),
            action: "revoking",
            source: Box::new(source),
        })
    })?;
    info!(certificate = name, version, serial = %bundle.serial, "revoked");
    Ok(Revoked {
        version,
        serial: bundle.serial,
    })
}

/// The stored `version` of `name` (default: the live one), parsed.
fn stored_version(
    fleet: &Fleet,
    name: &str,
    version: Option<u32>,
) -> Result<(u32, Bundle), ManageError> {
    let Some(version) = version.filter(|v| *v > 0) else {
        let live = fleet.issued(name)?;
        return Ok((live.version, live.bundle));
    };
    let store = fleet.store();
    let Some((fullchain, _key)) = store.read_version(name, version)? else {
        return Err(ManageError::NoVersion {
            name: name.to_owned(),
            version,
            latest: store.latest_version(name)?,
        });
    };
    let bundle = Bundle::parse(&fullchain, None, &[]).map_err(|e| ManageError::Unreadable {
        name: name.to_owned(),
        version,
        reason: e.to_string(),
    })?;
    Ok((version, bundle))
}

/// What a delete did.
#[derive(Debug, Clone, Default)]
pub struct Deleted {
    /// The last version the store held; `None` when it held none (an
    /// earlier delete left only the nodes' files).
    pub last_version: Option<u32>,
    /// What each node removed, with `--from-nodes`.
    pub nodes: Vec<(String, NodeRemoval)>,
}

/// Deletes the certificate `op` holds the lock of: from every node serving
/// it first when `from_nodes`, then from the store.
pub async fn delete(
    fleet: &Fleet,
    op: &OperationGuard,
    from_nodes: bool,
    progress: &Progress,
) -> Result<Deleted, ManageError> {
    let name = op.certificate();
    fleet.spec(name)?;
    if fleet.live(name)?.is_none() && !from_nodes {
        return Err(FleetError::NotIssued(name.to_owned()).into());
    }
    let nodes = if from_nodes {
        remove_from_nodes(fleet, name, progress).await?
    } else {
        Vec::new()
    };
    let last_version = fleet.store().delete(name)?;
    match last_version {
        Some(v) => progress.step(
            Stage::Store,
            format!("removed {name} (versions up to {v}) from the store"),
        ),
        None => progress.step(Stage::Store, format!("the store held nothing of {name}")),
    }
    info!(certificate = name, from_nodes, last_version, "deleted");
    Ok(Deleted {
        last_version,
        nodes,
    })
}

/// Asks every node serving `name` to remove its installed files; fails,
/// naming each node that did not, when any did not.
async fn remove_from_nodes(
    fleet: &Fleet,
    name: &str,
    progress: &Progress,
) -> Result<Vec<(String, NodeRemoval)>, ManageError> {
    let spec = fleet.spec(name)?;
    let nodes = fleet.nodes(&spec)?;
    progress.begin(
        Stage::Cleanup,
        nodes.len(),
        format!("removing {name} from {} nodes", nodes.len()),
    );
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    spec.fan_out()
        .run_each(
            &nodes,
            |n| n.transport.remove_certificate(name),
            |n, result| {
                let node = &n.node.name;
                match result {
                    Some(Ok(r)) => {
                        let mut message = match r.version {
                            0 => "nothing installed".to_owned(),
                            v => format!("removed version {v}: {} files", r.removed.len()),
                        };
                        for kept in &r.kept {
                            warn!(
                                certificate = name,
                                node, kept, "left a changed file in place"
                            );
                            message.push_str(&format!("; kept {kept}"));
                        }
                        progress.node(Stage::Cleanup, node, true, message);
                        removed.push((node.clone(), r));
                    }
                    Some(Err(e)) => {
                        let why = format!("({}): {e}", n.node.agent);
                        progress.node(Stage::Cleanup, node, false, why.clone());
                        failed.push((node.clone(), why));
                    }
                    None => {
                        let why = format!("({}): no answer in time", n.node.agent);
                        progress.node(Stage::Cleanup, node, false, why.clone());
                        failed.push((node.clone(), why));
                    }
                }
            },
        )
        .await;
    if !failed.is_empty() {
        failed.sort();
        return Err(ManageError::Nodes {
            name: name.to_owned(),
            failed,
        });
    }
    removed.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Operation;
    use crate::fleet::testing::{Bench, lock};
    use crate::transport::fake::{Call, Fail};

    #[tokio::test]
    async fn a_node_that_cannot_remove_keeps_the_store_and_a_retry_finishes() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        bench.fakes.fail("n1", Fail::Unreachable);
        let op = lock(&fleet, Operation::Delete);
        let err = delete(&fleet, &op, true, &Progress::discard())
            .await
            .unwrap_err();
        assert_eq!((err.kind(), err.nodes()), (ErrorKind::Node, vec!["n1"]));
        assert!(
            err.to_string().contains("the store still holds it"),
            "{err}"
        );
        assert_eq!(fleet.live("cn").unwrap().unwrap().version, 2);
        // The others removed theirs; the retry finds nothing there.
        assert_eq!(bench.fakes.installed("n0").0, 0);
        let fleet = bench.fleet(3, 1);
        let op = lock(&fleet, Operation::Delete);
        let deleted = delete(&fleet, &op, true, &Progress::discard())
            .await
            .unwrap();
        assert_eq!(deleted.last_version, Some(2));
        assert_eq!(deleted.nodes.len(), 3);
        assert!(fleet.live("cn").unwrap().is_none());
        assert_eq!(fleet.store().latest_version("cn").unwrap(), 2);
        // Without --from-nodes, no node is asked anything.
        let fleet = bench.fleet(3, 1);
        let op = lock(&fleet, Operation::Delete);
        let err = delete(&fleet, &op, false, &Progress::discard())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(!bench.fakes.calls("n0").contains(&Call::Remove));
    }

    #[test]
    fn reasons_are_rfc_5280_names_in_any_case() {
        assert!(parse_reason("").unwrap().is_none());
        assert!(matches!(
            parse_reason("keyCompromise").unwrap(),
            Some(RevocationReason::KeyCompromise)
        ));
        assert!(matches!(
            parse_reason("cessationofoperation").unwrap(),
            Some(RevocationReason::CessationOfOperation)
        ));
        let err = parse_reason("stolen").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let message = err.to_string();
        assert!(
            message.starts_with("--reason \"stolen\": not an RFC 5280"),
            "{message}"
        );
        for name in ["unspecified", "keyCompromise", "superseded", "aACompromise"] {
            assert!(message.contains(name), "{message}");
        }
    }
}
