//! Getting HTTP-01 responses onto every node, proving each node serves
//! them, and taking them off again.
//!
//! Any name of the certificate may resolve to any node, and the CA looks
//! from several vantage points, so every token must be on every node before
//! the CA is told to look. A failed validation counts against the CA's rate
//! limit (Let's Encrypt: 5 failed authorizations per name per hour), so the
//! coordinator first fetches each token from each node itself, directly at
//! the node's HTTP-01 address with `Host:` set to the identifier, bypassing
//! DNS and load balancers.
//!
//! Every fan-out is parallel with bounded concurrency and a per-node
//! timeout, and all tokens for a node travel in one call.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use certfleet_proto::challenge::{Http01Response, Token};
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{self, StreamExt};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Node;
use crate::progress::{Progress, Stage};
use crate::transport::{Transport, TransportError};

/// The most bytes read from a self-check response. A key authorization is
/// under 200 bytes; anything much longer is wrong anyway.
pub const MAX_SELF_CHECK_BODY: usize = 4096;

/// A node and the way to reach it.
#[derive(Clone)]
pub struct FleetNode {
    pub node: Node,
    pub transport: Arc<dyn Transport>,
}

/// One pending challenge: the identifier the CA will fetch it for.
#[derive(Debug, Clone)]
pub struct PendingChallenge {
    pub identifier: String,
    pub response: Http01Response,
}

/// A node that failed a step, naming the node, its address and the reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("node {node} ({addr}): placing tokens: {source}")]
    Place {
        node: String,
        addr: SocketAddr,
        source: TransportError,
    },
    #[error("node {node} ({addr}): token not served at {url} (Host: {host}): {reason}")]
    SelfCheck {
        node: String,
        addr: SocketAddr,
        url: String,
        host: String,
        reason: String,
    },
    #[error("node {node} ({addr}): self-check took longer than {timeout:?}")]
    SelfCheckTimeout {
        node: String,
        addr: SocketAddr,
        timeout: Duration,
    },
}

impl NodeError {
    pub fn node(&self) -> &str {
        match self {
            Self::Place { node, .. }
            | Self::SelfCheck { node, .. }
            | Self::SelfCheckTimeout { node, .. } => node,
        }
    }
}

/// Limits shared by every fan-out of one order.
#[derive(Debug, Clone, Copy)]
pub struct FanOut {
    pub concurrency: usize,
    pub node_timeout: Duration,
}

impl FanOut {
    /// Runs `f` for every node, at most `concurrency` at once, each bounded
    /// by `node_timeout`; yields each node's result in completion order.
    pub(crate) async fn run<'a, T, F, Fut>(
        &self,
        nodes: &'a [FleetNode],
        f: F,
    ) -> Vec<(&'a FleetNode, Option<T>)>
    where
        F: Fn(&'a FleetNode) -> Fut,
        Fut: Future<Output = T> + Send + 'a,
        T: Send + 'a,
    {
        let timeout = self.node_timeout;
        // Boxed up front so the stream's type does not carry the closure's
        // lifetimes (which trips the compiler's Send inference for spawn).
        let calls: Vec<BoxFuture<'a, (&'a FleetNode, Option<T>)>> = nodes
            .iter()
            .map(|n| {
                let fut = f(n);
                async move { (n, tokio::time::timeout(timeout, fut).await.ok()) }.boxed()
            })
            .collect();
        stream::iter(calls)
            .buffer_unordered(self.concurrency)
            .collect()
            .await
    }
}

/// Places every pending response on every node. All or nothing: the errors
/// of every node that failed come back, and the caller removes what landed.
pub async fn place_all(
    nodes: &[FleetNode],
    pending: &[PendingChallenge],
    ttl: Duration,
    limits: FanOut,
    progress: &Progress,
) -> Result<(), Vec<NodeError>> {
    let batch: Vec<Http01Response> = pending.iter().map(|p| p.response.clone()).collect();
    let results = limits
        .run(nodes, |n| {
            let batch = &batch;
            async move {
                let start = Instant::now();
                let result = n.transport.place_tokens(batch, ttl).await;
                (result, start.elapsed())
            }
        })
        .await;
    let mut errors = Vec::new();
    for (n, result) in results {
        let result = match result {
            Some((Ok(()), took)) => Ok(took),
            Some((Err(e), _)) => Err(e),
            None => Err(TransportError::Timeout(limits.node_timeout)),
        };
        match result {
            Ok(took) => progress.node(
                Stage::Placement,
                &n.node.name,
                true,
                format!("placed {} tokens in {} ms", batch.len(), took.as_millis()),
            ),
            Err(source) => {
                let err = NodeError::Place {
                    node: n.node.name.clone(),
                    addr: n.node.agent,
                    source,
                };
                progress.node(Stage::Placement, &n.node.name, false, err.to_string());
                errors.push(err);
            }
        }
    }
    sorted_result(errors, nodes)
}

