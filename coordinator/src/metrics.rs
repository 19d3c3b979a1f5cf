//! The coordinator's Prometheus endpoint (`[metrics] listen`): what a
//! monitoring system alerts on before a certificate expires on some node,
//! or when a rollout, a renewal or the mail outbox is stuck.
//!
//! Two sources, because they cost differently:
//! - what every node *serves* takes a TLS handshake per endpoint, so it is
//!   probed every `[metrics] probe_secs` ([`probe_until`]) through
//!   [`crate::status`], and scrapes read the last result;
//! - everything else (the store, the registry, the renewal scheduler) is
//!   read at each scrape, so it is never stale.
//!
//! The served expiry is named after cert-manager's
//! `certmanager_certificate_expiration_timestamp_seconds`, so alert rules
//! written for it carry over (`deploy/prometheus/certfleet-alerts.yml`).
//! Each scrape builds a [`Snapshot`] and [`encode`]s it into a fresh
//! registry: no series outlives the certificate or node it describes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certfleet_proto::clock;
use prometheus_client::encoding::text;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::db::RolloutOutcome;
use crate::fleet::Fleet;
use crate::renewal::FleetScheduler;

/// Default of `metrics.probe_secs`: how often what the nodes serve is
/// probed. Expiry moves in days; a handshake per endpoint every few
/// minutes is plenty.
pub const DEFAULT_PROBE: Duration = Duration::from_secs(300);

/// `[metrics]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetricsConfig {
    listen: String,
    probe_secs: Option<u64>,
}

/// `[metrics]`: where `/metrics` is served, and how often the nodes are
/// probed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    pub probe: Duration,
}

/// Checks `[metrics]`; an error is (key, reason).
pub fn validate_config(raw: RawMetricsConfig) -> Result<MetricsConfig, (String, String)> {
    let listen = raw.listen.parse().map_err(|e| {
        (
            "metrics.listen".to_owned(),
            format!(
                "{:?} is not an address like 127.0.0.1:9464: {e}",
                raw.listen
            ),
        )
    })?;
    let probe = match raw.probe_secs {
        None => DEFAULT_PROBE,
        Some(0) => {
            return Err((
                "metrics.probe_secs".into(),
                "must be at least 1 (seconds between probes of what the nodes serve)".into(),
            ));
        }
        Some(s) => Duration::from_secs(s),
    };
    Ok(MetricsConfig { listen, probe })
}

/// One endpoint serving a leaf certfleet stored, from the last probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub certificate: String,
    pub node: String,
    /// The service's name in the node's agent config.
    pub service: String,
    /// The address probed ("127.0.0.3:8443").
    pub endpoint: String,
    /// The served leaf's notAfter (Unix seconds).
    pub not_after: i64,
}

/// One node's answer for a certificate, from the last probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProbe {
    pub certificate: String,
    pub node: String,
    /// The version installed on disk; `None`: the node did not answer.
    pub version: Option<u32>,
}

/// What the last probe of every certificate found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probed {
    /// When it finished (Unix seconds); `None` before the first.
    pub at: Option<i64>,
    pub served: Vec<Served>,
    pub nodes: Vec<NodeProbe>,
}

/// One configured certificate, as read at the scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateState {
    pub name: String,
    /// The live version and its notAfter, once one was issued.
    pub live: Option<(u32, i64)>,
    /// The latest rollout: succeeded (`None` while it runs), and when it
    /// finished (or started, while it runs).
    pub rollout: Option<(Option<bool>, i64)>,
    /// Consecutive renewal failures and when the next attempt is due, when
    /// the renewal scheduler tracks it.
    pub renewal: Option<(u32, i64)>,
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub probed: Probed,
    pub certificates: Vec<CertificateState>,
    /// Mails waiting in the outbox, and when the oldest was queued.
    pub outbox: (u64, Option<i64>),
    pub approvals_pending: u64,
}

type Labels = Vec<(&'static str, String)>;

/// A gauge family registered under `name`.
fn family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    registry.register(name, help, f.clone());
    f
}

/// A gauge without labels, registered under `name` with `value`.
fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn set(f: &Family<Labels, Gauge>, labels: Labels, value: i64) {
    f.get_or_create(&labels).set(value);
}

