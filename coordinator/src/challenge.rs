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
use certfleet_proto::cause_chain::Chain;
use certfleet_proto::challenge::{Http01Response, Token};
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{self, StreamExt};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Node;
use crate::error::ErrorKind;
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
    /// A node that could not take its tokens failed as a node; one that
    /// took them but did not serve them failed the self-check.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Place { .. } => ErrorKind::Node,
            Self::SelfCheck { .. } | Self::SelfCheckTimeout { .. } => ErrorKind::SelfCheck,
        }
    }

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
    /// by `node_timeout`, and hands each node's result to `each` as soon as
    /// that node finishes (`None`: it timed out), so progress counts up as
    /// nodes answer rather than jumping when the slowest one does.
    pub(crate) async fn run_each<'a, T, F, Fut>(
        &self,
        nodes: &'a [FleetNode],
        f: F,
        mut each: impl FnMut(&'a FleetNode, Option<T>),
    ) where
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
        let mut results = stream::iter(calls).buffer_unordered(self.concurrency);
        while let Some((n, result)) = results.next().await {
            each(n, result);
        }
    }

    /// Like [`run_each`](Self::run_each), for a caller that wants every
    /// result at once: each node's result, in completion order.
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
        let mut all = Vec::with_capacity(nodes.len());
        self.run_each(nodes, f, |n, result| all.push((n, result)))
            .await;
        all
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
    progress.begin(
        Stage::Placement,
        nodes.len(),
        format!("placing {} tokens on {} nodes", batch.len(), nodes.len()),
    );
    let mut errors = Vec::new();
    limits
        .run_each(
            nodes,
            |n| {
                let batch = &batch;
                async move {
                    let start = Instant::now();
                    let result = n.transport.place_tokens(batch, ttl).await;
                    (result, start.elapsed())
                }
            },
            |n, result| {
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
            },
        )
        .await;
    sorted_result(errors, nodes)
}

/// Fetches every pending token from every node directly.
pub async fn self_check_all(
    nodes: &[FleetNode],
    pending: &[PendingChallenge],
    ports: ValidationPorts,
    client: &SelfCheckClient,
    limits: FanOut,
    progress: &Progress,
) -> Result<(), Vec<NodeError>> {
    progress.begin(
        Stage::SelfCheck,
        nodes.len(),
        format!(
            "fetching {} tokens from {} nodes",
            pending.len(),
            nodes.len()
        ),
    );
    let mut errors = Vec::new();
    limits
        .run_each(
            nodes,
            |n| async move {
                let addr = SocketAddr::new(n.node.http01, ports.http);
                let checks = pending
                    .iter()
                    .map(|p| client.check(&n.node.name, addr, ports, p));
                futures::future::join_all(checks)
                    .await
                    .into_iter()
                    .find_map(Result::err)
            },
            |n, result| {
                let addr = SocketAddr::new(n.node.http01, ports.http);
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
            },
        )
        .await;
    sorted_result(errors, nodes)
}

/// What happens to tokens a cleanup could not remove.
const LEFT_TOKENS: &str = "an agent drops them when their TTL ends; on a node reached over SSH they stay in the webroot until removed by hand (they are public values, no secret)";

/// Removes `tokens` from every node. Failures are reported, not returned:
/// the agent drops tokens after their TTL anyway.
pub async fn remove_all(
    nodes: &[FleetNode],
    tokens: &[Token],
    limits: FanOut,
    progress: &Progress,
) {
    progress.begin(
        Stage::Cleanup,
        nodes.len(),
        format!(
            "removing {} tokens from {} nodes",
            tokens.len(),
            nodes.len()
        ),
    );
    limits
        .run_each(
            nodes,
            |n| n.transport.remove_tokens(tokens),
            |n, result| match result {
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
                        "node {} ({}): removing tokens: {e}; {LEFT_TOKENS}",
                        n.node.name, n.node.agent
                    ),
                ),
                None => progress.node(
                    Stage::Cleanup,
                    &n.node.name,
                    false,
                    format!(
                        "node {} ({}): removing tokens took longer than {:?}; {LEFT_TOKENS}",
                        n.node.name, n.node.agent, limits.node_timeout
                    ),
                ),
            },
        )
        .await;
}

/// Reports failures in config order, so the first named is stable.
fn sorted_result(mut errors: Vec<NodeError>, nodes: &[FleetNode]) -> Result<(), Vec<NodeError>> {
    if errors.is_empty() {
        return Ok(());
    }
    errors.sort_by_key(|e| nodes.iter().position(|n| n.node.name == e.node()));
    Err(errors)
}

