//! The enrollment service (`certfleet.v1.Enrollment`): nodes join with a
//! one-time token and renew over mutual TLS.
//!
//! It listens on TCP with the coordinator's certificate. A client
//! certificate is optional at the TLS layer (a joining node has none yet)
//! but, when present, must come from the cluster CA; `Renew` then requires
//! it, and requires that the node it names is still active and that it is
//! the certificate recorded at the node's last join or renewal. So a
//! removed node's certificate is refused from then on, even once the node
//! has joined again (on a new machine, say).
//!
//! Failed join attempts are counted per source address ([`throttle`]): a
//! source that fails too often is refused for a while, and its attempts
//! are logged as a summary rather than one line each.
//!
//! A join token is minted here too ([`register`]), when `certfleet node
//! add` registers the node.

pub mod throttle;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certfleet_proto::bundle::hex;
use certfleet_proto::clock::now;
use certfleet_proto::identity::{OnlyIdentity, Peer, peer_of, server_config};
use certfleet_proto::pb;
use certfleet_proto::pb::enrollment_server::{Enrollment, EnrollmentServer};
use certfleet_proto::tls;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::config::EnrollmentConfig;
use crate::db::{Db, DbError, JoinRefusal, NodeRecord, RenewRefusal};
use crate::pki::{ClusterCa, NodeCertificate, PkiError};
use crate::transport::ClusterTrust;
use throttle::{JoinThrottle, Source, Summary};

/// Longest join token accepted, in characters.
pub const MAX_JOIN_TOKEN_LEN: usize = 128;
/// Longest any enrollment call may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a connection to the enrollment listener stays open. Anyone who
/// can reach the listener can finish a TLS handshake (a joining node has
/// no certificate yet), so a connection that then sends nothing must not
/// hold a descriptor for ever. A join or a renewal is one call, made as
/// soon as its connection is up and done within [`REQUEST_TIMEOUT`].
pub const MAX_CONNECTION_LIFE: Duration = REQUEST_TIMEOUT.saturating_add(Duration::from_secs(5));
/// Largest enrollment message (a CSR), in bytes.
pub const MAX_ENROLLMENT_MESSAGE: usize = 64 * 1024;
/// Random bytes in a join token's id.
const TOKEN_ID_BYTES: usize = 8;
/// Random bytes in a join token's secret: 192 bits.
const TOKEN_SECRET_BYTES: usize = 24;

/// A one-time join token, `<id>.<secret>`, as `node add` hands it out. The
/// registry keeps only a hash of the secret.
pub struct JoinToken {
    pub id: String,
    secret: String,
    /// When it stops working, seconds since the Unix epoch.
    pub expires: i64,
}

