//! certfleet's per-node agent.
//!
//! The agent is the only certfleet process that touches a node. It runs as a
//! systemd service and offers the coordinator one gRPC service (`Agent`):
//!
//! - [`tokens`] holds the HTTP-01 responses placed for an order, drops them
//!   after a TTL even if nobody removes them, and (in webroot mode) mirrors
//!   them as files under a web server's root.
//! - [`http01`] is the standalone responder: a tiny HTTP server that answers
//!   only `GET /.well-known/acme-challenge/{token}`.
//! - [`service`] is the gRPC service: it checks every request (tokens are
//!   untrusted input), bounds each call, and turns it into calls on
//!   [`tokens`], [`install`] and [`services`]; [`error`] maps every failure
//!   to a gRPC code in one place.
//! - [`install`] puts certificate versions into the files this node's
//!   config declares (owner, group, mode), all at once and crash-safe.
//! - [`dir`] is how the agent touches a file tree other users own: by
//!   directory descriptor, never following a link.
//! - [`services`] restarts the services that use a certificate and proves
//!   by a TLS handshake what they serve.
//! - [`identity`] is the node's place in the cluster: `join` with a
//!   one-time token and a pinned CA, then a certificate renewed over mutual
//!   TLS. The gRPC service accepts only the coordinator's identity.
//! - [`config`] is the agent's own config, validated before anything starts.
//! - [`metrics`] is the agent's own health for Prometheus, when
//!   `[metrics] listen` is set.
//! - [`snippet`] prints the nginx or apache2 config that answers HTTP-01
//!   for the agent behind a web server that owns port 80.
//!
//! Everything the agent may do on its node comes from its own config: the
//! coordinator names tokens and certificates, never paths or commands.
#![forbid(unsafe_code)]

pub mod config;
pub mod dir;
pub mod error;
pub mod http01;
pub mod identity;
pub mod install;
pub mod metrics;
pub mod service;
pub mod services;
pub mod snippet;
pub mod tokens;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::identity::{COORDINATOR_IDENTITY, OnlyIdentity, server_config};
use tokio::net::TcpListener;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, Http01Mode};
use crate::identity::Identity;
use crate::install::Installer;
use crate::tokens::Tokens;

/// How long shutdown lets requests in flight finish before it closes every
/// connection and stops every task, so no client can keep the agent from
/// stopping (or systemd from restarting it).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The agent's listeners, bound by the caller so tests can pass port 0.
pub struct Listeners {
    /// The gRPC listener the coordinator calls.
    pub grpc: TcpListener,
    /// The standalone HTTP-01 listener; `None` in webroot mode.
    pub http01: Option<TcpListener>,
}

/// Runs the agent until `shutdown` completes, then drains for at most
/// [`SHUTDOWN_GRACE`].
pub async fn run(
    config: Config,
    identity: Arc<Identity>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Finish any install a crash interrupted before serving anything.
    let installer = Arc::new(Installer::open(&config.state_dir, &config.certificates)?);
    run_with_installer(config, identity, installer, listeners, shutdown).await
}

/// [`run`] with an installer the caller opened, and keeps, to apply a
/// reloaded config's certificates ([`Installer::replace_targets`]).
/// `shutdown` is first polled once everything serves.
pub async fn run_with_installer(
    config: Config,
    identity: Arc<Identity>,
    installer: Arc<Installer>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tokens = Arc::new(Tokens::new(&config.http01, &config.state_dir));
    // Token files a killed run left would be served for ever otherwise.
    tokens.recover().await?;
    let stop = CancellationToken::new();

    let sweeper = tokio::spawn(Arc::clone(&tokens).sweep_until(stop.clone().cancelled_owned()));
    let http = match (listeners.http01, &config.http01.mode) {
        (Some(listener), Http01Mode::Standalone { .. }) => {
            info!(addr = %listener.local_addr()?, "HTTP-01 responder listening");
            Some(tokio::spawn(http01::serve(
                listener,
                Arc::clone(&tokens),
                config.http01.limits,
                stop.clone().cancelled_owned(),
            )))
        }
        _ => None,
    };
    info!(addr = %listeners.grpc.local_addr()?, node = %config.node, "gRPC listening (mutual TLS)");
    // Only the coordinator's identity, from the cluster CA, may call.
    let clients = OnlyIdentity::new(&identity.ca, Some(COORDINATOR_IDENTITY.to_owned()), false)?;
    let tls = server_config(Arc::clone(&identity.live), Arc::new(clients))?;
    let grpc = tokio::spawn(service::serve(
        certfleet_proto::tls::incoming_until(
            listeners.grpc,
            Arc::new(tls),
            stop.clone().cancelled_owned(),
        ),
        service::AgentService::new(
            config.node.clone(),
            config.http01.mode.name(),
            tokens,
            installer,
        ),
        stop.clone().cancelled_owned(),
    ));
    let renewal = tokio::spawn(Arc::clone(&identity).renew_until(stop.clone().cancelled_owned()));
    let metrics = match config.metrics {
        Some(m) => {
            let listener = TcpListener::bind(m.listen)
                .await
                .map_err(|e| anyhow::anyhow!("binding metrics.listen {}: {e}", m.listen))?;
            info!(addr = %m.listen, "metrics listening");
            Some(tokio::spawn(metrics::serve(
                listener,
                stop.clone().cancelled_owned(),
            )))
        }
        None => None,
    };

    shutdown.await;
    info!("shutting down");
    stop.cancel();
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    if let Some(served) = within_grace("gRPC server", grpc, deadline).await? {
        served?;
    }
    // The HTTP-01 server drains within the same grace on its own.
    if let Some(http) = http {
        http.await?;
    }
    within_grace("token sweeper", sweeper, deadline).await?;
    within_grace("certificate renewal", renewal, deadline).await?;
    if let Some(metrics) = metrics {
        within_grace("metrics", metrics, deadline).await?;
    }
    Ok(())
}

/// Waits for `task` until `deadline`, then aborts it with a warning. tonic's
/// server, for one, waits for every connection to close; aborting it drops
/// the connections when the runtime ends.
async fn within_grace<T>(
    task: &'static str,
    mut handle: JoinHandle<T>,
    deadline: Instant,
) -> Result<Option<T>, JoinError> {
    match tokio::time::timeout_at(deadline, &mut handle).await {
        Ok(joined) => joined.map(Some),
        Err(_) => {
            warn!(
                task,
                grace = ?SHUTDOWN_GRACE,
                "still running after the shutdown grace period; stopping it"
            );
            handle.abort();
            Ok(None)
        }
    }
}
