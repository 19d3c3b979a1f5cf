//! The agent's own health for Prometheus (`[metrics] listen`): that it is
//! up, and what it did for the coordinator since it started.
//!
//! The counters are one process-wide [`AGENT`]: one agent runs per process,
//! and the gRPC service bumps them with a call each, without a handle
//! threaded through every constructor. What the certificates on this node
//! are and serve is the coordinator's to report (it sees every node, and
//! keeps reporting a node whose agent is down).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;

/// `[metrics]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetricsConfig {
    listen: String,
}

/// `[metrics]`: where `/metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// Checks `[metrics]`; an error is (key, reason).
pub fn validate_config(raw: RawMetricsConfig) -> Result<MetricsConfig, (&'static str, String)> {
    let listen = raw.listen.parse().map_err(|e| {
        (
            "metrics.listen",
            format!(
                "{:?} is not an address like 127.0.0.1:9465: {e}",
                raw.listen
            ),
        )
    })?;
    Ok(MetricsConfig { listen })
}

/// What this agent did since it started.
#[derive(Debug)]
pub struct Counters {
    tokens_placed: AtomicU64,
    installs: AtomicU64,
    /// Unix seconds of the last install that changed files; 0: none yet.
    last_install: AtomicI64,
    restarts_ok: AtomicU64,
    restarts_failed: AtomicU64,
}

/// This process's counters.
pub static AGENT: Counters = Counters {
    tokens_placed: AtomicU64::new(0),
    installs: AtomicU64::new(0),
    last_install: AtomicI64::new(0),
    restarts_ok: AtomicU64::new(0),
    restarts_failed: AtomicU64::new(0),
};

impl Counters {
    /// `n` HTTP-01 tokens were placed for an order.
    pub fn placed(&self, n: usize) {
        self.tokens_placed.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A version was installed; `changed`: files were written (not
    /// already there).
    pub fn installed(&self, changed: bool) {
        if changed {
            self.installs.fetch_add(1, Ordering::Relaxed);
            self.last_install
                .store(certfleet_proto::clock::now(), Ordering::Relaxed);
        }
    }

    /// A restart of a certificate's services ended, verified or not.
    pub fn restarted(&self, ok: bool) {
        let counter = if ok {
            &self.restarts_ok
        } else {
            &self.restarts_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The OpenMetrics text of these counters.
    pub fn encode(&self) -> String {
        let mut r = Registry::default();
        let up = Gauge::<i64>::default();
        up.set(1);
        r.register("certfleet_agent_up", "The agent is running", up);
        let counter = |value: &AtomicU64| {
            let c = Counter::<u64>::default();
            c.inc_by(value.load(Ordering::Relaxed));
            c
        };
        r.register(
            "certfleet_agent_tokens_placed",
            "HTTP-01 tokens placed for the coordinator's orders",
            counter(&self.tokens_placed),
        );
        r.register(
            "certfleet_agent_installs",
            "Certificate versions installed that changed files",
            counter(&self.installs),
        );
        let last = self.last_install.load(Ordering::Relaxed);
        if last > 0 {
            let g = Gauge::<i64>::default();
            g.set(last);
            r.register(
                "certfleet_agent_last_install_timestamp_seconds",
                "When a certificate version was last installed (Unix seconds)",
                g,
            );
        }
        let restarts = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        r.register(
            "certfleet_agent_restarts",
            "Restarts of a certificate's services, by outcome (verified or failed)",
            restarts.clone(),
        );
        for (outcome, value) in [("ok", &self.restarts_ok), ("failed", &self.restarts_failed)] {
            restarts
                .get_or_create(&vec![("outcome", outcome)])
                .inc_by(value.load(Ordering::Relaxed));
        }
        let mut out = String::new();
        text::encode(&mut out, &r).expect("writing to a String never fails");
        out
    }
}

/// Serves [`AGENT`]'s `/metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    let render: certfleet_proto::metrics::Render = Arc::new(|| AGENT.encode());
    certfleet_proto::metrics::serve(listener, render, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Counters {
        Counters {
            tokens_placed: AtomicU64::new(0),
            installs: AtomicU64::new(0),
            last_install: AtomicI64::new(0),
            restarts_ok: AtomicU64::new(0),
            restarts_failed: AtomicU64::new(0),
        }
    }

    fn series(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        lines.sort_unstable();
        lines
    }

    #[test]
    fn a_fresh_agent_is_up_with_nothing_done() {
        let text = fresh().encode();
        assert_eq!(
            series(&text),
            [
                "certfleet_agent_installs_total 0",
                r#"certfleet_agent_restarts_total{outcome="failed"} 0"#,
                r#"certfleet_agent_restarts_total{outcome="ok"} 0"#,
                "certfleet_agent_tokens_placed_total 0",
                "certfleet_agent_up 1",
            ]
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn what_the_agent_did_is_counted() {
        let c = fresh();
        c.placed(5);
        c.installed(false);
        c.installed(true);
        c.restarted(true);
        c.restarted(false);
        c.restarted(true);
        let text = c.encode();
        let lines = series(&text);
        assert!(
            lines.contains(&"certfleet_agent_tokens_placed_total 5"),
            "{text}"
        );
        assert!(
            lines.contains(&"certfleet_agent_installs_total 1"),
            "{text}"
        );
        assert!(
            lines.contains(&r#"certfleet_agent_restarts_total{outcome="ok"} 2"#),
            "{text}"
        );
        assert!(
            lines.contains(&r#"certfleet_agent_restarts_total{outcome="failed"} 1"#),
            "{text}"
        );
        let last: i64 = lines
            .iter()
            .find_map(|l| l.strip_prefix("certfleet_agent_last_install_timestamp_seconds "))
            .expect("the last install's time")
            .parse()
            .unwrap();
        assert!((last - certfleet_proto::clock::now()).abs() < 60, "{last}");
    }

    #[test]
    fn a_listen_address_that_is_not_one_is_named() {
        let (key, reason) = validate_config(RawMetricsConfig {
            listen: "any".into(),
        })
        .unwrap_err();
        assert_eq!(key, "metrics.listen");
        assert!(reason.contains("\"any\""), "{reason}");
    }
}