/// The OpenMetrics text of `s`.
pub fn encode(s: &Snapshot) -> String {
    let mut r = Registry::default();
    let served = family(
        &mut r,
        "certfleet_certificate_expiration_timestamp_seconds",
        "When the certificate an endpoint serves expires (notAfter, Unix seconds), as last probed",
    );
    let version = family(
        &mut r,
        "certfleet_certificate_version",
        "The certificate version installed on the node's disk, as last probed",
    );
    let answered = family(
        &mut r,
        "certfleet_node_probe_success",
        "Whether the node answered the last probe (1) or not (0)",
    );
    let live_version = family(
        &mut r,
        "certfleet_certificate_live_version",
        "The certificate's live version in the coordinator's store",
    );
    let live_expiry = family(
        &mut r,
        "certfleet_certificate_live_expiration_timestamp_seconds",
        "When the live version expires (notAfter, Unix seconds)",
    );
    let rollout_ok = family(
        &mut r,
        "certfleet_rollout_last_success",
        "Whether the latest finished rollout reached every node (1) or halted or failed (0)",
    );
    let rollout_at = family(
        &mut r,
        "certfleet_rollout_last_timestamp_seconds",
        "When the latest rollout finished, or started while it runs (Unix seconds)",
    );
    let failures = family(
        &mut r,
        "certfleet_renewal_failures",
        "Renewal attempts that failed in a row since the last success",
    );
    let next = family(
        &mut r,
        "certfleet_renewal_next_timestamp_seconds",
        "When the next renewal attempt is due (Unix seconds)",
    );

    let p = &s.probed;
    for e in &p.served {
        let labels = vec![
            ("certificate", e.certificate.clone()),
            ("node", e.node.clone()),
            ("service", e.service.clone()),
            ("endpoint", e.endpoint.clone()),
        ];
        set(&served, labels, e.not_after);
    }
    for n in &p.nodes {
        let labels = vec![
            ("certificate", n.certificate.clone()),
            ("node", n.node.clone()),
        ];
        if let Some(v) = n.version {
            set(&version, labels.clone(), i64::from(v));
        }
        set(&answered, labels, i64::from(n.version.is_some()));
    }
    if let Some(at) = p.at {
        gauge(
            &mut r,
            "certfleet_probe_timestamp_seconds",
            "When the nodes were last probed for what they serve (Unix seconds)",
            at,
        );
    }
    for c in &s.certificates {
        let labels = vec![("certificate", c.name.clone())];
        if let Some((v, not_after)) = c.live {
            set(&live_version, labels.clone(), i64::from(v));
            set(&live_expiry, labels.clone(), not_after);
        }
        if let Some((ok, at)) = c.rollout {
            if let Some(ok) = ok {
                set(&rollout_ok, labels.clone(), i64::from(ok));
            }
            set(&rollout_at, labels.clone(), at);
        }
        if let Some((f, due)) = c.renewal {
            set(&failures, labels.clone(), i64::from(f));
            set(&next, labels, due);
        }
    }
    gauge(
        &mut r,
        "certfleet_outbox_pending",
        "Mails to the administrators not yet taken by the SMTP server",
        s.outbox.0 as i64,
    );
    if let Some(oldest) = s.outbox.1 {
        gauge(
            &mut r,
            "certfleet_outbox_oldest_pending_timestamp_seconds",
            "When the oldest mail still waiting in the outbox was queued (Unix seconds)",
            oldest,
        );
    }
    gauge(
        &mut r,
        "certfleet_approvals_pending",
        "Approval requests waiting for a person's decision",
        s.approvals_pending as i64,
    );
    let mut out = String::new();
    text::encode(&mut out, &r).expect("writing to a String never fails");
    out
}

/// What the `/metrics` endpoint reads from: the fleet, the renewal
/// scheduler (when renewals are on) and the last probe.
#[derive(Clone)]
pub struct Source {
    pub fleet: Arc<Fleet>,
    pub renewals: Option<Arc<FleetScheduler>>,
    pub probed: Arc<Mutex<Probed>>,
}

