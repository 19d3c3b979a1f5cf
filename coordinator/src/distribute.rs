//! `certfleet distribute`: a stored certificate version onto every node
//! that serves it, in parallel (bounded), each node within its timeout.
//!
//! Agents install into their own configured targets and answer with what
//! is now on disk; re-sending an installed version is a no-op, so
//! distribute is also how a new or drifted node is brought to the current
//! version without a new ACME order.

use std::time::Instant;

use certfleet_proto::clock::now;
use tracing::{info, warn};

use crate::challenge::{FanOut, FleetNode};
use crate::config::CertificateSpec;
use crate::error::ErrorKind;
use crate::fleet::{Fleet, FleetError, OperationGuard};
use crate::journal::{Journal, JournalError, step};
use crate::progress::{Progress, Stage};
use crate::store::StoreError;
use crate::transport::{BundleToInstall, NodeInstall, TransportError};

/// Why a distribution could not start, or which nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum DistributeError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("certificate {name} has no version {version} in the store")]
    NoVersion { name: String, version: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("node {0} is not among the nodes serving this certificate")]
    NotServing(String),
    #[error("{}", .failed.iter().map(|(n, e)| format!("node {n} {e}")).collect::<Vec<_>>().join("\n"))]
    Nodes {
        failed: Vec<(String, String)>,
        succeeded: usize,
    },
}

impl DistributeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fleet(e) => e.kind(),
            Self::NoVersion { .. } | Self::NotServing(_) => ErrorKind::Config,
            Self::Store(_) => ErrorKind::Store,
            Self::Journal(e) => e.kind(),
            Self::Nodes { .. } => ErrorKind::Node,
        }
    }

    /// The nodes at fault, when there are any.
    pub fn nodes(&self) -> Vec<&str> {
        match self {
            Self::Nodes { failed, .. } => failed.iter().map(|(n, _)| n.as_str()).collect(),
            Self::NotServing(node) => vec![node.as_str()],
            Self::Fleet(_) | Self::NoVersion { .. } | Self::Store(_) | Self::Journal(_) => {
                Vec::new()
            }
        }
    }
}

/// Per-node outcomes of a successful distribution.
#[derive(Debug)]
pub struct Distributed {
    pub version: u32,
    pub nodes: Vec<(String, NodeInstall)>,
}

