//! The standalone HTTP-01 responder (RFC 8555 §8.3).
//!
//! It answers `GET /.well-known/acme-challenge/{token}` with the key
//! authorization as `text/plain`, as certbot's standalone server does. Every
//! other path is 404, and a token that fails the syntax check is 404 without
//! a lookup.
//!
//! The port is open to anyone before anything is authenticated, so what a
//! client can hold is bounded by the config's [`ListenerLimits`]:
//!
//! - a connection that has not sent a request's headers within
//!   `header_timeout` is closed (hyper's header timer, and a bound of our own
//!   that does not depend on when hyper starts it);
//! - a connection with no request in the handler for `idle_timeout` is
//!   closed, whatever it is doing: waiting between keep-alive requests,
//!   trickling headers, or not reading its responses;
//! - at most `max_connections` are open. Past that, a new connection takes
//!   the place of the one idle longest ([`ConnectionLimit`]): idle
//!   connections are what an attacker holds cheaply, and a CA's validation
//!   request is never idle for long, so holding every place cannot lock the
//!   CA out;
//! - a request's head is at most [`MAX_HEAD_BYTES`], so open connections
//!   cost bounded memory.
//!
//! Shutdown stops accepting, lets requests in flight finish, closes idle
//! connections at once and everything left after [`SHUTDOWN_GRACE`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use certfleet_proto::challenge::Token;
use certfleet_proto::tls::{ConnectionLimit, Slot};
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, warn};

use crate::SHUTDOWN_GRACE;
use crate::config::ListenerLimits;
use crate::tokens::Tokens;

/// Largest request head (request line and headers) read, in bytes: a
/// validation request's is a few hundred. hyper's own floor.
pub const MAX_HEAD_BYTES: usize = 8192;

/// The router, separate from [`serve`] so tests can drive it directly.
pub fn router(tokens: Arc<Tokens>) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(challenge))
        .with_state(tokens)
}

/// Serves HTTP-01 on `listener` within `limits` until `shutdown`
/// completes, then drains for at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    tokens: Arc<Tokens>,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    serve_router(listener, router(tokens), limits, shutdown, SHUTDOWN_GRACE).await;
}

async fn serve_router(
    listener: TcpListener,
    router: Router,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let name = match listener.local_addr() {
        Ok(addr) => format!("HTTP-01 {addr}"),
        Err(_) => "HTTP-01".to_owned(),
    };
    let limit = ConnectionLimit::new(name, limits.max_connections);
    // `drain` asks connections to finish what they are doing; `close`
    // ends them when the grace period is over.
    let drain = CancellationToken::new();
    let close = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer, slot) = tokio::select! {
            accepted = limit.accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        let connection = serve_connection(
            tcp,
            slot,
            router.clone(),
            limits,
            drain.clone(),
            close.clone(),
        );
        connections.spawn(connection.instrument(debug_span!("http01", %peer)));
    }
    drop(listener);
    drain.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            ?grace,
            "HTTP-01 connections still open after the shutdown grace period; closing them"
        );
        close.cancel();
        connections.wait().await;
    }
}

/// Serves one connection until it ends, is quiet too long, is displaced by
/// a newer one, or is closed at shutdown.
async fn serve_connection<IO>(
    io: IO,
    slot: Slot,
    router: Router,
    limits: ListenerLimits,
    drain: CancellationToken,
    close: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new(slot));
    let service = {
        let activity = Arc::clone(&activity);
        let router = TowerToHyperService::new(router);
        hyper::service::service_fn(move |request| {
            let busy = activity.busy();
            let response = router.call(request);
            async move {
                let response = response.await;
                drop(busy);
                response
            }
        })
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    debug!(error = %e, "HTTP-01 connection ended");
                }
                return;
            }
            () = activity.quiet_too_long(&limits) => {
                debug!("closed a quiet HTTP-01 connection");
                return;
            }
            () = activity.slot.displaced() => {
                debug!("HTTP-01 connection closed to make room for a newer one");
                return;
            }
            // hyper closes an idle connection at once and lets a request
            // in flight finish first.
            () = drain.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            () = close.cancelled() => return,
        }
    }
}

