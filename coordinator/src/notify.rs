//! What the coordinator tells the administrators, by mail.
//!
//! Flows hand a [`Mail`] to the fleet's [`Notifier`]; it goes into the
//! durable outbox (`db::outbox`) and is delivered from there (`mail`).
//! Without a `[mail]` section nothing is queued and the mail is only
//! logged.
//!
//! Every mail is plain text with an HTML alternative made from the same
//! facts by [`render`], names the cluster (in the subject, which
//! [`Notifier::send`] prefixes, and in the body, which
//! [`Notifier::compose`] starts with) and the certificate. A mail never
//! carries a secret: no key, credential, join token or approval token
//! other than the approval link meant for its recipients.
//!
//! The mails the flows send are built here, one function each, so that a
//! hook in a flow is one line: [`issued`], [`issue_failed`],
//! [`rolled_out`], [`rollout_failed`], [`expiring`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use certfleet_proto::clock;
use tokio::sync::Notify;

use crate::config::Running;
use crate::db::{Db, NewMail};
use crate::fleet::{Fleet, Operation};
use crate::issue::{Failed, IssueError};
use crate::mail::Serving;
use crate::progress::Stage;
use crate::rollout::{Restarted, RolloutError};
use crate::store::Stored;

/// One message about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// The certificate it is about (its configured extra recipients get it
    /// too).
    pub certificate: String,
    pub subject: String,
    /// The plain-text body.
    pub text: String,
    /// The HTML alternative.
    pub html: String,
}

/// Queues mail for the administrators. `Default`: no `[mail]` section;
/// mail is logged only.
#[derive(Debug, Default)]
pub struct Notifier {
    outbox: Option<Outbox>,
}

/// Where mail goes when `[mail]` is configured.
struct Outbox {
    db: Arc<Db>,
    cluster: String,
    admins: Vec<String>,
    /// Where each certificate's own recipients (`certificates[].mail`)
    /// are read at each mail, so a reload's are used from the next one.
    config: Running,
    /// The domain of `Message-ID`s: the `From:` address's.
    domain: String,
    /// Wakes the delivery loop when a mail is queued.
    wake: Arc<Notify>,
}

impl Notifier {
    /// The notifier the running `config` asks for; mail is queued in `db`.
    /// (`[mail]` itself is read once: a reload does not change it.)
    pub fn new(running: &Running, db: Arc<Db>) -> Self {
        let config = running.get();
        let Some(mail) = &config.mail else {
            return Self::default();
        };
        Self {
            outbox: Some(Outbox {
                db,
                cluster: mail
                    .cluster
                    .clone()
                    .unwrap_or_else(|| config.enrollment.advertise.clone()),
                admins: mail.admins.clone(),
                config: running.clone(),
                domain: mail
                    .from
                    .rsplit_once('@')
                    .map(|(_, d)| d.trim_end_matches('>').to_owned())
                    .unwrap_or_else(|| "certfleet.invalid".into()),
                wake: Arc::new(Notify::new()),
            }),
        }
    }

    /// The cluster's name as mail shows it; `None` without `[mail]`.
    pub fn cluster(&self) -> Option<&str> {
        self.outbox.as_ref().map(|o| o.cluster.as_str())
    }

    /// What the delivery loop waits on; `None` without `[mail]`.
    pub fn wake(&self) -> Option<Arc<Notify>> {
        self.outbox.as_ref().map(|o| Arc::clone(&o.wake))
    }

    /// A mail about `certificate`: [`render`] of `facts` and `paragraphs`
    /// under `title`, after the cluster and the certificate. The subject
    /// gets the cluster when sent.
    pub fn compose(
        &self,
        certificate: &str,
        subject: impl Into<String>,
        title: &str,
        facts: &[(&str, String)],
        paragraphs: &[String],
    ) -> Mail {
        let mut all = vec![
            (
                "Cluster",
                self.cluster().unwrap_or("(no [mail] section)").to_owned(),
            ),
            ("Certificate", certificate.to_owned()),
        ];
        all.extend(facts.iter().cloned());
        let (text, html) = render(title, &all, paragraphs);
        Mail {
            certificate: certificate.to_owned(),
            subject: subject.into(),
            text,
            html,
        }
    }

