//! The admin API's SSH requests: how `node add` reads `--ssh` and
//! `--transport`, `node set`, and `node trust-host`.

use certfleet_proto::pb;
use tonic::Status;

use super::{NodeReach, NodeTransport, SshDestination, hostkey};
use crate::fleet::Fleet;

/// How a node `node add` registers is reached: `--transport`, defaulting
/// to `ssh` when only `--ssh` is given, and the destination it needs.
pub fn reach_to_add(r: &pb::AddNodeRequest) -> Result<NodeReach, Status> {
    let ssh = parse_ssh(&r.ssh)?;
    let transport = match (r.transport.as_str(), &ssh, r.agent.is_empty()) {
        ("", Some(_), true) => NodeTransport::Ssh,
        ("", _, _) => NodeTransport::Agent,
        (t, _, _) => NodeTransport::parse(t)
            .map_err(|e| Status::invalid_argument(format!("--transport {e}")))?,
    };
    let reach = NodeReach { transport, ssh };
    check(&r.name, &reach, !r.agent.is_empty())?;
    Ok(reach)
}

fn parse_ssh(given: &str) -> Result<Option<SshDestination>, Status> {
    match given {
        "" => Ok(None),
        s => SshDestination::parse(s)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("--ssh {e}"))),
    }
}

/// A transport that uses SSH needs a destination; one that uses the agent
/// needs its address.
fn check(name: &str, reach: &NodeReach, has_agent: bool) -> Result<(), Status> {
    if reach.transport.uses_ssh() && reach.ssh.is_none() {
        return Err(Status::invalid_argument(format!(
            "node {name}: transport {} needs --ssh user@host[:port]",
            reach.transport
        )));
    }
    if reach.transport != NodeTransport::Ssh && !has_agent {
        return Err(Status::invalid_argument(format!(
            "node {name}: transport {} needs --agent host:port",
            reach.transport
        )));
    }
    Ok(())
}

/// `node set`: changes a node's transport and SSH destination.
pub fn set_node(fleet: &Fleet, r: &pb::SetNodeRequest) -> Result<pb::NodeInfo, Status> {
    let db = fleet.db();
    let record = db
        .node(&r.name)
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("no node named {}", r.name)))?;
    let mut reach = record.reach.clone();
    if !r.transport.is_empty() {
        reach.transport = NodeTransport::parse(&r.transport)
            .map_err(|e| Status::invalid_argument(format!("--transport {e}")))?;
    }
    if let Some(ssh) = parse_ssh(&r.ssh)? {
        reach.ssh = Some(ssh);
    }
    check(&r.name, &reach, !record.agent.is_empty())?;
    db.set_reach(&r.name, &reach)
        .map_err(|e| Status::internal(e.to_string()))?;
    fleet.forget_node(&r.name);
    let record = db
        .node(&r.name)
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("no node named {}", r.name)))?;
    Ok(super::admin_node_info(record))
}

/// `node trust-host`: the keys the node presents, and with a fingerprint,
/// that key recorded in certfleet's known_hosts.
pub async fn trust_host(
    fleet: &Fleet,
    r: &pb::TrustHostRequest,
) -> Result<pb::TrustHostResponse, Status> {
    let record = fleet
        .db()
        .node(&r.name)
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("no node named {}", r.name)))?;
    let dest = record.reach.ssh.clone().ok_or_else(|| {
        Status::failed_precondition(format!(
            "node {} has no SSH destination: `certfleet node set {} --ssh user@host[:port]` first",
            r.name, r.name
        ))
    })?;
    let config = fleet.config().ssh.clone();
    let wanted = r.fingerprint.clone();
    let name = r.name.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let keys = hostkey::scan(&dest, config.connect_timeout)?;
        let recorded = if wanted.is_empty() {
            false
        } else {
            hostkey::trust(&config.known_hosts, &dest, &wanted, config.connect_timeout)?;
            true
        };
        Ok::<_, hostkey::HostKeyError>(pb::TrustHostResponse {
            host: dest.known_hosts_name(),
            keys: keys
                .into_iter()
                .map(|k| pb::HostKeyInfo {
                    key_type: k.key_type,
                    fingerprint: k.fingerprint,
                })
                .collect(),
            recorded,
            known_hosts: config.known_hosts.display().to_string(),
        })
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?;
    answer.map_err(|e| match e {
        hostkey::HostKeyError::Mismatch { .. } => {
            Status::failed_precondition(format!("node {name}: {e}"))
        }
        e => Status::unavailable(format!("node {name}: {e}")),
    })
}
