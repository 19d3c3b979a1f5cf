//! Mail to the administrators through a real SMTP server (Debian's
//! aiosmtpd writing a maildir), from a real coordinator driven by the real
//! CLI against Pebble: what each mail says, in every transport mode, and
//! that the outbox holds mail through an SMTP outage and a restart.

use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_proto::clock;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS};
use certfleet_tests::smtp::{Mode, Received, Smtp};
use serde_json::Value;

const ADMINS: [&str; 2] = ["ops@example.org", "oncall@example.org"];
/// The certificate's own extra recipient (`certificates[].mail`).
const OWNER: &str = "cn-owner@example.org";
const CLUSTER: &str = "dataone-test";
const WAIT: Duration = Duration::from_secs(60);

/// The coordinator config for `smtp`: the certificate's own recipient
/// (this lands inside `[[certificates]]`), then `[mail]`.
fn mail_config(smtp: &Smtp, extra: &str) -> String {
    format!(
        "mail = [\"{OWNER}\"]\n{}",
        smtp.config(&ADMINS, &format!("cluster = \"{CLUSTER}\"\n{extra}"))
    )
}

fn spec(smtp: &Smtp, nodes: usize, extra: &str) -> ClusterSpec {
    ClusterSpec {
        nodes,
        coordinator_extra: mail_config(smtp, extra),
        ..Default::default()
    }
}

/// The live version's bundle.
fn live(cluster: &Cluster) -> Bundle {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap()
}

fn days_left(not_after: i64) -> i64 {
    (not_after - clock::now()).div_euclid(86_400)
}

/// `certfleet --json outbox`, one object per mail.
async fn outbox(cluster: &Cluster) -> Vec<Value> {
    let out = cluster.ctl(&["--json", "outbox"]).await.unwrap();
    assert_eq!(
        out.code, 0,
        "certfleet outbox: {}{}",
        out.stdout, out.stderr
    );
    out.json_lines()
}

/// Keeps `m` as a sample (headers that matter, then the text part) in
/// `target/tmp/mail-samples/NAME.txt`, for the README.
fn keep(m: &Received, name: &str) {
    let mut sample = String::new();
    for h in ["From", "To", "Subject", "X-RcptTo"] {
        sample.push_str(&format!("{h}: {}\n", m.header(h).unwrap_or_default()));
    }
    sample.push('\n');
    sample.push_str(&m.text);
    keep_text(&sample, name);
}

fn keep_text(text: &str, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mail-samples");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.txt")), text);
}

/// The value of fact `label` in a mail's text (`Label:   value`).
fn fact<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")))
        .map(str::trim)
}

/// Every recipient, the subject naming the cluster, both alternatives,
/// and no secret.
fn assert_envelope(m: &Received, subject: &str) {
    let mut want: Vec<String> = ADMINS.iter().map(|s| s.to_string()).collect();
    want.push(OWNER.to_owned());
    assert_eq!(m.rcpt_to(), want, "recipients of {}", m.subject());
    assert!(
        m.subject().starts_with(&format!("[certfleet {CLUSTER}] "))
            && m.subject().contains(subject),
        "subject {:?}",
        m.subject()
    );
    assert_eq!(m.content_type, "multipart/alternative");
    assert!(m.header("Message-ID").is_some());
    for body in [&m.text, &m.html] {
        assert!(body.contains(CLUSTER), "no cluster in {body}");
        assert!(!body.contains("PRIVATE KEY"), "a key in {body}");
    }
    assert_eq!(fact(&m.text, "Cluster"), Some(CLUSTER), "{}", m.text);
    assert_eq!(fact(&m.text, "Certificate"), Some(CERT), "{}", m.text);
}

