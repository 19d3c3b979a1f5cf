//! `certfleet status`: what every node serving a certificate has on disk
//! and serves, beside the live version and what the last rollout recorded.
//!
//! Read-only: it takes no lock, so it answers while an operation runs, and
//! it shows what the registry last recorded for a node that cannot be asked.

use crate::db::{DbError, Installed, RolloutStep, RolloutSummary};
use crate::error::ErrorKind;
use crate::fleet::{Fleet, FleetError};
use crate::transport::{NodeCertificate, ServedReport};

/// Why a certificate's status could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Registry(#[from] DbError),
}

impl StatusError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fleet(e) => e.kind(),
            Self::Registry(e) => e.kind(),
        }
    }
}

/// A certificate across the fleet.
#[derive(Debug)]
pub struct FleetStatus {
    /// The live version and its leaf SHA-256, once one was issued.
    pub live: Option<(u32, String)>,
    /// Every node serving the certificate, in rollout order.
    pub nodes: Vec<NodeStatus>,
    /// The latest rollout, if there was one.
    pub last_rollout: Option<LastRollout>,
}

/// One node's view.
#[derive(Debug)]
pub struct NodeStatus {
    pub node: String,
    /// What the node reports, or why it could not be asked (naming its
    /// address).
    pub result: Result<NodeCertificate, String>,
    /// What the node last reported installed, as the registry recorded it.
    pub recorded: Option<Installed>,
}

/// The latest rollout and every step it recorded, in order.
#[derive(Debug)]
pub struct LastRollout {
    pub summary: RolloutSummary,
    pub steps: Vec<RolloutStep>,
}

/// One endpoint serving a leaf whose expiry is known, from a status.
#[derive(Debug)]
pub struct ServedLeaf<'a> {
    pub node: &'a str,
    pub endpoint: &'a ServedReport,
    pub leaf_sha256: &'a str,
    pub version: u32,
    pub not_after: i64,
}

impl FleetStatus {
    /// Every endpoint the nodes of certificate `name` serve a leaf on, with
    /// that leaf's version and notAfter: the node's installed version when
    /// it serves that, else the store's version with that leaf (read once,
    /// the first time a node serves another: mid-rollout, or rolled back).
    /// A leaf certfleet never stored is left out: its expiry is not known
    /// here.
    pub fn served_leaves(&self, fleet: &Fleet, name: &str) -> Vec<ServedLeaf<'_>> {
        let mut stored: Option<Vec<(String, u32, i64)>> = None;
        let mut out = Vec::new();
        for node in &self.nodes {
            let Ok(answer) = &node.result else { continue };
            for endpoint in &answer.served {
                let Ok(sha) = &endpoint.result else { continue };
                let found = if *sha == answer.leaf_sha256 {
                    Some((answer.version, answer.not_after))
                } else {
                    stored
                        .get_or_insert_with(|| stored_leaves(fleet, name))
                        .iter()
                        .find(|(s, _, _)| s == sha)
                        .map(|(_, version, not_after)| (*version, *not_after))
                };
                let Some((version, not_after)) = found else {
                    continue;
                };
                out.push(ServedLeaf {
                    node: &node.node,
                    endpoint,
                    leaf_sha256: sha,
                    version,
                    not_after,
                });
            }
        }
        out
    }
}

/// Each stored version of `name`: its leaf SHA-256, number and notAfter.
fn stored_leaves(fleet: &Fleet, name: &str) -> Vec<(String, u32, i64)> {
    let store = fleet.store();
    let latest = store.latest_version(name).unwrap_or(0);
    (1..=latest)
        .filter_map(|version| {
            let (chain, _) = store.read_version(name, version).ok().flatten()?;
            let bundle = certfleet_proto::bundle::Bundle::parse(&chain, None, &[]).ok()?;
            Some((bundle.leaf_sha256_hex(), version, bundle.not_after))
        })
        .collect()
}

