//! The admin API (`certfleet.v1.Admin`) on a Unix socket, which the
//! `certfleet` CLI talks to. This module holds its handlers; each checks
//! the request, audits it, and calls the flow that does the work:
//!
//! - `socket`: binding the socket, and who is calling (SO_PEERCRED).
//! - `stream`: running an operation under its certificate's lock and
//!   streaming its progress; a second operation on the certificate is
//!   refused as busy, naming the first, or waits for it when the request
//!   says `wait`.
//! - `history`: the journal as `certfleet history` shows it.
//! - `convert`: results as protobuf, and the one place an error's kind
//!   becomes the wire's failure kind or a status code.

mod approvals;
mod convert;
mod history;
mod renew;
mod socket;
mod stream;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::names::check_node_name;
use certfleet_proto::pb;
use certfleet_proto::pb::admin_server::{Admin, AdminServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use self::convert::refusal;
use self::socket::caller_uid;
use self::stream::{EventStream, stream_operation};
use crate::db::{NodeRecord, NodeState};
use crate::distribute::distribute;
use crate::enrollment;
use crate::fleet::{Fleet, Holder, Operation};
use crate::issue::Issuer;
use crate::manage;
use crate::notify;
use crate::rollout;
use crate::status;
use certfleet_proto::clock::now;

pub use self::socket::{ADMIN_GROUP, SOCKET_MODE, bind_socket};

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    service: AdminService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(
            AdminServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// The admin API's handlers.
pub struct AdminService {
    fleet: Arc<Fleet>,
    issuer: Arc<Issuer>,
    /// The cluster CA's pin, printed with join tokens.
    ca_pin: String,
    /// When each certificate renews next; `None` with renewal off.
    renewals: Option<Arc<crate::renewal::FleetScheduler>>,
}

/// The agent's config path the join command names unless told otherwise.
pub const DEFAULT_AGENT_CONFIG: &str = "/etc/certfleet/agent.toml";

/// Where the agent's config lives on the node, as printed in the join
/// command; only characters that need no shell quoting.
fn agent_config_path(given: &str) -> Result<String, Status> {
    if given.is_empty() {
        return Ok(DEFAULT_AGENT_CONFIG.to_owned());
    }
    let plain = given
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b));
    if !given.starts_with('/') || !plain || given.split('/').any(|c| c == "..") {
        return Err(Status::invalid_argument(format!(
            "--agent-config {given:?}: must be an absolute path of letters, digits and / . _ - +"
        )));
    }
    Ok(given.to_owned())
}

/// A registry record as `certfleet nodes` shows it.
pub(crate) fn node_info(record: NodeRecord) -> pb::NodeInfo {
    convert::node_to_pb(record)
}

/// The node `node add` registers, checked: its name, the agent's address
/// and the HTTP-01 address (default: the agent's IP); and the agent's
/// config path for the join command.
fn node_to_add(r: &pb::AddNodeRequest) -> Result<(NodeRecord, String), Status> {
    check_node_name(&r.name).map_err(Status::invalid_argument)?;
    let agent_config = agent_config_path(&r.agent_config)?;
    let reach = crate::ssh::admin_api::reach_to_add(r)?;
    // A node reached over SSH only has no agent: its errors name its sshd.
    let agent: SocketAddr = if r.agent.is_empty() {
        crate::ssh::agent_address("", &reach).map_err(|e| {
            Status::invalid_argument(format!("--ssh: {e}; give --http01 and --agent too"))
        })?
    } else {
        r.agent.parse().map_err(|e| {
            Status::invalid_argument(format!(
                "--agent {:?}: not an address like 10.0.0.2:7443: {e}",
                r.agent
            ))
        })?
    };
    let http01: IpAddr = if r.http01.is_empty() {
        agent.ip()
    } else {
        r.http01.parse().map_err(|e| {
            Status::invalid_argument(format!("--http01 {:?}: not an IP address: {e}", r.http01))
        })?
    };
    let record = NodeRecord {
        name: r.name.clone(),
        agent: if r.agent.is_empty() {
            String::new()
        } else {
            agent.to_string()
        },
        http01: http01.to_string(),
        state: NodeState::Pending,
        cert_not_after: 0,
        last_contact: 0,
        reach,
    };
    Ok((record, agent_config))
}