impl Source {
    /// Reads everything a scrape shows. A part that cannot be read (the
    /// registry is locked by a long write, a stored version is damaged) is
    /// left out and logged, so the rest is still exposed.
    pub fn snapshot(&self) -> Snapshot {
        let db = self.fleet.db();
        let entries = self
            .renewals
            .as_ref()
            .map(|s| s.entries())
            .unwrap_or_default();
        let certificates = self
            .fleet
            .config()
            .certificates
            .iter()
            .map(|c| {
                let name = &c.name;
                let live = match self.fleet.live(name) {
                    Ok(l) => l.map(|s| (s.version, s.bundle.not_after)),
                    Err(e) => {
                        tracing::warn!(certificate = %name, error = %e, "metrics: reading the live version");
                        None
                    }
                };
                let rollout = db
                    .latest_rollout(name)
                    .and_then(|r| match r {
                        Some(r) => Ok(db.rollout_times(r.id)?.map(|(started, finished)| {
                            let ok = r.outcome.map(|o| o == RolloutOutcome::Ok);
                            (ok, finished.unwrap_or(started))
                        })),
                        None => Ok(None),
                    })
                    .unwrap_or_else(|e| {
                        tracing::warn!(certificate = %name, error = %e, "metrics: reading the latest rollout");
                        None
                    });
                let renewal = entries
                    .iter()
                    .find(|e| e.name == *name)
                    .map(|e| (e.failures, e.next));
                CertificateState {
                    name: name.clone(),
                    live,
                    rollout,
                    renewal,
                }
            })
            .collect();
        let outbox = db.outbox_waiting().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "metrics: reading the outbox");
            (0, None)
        });
        let approvals_pending = db.pending_approvals().map_or_else(
            |e| {
                tracing::warn!(error = %e, "metrics: reading pending approvals");
                0
            },
            |p| p.len() as u64,
        );
        Snapshot {
            probed: self
                .probed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            certificates,
            outbox,
            approvals_pending,
        }
    }
}

/// Probes what every node serves every `every` into `into`, until `stop`.
pub async fn probe_until(
    fleet: Arc<Fleet>,
    every: Duration,
    into: Arc<Mutex<Probed>>,
    stop: CancellationToken,
) {
    loop {
        let probed = tokio::select! {
            p = probe(&fleet) => p,
            () = stop.cancelled() => return,
        };
        *into.lock().unwrap_or_else(|e| e.into_inner()) = probed;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One probe of every certificate that has a live version.
async fn probe(fleet: &Fleet) -> Probed {
    let mut out = Probed::default();
    let names: Vec<String> = fleet
        .config()
        .certificates
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for name in names {
        if !matches!(fleet.live(&name), Ok(Some(_))) {
            continue;
        }
        let status = match crate::status::status(fleet, &name).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(certificate = %name, error = %e, "metrics: probing the nodes");
                continue;
            }
        };
        out.nodes.extend(status.nodes.iter().map(|node| NodeProbe {
            certificate: name.clone(),
            node: node.node.clone(),
            version: node.result.as_ref().ok().map(|a| a.version),
        }));
        out.served.extend(
            status
                .served_leaves(fleet, &name)
                .into_iter()
                .map(|leaf| Served {
                    certificate: name.clone(),
                    node: leaf.node.to_owned(),
                    service: leaf.endpoint.service.clone(),
                    endpoint: leaf.endpoint.address.clone(),
                    not_after: leaf.not_after,
                }),
        );
    }
    out.at = Some(clock::now());
    out
}

