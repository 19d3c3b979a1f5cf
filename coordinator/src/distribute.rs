//! `certfleet distribute`: a stored certificate version onto every node
//! that serves it, in parallel (bounded), each node within its timeout.
//!
//! Agents install into their own configured targets and answer with what
//! is now on disk; re-sending an installed version is a no-op, so
//! distribute is also how a new or drifted node is brought to the current
//! version without a new ACME order.

use std::time::Instant;

use tracing::{info, warn};

use crate::challenge::{FanOut, FleetNode};
use crate::db::now;
use crate::issue::{IssueError, Issuer};
use crate::progress::{Progress, Stage};
use crate::store::StoreError;
use crate::transport::{BundleToInstall, NodeInstall, TransportError};

/// Why a distribution could not start, or which nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum DistributeError {
    #[error(transparent)]
    Setup(#[from] IssueError),
    #[error("certificate {name} has no version {version} in the store")]
    NoVersion { name: String, version: u32 },
    #[error("certificate {0} has not been issued yet: run `certfleet issue {0}`")]
    NotIssued(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("node {0} is not among the nodes serving this certificate")]
    NotServing(String),
    #[error("{}", .failed.iter().map(|(n, e)| format!("node {n} {e}")).collect::<Vec<_>>().join("\n"))]
    Nodes {
        failed: Vec<(String, String)>,
        succeeded: usize,
    },
}

/// Per-node outcomes of a successful distribution.
#[derive(Debug)]
pub struct Distributed {
    pub version: u32,
    pub nodes: Vec<(String, NodeInstall)>,
}

pub async fn distribute(
    issuer: &Issuer,
    name: &str,
    version: Option<u32>,
    only: &[String],
    progress: &Progress,
) -> Result<Distributed, DistributeError> {
    let spec = issuer
        .config()
        .certificate(name)
        .ok_or_else(|| IssueError::UnknownCertificate(name.to_owned()))?;
    let version = match version {
        Some(v) => v,
        None => issuer
            .store()
            .live(name)?
            .map(|s| s.version)
            .ok_or_else(|| DistributeError::NotIssued(name.to_owned()))?,
    };
    let (fullchain_pem, key_pem) =
        issuer
            .store()
            .read_version(name, version)?
            .ok_or_else(|| DistributeError::NoVersion {
                name: name.to_owned(),
                version,
            })?;
    let mut nodes: Vec<FleetNode> = issuer.fleet(spec)?;
    if !only.is_empty() {
        if let Some(missing) = only
            .iter()
            .find(|n| !nodes.iter().any(|f| &f.node.name == *n))
        {
            return Err(DistributeError::NotServing(missing.clone()));
        }
        nodes.retain(|f| only.contains(&f.node.name));
    }
    let bundle = BundleToInstall {
        certificate: name.to_owned(),
        version,
        fullchain_pem,
        key_pem,
        names: spec.sans.clone(),
    };
    let limits: FanOut = issuer.fan_out();
    let start = Instant::now();
    let results = limits
        .run(&nodes, |n| {
            let bundle = &bundle;
            async move { n.transport.install_certificate(bundle).await }
        })
        .await;
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (n, result) in results {
        let name = n.node.name.clone();
        match result.unwrap_or(Err(TransportError::Timeout(limits.node_timeout))) {
            Ok(install) => {
                let what = if install.changed {
                    "installed"
                } else {
                    "already had"
                };
                progress.node(
                    Stage::Distribute,
                    &name,
                    true,
                    format!(
                        "{what} version {} (leaf sha256 {})",
                        install.version, install.leaf_sha256
                    ),
                );
                ok.push((name, install));
            }
            Err(e) => {
                let reason = format!("({}): {e}", n.node.agent);
                progress.node(
                    Stage::Distribute,
                    &name,
                    false,
                    format!("node {name} {reason}"),
                );
                failed.push((name, reason));
            }
        }
    }
    let records: Vec<(String, u32, String)> = ok
        .iter()
        .map(|(n, i)| (n.clone(), i.version, i.leaf_sha256.clone()))
        .collect();
    if let Err(e) = issuer.db().record_installs(name, &records, now()) {
        warn!(error = %e, "cannot record installs");
    }
    info!(
        certificate = name,
        version,
        ok = ok.len(),
        failed = failed.len(),
        ms = start.elapsed().as_millis() as u64,
        "distributed"
    );
    if !failed.is_empty() {
        failed.sort();
        return Err(DistributeError::Nodes {
            failed,
            succeeded: ok.len(),
        });
    }
    ok.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Distributed { version, nodes: ok })
}