/// The HTTP client for self-checks: plain HTTP/1.1, a new connection for
/// each fetch, as the CA makes. It keeps no idle connection: a pool held
/// one per token per node between orders, 5,000 at 1,000 nodes and 5
/// names, most of the coordinator's memory.
#[derive(Clone)]
pub struct SelfCheckClient(HyperClient<HttpConnector, Empty<Bytes>>);

impl Default for SelfCheckClient {
    fn default() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Self(
            HyperClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(http),
        )
    }
}

impl SelfCheckClient {
    /// Fetches `p`'s token from the node at `addr` the way the CA would,
    /// following redirects (see [`Redirect`]); on failure the error names the
    /// last URL fetched.
    async fn check(
        &self,
        node: &str,
        addr: SocketAddr,
        ports: ValidationPorts,
        p: &PendingChallenge,
    ) -> Result<(), NodeError> {
        let path = format!("/.well-known/acme-challenge/{}", p.response.token());
        let mut url = format!("http://{addr}{path}");
        let mut host = p.identifier.clone();
        let fail = |url: &str, host: &str, reason: String| NodeError::SelfCheck {
            node: node.to_owned(),
            addr,
            url: url.to_owned(),
            host: host.to_owned(),
            reason,
        };
        let mut fetched = self
            .first(&url, &host)
            .await
            .map_err(|reason| fail(&url, &host, reason))?;
        let mut redirects = 0;
        while fetched.status.is_redirection() {
            let Some(location) = &fetched.location else {
                return Err(fail(
                    &url,
                    &host,
                    format!("got {} without a Location", fetched.status),
                ));
            };
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(fail(
                    &url,
                    &host,
                    format!("more than {MAX_REDIRECTS} redirects; the CA gives up there too"),
                ));
            }
            let next = Redirect::parse(location, &host, &url, ports).map_err(|reason| {
                fail(&url, &host, format!("redirect to {location:?}: {reason}"))
            })?;
            url = next.shown(addr.ip());
            host = next.host.clone();
            fetched = next
                .fetch(addr.ip())
                .await
                .map_err(|reason| fail(&url, &host, reason))?;
        }
        if fetched.status != http::StatusCode::OK {
            return Err(fail(&url, &host, unexpected_status(fetched.status)));
        }
        // The CA trims surrounding whitespace (RFC 8555 §8.3), so do we.
        let body = String::from_utf8_lossy(&fetched.body);
        if body.trim() != p.response.key_authorization() {
            return Err(fail(
                &url,
                &host,
                format!(
                    "got 200 with the wrong body ({} bytes, expected the key authorization)",
                    body.len()
                ),
            ));
        }
        Ok(())
    }

    /// The plain-HTTP fetch every check starts with, on the pooled client.
    async fn first(&self, url: &str, host: &str) -> Result<Fetched, String> {
        let request = http::Request::get(url)
            .header(http::header::HOST, host)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = self
            .0
            .request(request)
            .await
            .map_err(|e| Chain(&e).to_string())?;
        Fetched::read(response).await
    }
}

/// Most redirects a self-check follows, as Let's Encrypt's validators do.
pub const MAX_REDIRECTS: usize = 10;

/// Where the CA connects to validate: HTTP-01 on `http` (80 in production)
/// and, when the node redirects to HTTPS, `https` (443). Let's Encrypt
/// follows redirects only to these two ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationPorts {
    pub http: u16,
    pub https: u16,
}

/// A response as far as the self-check needs it.
struct Fetched {
    status: http::StatusCode,
    location: Option<String>,
    body: Bytes,
}

impl Fetched {
    async fn read<B>(response: http::Response<B>) -> Result<Self, String>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let status = response.status();
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(response.into_body(), MAX_SELF_CHECK_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes();
        Ok(Self {
            status,
            location,
            body,
        })
    }
}

/// One redirect to follow. RFC 8555 §8.3 lets the CA follow redirects;
/// Let's Encrypt follows `http` and `https` URLs to ports 80 and 443 only,
/// to DNS names, not IP addresses, and does not check the certificate of an
/// HTTPS target. The self-check keeps talking to the node under test (it
/// bypasses DNS on purpose) with `Host:` and SNI set to the URL's host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Redirect {
    https: bool,
    host: String,
    port: u16,
    path: String,
}