impl AdminService {
    pub fn new(fleet: Arc<Fleet>, issuer: Arc<Issuer>, ca_pin: String) -> Self {
        Self {
            fleet,
            issuer,
            ca_pin,
            renewals: None,
        }
    }

    /// Shows `scheduler`'s plans in `certfleet certificates`.
    pub fn with_renewals(mut self, scheduler: Option<Arc<crate::renewal::FleetScheduler>>) -> Self {
        self.renewals = scheduler;
        self
    }

    /// Refuses an unknown certificate before any work, as a usage error.
    fn known(&self, name: &str) -> Result<(), Status> {
        self.fleet
            .spec(name)
            .map(|_| ())
            .map_err(|e| refusal(e.kind(), e))
    }

    fn restart_or_rollout(
        &self,
        request: Request<pb::RestartRequest>,
        operation: Operation,
    ) -> Result<Response<EventStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            &operation.to_string(),
            &format!("certificate {:?}", r.certificate),
        );
        self.known(&r.certificate)?;
        let fleet = Arc::clone(&self.fleet);
        let holder = Holder::new(operation, &r.certificate, uid);
        Ok(Response::new(stream_operation(
            self.fleet.locks().clone(),
            holder,
            r.wait,
            move |op, progress| async move {
                let result = if operation == Operation::Rollout {
                    rollout::rollout(&fleet, &op, &progress).await
                } else {
                    rollout::restart(&fleet, &op, &progress).await
                };
                match &result {
                    Ok(done) => notify::rolled_out(&fleet, op.certificate(), operation, done),
                    Err(e) => notify::rollout_failed(&fleet, op.certificate(), operation, e),
                }
                convert::restarted_to_pb(op.certificate(), result)
            },
        )))
    }

    /// Writes who asked for what to the audit log. Never a secret: callers
    /// pass names and ids only.
    fn audit(&self, uid: Option<u32>, action: &str, detail: &str) {
        tracing::info!(uid, action, detail, "admin request");
        if let Err(e) = self.fleet.db().audit(uid, action, detail, now()) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type IssueStream = EventStream;
    type DistributeStream = EventStream;
    type RestartStream = EventStream;
    type RolloutStream = EventStream;
    type RenewStream = EventStream;
    type DeleteStream = EventStream;
    type ApproveStream = EventStream;

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        approvals::list(&self.fleet, request.get_ref().recent).map(Response::new)
    }

    /// Audited by `approval::decide`, with who decided.
    async fn approve(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<Self::ApproveStream>, Status> {
        let uid = caller_uid(&request);
        approvals::approve(Arc::clone(&self.fleet), request.into_inner(), uid).map(Response::new)
    }

    async fn reject(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::DecideApprovalResponse>, Status> {
        let uid = caller_uid(&request);
        approvals::reject(&self.fleet, request.into_inner(), uid).map(Response::new)
    }

    async fn renew(
        &self,
        request: Request<pb::RenewCertificatesRequest>,
    ) -> Result<Response<Self::RenewStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "renew",
            &format!(
                "certificates {:?} force {} dry-run {}",
                r.certificates, r.force, r.dry_run
            ),
        );
        let names: Vec<String> = if r.certificates.is_empty() {
            let config = self.fleet.config();
            config.certificates.iter().map(|c| c.name.clone()).collect()
        } else {
            r.certificates.clone()
        };
        if names.is_empty() {
            return Err(renew::nothing_configured());
        }
        for name in &names {
            self.known(name)?;
        }
        let options = renew::options(&self.fleet, r.force, r.dry_run)?;
        let now = now();
        // A dry run tries the order whether or not it is due, as
        // `certbot renew --dry-run` does.
        let plans = names
            .into_iter()
            .map(|name| renew::Plan {
                not_due_until: (!r.force && !r.dry_run)
                    .then(|| {
                        renew::not_due_until(&self.fleet, self.renewals.as_deref(), &name, now)
                    })
                    .flatten(),
                name,
            })
            .collect();
        let renewer = crate::renewal::FleetRenewer {
            fleet: Arc::clone(&self.fleet),
            issuer: Arc::clone(&self.issuer),
        };
        Ok(Response::new(renew::renew_all(
            renewer,
            self.renewals.clone(),
            plans,
            options,
            uid,
            r.wait,
        )))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        history::history(&self.fleet, request.get_ref()).map(Response::new)
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "revoke",
            &format!(
                "certificate {:?} version {} reason {:?}",
                r.certificate, r.version, r.reason
            ),
        );
        self.known(&r.certificate)?;
        let reason = manage::parse_reason(&r.reason).map_err(|e| refusal(e.kind(), e))?;
        // Unary, so it does not wait: a busy certificate is refused at once.
        let op = self
            .fleet
            .locks()
            .try_acquire(Holder::new(Operation::Revoke, &r.certificate, uid))
            .map_err(|busy| refusal(busy.kind(), busy))?;
        let version = (r.version > 0).then_some(r.version);
        let revoked = manage::revoke(&self.fleet, self.issuer.acme(), &op, version, reason).await;
        op.journal().finish_with(&revoked);
        let revoked = revoked.map_err(|e| refusal(e.kind(), e))?;
        Ok(Response::new(pb::RevokeResponse {
            version: revoked.version,
            serial: revoked.serial,
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<Self::DeleteStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "delete",
            &format!(
                "certificate {:?} from_nodes {}",
                r.certificate, r.from_nodes
            ),
        );
        self.known(&r.certificate)?;
        let fleet = Arc::clone(&self.fleet);
        let renewals = self.renewals.clone();
        let holder = Holder::new(Operation::Delete, &r.certificate, uid);
        Ok(Response::new(stream_operation(
            self.fleet.locks().clone(),
            holder,
            r.wait,
            move |op, progress| async move {
                let result = manage::delete(&fleet, &op, r.from_nodes, &progress).await;
                if result.is_ok()
                    && let Some(s) = renewals
                {
                    s.wake();
                }
                convert::deleted_to_pb(&r.certificate, result)
            },
        )))
    }

    async fn get_account(
        &self,
        _request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::AccountInfo>, Status> {
        let summary = self
            .issuer
            .acme()
            .show()
            .await
            .map_err(|e| refusal(e.kind(), e))?;
        Ok(Response::new(convert::account_to_pb(summary)))
    }

    async fn update_account(
        &self,
        request: Request<pb::UpdateAccountRequest>,
    ) -> Result<Response<pb::AccountInfo>, Status> {
        let uid = caller_uid(&request);
        let contacts = request.into_inner().contacts;
        self.audit(uid, "account update", &format!("contacts {contacts:?}"));
        let summary = self
            .issuer
            .acme()
            .update_contacts(&contacts)
            .await
            .map_err(|e| refusal(e.kind(), e))?;
        Ok(Response::new(convert::account_to_pb(summary)))
    }

    async fn rollover_account(
        &self,
        request: Request<pb::RolloverAccountRequest>,
    ) -> Result<Response<pb::AccountInfo>, Status> {
        let uid = caller_uid(&request);
        self.audit(uid, "account rollover", "the ACME account key");
        let summary = self
            .issuer
            .acme()
            .rollover()
            .await
            .map_err(|e| refusal(e.kind(), e))?;
        Ok(Response::new(convert::account_to_pb(summary)))
    }

    async fn outbox(
        &self,
        _request: Request<pb::OutboxRequest>,
    ) -> Result<Response<pb::OutboxResponse>, Status> {
        // Envelopes and delivery state only: bodies stay in the database.
        let mails = self
            .fleet
            .db()
            .outbox(crate::mail::LISTED_SENT)
            .map_err(|e| refusal(e.kind(), e))?
            .into_iter()
            .map(|m| pb::OutboxMail {
                id: m.id,
                certificate: m.certificate,
                subject: m.subject,
                recipients: m.recipients,
                created_unix: m.created,
                attempts: m.attempts,
                next_attempt_unix: if m.sent.is_some() { 0 } else { m.next_attempt },
                last_error: m.last_error,
                sent_unix: m.sent.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::OutboxResponse {
            configured: self.fleet.config().mail.is_some(),
            mails,
        }))
    }

    async fn import(
        &self,
        request: Request<pb::ImportRequest>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        let lineage = crate::import::Lineage {
            name: r.lineage,
            fullchain_pem: r.fullchain_pem,
            privkey_pem: r.privkey_pem,
            domains: r.domains,
        };
        let given = (!r.certificate.is_empty()).then_some(r.certificate.as_str());
        let config = self.fleet.config();
        let spec =
            crate::import::target(&config, given, &lineage).map_err(|e| refusal(e.kind(), e))?;
        self.audit(
            uid,
            "import",
            &format!(
                "certbot lineage {:?} into certificate {:?}",
                lineage.name, spec.name
            ),
        );
        let op = self
            .fleet
            .locks()
            .try_acquire(Holder::new(Operation::Import, &spec.name, uid))
            .map_err(|busy| refusal(busy.kind(), busy))?;
        let stored = crate::import::import(&self.fleet, &op, &lineage, now());
        if let Ok(stored) = &stored
            && let Err(e) = op.journal().version(stored.version)
        {
            tracing::warn!(error = %e, "imported, but the journal does not say which version");
        }
        op.journal().finish_with(&stored);
        let stored = stored.map_err(|e| refusal(e.kind(), e))?;
        drop(op);
        // The imported version's validity sets the next renewal.
        if let Some(s) = &self.renewals {
            s.wake();
        }
        Ok(Response::new(pb::ImportResponse {
            imported: Some(convert::stored_to_pb(&stored)),
        }))
    }

    async fn restart(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<Self::RestartStream>, Status> {
        self.restart_or_rollout(request, Operation::Restart)
    }

    async fn rollout(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<Self::RolloutStream>, Status> {
        self.restart_or_rollout(request, Operation::Rollout)
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let name = request.into_inner().certificate;
        let status = status::status(&self.fleet, &name)
            .await
            .map_err(|e| refusal(e.kind(), e))?;
        Ok(Response::new(convert::status_to_pb(status, now())))
    }

    async fn distribute(
        &self,
        request: Request<pb::DistributeRequest>,
    ) -> Result<Response<Self::DistributeStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "distribute",
            &format!(
                "certificate {:?} version {} nodes {:?}",
                r.certificate, r.version, r.nodes
            ),
        );
        self.known(&r.certificate)?;
        let fleet = Arc::clone(&self.fleet);
        let holder = Holder::new(Operation::Distribute, &r.certificate, uid);
        Ok(Response::new(stream_operation(
            self.fleet.locks().clone(),
            holder,
            r.wait,
            move |op, progress| async move {
                let version = (r.version > 0).then_some(r.version);
                let result = distribute(&fleet, &op, version, &r.nodes, &progress).await;
                convert::distributed_to_pb(&r.certificate, result)
            },
        )))
    }

    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<Self::IssueStream>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "issue",
            &format!(
                "certificate {:?} force {} dry-run {}",
                r.certificate, r.force, r.dry_run
            ),
        );
        self.known(&r.certificate)?;
        let options = renew::options(&self.fleet, r.force, r.dry_run)?;
        let issuer = Arc::clone(&self.issuer);
        let fleet = Arc::clone(&self.fleet);
        let renewals = self.renewals.clone();
        let operation = renew::operation(options, Operation::Issue);
        let holder = Holder::new(operation, &r.certificate, uid);
        Ok(Response::new(stream_operation(
            self.fleet.locks().clone(),
            holder,
            r.wait,
            move |op, progress| async move {
                match issuer.issue_with(&op, &progress, options).await {
                    Ok(crate::issue::Ordered::Issued(issued)) => {
                        notify::issued(&fleet, Operation::Issue, &issued.stored);
                        // The new version sets the next renewal.
                        if let Some(s) = renewals {
                            s.wake();
                        }
                        // A certificate with an approval policy goes on as
                        // its renewal would, up to the step that waits.
                        if let Some(failed) =
                            approvals::after_issue(&fleet, &op, &progress, &issued.stored).await
                        {
                            return failed;
                        }
                        convert::issued_to_pb(&issued)
                    }
                    Ok(crate::issue::Ordered::DryRun(dry)) => {
                        convert::dry_run_to_pb(op.certificate(), &dry)
                    }
                    Err(failed) => {
                        if operation == Operation::Issue {
                            notify::issue_failed(&fleet, op.certificate(), operation, &failed);
                        }
                        convert::issue_failed_to_pb(&failed)
                    }
                }
            },
        )))
    }

    async fn list_certificates(
        &self,
        _request: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let stored = self
            .fleet
            .store()
            .list()
            .map_err(|e| refusal(e.kind(), e))?;
        let entries = self
            .renewals
            .as_ref()
            .map(|s| s.entries())
            .unwrap_or_default();
        let certificates = stored
            .iter()
            .map(|s| {
                let mut c = convert::stored_to_pb(s);
                if let Some(e) = entries.iter().find(|e| e.name == s.name) {
                    convert::renewal_to_pb(&mut c, e);
                }
                c
            })
            .collect();
        Ok(Response::new(pb::ListCertificatesResponse { certificates }))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeResponse>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        let (record, agent_config) = node_to_add(&r)?;
        if record.reach.transport == crate::ssh::NodeTransport::Ssh {
            // No agent, so no join: the node is used once its host key is trusted.
            self.fleet
                .db()
                .add_ssh_node(&record, now())
                .map_err(|e| refusal(e.kind(), e))?;
            self.fleet.forget_node(&record.name);
            self.audit(
                uid,
                "node add",
                &format!("node {} ssh {}", record.name, record.reach.ssh_column()),
            );
            return Ok(Response::new(pb::AddNodeResponse::default()));
        }
        let config = self.fleet.config();
        let enrollment = &config.enrollment;
        let ttl = match r.token_ttl_seconds {
            0 => enrollment.join_token_ttl,
            s => std::time::Duration::from_secs(s.into()),
        };
        let token = enrollment::register(self.fleet.db(), &record, ttl)
            .map_err(|e| refusal(e.kind(), e))?;
        self.fleet.forget_node(&record.name);
        self.audit(
            uid,
            "node add",
            &format!(
                "node {} agent {} token id {}",
                record.name, record.agent, token.id
            ),
        );
        let ca_pin = self.ca_pin.clone();
        Ok(Response::new(pb::AddNodeResponse {
            // The token goes to the command's standard input, never into
            // its arguments: every local user can read a process's argv.
            join_command: format!(
                "certfleet-agent --config {agent_config} join --coordinator {} --ca-pin {ca_pin} --token-file -",
                enrollment.advertise
            ),
            token: token.reveal(),
            ca_pin,
            expires_unix: token.expires,
        }))
    }

    async fn set_node(
        &self,
        request: Request<pb::SetNodeRequest>,
    ) -> Result<Response<pb::SetNodeResponse>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "node set",
            &format!(
                "node {:?} transport {:?} ssh {:?}",
                r.name, r.transport, r.ssh
            ),
        );
        let node = crate::ssh::admin_api::set_node(&self.fleet, &r)?;
        Ok(Response::new(pb::SetNodeResponse { node: Some(node) }))
    }

    async fn trust_host(
        &self,
        request: Request<pb::TrustHostRequest>,
    ) -> Result<Response<pb::TrustHostResponse>, Status> {
        let uid = caller_uid(&request);
        let r = request.into_inner();
        self.audit(
            uid,
            "node trust-host",
            &format!("node {:?} fingerprint {:?}", r.name, r.fingerprint),
        );
        let answer = crate::ssh::admin_api::trust_host(&self.fleet, &r).await?;
        Ok(Response::new(answer))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let uid = caller_uid(&request);
        let name = request.into_inner().name;
        self.fleet
            .db()
            .remove(&name)
            .map_err(|e| refusal(e.kind(), e))?;
        self.fleet.forget_node(&name);
        self.audit(uid, "node remove", &format!("node {name}"));
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .fleet
            .db()
            .nodes()
            .map_err(|e| refusal(e.kind(), e))?
            .into_iter()
            .map(convert::node_to_pb)
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_command_names_only_a_plain_absolute_agent_config() {
        assert_eq!(agent_config_path("").unwrap(), DEFAULT_AGENT_CONFIG);
        assert_eq!(
            agent_config_path("/srv/certfleet/agent-2.toml").unwrap(),
            "/srv/certfleet/agent-2.toml"
        );
        for bad in [
            "agent.toml",
            "/etc/a b.toml",
            "/etc/$(id).toml",
            "/etc/../x.toml",
        ] {
            let err = agent_config_path(bad).unwrap_err();
            assert!(err.message().contains("--agent-config"), "{bad}: {err:?}");
        }
    }
}
