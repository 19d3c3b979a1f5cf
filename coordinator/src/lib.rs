//! certfleet's coordinator: obtains one multi-SAN certificate for a cluster
//! from an ACME CA over HTTP-01, and stores it.
//!
//! - [`config`]: the coordinator's config, validated before any side effect.
//! - [`acme`]: the ACME account and the HTTP client instant-acme uses.
//! - [`transport`]: how a node is reached (the agent over gRPC, mutual
//!   TLS); the one place the coordinator→agent channel is built. Its
//!   `Transport` trait is the seam the unit tests' fake nodes plug into.
//! - [`fleet`]: what every operation works on: config, registry, store,
//!   a transport per node, and one operation lock per certificate.
//! - [`pki`]: the cluster's private CA and the coordinator's identity.
//! - [`enrollment`]: nodes join with one-time tokens and renew over mTLS.
//! - [`db`]: the registry of nodes, join tokens, installs, rollouts and the
//!   audit log (SQLite).
//! - [`challenge`]: placing tokens on every node, self-checking each node,
//!   removing tokens — bounded, parallel fan-outs.
//! - [`issue`]: one order end to end, in the order that keeps the CA from
//!   looking before every node is ready.
//! - [`distribute`]: a stored version onto every node, each into the
//!   targets its own agent config declares.
//! - [`manage`]: revoking a stored version at the CA, and deleting a
//!   certificate from the store and, when asked, from the nodes.
//! - [`rollout`]: restart node by node, verify what each serves, roll a
//!   failed node back and halt.
//! - [`import`]: a certbot lineage brought in as a certificate's version 1.
//! - [`status`]: what every node has and serves, and what the last
//!   rollout recorded (read-only).
//! - [`store`]: certbot's `archive/` + `live/` layout, swapped atomically.
//! - [`journal`]: every operation's steps, written before each is taken.
//! - [`recovery`]: at start, heals what an operation the coordinator was
//!   stopped in left (tokens, orders, distributions, rollouts).
//! - [`notify`] and [`mail`]: mail to the administrators, queued in a
//!   durable outbox and delivered over SMTP; expiry warnings.
//! - [`approval`]: where a new version waits for a person, the stored
//!   requests, their decisions, reminders and expiry.
//! - [`web`]: the optional HTTPS page an approval mail links to.
//! - [`metrics`]: the optional Prometheus endpoint (`[metrics] listen`).
//! - [`admin`]: the admin API on a Unix socket, with a progress stream.
//! - [`progress`]: the events an operation reports.
//! - [`error`]: the one family of failure kinds every error maps to, which
//!   the admin API puts on the wire and the CLI turns into exit codes.
//!
//! The daemon (`certfleet-coordinator`) only wires these together; tests
//! and the demo drive the same functions.
#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod approval;
pub mod challenge;
pub mod config;
pub mod db;
pub mod distribute;
pub mod enrollment;
pub mod error;
pub mod fleet;
pub mod import;
pub mod issue;
pub mod journal;
pub mod mail;
pub mod manage;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod progress;
pub mod ratelimit;
pub mod recovery;
pub mod renewal;
pub mod rollout;
pub mod ssh;
pub mod status;
pub mod store;
pub mod transport;
pub mod web;

use std::future::Future;
use std::sync::Arc;

use certfleet_proto::identity::LiveIdentity;
use tokio::net::{TcpListener, UnixListener};
use tracing::info;