impl Redirect {
    /// `location` relative to the URL just fetched (`current_host`,
    /// `current_url`), checked against the CA's rules.
    fn parse(
        location: &str,
        current_host: &str,
        current_url: &str,
        ports: ValidationPorts,
    ) -> Result<Self, String> {
        if location.starts_with('/') && !location.starts_with("//") {
            let https = current_url.starts_with("https://");
            return Ok(Self {
                https,
                host: current_host.to_owned(),
                port: if https { ports.https } else { ports.http },
                path: location.to_owned(),
            });
        }
        let uri: http::Uri = location.parse().map_err(|e| format!("not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        let host = uri
            .host()
            .ok_or("no host")?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
            return Err("the CA does not follow redirects to IP addresses".into());
        }
        let (allowed, default) = if https {
            (ports.https, 443)
        } else {
            (ports.http, 80)
        };
        let port = uri.port_u16().unwrap_or(default);
        if port != allowed {
            return Err(format!(
                "port {port}: the CA follows redirects only to the validation ports ({} for http, {} for https)",
                ports.http, ports.https
            ));
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self {
            https,
            host,
            port,
            path,
        })
    }

    /// The URL as fetched, at the node's address, for messages.
    fn shown(&self, ip: std::net::IpAddr) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", SocketAddr::new(ip, self.port), self.path)
    }