impl JoinToken {
    /// The whole token, for the admin to pass to the node's agent.
    pub fn reveal(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// Registers `node` (or registers a pending or removed one again) and mints
/// the one-time token it joins with, valid for `ttl`. Earlier unused tokens
/// for the node stop working.
pub fn register(db: &Db, node: &NodeRecord, ttl: Duration) -> Result<JoinToken, DbError> {
    let token = JoinToken {
        id: random_b64(TOKEN_ID_BYTES),
        secret: random_b64(TOKEN_SECRET_BYTES),
        expires: now() + ttl.as_secs() as i64,
    };
    db.add_node(node, &token.id, &token.secret, token.expires, now())?;
    Ok(token)
}

/// `bytes` random bytes, base64url: only characters a token may hold.
fn random_b64(bytes: usize) -> String {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    crate::pki::random(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

pub struct EnrollmentService {
    db: Arc<Db>,
    ca: Arc<ClusterCa>,
    validity: Duration,
    throttle: Arc<Mutex<JoinThrottle>>,
}

impl EnrollmentService {
    pub fn new(db: Arc<Db>, ca: Arc<ClusterCa>, config: &EnrollmentConfig) -> Self {
        let throttle = JoinThrottle::new(config.failed_joins.limit, config.failed_joins.window);
        Self {
            db,
            ca,
            validity: config.agent_cert_validity,
            throttle: Arc::new(Mutex::new(throttle)),
        }
    }

    fn sign(&self, node: &str, csr_der: &[u8]) -> Result<NodeCertificate, Status> {
        self.ca
            .sign_node(node, csr_der, self.validity)
            .map_err(|e| match e {
                PkiError::Csr(_) => Status::invalid_argument(e.to_string()),
                e => Status::internal(e.to_string()),
            })
    }

    /// Refuses a join attempt from `source` while it is throttled.
    fn admit(&self, source: Source) -> Result<(), Status> {
        let (verdict, summaries) = {
            let mut throttle = self.throttle.lock().expect("join throttle lock poisoned");
            let verdict = throttle.admit(source, Instant::now());
            (verdict, throttle.take_summaries())
        };
        log_summaries(summaries);
        verdict.map_err(|throttled| {
            if throttled.first {
                warn!(
                    %source,
                    retry_after_secs = throttled.retry_after.as_secs(),
                    "too many failed join attempts; refusing this source's join attempts until its window ends (further ones are summed up then)"
                );
            } else {
                debug!(%source, "join attempt refused: throttled");
            }
            Status::resource_exhausted(throttled.to_string())
        })
    }

    /// Counts a failed join attempt, and logs it if it is the first of its
    /// source's window.
    fn failed(&self, source: Source, refusal: &JoinRefusal) {
        let (first, summaries) = {
            let mut throttle = self.throttle.lock().expect("join throttle lock poisoned");
            let first = throttle.failed(source, Instant::now());
            (first, throttle.take_summaries())
        };
        log_summaries(summaries);
        if first {
            warn!(%source, %refusal, "join refused");
        } else {
            debug!(%source, %refusal, "join refused");
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn log_summaries(summaries: Vec<Summary>) {
    for summary in summaries {
        warn!(source = %summary.source, attempts = summary.attempts, "{summary}");
    }
}

/// The serial number of a certificate, in hex as the registry records it.
fn serial_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(hex(cert.raw_serial()))
}

/// A renewal the registry refused becomes PERMISSION_DENIED, and a WARN.
fn renewal_allowed(
    node: &str,
    checked: Result<Result<(), RenewRefusal>, DbError>,
) -> Result<(), Status> {
    match checked.map_err(internal)? {
        Ok(()) => Ok(()),
        Err(refusal) => {
            warn!(%node, %refusal, "renewal refused");
            Err(Status::permission_denied(refusal.to_string()))
        }
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let source = Source::of(request.remote_addr().map(|a| a.ip()));
        // Before anything else: a throttled source costs no lookup.
        self.admit(source)?;
        let request = request.into_inner();
        let token = &request.token;
        if token.len() > MAX_JOIN_TOKEN_LEN
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            self.failed(source, &JoinRefusal::Malformed);
            return Err(Status::invalid_argument(JoinRefusal::Malformed.to_string()));
        }
        // The CSR is checked before the token is used up, so a bad CSR does
        // not burn the admin's token.
        ClusterCa::check_csr(&request.csr_der)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let node = match self.db.consume_token(token, now()).map_err(internal)? {
            Ok(node) => node,
            Err(refusal) => {
                self.failed(source, &refusal);
                return Err(Status::permission_denied(refusal.to_string()));
            }
        };
        let cert = self.sign(&node, &request.csr_der)?;
        self.db
            .activate(&node, &cert.serial, cert.not_after, now())
            .map_err(internal)?;
        let certificate_pem = cert.pem;
        info!(%node, %source, "node joined");
        let _ = self
            .db
            .audit(None, "join", &format!("node {node} joined"), now());
        Ok(Response::new(pb::JoinResponse {
            node,
            certificate_pem,
            ca_pem: self.ca.ca_pem.clone(),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let presented = request.peer_certs().and_then(|certs| {
            let leaf = certs.first()?;
            Some((peer_of(leaf)?, serial_of(leaf)?))
        });
        let Some((Peer::Node(node), serial)) = presented else {
            return Err(Status::unauthenticated(
                "renewal needs the node's current certificate as the TLS client certificate",
            ));
        };
        renewal_allowed(&node, self.db.check_renewal(&node, &serial))?;
        let cert = self.sign(&node, &request.into_inner().csr_der)?;
        // Checked again as the new serial is recorded: a removal or a new
        // join since the check above wins.
        renewal_allowed(
            &node,
            self.db
                .renew(&node, &serial, &cert.serial, cert.not_after, now()),
        )?;
        info!(%node, serial = %cert.serial, "node certificate renewed");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: cert.pem,
        }))
    }
}

/// Serves enrollment on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    service: EnrollmentService,
    trust: &ClusterTrust,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let clients = OnlyIdentity::new(&trust.ca, None, true).expect("the cluster CA is a valid root");
    let config = server_config(Arc::clone(&trust.identity), Arc::new(clients))
        .expect("the coordinator identity is a valid server certificate");
    let summaries = tokio::spawn(summarise_ended_windows(Arc::clone(&service.throttle)));
    let served = tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        // With a grace set, tonic closes a connection at age + grace, in
        // whatever state it is (it does not ask it to close at `age`).
        .max_connection_age(MAX_CONNECTION_LIFE.saturating_sub(REQUEST_TIMEOUT))
        .max_connection_age_grace(REQUEST_TIMEOUT)
        .add_service(
            EnrollmentServer::new(service)
                .max_decoding_message_size(MAX_ENROLLMENT_MESSAGE)
                .max_encoding_message_size(MAX_ENROLLMENT_MESSAGE),
        )
        .serve_with_incoming_shutdown(tls::incoming(listener, Arc::new(config)), shutdown)
        .await;
    summaries.abort();
    served
}

/// Logs the summary of each throttle window soon after it ends, not only
/// when its source tries again.
async fn summarise_ended_windows(throttle: Arc<Mutex<JoinThrottle>>) {
    let period = throttle
        .lock()
        .expect("join throttle lock poisoned")
        .window();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let summaries = {
            let mut throttle = throttle.lock().expect("join throttle lock poisoned");
            throttle.expire(Instant::now());
            throttle.take_summaries()
        };
        log_summaries(summaries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FailedJoinsConfig;
    use crate::db::NodeState;

    fn service(state: &std::path::Path, limit: u32) -> EnrollmentService {
        crate::pki::init(state, false).unwrap();
        let config = EnrollmentConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: "127.0.0.1:7444".into(),
            agent_cert_validity: Duration::from_secs(3600),
            coordinator_cert_validity: crate::pki::COORDINATOR_VALIDITY,
            join_token_ttl: Duration::from_secs(3600),
            failed_joins: FailedJoinsConfig {
                limit,
                window: Duration::from_secs(60),
            },
        };
        EnrollmentService::new(
            Arc::new(Db::open(state).unwrap()),
            Arc::new(ClusterCa::load(state, crate::pki::COORDINATOR_VALIDITY).unwrap()),
            &config,
        )
    }

    fn csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    /// cn-unm-1, registered and waiting to join.
    fn pending_node() -> NodeRecord {
        NodeRecord {
            name: "cn-unm-1".into(),
            agent: "127.0.0.3:7443".into(),
            http01: "127.0.0.3".into(),
            state: NodeState::Pending,
            cert_not_after: 0,
            last_contact: 0,
            reach: Default::default(),
        }
    }

    #[test]
    fn the_serial_read_from_a_certificate_is_the_one_recorded() {
        let state = tempfile::tempdir().unwrap();
        let service = service(state.path(), 5);
        let node = pending_node();
        service
            .db
            .add_node(&node, "id", "secret", i64::MAX, 0)
            .unwrap();
        // Serials are random: enough of them to meet the leading-zero cases.
        for _ in 0..64 {
            let cert = service.sign("cn-unm-1", &csr()).unwrap();
            service
                .db
                .activate("cn-unm-1", &cert.serial, cert.not_after, 0)
                .unwrap();
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let der = CertificateDer::from_pem_slice(cert.pem.as_bytes()).unwrap();
            let presented = serial_of(&der).unwrap();
            assert_eq!(
                service.db.check_renewal("cn-unm-1", &presented).unwrap(),
                Ok(()),
                "recorded {}, read {presented}",
                cert.serial
            );
        }
    }

    #[tokio::test]
    async fn a_source_that_failed_too_often_is_refused_before_its_token_is_looked_at() {
        let state = tempfile::tempdir().unwrap();
        let service = service(state.path(), 2);
        let attempt = |token: &str| {
            service.join(Request::new(pb::JoinRequest {
                token: token.to_owned(),
                csr_der: csr(),
            }))
        };
        for _ in 0..2 {
            let err = attempt("id.wrong").await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        }
        let err = attempt("id.wrong").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message()
                .starts_with("too many failed join attempts from an unknown address; try again in"),
            "{err:?}"
        );
        // A malformed token is refused the same way: nothing is looked at.
        let err = attempt("not a token").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    }

    #[test]
    fn a_minted_token_joins_once_and_never_shows_its_secret() {
        let db = Db::in_memory().unwrap();
        let node = pending_node();
        let token = register(&db, &node, Duration::from_secs(60)).unwrap();
        let whole = token.reveal();
        let (id, secret) = whole.split_once('.').unwrap();
        assert_eq!((id, id.len(), secret.len()), (token.id.as_str(), 11, 32));
        assert!(whole.len() <= MAX_JOIN_TOKEN_LEN);
        assert!(!format!("{token:?}").contains(secret));
        assert!((token.expires - now()).abs() <= 61);
        // A second token voids the first.
        let second = register(&db, &node, Duration::from_secs(60)).unwrap();
        assert_eq!(
            db.consume_token(&whole, now()).unwrap(),
            Err(JoinRefusal::Unknown(token.id.clone()))
        );
        assert_eq!(
            db.consume_token(&second.reveal(), now()).unwrap(),
            Ok("cn-unm-1".into())
        );
    }
}
