//! gRPC over certfleet's own TLS, on both ends.
//!
//! tonic's built-in TLS cannot take a custom certificate verifier, and the
//! cluster's rules (verify the identity, not the dialled address; accept only
//! the coordinator) need one. So the TLS layer is ours, from rustls configs
//! built with [`crate::identity`]'s verifiers, and tonic sees plain streams:
//! [`incoming`] for servers, [`channel`] for clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, warn};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshaken connections waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 64;

/// Accepts TCP connections on `listener` and yields those whose TLS
/// handshake succeeds under `config`. Handshakes run concurrently, each
/// bounded by [`HANDSHAKE_TIMEOUT`], so a slow or hostile client delays
/// nobody; refusals are logged with the peer's address and the reason.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // The server dropped its end: stop accepting.
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        debug!(%peer, "TLS connection accepted");
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => warn!(%peer, error = %e, "refused a TLS connection"),
                    Err(_) => warn!(%peer, "TLS handshake timed out"),
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
