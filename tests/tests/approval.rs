//! Approvals: a certificate with `approval = "distribute"` stores a new
//! version and waits for a person before anything reaches the nodes.
//!
//! Real parts throughout: Pebble issues, agents install, every node's
//! nginx serves TLS, aiosmtpd receives the mail, and the page is opened in
//! headless chromium through chromedriver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::browser::Browser;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS};
use certfleet_tests::net::free_port;
use certfleet_tests::nginx::Nginx;
use certfleet_tests::process::eventually;
use certfleet_tests::smtp::{Mode, Smtp};
use certfleet_tests::verify::served_leaf_sha256;
use fantoccini::Locator;
use serde_json::Value;

const SNI: &str = "cn.dataone.test";
const ADMIN: &str = "admins@dataone.test";
const MAIL_WAIT: Duration = Duration::from_secs(60);

struct Fleet {
    cluster: Cluster,
    _nginx: Vec<Nginx>,
    /// The page's address, when `[web]` is on.
    web: Option<SocketAddr>,
    smtp: Option<Smtp>,
    _smtp_dir: tempfile::TempDir,
    v1: String,
}

/// Every node serves version 1 (issued and distributed by hand); the
/// certificate then needs approval before a new version is distributed.
async fn fleet(nodes: usize, web: bool, mail: bool, approval_extra: &str) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let smtp = if mail {
        Some(Smtp::start(dir.path(), Mode::Plain).await.unwrap())
    } else {
        None
    };
    let web_addr = web.then(|| {
        let ip = "127.0.0.1".parse().unwrap();
        SocketAddr::new(ip, free_port(ip))
    });
    let mut extra = "approval = \"distribute\"\nrestart_batch = 1\n".to_owned();
    extra.push_str(approval_extra);
    if let Some(addr) = web_addr {
        extra.push_str(&format!(
            "\n[web]\nlisten = \"{addr}\"\nbase_url = \"https://{addr}\"\n"
        ));
    }
    if let Some(s) = &smtp {
        extra.push_str(&s.config(&[ADMIN], ""));
    }
    let (cluster, nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: extra,
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = live_sha(&cluster);
    for i in 0..nodes {
        assert_eq!(served(&cluster, i).await, v1);
    }
    Fleet {
        cluster,
        _nginx: nginx,
        web: web_addr,
        smtp,
        _smtp_dir: dir,
        v1,
    }
}

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