use crate::acme::{AcmeAccount, AcmeSetupError};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::enrollment::EnrollmentService;
use crate::error::ErrorKind;
use crate::fleet::Fleet;
use crate::issue::Issuer;
use crate::pki::{ClusterCa, PkiError};
use crate::store::{Store, StoreError};
use crate::transport::ClusterTrust;

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Acme(#[from] AcmeSetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("coordinator identity: {0}")]
    Identity(String),
    #[error(transparent)]
    Mail(#[from] mail::MailSetupError),
    #[error("ssh state {path}: {source}")]
    Ssh {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl SetupError {
    /// An ACME setup the config gets wrong (no roots, terms not accepted)
    /// and a missing cluster CA are the admin's to fix.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Acme(_) | Self::Pki(PkiError::Missing(_)) => ErrorKind::Config,
            Self::Mail(e) => e.kind(),
            Self::Store(_) | Self::Db(_) => ErrorKind::Store,
            Self::Pki(_) | Self::Identity(_) => ErrorKind::Internal,
            Self::Ssh { .. } => ErrorKind::Store,
        }
    }
}

/// Everything the coordinator serves, built from a validated config.
pub struct Coordinator {
    pub fleet: Arc<Fleet>,
    pub issuer: Arc<Issuer>,
    /// The cluster CA's pin, printed with join tokens.
    pub ca_pin: String,
    pub enrollment: EnrollmentService,
    pub trust: ClusterTrust,
    /// The cluster CA, which renews the coordinator's own identity.
    pub ca: Arc<ClusterCa>,
    /// How long each of the coordinator's own certificates lives.
    pub identity_lifetime: std::time::Duration,
    /// The SMTP client the outbox is delivered with; `None`: no `[mail]`.
    pub mail: Option<mail::Sender>,
}

/// Loads the cluster CA (made by `init`), the registry, the store and the
/// ACME client.
pub fn build(config: Config) -> Result<Coordinator, SetupError> {
    let store = Store::open(&config.state_dir)?;
    let acme = AcmeAccount::new(&config.acme, &config.state_dir)?;
    let identity_lifetime = config.enrollment.coordinator_cert_validity;
    let ca = Arc::new(ClusterCa::load(&config.state_dir, identity_lifetime)?);
    let db = Arc::new(Db::open(&config.state_dir)?);
    let identity = LiveIdentity::from_pem(&ca.identity_pem, &ca.identity_key_pem)
        .map_err(|e| SetupError::Identity(e.to_string()))?;
    let trust = ClusterTrust::new(ca.ca_der.clone(), Arc::new(identity))
        .map_err(|e| SetupError::Identity(e.to_string()))?;
    let enrollment = EnrollmentService::new(Arc::clone(&db), Arc::clone(&ca), &config.enrollment);
    let mail = config.mail.as_ref().map(mail::Sender::new).transpose()?;
    // Masters a killed coordinator left are ended before any new one starts.
    let ended = config.ssh.prepare().map_err(|source| SetupError::Ssh {
        path: config.ssh.control_dir.clone(),
        source,
    })?;
    if ended > 0 {
        info!(
            masters = ended,
            "ended ssh master connections left by the last run"
        );
    }
    let reach = ssh::Reach {
        trust: trust.clone(),
        ssh: Arc::new(ssh::SshContext {
            config: config.ssh.clone(),
            store: Store::open(&config.state_dir)?,
        }),
    };
    let fleet = Arc::new(Fleet::new(Arc::new(config), db, store, Box::new(reach)));
    let issuer = Arc::new(Issuer::new(Arc::clone(&fleet), acme));
    Ok(Coordinator {
        fleet,
        issuer,
        ca_pin: ca.pin.clone(),
        enrollment,
        trust,
        ca,
        identity_lifetime,
        mail,
    })
}

/// The coordinator's listeners, bound by the caller.
pub struct Listeners {
    pub admin: UnixListener,
    pub enrollment: TcpListener,
    /// `[web]` and `[metrics]`, when configured (`bind_optional`).
    pub optional: OptionalListeners,
}

/// The approval page's listener and the identity it presents, and the
/// metrics listener, each when its section is configured.
#[derive(Default)]
pub struct OptionalListeners {
    web: Option<(TcpListener, Arc<LiveIdentity>)>,
    metrics: Option<TcpListener>,
}

/// Binds the listeners of `[web]` and `[metrics]` and loads the page's
/// certificate, when configured. A coordinator that cannot serve what its
/// config asks for refuses to start, naming the key and the reason, rather
/// than run without its approval page or its metrics.
pub async fn bind_optional(coordinator: &Coordinator) -> Result<OptionalListeners, String> {
    let config = coordinator.fleet.config();
    let bind = |key: &'static str, addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding {key} {addr}: {e}"))
    };
    let web = match &config.web {
        Some(web) => {
            let identity = web::identity(web, Arc::clone(&coordinator.trust.identity))
                .map_err(|e| format!("the approval page ([web]): {e}"))?;
            Some((bind("web.listen", web.listen).await?, identity))
        }
        None => None,
    };
    let metrics = match &config.metrics {
        Some(m) => Some(bind("metrics.listen", m.listen).await?),
        None => None,
    };
    Ok(OptionalListeners { web, metrics })
}