/// Fetches every pending token from every node directly.
pub async fn self_check_all(
    nodes: &[FleetNode],
    pending: &[PendingChallenge],
    port: u16,
    client: &SelfCheckClient,
    limits: FanOut,
    progress: &Progress,
) -> Result<(), Vec<NodeError>> {
    let results = limits
        .run(nodes, |n| async move {
            let addr = SocketAddr::new(n.node.http01, port);
            let checks = pending.iter().map(|p| client.check(&n.node.name, addr, p));
            futures::future::join_all(checks)
                .await
                .into_iter()
                .find_map(Result::err)
        })
        .await;
    let mut errors = Vec::new();
    for (n, result) in results {
        let addr = SocketAddr::new(n.node.http01, port);
        let error = match result {
            Some(None) => None,
            Some(Some(e)) => Some(e),
            None => Some(NodeError::SelfCheckTimeout {
                node: n.node.name.clone(),
                addr,
                timeout: limits.node_timeout,
            }),
        };
        match error {
            None => progress.node(
                Stage::SelfCheck,
                &n.node.name,
                true,
                format!("serves all {} tokens at {addr}", pending.len()),
            ),
            Some(e) => {
                progress.node(Stage::SelfCheck, &n.node.name, false, e.to_string());
                errors.push(e);
            }
        }
    }
    sorted_result(errors, nodes)
}

/// Removes `tokens` from every node. Failures are reported, not returned:
/// the agent drops tokens after their TTL anyway.
pub async fn remove_all(
    nodes: &[FleetNode],
    tokens: &[Token],
    limits: FanOut,
    progress: &Progress,
) {
    let results = limits
        .run(nodes, |n| n.transport.remove_tokens(tokens))
        .await;
    for (n, result) in results {
        match result {
            Some(Ok(removed)) => progress.node(
                Stage::Cleanup,
                &n.node.name,
                true,
                format!("removed {removed} tokens"),
            ),
            Some(Err(e)) => progress.node(
                Stage::Cleanup,
                &n.node.name,
                false,
                format!(
                    "node {} ({}): removing tokens: {e}; they expire on their own",
                    n.node.name, n.node.agent
                ),
            ),
            None => progress.node(
                Stage::Cleanup,
                &n.node.name,
                false,
                format!(
                    "node {} ({}): removing tokens took longer than {:?}; they expire on their own",
                    n.node.name, n.node.agent, limits.node_timeout
                ),
            ),
        }
    }
}

/// Reports failures in config order, so the first named is stable.
fn sorted_result(mut errors: Vec<NodeError>, nodes: &[FleetNode]) -> Result<(), Vec<NodeError>> {
    if errors.is_empty() {
        return Ok(());
    }
    errors.sort_by_key(|e| nodes.iter().position(|n| n.node.name == e.node()));
    Err(errors)
}

/// The HTTP client for self-checks: plain HTTP/1.1, pooled per node.
#[derive(Clone)]
pub struct SelfCheckClient(HyperClient<HttpConnector, Empty<Bytes>>);

impl Default for SelfCheckClient {
    fn default() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Self(HyperClient::builder(TokioExecutor::new()).build(http))
    }
}

impl SelfCheckClient {
    async fn check(
        &self,
        node: &str,
        addr: SocketAddr,
        p: &PendingChallenge,
    ) -> Result<(), NodeError> {
        let url = format!(
            "http://{addr}/.well-known/acme-challenge/{}",
            p.response.token()
        );
        let fail = |reason: String| NodeError::SelfCheck {
            node: node.to_owned(),
            addr,
            url: url.clone(),
            host: p.identifier.clone(),
            reason,
        };
        let request = http::Request::get(&url)
            .header(http::header::HOST, &p.identifier)
            .body(Empty::new())
            .map_err(|e| fail(e.to_string()))?;
        let response = self
            .0
            .request(request)
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_SELF_CHECK_BODY)
            .collect()
            .await
            .map_err(|e| fail(format!("reading body: {e}")))?
            .to_bytes();
        if status != http::StatusCode::OK {
            return Err(fail(format!("got {status}")));
        }
        // The CA trims surrounding whitespace (RFC 8555 §8.3), so do we.
        let body = String::from_utf8_lossy(&body);
        if body.trim() != p.response.key_authorization() {
            return Err(fail(format!(
                "got 200 with the wrong body ({} bytes, expected the key authorization)",
                body.len()
            )));
        }
        Ok(())
    }
}