/// Serves `/metrics` on `listener` and probes the nodes every
/// `config.probe`, until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Source,
    config: MetricsConfig,
    stop: CancellationToken,
) {
    let probing = tokio::spawn(probe_until(
        Arc::clone(&source.fleet),
        config.probe,
        Arc::clone(&source.probed),
        stop.clone(),
    ));
    let render: certfleet_proto::metrics::Render = Arc::new(move || encode(&source.snapshot()));
    certfleet_proto::metrics::serve(listener, render, stop.cancelled()).await;
    let _ = probing.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            probed: Probed {
                at: Some(1_700_000_100),
                served: vec![Served {
                    certificate: "cn".into(),
                    node: "n0".into(),
                    service: "nginx".into(),
                    endpoint: "127.0.0.3:8443".into(),
                    not_after: 1_707_776_000,
                }],
                nodes: vec![
                    NodeProbe {
                        certificate: "cn".into(),
                        node: "n0".into(),
                        version: Some(2),
                    },
                    NodeProbe {
                        certificate: "cn".into(),
                        node: "n1".into(),
                        version: None,
                    },
                ],
            },
            certificates: vec![
                CertificateState {
                    name: "cn".into(),
                    live: Some((2, 1_707_776_000)),
                    rollout: Some((Some(false), 1_700_000_050)),
                    renewal: Some((3, 1_700_003_600)),
                },
                CertificateState {
                    name: "never-issued".into(),
                    ..Default::default()
                },
            ],
            outbox: (2, Some(1_699_990_000)),
            approvals_pending: 1,
        }
    }

    /// The series lines of `text` (no comments), sorted.
    fn series(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        lines.sort_unstable();
        lines
    }

    #[test]
    fn a_snapshot_is_encoded_series_by_series() {
        let text = encode(&sample());
        assert_eq!(
            series(&text),
            [
                "certfleet_approvals_pending 1",
                r#"certfleet_certificate_expiration_timestamp_seconds{certificate="cn",node="n0",service="nginx",endpoint="127.0.0.3:8443"} 1707776000"#,
                r#"certfleet_certificate_live_expiration_timestamp_seconds{certificate="cn"} 1707776000"#,
                r#"certfleet_certificate_live_version{certificate="cn"} 2"#,
                r#"certfleet_certificate_version{certificate="cn",node="n0"} 2"#,
                r#"certfleet_node_probe_success{certificate="cn",node="n0"} 1"#,
                r#"certfleet_node_probe_success{certificate="cn",node="n1"} 0"#,
                "certfleet_outbox_oldest_pending_timestamp_seconds 1699990000",
                "certfleet_outbox_pending 2",
                "certfleet_probe_timestamp_seconds 1700000100",
                r#"certfleet_renewal_failures{certificate="cn"} 3"#,
                r#"certfleet_renewal_next_timestamp_seconds{certificate="cn"} 1700003600"#,
                r#"certfleet_rollout_last_success{certificate="cn"} 0"#,
                r#"certfleet_rollout_last_timestamp_seconds{certificate="cn"} 1700000050"#,
            ]
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE certfleet_certificate_expiration_timestamp_seconds gauge"),
            "{text}"
        );
    }

    #[test]
    fn what_is_not_known_is_left_out_rather_than_zero() {
        let text = encode(&Snapshot::default());
        assert_eq!(
            series(&text),
            [
                "certfleet_approvals_pending 0",
                "certfleet_outbox_pending 0"
            ]
        );
        // A running rollout has a time but no result yet.
        let mut s = Snapshot::default();
        s.certificates.push(CertificateState {
            name: "cn".into(),
            rollout: Some((None, 5)),
            ..Default::default()
        });
        let text = encode(&s);
        assert!(!text.contains("certfleet_rollout_last_success{"), "{text}");
        assert!(
            text.contains(r#"certfleet_rollout_last_timestamp_seconds{certificate="cn"} 5"#),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = Snapshot::default();
        s.certificates.push(CertificateState {
            name: "a\"b\\c".into(),
            live: Some((1, 7)),
            ..Default::default()
        });
        let text = encode(&s);
        assert!(
            text.contains(r#"certfleet_certificate_live_version{certificate="a\"b\\c"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn the_config_names_the_key_that_is_wrong() {
        let raw = |listen: &str, probe_secs| RawMetricsConfig {
            listen: listen.into(),
            probe_secs,
        };
        let c = validate_config(raw("127.0.0.1:9464", None)).unwrap();
        assert_eq!(c.probe, DEFAULT_PROBE);
        assert_eq!(c.listen, "127.0.0.1:9464".parse().unwrap());
        let (key, reason) = validate_config(raw("localhost", None)).unwrap_err();
        assert_eq!(key, "metrics.listen");
        assert!(reason.contains("\"localhost\""), "{reason}");
        let (key, _) = validate_config(raw("127.0.0.1:9464", Some(0))).unwrap_err();
        assert_eq!(key, "metrics.probe_secs");
    }
}