/// Sends `version` (default: the live one) to every node serving the
/// certificate, or only to `only`. The caller holds the certificate's lock.
pub async fn distribute(
    fleet: &Fleet,
    op: &OperationGuard,
    version: Option<u32>,
    only: &[String],
    progress: &Progress,
) -> Result<Distributed, DistributeError> {
    let name = op.certificate();
    let spec = fleet.spec(name)?;
    let bundle = read_bundle(fleet, &spec, version)?;
    let nodes = only_nodes(fleet.nodes(&spec)?, only)?;
    let journal = op.journal();
    journal.version(bundle.version)?;
    let what = format!("version {}", bundle.version);
    journal.step(step::INSTALLING, "", &what)?;
    progress.begin(
        Stage::Distribute,
        nodes.len(),
        format!("{what} to {} nodes", nodes.len()),
    );
    let start = Instant::now();
    let (mut ok, mut failed) =
        install_all(spec.fan_out(), &nodes, &bundle, journal, progress).await;
    let records: Vec<(String, u32, String)> = ok
        .iter()
        .map(|(n, i)| (n.clone(), i.version, i.leaf_sha256.clone()))
        .collect();
    if let Err(e) = fleet.db().record_installs(name, &records, now()) {
        warn!(error = %e, "cannot record installs");
    }
    info!(
        certificate = name,
        version = bundle.version,
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
    Ok(Distributed {
        version: bundle.version,
        nodes: ok,
    })
}

/// Reads `version` of the certificate (default: the live one) from the store.
fn read_bundle(
    fleet: &Fleet,
    spec: &CertificateSpec,
    version: Option<u32>,
) -> Result<BundleToInstall, DistributeError> {
    let name = &spec.name;
    let version = match version {
        Some(v) => v,
        None => fleet.issued(name)?.version,
    };
    let (fullchain_pem, key_pem) =
        fleet
            .store()
            .read_version(name, version)?
            .ok_or_else(|| DistributeError::NoVersion {
                name: name.to_owned(),
                version,
            })?;
    Ok(BundleToInstall {
        certificate: name.to_owned(),
        version,
        fullchain_pem,
        key_pem,
        names: spec.sans.clone(),
    })
}

/// `nodes`, or only those named in `only` when it names any; each of
/// those must serve the certificate.
fn only_nodes(
    mut nodes: Vec<FleetNode>,
    only: &[String],
) -> Result<Vec<FleetNode>, DistributeError> {
    if only.is_empty() {
        return Ok(nodes);
    }
    if let Some(missing) = only
        .iter()
        .find(|n| !nodes.iter().any(|f| &f.node.name == *n))
    {
        return Err(DistributeError::NotServing(missing.clone()));
    }
    nodes.retain(|f| only.contains(&f.node.name));
    Ok(nodes)
}

/// Installs `bundle` on every node under `limits`, reporting each;
/// returns the nodes that have it and the ones that failed, with why.
async fn install_all(
    limits: FanOut,
    nodes: &[FleetNode],
    bundle: &BundleToInstall,
    journal: &Journal,
    progress: &Progress,
) -> (Vec<(String, NodeInstall)>, Vec<(String, String)>) {
    let what = format!("version {}", bundle.version);
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    limits
        .run_each(
            nodes,
            |n| async {
                let installed = n.transport.install_certificate(bundle).await;
                if installed.is_ok() {
                    if let Err(e) = journal.step(step::INSTALLED, &n.node.name, &what) {
                        warn!(error = %e, node = n.node.name, "installed, but the journal does not say so");
                    }
                }
                installed
            },
            |n, result| {
                let name = n.node.name.clone();
                match result.unwrap_or(Err(TransportError::Timeout(limits.node_timeout))) {
                    Ok(install) => {
                        let what = if install.changed {
                            "installed"
                        } else {
                            "already had"
                        };
                        let line = format!(
                            "{what} version {} (leaf sha256 {})",
                            install.version, install.leaf_sha256
                        );
                        progress.node(Stage::Distribute, &name, true, line);
                        ok.push((name, install));
                    }
                    Err(e) => {
                        let mut reason = format!("({}): {e}", n.node.agent);
                        // The agent goes on with an install it started.
                        if matches!(e, TransportError::Timeout(_)) {
                            let cert = &bundle.certificate;
                            reason.push_str(&format!(
                                "; it may still finish installing: `certfleet status {cert}` shows what it has, and `certfleet distribute {cert}` again completes it"
                            ));
                        }
                        let line = format!("node {name} {reason}");
                        progress.node(Stage::Distribute, &name, false, line);
                        failed.push((name, reason));
                    }
                }
            },
        )
        .await;
    (ok, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::fleet::Operation;
    use crate::fleet::testing::{Bench, lock};
    use crate::progress::Event;
    use crate::progress::testing::timed;
    use crate::transport::fake::{Call, Fail};

    async fn run(
        fleet: &Fleet,
        version: Option<u32>,
        only: &[&str],
    ) -> Result<Distributed, DistributeError> {
        let op = lock(fleet, Operation::Distribute);
        let only: Vec<String> = only.iter().map(|n| n.to_string()).collect();
        distribute(fleet, &op, version, &only, &Progress::discard()).await
    }

    #[tokio::test]
    async fn every_node_gets_the_version_and_the_installs_are_recorded() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        let done = run(&fleet, Some(1), &[]).await.unwrap();
        assert_eq!(done.version, 1);
        let names: Vec<&str> = done.nodes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["n0", "n1", "n2"]);
        assert!(done.nodes.iter().all(|(_, i)| i.changed));
        for n in names {
            assert_eq!(bench.fakes.calls(n), [Call::Install(1)]);
            assert_eq!(bench.fakes.installed(n), bench.v1);
        }
        let recorded = bench.db.installs("cn").unwrap();
        assert_eq!(recorded.len(), 3);
        assert!(
            recorded
                .iter()
                .all(|i| (i.version, &i.leaf_sha256) == (1, &bench.v1.1))
        );
        // Sending what a node has is a no-op.
        let again = run(&fleet, Some(1), &[]).await.unwrap();
        assert!(again.nodes.iter().all(|(_, i)| !i.changed));
    }

    #[tokio::test]
    async fn only_the_named_nodes_are_sent_to() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        let done = run(&fleet, None, &["n1"]).await.unwrap();
        assert_eq!(done.version, 2);
        assert_eq!(bench.fakes.calls("n1"), [Call::Install(2)]);
        assert_eq!(bench.fakes.calls("n0"), []);
        assert_eq!(bench.fakes.calls("n2"), []);
        let err = run(&fleet, None, &["n1", "n7"]).await.unwrap_err();
        assert!(
            matches!(&err, DistributeError::NotServing(n) if n == "n7"),
            "{err:?}"
        );
        assert_eq!(bench.fakes.calls("n1"), [Call::Install(2)]);
    }

    #[tokio::test]
    async fn a_failing_node_is_named_and_the_others_still_get_the_version() {
        let bench = Bench::new();
        let fleet = bench.fleet(4, 1);
        bench.fakes.fail("n2", Fail::Install);
        bench.fakes.fail("n0", Fail::Unreachable);
        let err = run(&fleet, Some(1), &[]).await.unwrap_err();
        let DistributeError::Nodes { failed, succeeded } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*succeeded, 2);
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["n0", "n2"]);
        let text = err.to_string();
        assert!(
            text.contains("node n2 (127.0.0.4:7443): refused: PermissionDenied: target /etc/ssl/private/cn.key: permission denied"),
            "{text}"
        );
        assert!(
            text.contains("node n0 (127.0.0.2:7443): unreachable"),
            "{text}"
        );
        for n in ["n1", "n3"] {
            assert_eq!(bench.fakes.installed(n), bench.v1, "{n}");
        }
        assert_eq!(bench.fakes.installed("n2"), bench.v2);
    }

    /// Distributes version 1 with progress on a channel; the result and
    /// each event with when it arrived.
    async fn run_timed(
        fleet: &Fleet,
    ) -> (Result<Distributed, DistributeError>, Vec<(Duration, Event)>) {
        let op = lock(fleet, Operation::Distribute);
        let (progress, mut rx) = Progress::channel();
        timed(distribute(fleet, &op, Some(1), &[], &progress), &mut rx).await
    }

    /// (node, when) of each event about a node.
    fn node_times(events: &[(Duration, Event)]) -> Vec<(&str, Duration)> {
        events
            .iter()
            .filter_map(|(at, e)| Some((e.node.as_deref()?, *at)))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_node_is_reported_when_it_finishes_not_when_the_slowest_does() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        let slow = Duration::from_secs(5);
        bench.fakes.delay("n1", slow);
        let (done, events) = run_timed(&fleet).await;
        // The stage opens with how many nodes it concerns.
        let (at, first) = &events[0];
        assert_eq!(*at, Duration::ZERO);
        assert_eq!(
            (first.stage, first.node.as_deref(), first.nodes),
            (Stage::Distribute, None, Some(3))
        );
        assert_eq!(first.message, "version 1 to 3 nodes");
        assert!(events[1..].iter().all(|(_, e)| e.nodes.is_none()));
        // The fast nodes are counted at once; the slow one when it answers.
        let mut times = node_times(&events);
        assert_eq!(times.pop(), Some(("n1", slow)), "{events:?}");
        times.sort();
        assert_eq!(times, [("n0", Duration::ZERO), ("n2", Duration::ZERO)]);
        // The result is as before: every node, in name order.
        let names: Vec<String> = done.unwrap().nodes.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["n0", "n1", "n2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_slower_than_the_timeout_is_failed_at_the_timeout() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        let timeout = fleet.spec("cn").unwrap().fan_out().node_timeout;
        bench.fakes.delay("n0", timeout * 6);
        let (result, events) = run_timed(&fleet).await;
        let err = result.unwrap_err();
        let DistributeError::Nodes { failed, succeeded } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*succeeded, 2);
        assert_eq!(
            failed,
            &[(
                "n0".to_owned(),
                format!(
                    "(127.0.0.2:7443): no answer within {timeout:?}; it may still finish installing: `certfleet status cn` shows what it has, and `certfleet distribute cn` again completes it"
                )
            )]
        );
        let (at, last) = events.last().unwrap();
        assert_eq!(
            (last.node.as_deref(), last.ok, *at),
            (Some("n0"), false, timeout)
        );
        assert_eq!(bench.fakes.installed("n1"), bench.v1);
    }

    #[tokio::test]
    async fn a_rollout_opens_each_stage_with_how_many_nodes_it_concerns() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 2);
        let op = lock(&fleet, Operation::Rollout);
        let (progress, mut rx) = Progress::channel();
        let run = crate::rollout::rollout(&fleet, &op, &progress);
        let (done, events) = timed(run, &mut rx).await;
        done.unwrap();
        let opening: Vec<(Stage, usize, &str)> = events
            .iter()
            .filter_map(|(_, e)| Some((e.stage, e.nodes?, e.message.as_str())))
            .collect();
        assert_eq!(
            opening,
            [
                (Stage::Distribute, 3, "version 2 to 3 nodes"),
                (Stage::Restart, 3, "version 2 onto 3 nodes, 2 at a time"),
            ]
        );
    }

    #[tokio::test]
    async fn a_version_not_in_the_store_is_refused_before_any_node_is_asked() {
        let bench = Bench::new();
        let fleet = bench.fleet(2, 1);
        let err = run(&fleet, Some(9), &[]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "certificate cn has no version 9 in the store"
        );
        assert_eq!(bench.fakes.calls("n0"), []);
    }
}