/// Runs the coordinator's services until `shutdown` completes.
pub async fn run(
    coordinator: Coordinator,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    if let Ok(addr) = listeners.admin.local_addr()
        && let Some(path) = addr.as_pathname()
    {
        info!(socket = %path.display(), "admin API listening");
    }
    if let Ok(addr) = listeners.enrollment.local_addr() {
        info!(%addr, "enrollment listening");
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let enrollment = {
        let stop = stop.clone();
        let trust = coordinator.trust.clone();
        let service = coordinator.enrollment;
        let listener = listeners.enrollment;
        tokio::spawn(async move {
            enrollment::serve(listener, service, &trust, stop.cancelled_owned()).await
        })
    };
    let renewal = tokio::spawn(pki::renew_identity_until(
        Arc::clone(&coordinator.ca),
        Arc::clone(&coordinator.trust.identity),
        coordinator.identity_lifetime,
        stop.clone().cancelled_owned(),
    ));
    // Certificates renew themselves unless the config says otherwise.
    let renewal_config = coordinator.fleet.config().renewal;
    let scheduler = renewal_config.enabled.then(|| {
        renewal::fleet_scheduler(
            renewal::FleetRenewer {
                fleet: Arc::clone(&coordinator.fleet),
                issuer: Arc::clone(&coordinator.issuer),
            },
            renewal_config.policy,
        )
    });
    // What a stopped coordinator left is healed first, under each
    // certificate's lock; renewals start after it. It is read now, before
    // the admin API serves: an operation an admin starts meanwhile is not
    // one to heal (it was once closed as interrupted, and its recovery then
    // waited for its lock).
    let interrupted = recovery::interrupted(&coordinator.fleet);
    let recovered = {
        let (fleet, issuer) = (
            Arc::clone(&coordinator.fleet),
            Arc::clone(&coordinator.issuer),
        );
        async move {
            let healed = recovery::recover(&fleet, &issuer, interrupted).await;
            if healed > 0 {
                info!(operations = healed, "healed what the last run left");
            }
        }
    };
    let renewals = {
        let scheduler = scheduler.clone();
        let stop = stop.clone();
        let fleet = Arc::clone(&coordinator.fleet);
        tokio::spawn(async move {
            tokio::select! {
                () = recovered => {}
                () = stop.cancelled() => return,
            }
            let Some(s) = scheduler else { return };
            // A reload may add, remove or reschedule certificates.
            let waker = s.clone();
            let wake_on_reload = async {
                loop {
                    fleet.reloaded().await;
                    waker.wake();
                }
            };
            tokio::select! {
                () = s.run(stop.cancelled_owned()) => {}
                () = wake_on_reload => {}
            }
        })
    };
    // Mail: the outbox is delivered, and what the nodes serve is probed
    // for certificates about to expire.
    let mail = match (
        coordinator.mail.clone(),
        coordinator.fleet.notifier().wake(),
    ) {
        (Some(sender), Some(wake)) => {
            let db = Arc::clone(coordinator.fleet.db());
            let delivery = tokio::spawn(mail::deliver_until(db, sender, wake, stop.clone()));
            let config = coordinator.fleet.config();
            let expiry = config.mail.as_ref().map(|m| {
                tokio::spawn(mail::warn_expiry_until(
                    Arc::clone(&coordinator.fleet),
                    m.expiry_check,
                    m.expiry_warning_days,
                    stop.clone(),
                ))
            });
            vec![Some(delivery), expiry]
        }
        _ => Vec::new(),
    };
    let idle = {
        let fleet = Arc::clone(&coordinator.fleet);
        let stop = stop.clone();
        tokio::spawn(async move { fleet.close_idle_until(stop).await })
    };
    let approvals = tokio::spawn(approval::watch(
        Arc::clone(&coordinator.fleet),
        stop.clone().cancelled_owned(),
    ));
    let OptionalListeners { web, metrics } = listeners.optional;
    let web = web.map(|(listener, identity)| {
        spawn_web(&coordinator.fleet, listener, identity, stop.clone())
    });
    let metrics = metrics.and_then(|listener| {
        spawn_metrics(
            &coordinator.fleet,
            listener,
            scheduler.clone(),
            stop.clone(),
        )
    });
    let admin = tokio::spawn(admin::serve(
        listeners.admin,
        admin::AdminService::new(coordinator.fleet, coordinator.issuer, coordinator.ca_pin)
            .with_renewals(scheduler),
        stop.clone().cancelled_owned(),
    ));
    shutdown.await;
    info!("shutting down");
    stop.cancel();
    let _ = renewal.await;
    let _ = renewals.await;
    let _ = approvals.await;
    let _ = idle.await;
    if let Some(web) = web {
        let _ = web.await;
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    for task in mail.into_iter().flatten() {
        let _ = task.await;
    }
    admin.await.expect("admin task")?;
    enrollment.await.expect("enrollment task")
}

/// Serves the approval page on `listener` (`bind_optional`).
fn spawn_web(
    fleet: &Arc<Fleet>,
    listener: TcpListener,
    identity: Arc<LiveIdentity>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let fleet = Arc::clone(fleet);
    tokio::spawn(async move {
        if let Some(web) = &fleet.config().web {
            info!(addr = %web.listen, base_url = web.base_url, "approval page listening");
        }
        if let Err(e) = web::serve(
            listener,
            Arc::clone(&fleet),
            identity,
            stop.cancelled_owned(),
        )
        .await
        {
            tracing::error!(error = %e, "approval page stopped");
        }
    })
}

/// Serves `/metrics` on `listener` (`bind_optional`).
fn spawn_metrics(
    fleet: &Arc<Fleet>,
    listener: TcpListener,
    renewals: Option<Arc<renewal::FleetScheduler>>,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let config = fleet.config().metrics?;
    let source = metrics::Source {
        fleet: Arc::clone(fleet),
        renewals,
        probed: Arc::default(),
    };
    Some(tokio::spawn(async move {
        info!(addr = %config.listen, probe = ?config.probe, "metrics listening");
        metrics::serve(listener, source, config, stop).await;
    }))
}
