//! Restarting the services that use a certificate, and proving what they
//! serve.
//!
//! For each service, in the config's order: run its check (never restart a
//! service whose config is broken), run its restart, then connect to each
//! of its verify endpoints until every one serves the expected leaf or the
//! service's timeout passes. Commands are argv from this agent's config, run
//! without a shell.

use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::bundle::hex;
use certfleet_proto::identity::FingerprintOnly;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Endpoint, Protocol, Service};

/// Bytes of a failed command's output kept for the report.
const OUTPUT_TAIL: usize = 800;
/// Pause between verify probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Probes in a row that must all see the expected leaf. A reload hands
/// new connections to new workers while old ones wind down (nginx, apache),
/// so one good handshake can come before the last old one.
const VERIFY_CONSECUTIVE: u32 = 3;
/// Longest one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// PostgreSQL's SSLRequest: length 8, code 80877103 (protocol docs, 53.2.10).
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What one endpoint served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub service: String,
    pub address: String,
    pub result: Result<String, String>,
}

/// How one service fared.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub service: String,
    /// "check", "restart" or "verify".
    pub step: &'static str,
    pub ok: bool,
    pub detail: String,
    pub served: Vec<Served>,
}

/// Restarts `services` in order. Stops at the first failure unless
/// `keep_going` (used when rolling back, to put every service back).
pub async fn restart_all(
    services: &[Service],
    expected: &str,
    keep_going: bool,
) -> (bool, Vec<Outcome>) {
    let mut outcomes = Vec::with_capacity(services.len());
    let mut all_ok = true;
    for service in services {
        let outcome = restart_one(service, expected).await;
        all_ok &= outcome.ok;
        let failed = !outcome.ok;
        outcomes.push(outcome);
        if failed && !keep_going {
            break;
        }
    }
    (all_ok, outcomes)
}

async fn restart_one(service: &Service, expected: &str) -> Outcome {
    let fail = |step, detail: String, served| Outcome {
        service: service.name.clone(),
        step,
        ok: false,
        detail,
        served,
    };
    if let Some(check) = &service.check
        && let Err(detail) = run(check, service.timeout).await
    {
        // The running service keeps its old config and certificate: say
        // what it serves, but do not restart it.
        return fail("check", detail, probe_all(service).await);
    }
    if let Err(detail) = run(&service.restart, service.timeout).await {
        return fail("restart", detail, probe_all(service).await);
    }
    if service.verify.is_empty() {
        return Outcome {
            service: service.name.clone(),
            step: "restart",
            ok: true,
            detail: "restarted; no verify endpoint configured".into(),
            served: Vec::new(),
        };
    }
    let deadline = tokio::time::Instant::now() + service.timeout;
    let mut good = 0;
    loop {
        let served = probe_all(service).await;
        let wrong: Vec<String> = served
            .iter()
            .filter(|s| s.result.as_deref() != Ok(expected))
            .map(|s| match &s.result {
                Ok(sha) => format!("{} served {sha}", s.address),
                Err(e) => format!("{}: {e}", s.address),
            })
            .collect();
        good = if wrong.is_empty() { good + 1 } else { 0 };
        if good >= VERIFY_CONSECUTIVE {
            return Outcome {
                service: service.name.clone(),
                step: "verify",
                ok: true,
                detail: format!("{} endpoint(s) serve {expected}", served.len()),
                served,
            };
        }
        if !wrong.is_empty() && tokio::time::Instant::now() >= deadline {
            return fail(
                "verify",
                format!(
                    "after {:?}, expected {expected}: {}",
                    service.timeout,
                    wrong.join("; ")
                ),
                served,
            );
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Runs `argv` without a shell, within `timeout`.
async fn run(argv: &[String], timeout: Duration) -> Result<(), String> {
    let shown = argv.join(" ");
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(timeout, child).await {
        Err(_) => return Err(format!("`{shown}` did not finish within {timeout:?}")),
        Ok(Err(e)) => return Err(format!("`{shown}` could not run: {e}")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let text = text.trim();
    let tail = &text[text.len().saturating_sub(OUTPUT_TAIL)..];
    Err(format!("`{shown}` failed ({}): {tail}", out.status))
}

/// What every endpoint of `service` serves now.
pub async fn probe_all(service: &Service) -> Vec<Served> {
    let probes = service.verify.iter().map(|e| async move {
        let result = match tokio::time::timeout(PROBE_TIMEOUT, probe(e)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no TLS handshake within {PROBE_TIMEOUT:?}")),
        };
        Served {
            service: service.name.clone(),
            address: e.address.clone(),
            result,
        }
    });
    futures::future::join_all(probes).await
}

/// The SHA-256 of the leaf `endpoint` serves.
async fn probe(endpoint: &Endpoint) -> Result<String, String> {
    let mut tcp = TcpStream::connect(&endpoint.address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if endpoint.protocol == Protocol::Postgres {
        tcp.write_all(&PG_SSL_REQUEST)
            .await
            .map_err(|e| format!("SSLRequest: {e}"))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| format!("SSLRequest: {e}"))?;
        if answer[0] != b'S' {
            return Err(format!(
                "server refused TLS (answered {:?})",
                answer[0] as char
            ));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(certfleet_proto::identity::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FingerprintOnly::new()))
        .with_no_client_auth();
    let name = ServerName::try_from(endpoint.sni.clone())
        .map_err(|e| format!("SNI {:?}: {e}", endpoint.sni))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate served")?;
    Ok(hex(&Sha256::digest(leaf)))
}