/// Asks every node serving `name` what it has and serves, and reads what
/// the registry recorded about them.
pub async fn status(fleet: &Fleet, name: &str) -> Result<FleetStatus, StatusError> {
    let spec = fleet.spec(name)?;
    let live = fleet
        .live(name)?
        .map(|s| (s.version, s.bundle.leaf_sha256_hex()));
    let nodes = fleet.nodes(&spec)?;
    let results = spec
        .fan_out()
        .run(&nodes, |n| n.transport.certificate_status(name, true))
        .await;
    let mut installs = fleet.db().installs(name)?;
    let mut out: Vec<NodeStatus> = results
        .into_iter()
        .map(|(n, r)| NodeStatus {
            node: n.node.name.clone(),
            result: match r {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(format!("({}): {e}", n.node.agent)),
                None => Err(format!("({}): no answer in time", n.node.agent)),
            },
            recorded: installs
                .iter()
                .position(|i| i.node == n.node.name)
                .map(|at| installs.swap_remove(at)),
        })
        .collect();
    let order = |name: &str| nodes.iter().position(|n| n.node.name == name);
    out.sort_by_key(|s| order(&s.node));
    let db = fleet.db();
    let last_rollout = match db.latest_rollout(name)? {
        Some(summary) => Some(LastRollout {
            steps: db.rollout_steps(summary.id)?,
            summary,
        }),
        None => None,
    };
    Ok(FleetStatus {
        live,
        nodes: out,
        last_rollout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::RolloutOutcome;
    use crate::distribute::distribute;
    use crate::fleet::Operation;
    use crate::fleet::testing::{Bench, lock};
    use crate::progress::Progress;
    use crate::rollout::restart;
    use crate::transport::fake::{Call, Fail};

    #[tokio::test]
    async fn every_node_answers_in_rollout_order_beside_what_was_recorded() {
        let bench = Bench::new();
        let fleet = bench.fleet(4, 1);
        let op = lock(&fleet, Operation::Distribute);
        let only = ["n1".to_owned()];
        distribute(&fleet, &op, Some(2), &only, &Progress::discard())
            .await
            .unwrap();
        drop(op);
        bench.fakes.fail("n3", Fail::Unreachable);
        let s = status(&fleet, "cn").await.unwrap();
        assert_eq!(s.live, Some(bench.v2.clone()));
        let names: Vec<&str> = s.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["n0", "n1", "n2", "n3"]);
        let n1 = &s.nodes[1];
        let answer = n1.result.as_ref().unwrap();
        assert_eq!(
            (answer.version, &answer.leaf_sha256),
            (bench.v2.0, &bench.v2.1)
        );
        assert_eq!(answer.served.len(), 1);
        let recorded = n1.recorded.as_ref().unwrap();
        assert_eq!((recorded.version, &recorded.leaf_sha256), (2, &bench.v2.1));
        assert!(s.nodes[0].recorded.is_none());
        let err = s.nodes[3].result.as_ref().unwrap_err();
        assert_eq!(
            err,
            "(127.0.0.5:7443): unreachable: node n3: connection refused"
        );
        assert!(s.last_rollout.is_none());
        // Read-only: the nodes were only asked.
        assert_eq!(bench.fakes.calls("n0"), [Call::Status { probe: true }]);
    }

    #[tokio::test]
    async fn the_last_rollout_comes_with_its_steps() {
        let bench = Bench::new();
        let fleet = bench.fleet(3, 1);
        bench.fakes.fail("n1", Fail::Restart);
        let op = lock(&fleet, Operation::Restart);
        restart(&fleet, &op, &Progress::discard())
            .await
            .unwrap_err();
        drop(op);
        let last = status(&fleet, "cn").await.unwrap().last_rollout.unwrap();
        assert_eq!(last.summary.version, bench.v2.0);
        assert_eq!(last.summary.outcome, Some(RolloutOutcome::Halted));
        let steps: Vec<(&str, &str, bool)> = last
            .steps
            .iter()
            .map(|s| (s.node.as_str(), s.step.as_str(), s.ok))
            .collect();
        assert_eq!(
            steps,
            [
                ("n0", "web:verify", true),
                ("n1", "web:check", false),
                ("n1", "rollback", true),
            ]
        );
        assert!(last.steps[1].detail.contains("unknown directive"));
    }

    #[tokio::test]
    async fn an_unknown_certificate_is_a_config_error() {
        let bench = Bench::new();
        let fleet = bench.fleet(1, 1);
        let err = status(&fleet, "web").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert_eq!(
            err.to_string(),
            "no certificate named \"web\" in the config"
        );
    }

    #[test]
    fn a_served_leaf_has_its_installed_or_its_stored_expiry_and_an_unknown_one_none() {
        let bench = Bench::new();
        let fleet = bench.fleet(1, 1);
        let stored = |version| {
            let (chain, _) = fleet.store().read_version("cn", version).unwrap().unwrap();
            certfleet_proto::bundle::Bundle::parse(&chain, None, &[])
                .unwrap()
                .not_after
        };
        let endpoint = |address: &str, result: Result<&str, &str>| ServedReport {
            service: "web".into(),
            address: address.into(),
            result: result.map(str::to_owned).map_err(str::to_owned),
        };
        let node = |name: &str, served| NodeStatus {
            node: name.into(),
            result: Ok(NodeCertificate {
                version: 2,
                leaf_sha256: bench.v2.1.clone(),
                intact: true,
                problem: String::new(),
                // Not version 2's own: shows which source was used.
                not_after: 42,
                served,
            }),
            recorded: None,
        };
        let status = FleetStatus {
            live: Some(bench.v2.clone()),
            nodes: vec![
                node(
                    "n0",
                    vec![
                        endpoint("a:443", Ok(&bench.v2.1)),
                        endpoint("b:443", Ok(&bench.v1.1)),
                        endpoint("c:443", Ok("someone else's leaf")),
                        endpoint("d:443", Err("connection refused")),
                    ],
                ),
                NodeStatus {
                    node: "n1".into(),
                    result: Err("(127.0.0.3:7443): unreachable".into()),
                    recorded: None,
                },
            ],
            last_rollout: None,
        };
        let leaves: Vec<_> = status
            .served_leaves(&fleet, "cn")
            .into_iter()
            .map(|l| (l.node, l.endpoint.address.as_str(), l.version, l.not_after))
            .collect();
        assert_eq!(
            leaves,
            [("n0", "a:443", 2, 42), ("n0", "b:443", 1, stored(1))]
        );
    }
}