/// Whether a connection has a request in the handler, and if not, since
/// when: what its idle bounds and its [`Slot`] go by.
struct Activity {
    slot: Slot,
    state: Mutex<ActivityState>,
}

struct ActivityState {
    in_flight: usize,
    /// When the last request left the handler, or the connection opened.
    quiet_since: Instant,
    /// A request has been handled: the connection is between requests
    /// rather than waiting for its first.
    served: bool,
}

/// A request in the handler; dropping it marks the end.
struct Busy(Arc<Activity>);

impl Activity {
    fn new(slot: Slot) -> Self {
        Self {
            slot,
            state: Mutex::new(ActivityState {
                in_flight: 0,
                quiet_since: Instant::now(),
                served: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().expect("connection activity poisoned")
    }

    fn busy(self: &Arc<Self>) -> Busy {
        self.lock().in_flight += 1;
        self.slot.set_busy();
        Busy(Arc::clone(self))
    }

    /// When the connection has been quiet too long; `None` while a request
    /// is in the handler. Before its first request a connection is waiting
    /// for headers, so the header timeout bounds it too.
    fn deadline(&self, limits: &ListenerLimits) -> Option<Instant> {
        let state = self.lock();
        if state.in_flight > 0 {
            return None;
        }
        let bound = if state.served {
            limits.idle_timeout
        } else {
            limits.header_timeout.min(limits.idle_timeout)
        };
        Some(state.quiet_since + bound)
    }

    /// Completes once the connection has been quiet past its deadline.
    /// A deadline only ever moves later (each request restarts the clock,
    /// and the bound between requests is at least the one before the
    /// first), so sleeping until it and looking again never misses one.
    async fn quiet_too_long(&self, limits: &ListenerLimits) {
        loop {
            match self.deadline(limits) {
                Some(deadline) if deadline <= Instant::now() => return,
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                // Look again later: the handler answers at once.
                None => tokio::time::sleep(limits.idle_timeout).await,
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.quiet_since = Instant::now();
            state.served = true;
            self.0.slot.set_idle();
        }
    }
}

async fn challenge(State(tokens): State<Arc<Tokens>>, Path(token): Path<String>) -> Response {
    let Ok(token) = Token::parse(&token) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match tokens.get(&token) {
        Some(key_authorization) => (
            [(header::CONTENT_TYPE, "text/plain")],
            key_authorization.to_string(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use axum::Router;
    use certfleet_proto::tls::ConnectionLimit;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::{serve_connection, serve_router};
    use crate::SHUTDOWN_GRACE;
    use crate::config::ListenerLimits;

    /// A request for a token nobody placed: answered 404, keep-alive.
    const REQUEST: &[u8] = b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: a\r\n\r\n";
    /// How long a real socket may take to see what the server did.
    const BOUND: Duration = Duration::from_secs(5);

    fn limits(max_connections: usize, header_secs: u64, idle_secs: u64) -> ListenerLimits {
        ListenerLimits {
            max_connections,
            header_timeout: Duration::from_secs(header_secs),
            idle_timeout: Duration::from_secs(idle_secs),
        }
    }

    /// One connection served over an in-memory pipe; returns the client's end.
    fn connect(limits: ListenerLimits) -> DuplexStream {
        let (client, server) = tokio::io::duplex(4096);
        let peer: SocketAddr = (Ipv4Addr::LOCALHOST, 1).into();
        let slot = ConnectionLimit::new("test", 1).admit(peer).unwrap();
        tokio::spawn(serve_connection(
            server,
            slot,
            Router::new(),
            limits,
            CancellationToken::new(),
            CancellationToken::new(),
        ));
        client
    }

    /// Reads a response head (the 404 has no body).
    async fn read_head(client: &mut (impl AsyncRead + Unpin)) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                client.read(&mut byte).await.unwrap(),
                1,
                "closed mid-response"
            );
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    /// Whether the server closed `client`: it reads end of file (or a reset).
    async fn closed_within(client: &mut (impl AsyncRead + Unpin), bound: Duration) -> bool {
        let mut rest = Vec::new();
        tokio::time::timeout(bound, client.read_to_end(&mut rest))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_within_the_header_timeout() {
        let limits = limits(1, 2, 30);
        let mut client = connect(limits);
        let bound = limits.header_timeout + Duration::from_millis(100);
        assert!(closed_within(&mut client, bound).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_idle_between_requests_is_closed_within_the_idle_timeout() {
        let limits = limits(1, 60, 2);
        let mut client = connect(limits);
        client.write_all(REQUEST).await.unwrap();
        assert!(read_head(&mut client).await.starts_with("HTTP/1.1 404"));
        client.write_all(REQUEST).await.unwrap();
        assert!(read_head(&mut client).await.starts_with("HTTP/1.1 404"));
        let bound = limits.idle_timeout + Duration::from_millis(100);
        assert!(closed_within(&mut client, bound).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_trickling_its_headers_is_closed_within_the_header_timeout() {
        let limits = limits(1, 2, 30);
        let mut client = connect(limits);
        let started = Instant::now();
        let bound = limits.header_timeout + Duration::from_millis(100);
        for byte in REQUEST.iter().take(REQUEST.len() - 2) {
            if client.write_all(&[*byte]).await.is_err() || started.elapsed() > bound {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(closed_within(&mut client, bound.saturating_sub(started.elapsed())).await);
    }

    /// Serves `Router::new()` on a real socket; returns its address, the
    /// shutdown trigger and the server's task.
    async fn server(
        limits: ListenerLimits,
        grace: Duration,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve_router(
            listener,
            Router::new(),
            limits,
            shutdown,
            grace,
        ));
        (addr, stop, task)
    }

    #[tokio::test]
    async fn past_the_cap_a_new_connection_displaces_the_oldest_idle_one() {
        let (addr, _stop, _task) = server(limits(2, 60, 60), SHUTDOWN_GRACE).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        // Only two fit: the oldest idle one made room for the third.
        assert!(closed_within(&mut first, BOUND).await);
        for client in [&mut second, &mut third] {
            client.write_all(REQUEST).await.unwrap();
            let head = tokio::time::timeout(BOUND, read_head(client))
                .await
                .unwrap();
            assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        }
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_at_once() {
        let (addr, stop, task) = server(limits(8, 60, 60), SHUTDOWN_GRACE).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut kept_alive = TcpStream::connect(addr).await.unwrap();
        kept_alive.write_all(REQUEST).await.unwrap();
        read_head(&mut kept_alive).await;

        stop.send(()).unwrap();
        // Within the grace, not at its end: nothing was in flight.
        tokio::time::timeout(SHUTDOWN_GRACE, task)
            .await
            .expect("shutdown waited for idle connections")
            .unwrap();
        assert!(closed_within(&mut silent, BOUND).await);
        assert!(closed_within(&mut kept_alive, BOUND).await);
    }

    #[tokio::test]
    async fn shutdown_closes_a_stuck_connection_when_the_grace_runs_out() {
        let grace = Duration::from_millis(200);
        let (addr, stop, task) = server(limits(8, 60, 60), grace).await;
        // Half a request: hyper's graceful shutdown waits for the rest.
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        stuck.write_all(&REQUEST[..20]).await.unwrap();

        stop.send(()).unwrap();
        tokio::time::timeout(grace + BOUND, task)
            .await
            .expect("shutdown outlived its grace")
            .unwrap();
        assert!(closed_within(&mut stuck, BOUND).await);
    }
}