    /// Queues `mail` for the admins and the certificate's own recipients,
    /// its subject prefixed with the cluster. Never fails nor waits for
    /// SMTP: a mail that cannot be queued is logged, and the operation
    /// that sends it goes on.
    pub fn send(&self, mail: Mail) {
        self.queue(mail, None);
    }

    /// Like [`send`](Self::send), but a mail with the same `key` is queued
    /// only once (ever: put the day in the key for once a day).
    pub fn send_once(&self, mail: Mail, key: &str) {
        self.queue(mail, Some(key));
    }

    fn queue(&self, mail: Mail, dedup: Option<&str>) {
        let Some(o) = &self.outbox else {
            tracing::info!(
                certificate = mail.certificate,
                subject = mail.subject,
                "mail (no [mail] section: not sent)"
            );
            return;
        };
        let mut recipients = o.admins.clone();
        let config = o.config.get();
        let own = config
            .certificate(&mail.certificate)
            .map(|c| c.mail.as_slice());
        for r in own.unwrap_or_default() {
            if !recipients.contains(r) {
                recipients.push(r.clone());
            }
        }
        if recipients.is_empty() {
            tracing::warn!(
                certificate = mail.certificate,
                subject = mail.subject,
                "mail has no recipient (set mail.admins or the certificate's mail): not queued"
            );
            return;
        }
        let subject = format!("[certfleet {}] {}", o.cluster, mail.subject);
        let message_id = message_id(&o.domain);
        let new = NewMail {
            message_id: &message_id,
            certificate: &mail.certificate,
            subject: &subject,
            recipients: &recipients,
            text: &mail.text,
            html: &mail.html,
            dedup,
        };
        match o.db.enqueue_mail(&new, clock::now()) {
            Ok(Some(id)) => {
                tracing::info!(id, certificate = mail.certificate, subject, "mail queued");
                o.wake.notify_one();
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                certificate = mail.certificate,
                subject,
                error = %e,
                "cannot queue mail"
            ),
        }
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("cluster", &self.cluster)
            .field("admins", &self.admins)
            .finish_non_exhaustive()
    }
}

/// A `Message-ID` unique to this mail, kept across its retries.
fn message_id(domain: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "<certfleet.{nanos}.{}.{}@{domain}>",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A mail body as plain text and as HTML, from the same parts: a title,
/// facts as label/value rows, and paragraphs (each may span lines). The
/// HTML escapes every part and needs no stylesheet or script: mail
/// clients strip both.
///
/// Text:
/// ```text
/// Title
/// =====
///
/// Label:        value
/// Longer label: value
///
/// Paragraph.
/// ```
pub fn render(title: &str, facts: &[(&str, String)], paragraphs: &[String]) -> (String, String) {
    let width = facts
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    let mut text = format!("{title}\n{}\n\n", "=".repeat(title.chars().count()));
    for (label, value) in facts {
        let label = format!("{label}:");
        // A value over several lines stays under its column.
        let value = value.replace('\n', &format!("\n{}", " ".repeat(width + 1)));
        text.push_str(&format!("{label:<width$} {value}\n", width = width));
    }
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\n\
         <body style=\"font-family:sans-serif\">\n<h2>{t}</h2>\n",
        t = escape(title)
    );
    if !facts.is_empty() {
        html.push_str("<table cellpadding=\"4\">\n");
        for (label, value) in facts {
            html.push_str(&format!(
                "<tr><th align=\"left\" valign=\"top\">{}</th><td><code>{}</code></td></tr>\n",
                escape(label),
                escape(value).replace('\n', "<br>")
            ));
        }
        html.push_str("</table>\n");
    }
    for p in paragraphs {
        text.push('\n');
        text.push_str(p);
        text.push('\n');
        html.push_str(&format!("<p>{}</p>\n", escape(p).replace('\n', "<br>")));
    }
    html.push_str("</body></html>\n");
    (text, html)
}

