//! Debian's Pebble and pebble-challtestsrv, started per cluster.
//!
//! Facts that shape this (see DESIGN.md): Pebble ships no listener
//! certificate, so one is made here (a CA and a leaf for
//! localhost/127.0.0.1, since rustls refuses a CA as its own leaf);
//! challtestsrv must not answer AAAA (`-defaultIPv6 ""`), or Pebble
//! validates over ::1; the issuing root changes at every start and is read
//! from `/roots/0`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::net::{free_port, free_tcp_udp_port, http, https_get, wait_listening};
use crate::process::Proc;

/// Pebble's fault injection, as percentages.
#[derive(Debug, Clone, Copy, Default)]
pub struct PebbleOptions {
    /// `PEBBLE_WFE_NONCEREJECT`: share of good nonces rejected as bad.
    pub nonce_reject: u8,
    /// `PEBBLE_AUTHZREUSE`: share of valid authorizations reused.
    pub authz_reuse: u8,
    /// Require external account binding with this (key id, base64url MAC key).
    pub external_account: Option<(&'static str, &'static str)>,
}

pub struct Pebble {
    pub acme_port: u16,
    pub mgmt_port: u16,
    pub dns_port: u16,
    pub chall_port: u16,
    /// The port Pebble fetches HTTP-01 responses from.
    pub http_port: u16,
    /// The CA that signed Pebble's listener certificate (trust it to talk to Pebble).
    pub listener_ca: PathBuf,
    pebble: Proc,
    challtestsrv: Proc,
}

const STARTUP: Duration = Duration::from_secs(20);
const START_ATTEMPTS: usize = 5;

impl Pebble {
    /// Starts Pebble and challtestsrv. A port picked as free can be taken
    /// (by another test, or as the source port of an outgoing connection)
    /// before the server binds it, so a failed start is retried on new ports.
    /// It validates HTTP-01 on `http_port` and follows redirects to HTTPS on
    /// `tls_port`.
    pub async fn start(
        dir: &Path,
        http_port: u16,
        tls_port: u16,
        options: PebbleOptions,
    ) -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(dir, http_port, tls_port, options).await {
                Ok(pebble) => return Ok(pebble),
                Err(e) if attempt < START_ATTEMPTS => {
                    eprintln!("pebble start attempt {attempt} failed, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(
        dir: &Path,
        http_port: u16,
        tls_port: u16,
        options: PebbleOptions,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let listener_ca = write_listener_certs(dir)?;
        let localhost: IpAddr = "127.0.0.1".parse()?;
        let acme_port = free_port(localhost);
        let mgmt_port = free_port(localhost);
        let chall_port = free_port(localhost);
        let dns_port = free_tcp_udp_port();

        let mut cmd = Command::new("pebble-challtestsrv");
        cmd.args(["-management", &format!("127.0.0.1:{chall_port}")])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv6", "", "-defaultIPv4", "127.0.0.1"]);
        let challtestsrv = Proc::spawn("pebble-challtestsrv", cmd, &dir.join("challtestsrv.log"))?;

        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                "certificate": dir.join("listener.pem"),
                "privateKey": dir.join("listener.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": options.external_account.is_some(),
                "externalAccountMACKeys": options
                    .external_account
                    .map(|(kid, key)| serde_json::json!({ kid: key }))
                    .unwrap_or_else(|| serde_json::json!({})),
            }
        });
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", options.nonce_reject.to_string())
            .env("PEBBLE_AUTHZREUSE", options.authz_reuse.to_string());
        let pebble = Proc::spawn("pebble", cmd, &dir.join("pebble.log"))?;

        let mut this = Self {
            acme_port,
            mgmt_port,
            dns_port,
            chall_port,
            http_port,
            listener_ca,
            pebble,
            challtestsrv,
        };
        for port in [acme_port, mgmt_port, chall_port] {
            let addr = SocketAddr::new(localhost, port);
            if let Err(e) = wait_listening(addr, STARTUP).await {
                this.pebble.check_running()?;
                this.challtestsrv.check_running()?;
                return Err(e);
            }
        }
        // Listening is not enough: another test's server may have bound a
        // port picked here before Pebble or challtestsrv did (one of them
        // then failed to start). Each must answer as itself.
        this.challtestsrv("clear-a", serde_json::json!({ "host": "probe.invalid" }))
            .await
            .context("challtestsrv's management port does not answer as challtestsrv")?;
        https_get(&this.directory_url(), &std::fs::read(&this.listener_ca)?)
            .await
            .context("Pebble's ACME port does not answer as Pebble")?;
        this.root_pem().await?;
        Ok(this)
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// Makes challtestsrv's DNS answer `host` with `ip` alone (replacing
    /// any address it answered before).
    pub async fn add_a(&self, host: &str, ip: IpAddr) -> anyhow::Result<()> {
        self.challtestsrv("clear-a", serde_json::json!({ "host": host }))
            .await?;
        self.challtestsrv(
            "add-a",
            serde_json::json!({ "host": host, "addresses": [ip.to_string()] }),
        )
        .await
    }

    async fn challtestsrv(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/{path}", self.chall_port);
        let (status, text) = http(http::Method::POST, &url, None, Some(body.to_string())).await?;
        if !status.is_success() {
            bail!("challtestsrv {path} {body}: {status} {text}");
        }
        Ok(())
    }

    /// The root that issued (this run of) Pebble's certificates.
    pub async fn root_pem(&self) -> anyhow::Result<String> {
        let ca = std::fs::read(&self.listener_ca)?;
        https_get(
            &format!("https://127.0.0.1:{}/roots/0", self.mgmt_port),
            &ca,
        )
        .await
        .context("reading Pebble's root")
    }

    pub fn log(&self) -> String {
        self.pebble.log_text()
    }

    /// Whether Pebble's management API says the certificate with `serial`
    /// (hex, as `certfleet` prints it) is revoked: its
    /// `GET /cert-status-by-serial/<serial>` answers `{"Status": "Revoked",
    /// ...}` or `"Valid"`. Returns the answer's JSON with the verdict.
    pub async fn revoked(&self, serial: &str) -> anyhow::Result<(bool, serde_json::Value)> {
        let ca = std::fs::read(&self.listener_ca)?;
        let url = format!(
            "https://127.0.0.1:{}/cert-status-by-serial/{serial}",
            self.mgmt_port
        );
        let text = https_get(&url, &ca).await?;
        let status: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("GET {url}: {text}"))?;
        let revoked = match status["Status"].as_str() {
            Some("Revoked") => true,
            Some("Valid") => false,
            _ => bail!("GET {url}: no Status I know in {text}"),
        };
        Ok((revoked, status))
    }
}

/// Writes a listener CA and a leaf for localhost/127.0.0.1 signed by it;
/// returns the CA's path.
fn write_listener_certs(dir: &Path) -> anyhow::Result<PathBuf> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "certfleet test listener CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = params.signed_by(&key, &issuer)?;
    std::fs::write(
        dir.join("listener.pem"),
        format!("{}{}", leaf.pem(), ca.pem()),
    )?;
    std::fs::write(dir.join("listener.key"), key.serialize_pem())?;
    let ca_path = dir.join("listener-ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    Ok(ca_path)
}
