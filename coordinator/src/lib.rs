//! certfleet's coordinator: obtains one multi-SAN certificate for a cluster
//! from an ACME CA over HTTP-01, and stores it.
//!
//! - [`config`]: the coordinator's config, validated before any side effect.
//! - [`acme`]: the ACME account and the HTTP client instant-acme uses.
//! - [`transport`]: how a node is reached (the agent over gRPC); the one
//!   place the coordinator→agent channel is built.
//! - [`challenge`]: placing tokens on every node, self-checking each node,
//!   removing tokens — bounded, parallel fan-outs.
//! - [`issue`]: one order end to end, in the order that keeps the CA from
//!   looking before every node is ready.
//! - [`store`]: certbot's `archive/` + `live/` layout, swapped atomically.
//! - [`admin`]: the admin API on a Unix socket, with a progress stream.
//! - [`progress`]: the events an operation reports.
//!
//! The daemon (`certfleet-coordinator`) only wires these together; tests
//! and the demo drive the same functions.
#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod challenge;
pub mod config;
mod fsutil;
pub mod issue;
pub mod progress;
pub mod store;
pub mod transport;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::UnixListener;
use tracing::info;

use crate::acme::{AcmeAccount, AcmeSetupError};
use crate::challenge::FleetNode;
use crate::config::Config;
use crate::issue::Issuer;
use crate::store::{Store, StoreError};
use crate::transport::GrpcAgent;

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Acme(#[from] AcmeSetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Builds the issuer: the store, the ACME client, a channel per node.
pub fn build(config: Config) -> Result<Arc<Issuer>, SetupError> {
    let store = Store::open(&config.state_dir)?;
    let acme = AcmeAccount::new(&config.acme, &config.state_dir)?;
    let fleet: HashMap<String, FleetNode> = config
        .nodes
        .iter()
        .map(|node| {
            let fleet_node = FleetNode {
                node: node.clone(),
                transport: Arc::new(GrpcAgent::new(node)),
            };
            (node.name.clone(), fleet_node)
        })
        .collect();
    Ok(Arc::new(Issuer::new(Arc::new(config), acme, fleet, store)))
}

/// Runs the coordinator's services until `shutdown` completes.
pub async fn run(
    issuer: Arc<Issuer>,
    admin: UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    if let Ok(addr) = admin.local_addr()
        && let Some(path) = addr.as_pathname()
    {
        info!(socket = %path.display(), "admin API listening");
    }
    admin::serve(admin, issuer, shutdown).await
}
