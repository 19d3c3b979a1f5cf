//! gRPC over certfleet's own TLS, on both ends, and the bound on what
//! unauthenticated peers may hold open on a listener.
//!
//! tonic's built-in TLS cannot take a custom certificate verifier, and the
//! cluster's rules (verify the identity, not the dialled address; accept only
//! the coordinator) need one. So the TLS layer is ours, from rustls configs
//! built with [`crate::identity`]'s verifiers, and tonic sees plain streams:
//! [`incoming`] for servers, [`channel`] for clients.
//!
//! Before a peer has proved anything (no handshake done, no request read)
//! it is a file descriptor anyone can make us hold. [`ConnectionLimit`]
//! bounds those per listener: [`incoming`] uses it for TLS handshakes, and
//! the agent's HTTP-01 responder for its connections. Past the bound a new
//! connection takes the place of the one idle longest, because an idle
//! connection is the cheapest thing an attacker can hold and a real client
//! (the coordinator, a CA's validation request) is never idle for long.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, warn};

/// Longest a TLS handshake may take before the connection is dropped. A
/// real peer needs a few round trips; this is far more, and short enough
/// that a peer which sends nothing is gone soon even when nobody displaces it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// TLS handshakes in flight at once on one [`incoming`] listener. The
/// coordinator opens one connection per node, so this is far above what
/// real peers need and far below a service's 1024 file descriptors.
pub const MAX_HANDSHAKES: usize = 64;
/// Handshaken connections waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 64;
/// How long to wait before accepting again after `accept` failed (out of
/// file descriptors: EMFILE, ENFILE), so the accept loop never spins.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Least time between two log lines about one listener's overflow or its
/// accept errors; each line counts what happened since the one before.
pub const OVERFLOW_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener` and yields those whose TLS
/// handshake succeeds under `config`. Handshakes run concurrently, each
/// bounded by [`HANDSHAKE_TIMEOUT`], so a slow or hostile client delays
/// nobody; refusals are logged with the peer's address and the reason, at
/// most once per [`OVERFLOW_LOG_INTERVAL`] with how many there were.
///
/// At most [`MAX_HANDSHAKES`] are in flight: past that, a new connection
/// displaces the oldest handshake (see [`ConnectionLimit`]), so idle TCP
/// connections can neither use up the process's file descriptors nor keep
/// the coordinator out. Connections that completed their handshake are
/// the server's and do not count.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    incoming_until(listener, config, std::future::pending())
}

/// [`incoming`] until `shutdown` completes: then the listener is closed and
/// handshakes in flight are dropped. tonic keeps its incoming stream while
/// it drains its connections, so without this the listener would go on
/// accepting connections that nobody serves.
pub fn incoming_until(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    // Never sent on: handshakes see it dropped when accepting stops.
    let (accepting, stopped) = watch::channel(());
    let acceptor = TlsAcceptor::from(config);
    let name = match listener.local_addr() {
        Ok(addr) => format!("TLS {addr}"),
        Err(_) => "TLS".to_owned(),
    };
    let limit = ConnectionLimit::new(name, MAX_HANDSHAKES);
    // Anyone can make a handshake fail, as often as they like.
    let failures = Arc::new(LogLimit::new(OVERFLOW_LOG_INTERVAL));
    tokio::spawn(async move {
        let _accepting = accepting;
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer, slot) = tokio::select! {
                accepted = limit.accept(&listener) => accepted,
                // The server dropped its end: stop accepting.
                _ = tx.closed() => return,
                () = &mut shutdown => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let failures = Arc::clone(&failures);
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let outcome = tokio::select! {
                    outcome = handshake => outcome,
                    () = slot.displaced() => {
                        debug!(%peer, "TLS handshake displaced by a newer connection");
                        return;
                    }
                    _ = stopped.changed() => return,
                };
                drop(slot);
                match outcome {
                    Ok(Ok(stream)) => {
                        debug!(%peer, "TLS connection accepted");
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        if let Some(times) = failures.note() {
                            warn!(%peer, error = %e, times, "refused a TLS connection");
                        }
                    }
                    Err(_) => {
                        if let Some(times) = failures.note() {
                            warn!(%peer, timeout = ?HANDSHAKE_TIMEOUT, times, "TLS handshake timed out");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazy gRPC channel to `addr` over TLS with `config`. The server name
/// sent is `server_name`; what is accepted is up to `config`'s verifier.
pub fn channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>, server_name: &str) -> Channel {
    let connector = TlsConnector::from(config);
    let server_name =
        ServerName::try_from(server_name.to_owned()).expect("identity names are DNS names");
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI authority")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                    })??;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
}

/// A bound on the connections one listener holds for peers that have not
/// proved anything yet.
///
/// Each admitted connection holds a [`Slot`] until it has proved itself
/// (dropped the slot) or closed. A slot is idle or busy: a connection
/// waiting for its peer is idle, one doing work for it (a request in
/// flight) is busy. When all `capacity` slots are taken, a new connection
/// takes the slot that has been idle longest, whose owner sees
/// [`Slot::displaced`] and closes its connection; if every slot is busy,
/// the new connection is closed at once. Either way it is accepted first,
/// so the kernel's backlog never fills up with connections nobody takes.
///
/// Overflow is logged at most once per [`OVERFLOW_LOG_INTERVAL`], naming
/// the latest peer and counting what happened since the line before.
#[derive(Clone)]
pub struct ConnectionLimit {
    shared: Arc<Shared>,
}

struct Shared {
    /// The listener, as log lines name it (`HTTP-01 127.0.0.3:80`).
    name: String,
    capacity: usize,
    table: Mutex<Table>,
    displaced: LogLimit,
    refused: LogLimit,
    accept_errors: LogLimit,
}

struct Table {
    /// Slots taken, idle or busy.
    taken: usize,
    /// Idle slots by when they became idle, oldest first.
    idle: BTreeMap<u64, Arc<SlotState>>,
    next_idle: u64,
}

struct SlotState {
    /// Key in [`Table::idle`] while idle, 0 while busy. Written under the
    /// table's lock.
    idle_key: AtomicU64,
    /// A newer connection took this slot.
    displaced: AtomicBool,
    wake: Notify,
}

/// One admitted connection's place in a [`ConnectionLimit`]; dropping it
/// frees the place.
pub struct Slot {
    state: Arc<SlotState>,
    shared: Arc<Shared>,
}

impl ConnectionLimit {
    /// At most `capacity` connections (at least one) on the listener `name`.
    pub fn new(name: impl Into<String>, capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                name: name.into(),
                capacity: capacity.max(1),
                table: Mutex::new(Table {
                    taken: 0,
                    idle: BTreeMap::new(),
                    next_idle: 1,
                }),
                displaced: LogLimit::new(OVERFLOW_LOG_INTERVAL),
                refused: LogLimit::new(OVERFLOW_LOG_INTERVAL),
                accept_errors: LogLimit::new(OVERFLOW_LOG_INTERVAL),
            }),
        }
    }

    /// Accepts the next connection on `listener` that gets a slot (it
    /// starts idle). Connections that get none are closed at once. Accept
    /// errors are logged and retried after [`ACCEPT_RETRY`].
    ///
    /// Cancel-safe: nothing is lost if the future is dropped.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Slot) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    if let Some(slot) = self.admit(peer) {
                        return (tcp, peer, slot);
                    }
                    // Dropping `tcp` closes it and frees its descriptor.
                }
                Err(e) => {
                    if let Some(times) = self.shared.accept_errors.note() {
                        warn!(
                            listener = %self.shared.name,
                            error = %e,
                            times,
                            retry_in = ?ACCEPT_RETRY,
                            "accept failed",
                        );
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }

    /// A slot for a new connection from `peer`, displacing the longest
    /// idle one if all are taken; `None` if every slot is busy.
    pub fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        let shared = &self.shared;
        let mut table = shared.lock();
        let displaced = if table.taken < shared.capacity {
            table.taken += 1;
            false
        } else if let Some((_, victim)) = table.idle.pop_first() {
            // The victim's slot passes to the new connection: `taken`
            // stays, and the victim's drop gives nothing back.
            victim.idle_key.store(0, Ordering::SeqCst);
            victim.displaced.store(true, Ordering::SeqCst);
            victim.wake.notify_one();
            true
        } else {
            drop(table);
            if let Some(times) = shared.refused.note() {
                warn!(
                    listener = %shared.name,
                    max = shared.capacity,
                    %peer,
                    times,
                    "connection limit reached and every connection busy: closed a new connection",
                );
            }
            return None;
        };
        let state = Arc::new(SlotState {
            idle_key: AtomicU64::new(0),
            displaced: AtomicBool::new(false),
            wake: Notify::new(),
        });
        table.make_idle(&state);
        drop(table);
        if displaced && let Some(times) = shared.displaced.note() {
            warn!(
                listener = %shared.name,
                max = shared.capacity,
                %peer,
                times,
                "connection limit reached: closed the longest idle connection to make room",
            );
        }
        Some(Slot {
            state,
            shared: Arc::clone(shared),
        })
    }

    /// Slots taken now, idle or busy.
    pub fn taken(&self) -> usize {
        self.shared.lock().taken
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().expect("connection table poisoned")
    }
}

impl Table {
    fn make_idle(&mut self, state: &Arc<SlotState>) {
        if state.idle_key.load(Ordering::SeqCst) == 0 {
            let key = self.next_idle;
            self.next_idle += 1;
            state.idle_key.store(key, Ordering::SeqCst);
            self.idle.insert(key, Arc::clone(state));
        }
    }

    fn make_busy(&mut self, state: &SlotState) {
        let key = state.idle_key.swap(0, Ordering::SeqCst);
        if key != 0 {
            self.idle.remove(&key);
        }
    }
}

impl Slot {
    /// The connection is working for its peer: it must not be displaced.
    pub fn set_busy(&self) {
        let mut table = self.shared.lock();
        if !self.is_displaced() {
            table.make_busy(&self.state);
        }
    }

    /// The connection waits for its peer: it may be displaced, after those
    /// idle longer.
    pub fn set_idle(&self) {
        let mut table = self.shared.lock();
        if !self.is_displaced() {
            table.make_idle(&self.state);
        }
    }

    /// Completes once a newer connection took this slot: close the
    /// connection.
    pub async fn displaced(&self) {
        // A wake before this call left a permit, so none is lost.
        if !self.is_displaced() {
            self.state.wake.notified().await;
        }
    }

    fn is_displaced(&self) -> bool {
        self.state.displaced.load(Ordering::SeqCst)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.shared.lock();
        if !self.is_displaced() {
            table.make_busy(&self.state);
            table.taken -= 1;
        }
    }
}

/// One kind of repeated event (a connection refused, an accept error),
/// logged at most [`LOG_BURST`] times per interval so that nobody can flood
/// the log; the first line after a quiet spell says how many were not logged.
/// A burst rather than one line: an admin looking at a handful of refusals
/// (a wrong client certificate, a probe) should see each of them.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    state: Mutex<LogLimitState>,
}

/// Lines a [`LogLimit`] writes per interval before it only counts.
pub const LOG_BURST: u32 = 10;

#[derive(Debug, Default)]
struct LogLimitState {
    window_start: Option<Instant>,
    lines_in_window: u32,
    /// Events not logged since the last line.
    unlogged: u64,
}

impl LogLimit {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::default(),
        }
    }

    /// Counts one event. `Some(n)`: log a line now, for `n` events (this
    /// one and those not logged since the last line).
    pub fn note(&self) -> Option<u64> {
        self.note_at(Instant::now())
    }

    fn note_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("log limit poisoned");
        state.unlogged += 1;
        let expired = state
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            state.window_start = Some(now);
            state.lines_in_window = 0;
        }
        if state.lines_in_window >= LOG_BURST {
            return None;
        }
        state.lines_in_window += 1;
        Some(std::mem::take(&mut state.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rustls::pki_types::ServerName;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsConnector;
    use tokio_stream::StreamExt;

    use super::{ConnectionLimit, LogLimit, MAX_HANDSHAKES, incoming};
    use crate::identity::{FingerprintOnly, LiveIdentity, client_config, server_config};

    fn peer() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, 1).into()
    }

    #[test]
    fn a_new_connection_displaces_the_longest_idle_one() {
        let limit = ConnectionLimit::new("test", 2);
        let first = limit.admit(peer()).unwrap();
        let second = limit.admit(peer()).unwrap();
        let third = limit.admit(peer()).unwrap();
        assert!(first.is_displaced() && !second.is_displaced());
        assert_eq!(limit.taken(), 2);
        // The displaced slot passed to `third`: dropping it frees nothing.
        drop(first);
        assert_eq!(limit.taken(), 2);
        // `second` went busy and back to idle: `third` is now the oldest.
        second.set_busy();
        second.set_idle();
        let _fourth = limit.admit(peer()).unwrap();
        assert!(third.is_displaced() && !second.is_displaced());
    }

    #[test]
    fn busy_connections_are_never_displaced_and_new_ones_are_refused() {
        let limit = ConnectionLimit::new("test", 2);
        let a = limit.admit(peer()).unwrap();
        let b = limit.admit(peer()).unwrap();
        a.set_busy();
        b.set_busy();
        assert!(limit.admit(peer()).is_none());
        assert!(!a.is_displaced() && !b.is_displaced());
        drop(a);
        assert_eq!(limit.taken(), 1);
        assert!(limit.admit(peer()).is_some());
    }

    #[tokio::test]
    async fn displaced_completes_even_when_the_wake_came_first() {
        let limit = ConnectionLimit::new("test", 1);
        let old = limit.admit(peer()).unwrap();
        let _new = limit.admit(peer()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), old.displaced())
            .await
            .expect("displaced() did not complete");
    }

    #[test]
    fn a_repeated_event_is_logged_in_bursts_with_the_count_it_left_out() {
        let log = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..super::LOG_BURST {
            assert_eq!(log.note_at(t0), Some(1));
        }
        assert_eq!(log.note_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note_at(t0 + Duration::from_secs(9)), None);
        // A new interval: its first line counts the two left out.
        assert_eq!(log.note_at(t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(log.note_at(t0 + Duration::from_secs(11)), Some(1));
    }

    /// A server config for `localhost` that asks for no client certificate.
    fn test_server() -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let identity = LiveIdentity::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        let clients = rustls::server::WebPkiClientVerifier::no_client_auth();
        Arc::new(server_config(Arc::new(identity), clients).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_do_not_keep_a_real_handshake_out() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, test_server());

        // Twice as many silent connections as handshakes may be in flight.
        let mut idle = Vec::new();
        for _ in 0..2 * MAX_HANDSHAKES {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let config = client_config(Arc::new(FingerprintOnly::new()), None).unwrap();
        let handshake = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
        };
        tokio::time::timeout(Duration::from_secs(5), handshake)
            .await
            .expect("the handshake was kept waiting")
            .expect("the handshake failed");
        let stream = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await;
        assert!(matches!(stream, Ok(Some(Ok(_)))), "server yielded nothing");

        // The oldest silent connections made room: the server closed them.
        let mut oldest = idle.swap_remove(0);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), oldest.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the oldest idle connection is still open: {read:?}"
        );
    }
}