/// `s` safe inside HTML text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "2030-01-02T03:04:05Z (1825 days left)".
fn expiry(not_after: i64) -> String {
    format!(
        "{} ({} days left)",
        clock::rfc3339(not_after),
        days_left(not_after)
    )
}

/// Whole days from now until `not_after`; negative once it has passed.
fn days_left(not_after: i64) -> i64 {
    (not_after - clock::now()).div_euclid(86_400)
}

/// What the fleet serves now, for a failure mail: the live version and
/// its days left.
fn served_now(fleet: &Fleet, name: &str) -> String {
    match fleet.live(name) {
        Ok(Some(s)) => format!(
            "version {}, serial {}, not after {}",
            s.version,
            s.bundle.serial,
            expiry(s.bundle.not_after)
        ),
        Ok(None) => "none: no version was stored yet".into(),
        Err(e) => format!("unknown: {e}"),
    }
}

/// A version was stored: issued by hand (`operation` Issue) or renewed.
pub fn issued(fleet: &Fleet, operation: Operation, stored: &Stored) {
    let verb = if operation == Operation::Renew {
        "renewed"
    } else {
        "issued"
    };
    let n = fleet.notifier();
    let b = &stored.bundle;
    let mail = n.compose(
        &stored.name,
        format!("{}: version {} {verb}", stored.name, stored.version),
        &format!("Certificate {} {verb}", stored.name),
        &[
            ("Version", stored.version.to_string()),
            ("Serial", b.serial.clone()),
            ("Names", b.sans.join("\n")),
            ("Not before", clock::rfc3339(b.not_before)),
            ("Not after", expiry(b.not_after)),
            ("Leaf SHA-256", b.leaf_sha256_hex()),
        ],
        &[format!(
            "The new version is stored; the nodes serve it once it is distributed \
             and their services restarted (`certfleet rollout {}`), which a renewal \
             does by itself when the certificate's after_issue says so.",
            stored.name
        )],
    );
    n.send(mail);
}

/// Where a failure happened, for the failure mail.
struct Failure {
    node: String,
    step: String,
    problem: Option<(String, String)>,
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Order => "order",
        Stage::Placement => "placement",
        Stage::SelfCheck => "self-check",
        Stage::Validation => "validation",
        Stage::Finalize => "finalize",
        Stage::Store => "store",
        Stage::Cleanup => "cleanup",
        Stage::Distribute => "distribute",
        Stage::Restart => "restart",
        Stage::Rollback => "rollback",
    }
}

impl Failure {
    fn of_issue(e: &IssueError) -> Self {
        let problem = e.problem().map(|p| {
            (
                p.r#type.clone().unwrap_or_else(|| "(none)".into()),
                p.detail.clone().unwrap_or_else(|| "(none)".into()),
            )
        });
        match e {
            IssueError::Nodes { stage, errors } => {
                let mut nodes: Vec<&str> = errors.iter().map(|e| e.node()).collect();
                nodes.dedup();
                Self {
                    node: nodes.join(", "),
                    step: stage_name(*stage).into(),
                    problem,
                }
            }
            IssueError::Acme { context, .. } => Self {
                node: "none (the CA refused)".into(),
                step: format!("ACME {context}"),
                problem,
            },
            _ => Self {
                node: "none (the coordinator)".into(),
                step: "order".into(),
                problem,
            },
        }
    }

    fn of_rollout(e: &RolloutError) -> Self {
        let (node, step) = match e {
            RolloutError::Halted {
                node,
                service,
                step,
                ..
            } => (node.clone(), format!("service {service}: {step}")),
            RolloutError::Distribute(d) => {
                let nodes = d.nodes();
                let node = if nodes.is_empty() {
                    "none (the coordinator)".into()
                } else {
                    nodes.join(", ")
                };
                (node, "distribute".into())
            }
            _ => ("none (the coordinator)".into(), "rollout".into()),
        };
        Self {
            node,
            step,
            problem: None,
        }
    }
}

