//! Addresses, ports and small HTTP helpers for the harness.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::process::eventually;

/// A /24 of the loopback range that belongs to one cluster: nodes live at
/// 127.A.B.10, .11, … Chosen from the pid and a counter so parallel tests
/// (threads or processes) do not share addresses.
#[derive(Debug, Clone, Copy)]
pub struct Subnet(u8, u8);

impl Subnet {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let seed = std::process::id()
            .wrapping_mul(2_654_435_761)
            .wrapping_add(n.wrapping_mul(40_503))
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0));
        Self(1 + (seed % 250) as u8, ((seed >> 8) % 256) as u8)
    }

    /// The address of node `i` (0-based): 240 per /24, continuing into the
    /// next /24s for larger clusters.
    pub fn node(&self, i: usize) -> IpAddr {
        const PER_BLOCK: usize = 240;
        let block = self.1.wrapping_add((i / PER_BLOCK) as u8);
        IpAddr::V4(Ipv4Addr::new(
            127,
            self.0,
            block,
            10 + (i % PER_BLOCK) as u8,
        ))
    }

    /// An address in the subnet that no node uses.
    pub fn unused(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.0, self.1, 253))
    }
}

impl Default for Subnet {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP port free on `ip` right now.
pub fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding port 0")
}

/// A port free for both TCP and UDP on 127.0.0.1 (for DNS).
pub fn free_tcp_udp_port() -> u16 {
    loop {
        let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A port free on every one of `ips` (all nodes answer HTTP-01 on the same
/// port, as they would on port 80 in production).
pub fn common_free_port(ips: &[IpAddr]) -> u16 {
    'pick: loop {
        let port = free_port(ips[0]);
        for ip in &ips[1..] {
            if std::net::TcpListener::bind((*ip, port)).is_err() {
                continue 'pick;
            }
        }
        return port;
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    eventually(&format!("a listener on {addr}"), timeout, || async move {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await
}

/// A plain-HTTP request; returns status and body.
pub async fn http(
    method: http::Method,
    url: &str,
    host: Option<&str>,
    body: Option<String>,
) -> anyhow::Result<(http::StatusCode, String)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(host) = host {
        req = req.header(http::header::HOST, host);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let rsp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .with_context(|| format!("{url}: timed out"))?
        .with_context(|| url.to_string())?;
    let status = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTPS GET trusting only `root_pem`.
pub async fn https_get(url: &str, root_pem: &[u8]) -> anyhow::Result<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(certfleet_proto::identity::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let rsp = client
        .request(http::Request::get(url).body(Full::new(Bytes::new()))?)
        .await
        .with_context(|| format!("GET {url}"))?;
    if !rsp.status().is_success() {
        bail!("GET {url}: {}", rsp.status());
    }
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(body.to_vec())?)
}