fn on_disk_sha(cluster: &Cluster, i: usize) -> String {
    let dir = &cluster.nodes[i].dir;
    let chain = std::fs::read_to_string(dir.join("ssl/certs/cn.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

async fn served(cluster: &Cluster, i: usize) -> String {
    let addr = SocketAddr::new(cluster.nodes[i].ip, cluster.tls_port);
    served_leaf_sha256(addr, SNI).await.unwrap()
}

/// `certfleet --json approvals`, one object per request.
async fn approvals(c: &Cluster) -> Vec<Value> {
    let out = c.ctl(&["--json", "approvals"]).await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    out.json_lines()
}

/// Issues version 2 and returns its pending request.
async fn issue_v2(c: &Cluster) -> Value {
    let out = c.ctl(&["issue", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}\n{}", out.stdout, out.stderr, c.logs());
    assert!(
        out.stdout
            .contains("version 2 waits for approval before it is distributed"),
        "{}",
        out.stdout
    );
    let pending: Vec<Value> = approvals(c)
        .await
        .into_iter()
        .filter(|a| a["state"] == "pending")
        .collect();
    assert_eq!(pending.len(), 1, "{pending:#?}");
    let a = pending[0].clone();
    assert_eq!(a["version"], 2);
    assert_eq!(a["step"], "rollout");
    a
}

/// Every node serves `sha` (and has it on disk).
async fn all_serve(c: &Cluster, sha: &str) {
    for i in 0..c.nodes.len() {
        assert_eq!(on_disk_sha(c, i), sha, "node {} on disk", c.nodes[i].name);
        assert_eq!(served(c, i).await, sha, "node {} serves", c.nodes[i].name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn approved_from_the_cli_the_rollout_runs() {
    let f = fleet(2, false, false, "").await;
    let c = &f.cluster;
    let request = issue_v2(c).await;
    let id = request["id"].as_str().unwrap();
    let names: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
    // One node per batch, in the configured order.
    assert_eq!(
        request["batches"],
        serde_json::json!([[names[0]], [names[1]]])
    );
    // Stored, not distributed.
    let v2 = live_sha(c);
    assert_ne!(v2, f.v1);
    all_serve(c, &f.v1).await;
    let text = c.ctl(&["approvals"]).await.unwrap().stdout;
    assert!(text.contains(&format!("certfleet approve {id}")), "{text}");
    keep_sample("approvals", &format!("$ certfleet approvals\n{text}"));

    let out = c
        .ctl(&["approve", id, "--comment", "change CHG-1"])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{}\n{}\n{}", out.stdout, out.stderr, c.logs());
    assert!(out.stdout.contains("approved by uid 0"), "{}", out.stdout);
    keep_sample(
        "approve",
        &format!(
            "$ certfleet approve {id} --comment 'change CHG-1'\n{}",
            out.stdout
        ),
    );
    all_serve(c, &v2).await;
    let decided = approvals(c).await;
    let a = decided.iter().find(|a| a["id"] == id).unwrap();
    assert_eq!(a["state"], "approved");
    assert_eq!(a["decided_by"], "uid 0");
    assert_eq!(a["comment"], "change CHG-1");
    assert_eq!(a["outcome"], "ok");
    // Once only.
    let again = c.ctl(&["approve", id]).await.unwrap();
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(
        again.stderr.contains("approved already"),
        "{}",
        again.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_request_distributes_nothing() {
    let f = fleet(2, false, false, "").await;
    let c = &f.cluster;
    let request = issue_v2(c).await;
    let id = request["id"].as_str().unwrap();
    let out = c
        .ctl(&["reject", id, "--comment", "not during the freeze"])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("stays stored"), "{}", out.stdout);
    // The nodes keep version 1; version 2 stays the store's live version.
    all_serve(c, &f.v1).await;
    let certs = c.ctl(&["--json", "certificates"]).await.unwrap();
    assert!(certs.stdout.contains("\"version\":2"), "{}", certs.stdout);
    let out = c.ctl(&["approve", id]).await.unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("rejected already"), "{}", out.stderr);
}

/// Keeps `text` in `target/tmp/mail-samples/NAME.txt`, for the README.
fn keep_sample(name: &str, text: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mail-samples");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.txt")), text);
}

/// The approval link from the mail's text.
fn link_in(text: &str) -> String {
    text.split_whitespace()
        .find(|w| w.starts_with("https://") && w.contains("/approve/"))
        .unwrap_or_else(|| panic!("no link in the mail:\n{text}"))
        .to_owned()
}

/// A GET of `url` over TLS that trusts only the cluster CA and expects the
/// coordinator's identity: (status, body).
async fn get_as_cluster_client(c: &Cluster, addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (connector, name) = c.coordinator_tls(&[]);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

/// Where the test keeps what it shows (the screenshot).
fn artifact_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/approval")
}

#[tokio::test(flavor = "multi_thread")]
async fn approved_on_the_mailed_page_in_a_browser() {
    let f = fleet(2, true, true, "").await;
    let c = &f.cluster;
    let smtp = f.smtp.as_ref().unwrap();
    let web = f.web.unwrap();
    let request = issue_v2(c).await;
    let id = request["id"].as_str().unwrap();

    let mails = smtp
        .wait_for("approval needed: cn version 2", MAIL_WAIT)
        .await
        .unwrap();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.rcpt_to(), [ADMIN]);
    let serial = request["serial"].as_str().unwrap();
    for fact in [
        "Certificate: cn",
        "Version: 2",
        &format!("Serial: {serial}"),
        "Not after: ",
        &format!("1. {}", c.nodes[0].name),
        &format!("2. {}", c.nodes[1].name),
        &format!("certfleet approve {id}"),
        "expires at",
        "Cluster: ",
    ] {
        // Facts are aligned in columns: compare with single spaces.
        let text = mail
            .text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains(fact), "{fact:?} not in\n{}", mail.text);
    }
    let link = link_in(&mail.text);
    assert!(
        link.starts_with(&format!("https://{web}/approve/{id}.")),
        "{link}"
    );
    // The README's sample, without the link's secret.
    let secret = link.rsplit('.').next().unwrap();
    keep_sample("approval-mail", &mail.text.replace(secret, "<secret>"));
    assert!(
        mail.html.contains(&format!("href=\"{link}\"")),
        "{}",
        mail.html
    );
    let path = link.trim_start_matches(&format!("https://{web}"));

    // The page is served with the coordinator's cluster identity, and a
    // GET (a mail scanner) decides nothing.
    let (status, body) = get_as_cluster_client(c, web, path).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Approve") && body.contains(serial), "{body}");
    assert_eq!(approvals(c).await[0]["state"], "pending");
    all_serve(c, &f.v1).await;

    let browser = Browser::start(&c.dir.path().join("browser")).await.unwrap();
    browser.client.goto(&link).await.unwrap();
    let plan = browser
        .client
        .find(Locator::Id("plan"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = |name: &str| {
        plan.find(name)
            .unwrap_or_else(|| panic!("{name} not in {plan}"))
    };
    assert!(
        at(&c.nodes[0].name) < at(&c.nodes[1].name),
        "the plan lists the nodes in order: {plan}"
    );
    let page = browser.client.source().await.unwrap();
    assert!(page.contains("name=\"viewport\""), "{page}");
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/approval-page.png");
    browser
        .screenshot(&[&artifact_dir().join("approval-page.png"), &docs])
        .await
        .unwrap();
    browser
        .client
        .find(Locator::Id("comment"))
        .await
        .unwrap()
        .send_keys("from my phone")
        .await
        .unwrap();
    browser
        .client
        .find(Locator::Id("approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let result = browser
        .client
        .wait()
        .for_element(Locator::Id("result"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(result.starts_with("Approved."), "{result}");
    browser
        .screenshot(&[&artifact_dir().join("approval-approved.png")])
        .await
        .unwrap();

    // The rollout runs in the coordinator; every node ends up serving v2.
    let v2 = live_sha(c);
    eventually("the rollout to finish", Duration::from_secs(60), || async {
        let a = approvals(c).await.into_iter().find(|a| a["id"] == id)?;
        (a["outcome"] == "ok").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    all_serve(c, &v2).await;
    let a = approvals(c)
        .await
        .into_iter()
        .find(|a| a["id"] == id)
        .unwrap();
    assert_eq!(a["decided_by"], "the one-time link (from 127.0.0.1)");
    // The rollout it ran is journaled as the link's.
    let history = c.ctl(&["history", "cn"]).await.unwrap().stdout;
    assert!(
        history.contains("rollout version 2 by the one-time link (from 127.0.0.1)"),
        "{history}"
    );
    assert_eq!(a["comment"], "from my phone");

    // The link replayed: a clear page, HTTP 410, nothing decided again.
    browser.client.goto(&link).await.unwrap();
    let title = browser
        .client
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(title, "This link was used already");
    let (status, body) = get_as_cluster_client(c, web, path).await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("approved by the one-time link"), "{body}");
    // A guessed token is as unknown as a missing one.
    let guessed = format!("/approve/{id}.{}", "A".repeat(43));
    let (status, body) = get_as_cluster_client(c, web, &guessed).await;
    assert_eq!(status, 404, "{body}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_request_is_reminded_refused_and_mailed() {
    let f = fleet(2, false, true, "\n[approval]\nexpires_after_secs = 6\n").await;
    let c = &f.cluster;
    let smtp = f.smtp.as_ref().unwrap();
    let request = issue_v2(c).await;
    let id = request["id"].as_str().unwrap();
    let reminder = smtp
        .wait_for("reminder: approval needed: cn version 2", MAIL_WAIT)
        .await
        .unwrap();
    assert!(
        reminder[0]
            .text
            .contains(&format!("certfleet approve {id}"))
    );
    let expired = smtp
        .wait_for("approval expired: cn version 2", MAIL_WAIT)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert!(expired[0].text.contains("refused"), "{}", expired[0].text);
    keep_sample("approval-reminder", &reminder[0].text);
    keep_sample("approval-expired", &expired[0].text);
    let a = approvals(c)
        .await
        .into_iter()
        .find(|a| a["id"] == id)
        .unwrap();
    assert_eq!(a["state"], "expired");
    assert_eq!(a["reminded"], true);
    let out = c.ctl(&["approve", id]).await.unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("expired"), "{}", out.stderr);
    all_serve(c, &f.v1).await;
}