fn send_failure(fleet: &Fleet, name: &str, what: &str, failure: Failure, error: String) {
    let n = fleet.notifier();
    let mut facts = vec![
        ("What failed", what.to_owned()),
        ("Node", failure.node.clone()),
        ("Step", failure.step.clone()),
    ];
    if let Some((kind, detail)) = failure.problem {
        facts.push(("CA problem type", kind));
        facts.push(("CA problem detail", detail));
    }
    facts.push(("Serving now", served_now(fleet, name)));
    let mail = n.compose(
        name,
        format!(
            "{name}: {what} FAILED at {} on {}",
            failure.step, failure.node
        ),
        &format!("{what} of {name} failed"),
        &facts,
        &[format!("The error, in full:\n{error}")],
    );
    n.send(mail);
}

/// An issue or renewal of `name` failed.
pub fn issue_failed(fleet: &Fleet, name: &str, operation: Operation, failed: &Failed) {
    let mut error = failed.error.to_string();
    if let Some(url) = &failed.order_url {
        error.push_str(&format!("\norder: {url}"));
    }
    send_failure(
        fleet,
        name,
        &capitalised(operation),
        Failure::of_issue(&failed.error),
        error,
    );
}

/// A rollout or restart of `name` failed (and halted).
pub fn rollout_failed(fleet: &Fleet, name: &str, operation: Operation, e: &RolloutError) {
    send_failure(
        fleet,
        name,
        &capitalised(operation),
        Failure::of_rollout(e),
        e.to_string(),
    );
}

/// Distributing a renewed version of `name` failed.
pub fn distribute_failed(fleet: &Fleet, name: &str, e: &crate::distribute::DistributeError) {
    let nodes = e.nodes();
    let failure = Failure {
        node: if nodes.is_empty() {
            "none (the coordinator)".into()
        } else {
            nodes.join(", ")
        },
        step: "distribute".into(),
        problem: None,
    };
    send_failure(fleet, name, "Distribution", failure, e.to_string());
}

fn capitalised(operation: Operation) -> String {
    let s = operation.to_string();
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => s,
    }
}

/// A rollout or restart of `name` finished: every node was verified to
/// serve the live version's leaf.
pub fn rolled_out(fleet: &Fleet, name: &str, operation: Operation, done: &Restarted) {
    let n = fleet.notifier();
    let (sha, not_after) = match fleet.live(name) {
        Ok(Some(s)) if s.version == done.version => {
            (s.bundle.leaf_sha256_hex(), Some(s.bundle.not_after))
        }
        _ => ("(the live version changed since)".into(), None),
    };
    let mut facts = vec![("Version", done.version.to_string())];
    if let Some(t) = not_after {
        facts.push(("Not after", expiry(t)));
    }
    let nodes: Vec<String> = done
        .nodes
        .iter()
        .map(|node| format!("{node}: serves leaf SHA-256 {sha}"))
        .collect();
    facts.push(("Verified", nodes.join("\n")));
    let mail = n.compose(
        name,
        format!(
            "{name}: {operation} of version {} finished on {} nodes",
            done.version,
            done.nodes.len()
        ),
        &format!("{} of {name} finished", capitalised(operation)),
        &facts,
        &[
            "Each node above was restarted and then probed: the leaf it serves has the \
           SHA-256 fingerprint shown (`certfleet status` shows the same)."
                .to_owned(),
        ],
    );
    n.send(mail);
}