/// The issued mail states the version, serial, names and not-after of
/// what was stored, in the text and in the HTML.
fn assert_issued_mail(cluster: &Cluster, m: &Received) {
    let b = live(cluster);
    assert_envelope(m, &format!("{CERT}: version 1 issued"));
    let not_after = clock::rfc3339(b.not_after);
    for fact in [b.serial.clone(), not_after.clone(), b.leaf_sha256_hex()] {
        assert!(m.text.contains(&fact), "{fact} not in text:\n{}", m.text);
        assert!(m.html.contains(&fact), "{fact} not in html:\n{}", m.html);
    }
    assert_eq!(fact(&m.text, "Version"), Some("1"), "{}", m.text);
    for san in &cluster.sans {
        assert!(
            m.text.contains(san.as_str()),
            "{san} not in text:\n{}",
            m.text
        );
        assert!(m.html.contains(san.as_str()), "{san} not in html");
    }
}

async fn issued_mail_arrives(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path(), mode).await.unwrap();
    let cluster = Cluster::start(spec(&smtp, 2, "")).await.unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(
        out.code,
        0,
        "{}{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
    let got = smtp
        .wait_for(&format!("{CERT}: version 1 issued"), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.coordinator_log()));
    assert_eq!(got.len(), 1);
    assert_issued_mail(&cluster, &got[0]);
    keep(&got[0], "issued");
    let listed = outbox(&cluster).await;
    assert_eq!(listed[0]["state"], "sent", "{listed:?}");
    assert!(listed[0]["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issued_mail_is_delivered_over_plain_smtp() {
    issued_mail_arrives(Mode::Plain).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issued_mail_is_delivered_over_starttls() {
    issued_mail_arrives(Mode::StartTls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issued_mail_is_delivered_over_smtps() {
    issued_mail_arrives(Mode::Smtps).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_waits_out_smtp_down_and_a_restart_and_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    // The server's port is chosen, but nothing listens yet.
    let mut smtp = Smtp::new(dir.path(), Mode::StartTls).unwrap();
    let mut cluster = Cluster::start(spec(&smtp, 2, "")).await.unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(
        out.code, 0,
        "the issue proceeds: {}{}",
        out.stdout, out.stderr
    );

    // It waits, and `certfleet outbox` says why.
    let waiting = certfleet_tests::process::eventually("a failed attempt", WAIT, || async {
        let listed = outbox(&cluster).await;
        let m = listed.first()?.clone();
        (m["attempts"].as_u64()? >= 1).then_some(m)
    })
    .await
    .unwrap();
    assert_eq!(waiting["state"], "waiting");
    let error = waiting["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("smtp+starttls://127.0.0.1:{}", smtp.port)),
        "{error}"
    );
    let text = cluster.ctl(&["outbox"]).await.unwrap().stdout;
    assert!(text.contains("WAITING") && text.contains(error), "{text}");

    // The coordinator stops, SMTP comes up, the coordinator starts again.
    cluster
        .coordinator
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(10));
    smtp.run().await.unwrap();
    cluster.start_coordinator().await.unwrap();
    let got = smtp
        .wait_for(&format!("{CERT}: version 1 issued"), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.coordinator_log()));
    assert_issued_mail(&cluster, &got[0]);
    // Exactly one copy, now and after the delivery loop had time to err.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = smtp.messages().unwrap();
    assert_eq!(
        all.len(),
        1,
        "{:?}",
        all.iter().map(|m| m.subject()).collect::<Vec<_>>()
    );
    let listed = outbox(&cluster).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["state"], "sent");
    // The failed attempts before the restart stay on record.
    assert!(listed[0]["attempts"].as_u64().unwrap() >= 1, "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_issue_mails_the_node_the_step_and_the_days_left() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path(), Mode::Plain).await.unwrap();
    let mut cluster = Cluster::start(spec(&smtp, 3, "")).await.unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let v1 = live(&cluster);

    cluster.nodes[1].stop_agent();
    let down = cluster.nodes[1].name.clone();
    let out = cluster.issue().await.unwrap();
    assert_ne!(out.code, 0, "the issue should fail: {}", out.stdout);
    let got = smtp
        .wait_for("FAILED", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.coordinator_log()));
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_envelope(m, &format!("{CERT}: Issue FAILED at placement on {down}"));
    let left = days_left(v1.not_after);
    for fact in [
        down.clone(),
        "placement".to_owned(),
        format!("version 1, serial {}", v1.serial),
        format!("({left} days left)"),
    ] {
        assert!(m.text.contains(&fact), "{fact} not in:\n{}", m.text);
        assert!(m.html.contains(&fact), "{fact} not in html:\n{}", m.html);
    }
    keep(m, "failure");
    assert_eq!(fact(&m.text, "Node"), Some(down.as_str()), "{}", m.text);
    assert_eq!(fact(&m.text, "Step"), Some("placement"), "{}", m.text);
    // The agent's address and the transport's reason, unchanged.
    assert!(
        m.text.contains(&cluster.nodes[1].grpc.to_string()),
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_asked_for_is_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    // A server that offers no STARTTLS, named as smtp+starttls://.
    let plain = Smtp::start(dir.path(), Mode::Plain).await.unwrap();
    let mut config = mail_config(&plain, "");
    config = config.replace("smtp = \"smtp://", "smtp = \"smtp+starttls://");
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        coordinator_extra: config,
        ..Default::default()
    })
    .await
    .unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let waiting = certfleet_tests::process::eventually("a failed attempt", WAIT, || async {
        let listed = outbox(&cluster).await;
        let m = listed.first()?.clone();
        (m["attempts"].as_u64()? >= 1).then_some(m)
    })
    .await
    .unwrap();
    assert_eq!(waiting["state"], "waiting");
    let error = waiting["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("smtp+starttls://127.0.0.1:{}", plain.port))
            && error.contains("STARTTLS is not supported on this server")
            && error.contains("nothing is sent in the clear"),
        "{error}"
    );
    let text = cluster.ctl(&["outbox"]).await.unwrap().stdout;
    assert!(
        text.contains("WAITING") && text.contains("STARTTLS"),
        "{text}"
    );
    keep_text(&text, "outbox-starttls");
    // Nothing reached the server in the clear.
    assert!(plain.messages().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_and_an_expiring_certificate_are_mailed() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path(), Mode::Plain).await.unwrap();
    // Pebble's certificates live 5 years: a 2000-day threshold catches them.
    let (cluster, _nginx) = Cluster::serving_version_1(ClusterSpec {
        agent_certificates: NGINX_TARGETS.to_owned(),
        ..spec(
            &smtp,
            2,
            "expiry_warning_days = 2000\nexpiry_check_secs = 2\n",
        )
    })
    .await
    .unwrap();
    let v1 = live(&cluster);
    let sha = v1.leaf_sha256_hex();

    let out = cluster.ctl(&["rollout", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let got = smtp
        .wait_for("rollout of version 1 finished", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.coordinator_log()));
    let m = &got[0];
    keep(m, "rollout");
    assert_envelope(
        m,
        &format!("{CERT}: rollout of version 1 finished on 2 nodes"),
    );
    for node in &cluster.nodes {
        let line = format!("{}: serves leaf SHA-256 {sha}", node.name);
        assert!(m.text.contains(&line), "{line} not in:\n{}", m.text);
        assert!(m.html.contains(&line), "{line} not in html");
    }

    let got = smtp
        .wait_for("serve a certificate that expires in", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.coordinator_log()));
    let m = &got[0];
    keep(m, "expiry");
    let left = days_left(v1.not_after);
    assert_envelope(
        m,
        &format!("{CERT}: 2 node(s) serve a certificate that expires in {left} days"),
    );
    for node in &cluster.nodes {
        let endpoint = format!("{}: nginx {}:{}", node.name, node.ip, cluster.tls_port);
        assert!(m.text.contains(&endpoint), "{endpoint} not in:\n{}", m.text);
    }
    assert!(m.text.contains(&sha), "{}", m.text);
    assert!(m.text.contains("2000 days"), "{}", m.text);
    // Probes every 2 s, but one warning per leaf a day.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let warnings = smtp
        .messages()
        .unwrap()
        .into_iter()
        .filter(|m| m.subject().contains("expires in"))
        .count();
    assert_eq!(warnings, 1);
}
