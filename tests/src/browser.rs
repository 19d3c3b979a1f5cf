//! A real browser for the tests: Debian's headless `chromium`, driven over
//! WebDriver through `chromedriver` (fantoccini, rustls on aws-lc-rs).
//!
//! chromedriver listens on a free loopback port of its own; chromium gets
//! a profile directory of its own and a phone-sized window. It accepts the
//! page's certificate without a trust store: chromium reads its roots from
//! an NSS database, which a test does not set up; that the page serves
//! the cluster identity is checked with rustls against the cluster CA
//! instead. The driver (and so the browser) is killed when the [`Browser`]
//! is dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::net::{free_port, wait_listening};
use crate::process::Proc;

/// The window a phone would give the page (CSS pixels).
pub const PHONE_WINDOW: (u32, u32) = (412, 915);

/// A headless chromium session.
pub struct Browser {
    pub client: fantoccini::Client,
    driver: Proc,
}

impl Browser {
    /// Starts chromedriver and a chromium session; logs and the profile go
    /// under `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let port = free_port(ip);
        let mut cmd = Command::new("chromedriver");
        cmd.arg(format!("--port={port}")).arg(format!(
            "--log-path={}",
            dir.join("chromedriver.log").display()
        ));
        let mut driver = Proc::spawn("chromedriver", cmd, &dir.join("chromedriver.out"))?;
        if let Err(e) = wait_listening(SocketAddr::new(ip, port), Duration::from_secs(20)).await {
            driver.check_running()?;
            return Err(e.context("chromedriver did not listen"));
        }
        let profile = dir.join("profile");
        let (w, h) = PHONE_WINDOW;
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    format!("--window-size={w},{h}"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal");
        };
        let client = fantoccini::ClientBuilder::rustls()
            .context("fantoccini's HTTP client")?
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .with_context(|| {
                format!(
                    "starting chromium through chromedriver: {}",
                    std::fs::read_to_string(dir.join("chromedriver.log")).unwrap_or_default()
                )
            })?;
        Ok(Self { client, driver })
    }

    /// Saves a PNG of the window to each of `paths`.
    pub async fn screenshot(&self, paths: &[&Path]) -> anyhow::Result<()> {
        let png = self.client.screenshot().await?;
        for path in paths {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, &png).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Ends the session, then the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        self.driver.terminate(Duration::from_secs(5));
    }
}