/// Nodes serve leaves of `name` that expire within `days`: one warning
/// per leaf a day, naming each node and endpoint serving it.
pub fn expiring(fleet: &Fleet, name: &str, days: u32, serving: &[Serving]) {
    let n = fleet.notifier();
    let today = clock::now().div_euclid(86_400);
    let mut leaves: Vec<&str> = serving.iter().map(|s| s.leaf_sha256.as_str()).collect();
    leaves.sort_unstable();
    leaves.dedup();
    for leaf in leaves {
        let on: Vec<&Serving> = serving.iter().filter(|s| s.leaf_sha256 == leaf).collect();
        let first = on[0];
        let left = days_left(first.not_after);
        let nodes: Vec<String> = on
            .iter()
            .map(|s| format!("{}: {}", s.node, s.endpoints.join(", ")))
            .collect();
        let version = first
            .version
            .map_or_else(|| "unknown".into(), |v| v.to_string());
        let mail = n.compose(
            name,
            format!(
                "{name}: {} node(s) serve a certificate that expires in {left} days",
                on.len()
            ),
            &format!("Certificate {name} expires in {left} days"),
            &[
                ("Version served", version),
                ("Leaf SHA-256", leaf.to_owned()),
                ("Not after", expiry(first.not_after)),
                ("Served by", nodes.join("\n")),
                (
                    "Warning threshold",
                    format!("{days} days (mail.expiry_warning_days)"),
                ),
            ],
            &[format!(
                "The coordinator's own probe found these nodes serving it. Renew with \
                 `certfleet renew {name}` and roll it out with `certfleet rollout {name}`; \
                 `certfleet status {name}` shows what each node serves."
            )],
        );
        n.send_once(mail, &format!("expiry {name} {leaf} day {today}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn text_and_html_carry_the_same_facts_and_html_is_escaped() {
        let (text, html) = render(
            "Certificate cn issued",
            &[
                ("Version", "2".into()),
                ("Names", "a.example.org\nb.example.org".into()),
            ],
            &["Run `certfleet rollout cn` <now> & then check.".into()],
        );
        assert_eq!(
            text,
            "Certificate cn issued\n=====================\n\n\
             Version: 2\n\
             Names:   a.example.org\n         b.example.org\n\n\
             Run `certfleet rollout cn` <now> & then check.\n"
        );
        assert!(html.contains("<th align=\"left\" valign=\"top\">Names</th><td><code>a.example.org<br>b.example.org</code></td>"));
        assert!(html.contains("<p>Run `certfleet rollout cn` &lt;now&gt; &amp; then check.</p>"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn without_mail_compose_still_names_cluster_and_certificate() {
        let m = Notifier::default().compose("cn", "s", "T", &[("Version", "1".into())], &[]);
        assert!(m.text.contains("Certificate: cn\n"), "{}", m.text);
        assert!(m.text.contains("Cluster:"), "{}", m.text);
        // Sending without [mail] only logs.
        Notifier::default().send(m);
    }

    #[test]
    fn queued_mail_goes_to_admins_and_the_certificates_own_recipients_once() {
        let config = Config::from_toml_str(
            r#"
[acme]
directory = "https://localhost:14000/dir"
[enrollment]
listen = "127.0.0.1:7444"
[mail]
smtp = "smtp://127.0.0.1:2525"
from = "certfleet@example.org"
admins = ["ops@example.org", "web@example.org"]
cluster = "dataone"
[[certificates]]
name = "cn"
sans = ["cn.example.org"]
mail = ["web@example.org", "cn-owner@example.org"]
"#,
            "test.toml",
        )
        .unwrap();
        let db = Arc::new(Db::in_memory().unwrap());
        let running = Running::new(Arc::new(config.clone()));
        let n = Notifier::new(&running, Arc::clone(&db));
        assert_eq!(n.cluster(), Some("dataone"));
        n.send(n.compose("cn", "hello", "T", &[], &[]));
        let queued = db.outbox(0).unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].subject, "[certfleet dataone] hello");
        assert_eq!(
            queued[0].recipients,
            ["ops@example.org", "web@example.org", "cn-owner@example.org"]
        );
        assert!(queued[0].message_id.ends_with("@example.org>"));
        n.send_once(n.compose("cn", "x", "T", &[], &[]), "k");
        n.send_once(n.compose("cn", "x", "T", &[], &[]), "k");
        assert_eq!(db.outbox(0).unwrap().len(), 2);
        // A reloaded config's recipients get the next mail.
        let mut reloaded = config.clone();
        reloaded.certificates[0].mail = vec!["new-owner@example.org".into()];
        running.update(|_| (Some(reloaded), ()));
        n.send(n.compose("cn", "after", "T", &[], &[]));
        let queued = db.outbox(0).unwrap();
        let after = queued
            .iter()
            .find(|m| m.subject.ends_with("after"))
            .unwrap();
        assert_eq!(
            after.recipients,
            [
                "ops@example.org",
                "web@example.org",
                "new-owner@example.org"
            ]
        );
    }
}