    /// Fetches it from the node at `ip`, on a connection of its own.
    async fn fetch(&self, ip: std::net::IpAddr) -> Result<Fetched, String> {
        let tcp = tokio::net::TcpStream::connect(SocketAddr::new(ip, self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if !self.https {
            return self.exchange(tcp).await;
        }
        // Like the CA: any certificate will do on a redirect target.
        let config =
            rustls::ClientConfig::builder_with_provider(certfleet_proto::identity::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(
                    certfleet_proto::identity::FingerprintOnly::new(),
                ))
                .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| format!("host {:?}: {e}", self.host))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        self.exchange(tls).await
    }

    async fn exchange<S>(&self, stream: S) -> Result<Fetched, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("{e:#}"))?;
        tokio::spawn(conn);
        let request = http::Request::get(&self.path)
            .header(http::header::HOST, &self.host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{e:#}"))?;
        Fetched::read(response).await
    }
}

/// The reason for a self-check answered with `status` instead of 200, with
/// what to check where the status says. The coordinator does not know a
/// webroot node's directory (the agent's config holds it), so the hint
/// names it as `<webroot>`.
pub(crate) fn unexpected_status(status: http::StatusCode) -> String {
    match status {
        // The web server does not find the token file, or may not read it.
        http::StatusCode::NOT_FOUND | http::StatusCode::FORBIDDEN => format!(
            "got {status} (webroot mode: is `<webroot>/.well-known/acme-challenge/` served and readable by the web server user?)"
        ),
        _ => format!("got {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testing::Bench;
    use crate::progress::Event;
    use crate::progress::testing::timed;
    use crate::transport::fake::{Call, Fail};

    const PORTS: ValidationPorts = ValidationPorts {
        http: 80,
        https: 443,
    };

    #[test]
    fn redirects_follow_the_cas_rules() {
        let here = "http://10.0.0.1:80/.well-known/acme-challenge/t";
        let r = Redirect::parse(
            "https://cn.example.org/.well-known/acme-challenge/t",
            "cn.example.org",
            here,
            PORTS,
        )
        .unwrap();
        assert_eq!(
            (r.https, r.port, r.host.as_str()),
            (true, 443, "cn.example.org")
        );
        assert_eq!(r.path, "/.well-known/acme-challenge/t");
        let r = Redirect::parse("/x?y=1", "cn.example.org", here, PORTS).unwrap();
        assert_eq!((r.https, r.port, r.path.as_str()), (false, 80, "/x?y=1"));
        for (bad, why) in [
            ("https://cn.example.org:8443/x", "port 8443"),
            ("ftp://cn.example.org/x", "scheme"),
            ("http://192.0.2.1/x", "IP addresses"),
            ("not a url at all", "not a URL"),
        ] {
            let err = Redirect::parse(bad, "cn.example.org", here, PORTS).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let test_ports = ValidationPorts {
            http: 5002,
            https: 5001,
        };
        assert!(Redirect::parse("https://cn.example.org:5001/x", "h", here, test_ports).is_ok());
    }

    #[test]
    fn a_missing_or_unreadable_token_file_points_at_the_webroot() {
        assert_eq!(
            unexpected_status(http::StatusCode::NOT_FOUND),
            "got 404 Not Found (webroot mode: is `<webroot>/.well-known/acme-challenge/` served and readable by the web server user?)"
        );
        assert!(
            unexpected_status(http::StatusCode::FORBIDDEN)
                .contains("readable by the web server user")
        );
        assert_eq!(
            unexpected_status(http::StatusCode::INTERNAL_SERVER_ERROR),
            "got 500 Internal Server Error"
        );
    }

    /// Two challenges for "cn.example.org".
    fn pending() -> Vec<PendingChallenge> {
        ["a", "b"]
            .iter()
            .map(|c| {
                let token = Token::parse(&c.repeat(43)).unwrap();
                let key_authorization = format!("{token}.{}", "t".repeat(43));
                PendingChallenge {
                    identifier: "cn.example.org".into(),
                    response: Http01Response::new(token, &key_authorization).unwrap(),
                }
            })
            .collect()
    }

    /// (node, ok, when) of each event about a node, after the opening
    /// event, which must be the first and say `stage`, `nodes` and
    /// `message`.
    fn per_node<'a>(
        events: &'a [(Duration, Event)],
        stage: Stage,
        nodes: usize,
        message: &str,
    ) -> Vec<(&'a str, bool, Duration)> {
        let (at, first) = &events[0];
        assert_eq!(
            (*at, first.stage, first.node.as_deref(), first.nodes),
            (Duration::ZERO, stage, None, Some(nodes)),
            "{events:?}"
        );
        assert_eq!(first.message, message);
        events[1..]
            .iter()
            .map(|(at, e)| {
                assert_eq!((e.stage, e.nodes), (stage, None), "{e:?}");
                (e.node.as_deref().unwrap(), e.ok, *at)
            })
            .collect()
    }

    /// n1, n2 (answering) and n3 (unreachable at once) were reported at
    /// once, n0 (unreachable after `slow`) last, after `slow`.
    fn assert_fast_nodes_first(mut seen: Vec<(&str, bool, Duration)>, slow: Duration) {
        assert_eq!(seen.pop(), Some(("n0", false, slow)), "{seen:?}");
        seen.sort();
        assert_eq!(
            seen,
            [
                ("n1", true, Duration::ZERO),
                ("n2", true, Duration::ZERO),
                ("n3", false, Duration::ZERO)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn placement_and_cleanup_report_each_node_as_it_answers() {
        let bench = Bench::new();
        let fleet = bench.fleet(4, 1);
        let spec = fleet.spec("cn").unwrap();
        let nodes = fleet.nodes(&spec).unwrap();
        let limits = spec.fan_out();
        let slow = Duration::from_secs(3);
        assert!(slow < limits.node_timeout);
        bench.fakes.delay("n0", slow);
        bench.fakes.fail("n0", Fail::Unreachable);
        bench.fakes.fail("n3", Fail::Unreachable);
        let (progress, mut rx) = Progress::channel();
        let pending = pending();
        let ttl = Duration::from_secs(60);
        let place = place_all(&nodes, &pending, ttl, limits, &progress);
        let (placed, events) = timed(place, &mut rx).await;
        // Failures come back in config order, though n3 failed first.
        let errors = placed.unwrap_err();
        let failed: Vec<&str> = errors.iter().map(NodeError::node).collect();
        assert_eq!(failed, ["n0", "n3"]);
        assert_eq!(
            errors[0].to_string(),
            "node n0 (127.0.0.2:7443): placing tokens: unreachable: node n0: connection refused"
        );
        let seen = per_node(&events, Stage::Placement, 4, "placing 2 tokens on 4 nodes");
        assert_fast_nodes_first(seen, slow);
        assert_eq!(bench.fakes.calls("n1"), [Call::PlaceTokens(2)]);

        let tokens: Vec<Token> = pending.iter().map(|p| p.response.token().clone()).collect();
        let start = tokio::time::Instant::now();
        let ((), events) = timed(remove_all(&nodes, &tokens, limits, &progress), &mut rx).await;
        let seen = per_node(&events, Stage::Cleanup, 4, "removing 2 tokens from 4 nodes");
        assert_fast_nodes_first(seen, slow);
        assert_eq!(start.elapsed(), slow);
        assert_eq!(
            bench.fakes.calls("n2"),
            [Call::PlaceTokens(2), Call::RemoveTokens(2)]
        );
    }
}
