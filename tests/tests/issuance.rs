//! Issuance scenarios against a real Pebble, real agents on loopback, the
//! real coordinator and the real CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Http01};
use certfleet_tests::pebble::PebbleOptions;
use certfleet_tests::verify::chain_verifies;

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asserts an issue run succeeded and returns its certificate JSON.
fn issued(cluster: &Cluster, out: &certfleet_tests::cluster::CtlOutput) -> serde_json::Value {
    let last = out.last_json();
    assert_eq!(
        (out.code, last["stage"].as_str()),
        (0, Some("done")),
        "issue failed: stdout:\n{}\nstderr:\n{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
    last["certificate"].clone()
}

/// Challenge fetches with `status` (e.g. `" 200 "`) in every node's
/// nginx access log.
fn challenge_fetches(cluster: &Cluster, status: &str) -> usize {
    cluster
        .nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(n.dir.join("nginx/access.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("/.well-known/acme-challenge/") && l.contains(status))
                .count()
        })
        .sum()
}

async fn assert_no_tokens_left(cluster: &Cluster) {
    for node in &cluster.nodes {
        if node.agent.is_some() {
            let tokens = node.tokens().await.unwrap();
            assert!(
                tokens.is_empty(),
                "node {} still serves {tokens:?}",
                node.name
            );
        }
        assert!(
            node.webroot_files().is_empty(),
            "node {} webroot still holds {:?}",
            node.name,
            node.webroot_files()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn issues_one_certificate_for_a_four_node_cluster() {
    // The shared name resolves to the second node, not the first.
    let cluster = Cluster::start(ClusterSpec {
        shared_node: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(cluster.sans.len(), 5);

    let out = cluster.issue().await.unwrap();
    let cert = issued(&cluster, &out);
    assert_eq!(cert["version"], 1);

    // Progress reached the CLI per node, for placement and self-check.
    let events = out.json_lines();
    for node in &cluster.nodes {
        for stage in ["placement", "self-check"] {
            assert!(
                events.iter().any(|e| e["stage"] == stage
                    && e["node"] == node.name.as_str()
                    && e["ok"] == true),
                "no successful {stage} event for {}: {}",
                node.name,
                out.stdout
            );
        }
    }

    // live/ points at version 1, in certbot's layout, and the chain verifies
    // against Pebble's root for every name.
    let live = cluster.live_dir();
    assert_eq!(
        std::fs::read_link(live.join("fullchain.pem")).unwrap(),
        PathBuf::from(format!("../../archive/{CERT}/fullchain1.pem"))
    );
    let fullchain = read(live.join("fullchain.pem"));
    let key = read(live.join("privkey.pem"));
    let root = cluster.pebble.root_pem().await.unwrap();
    chain_verifies(&fullchain, &root, &cluster.sans).unwrap();
    let bundle = Bundle::parse(&fullchain, Some(&key), &cluster.sans).unwrap();
    assert_eq!(cert["serial"], bundle.serial.as_str());
    assert_eq!(read(live.join("cert.pem")), bundle.leaf_pem);
    let key_mode = std::fs::metadata(
        cluster
            .state_dir
            .join(format!("archive/{CERT}/privkey1.pem")),
    )
    .unwrap()
    .permissions()
    .mode();
    assert_eq!(key_mode & 0o777, 0o600, "private key mode");
    let account_dir = cluster.state_dir.join("acme");
    for entry in std::fs::read_dir(&account_dir).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "account credentials mode");
    }
    assert_no_tokens_left(&cluster).await;

    // A second issue gives version 2 and moves live/ to it.
    let out = cluster.issue().await.unwrap();
    let cert2 = issued(&cluster, &out);
    assert_eq!(cert2["version"], 2);
    assert_ne!(cert2["serial"], cert["serial"]);
    let fullchain2 = read(live.join("fullchain.pem"));
    let bundle2 = Bundle::parse(
        &fullchain2,
        Some(&read(live.join("privkey.pem"))),
        &cluster.sans,
    )
    .unwrap();
    assert_eq!(cert2["serial"], bundle2.serial.as_str());
    assert!(
        cluster
            .state_dir
            .join(format!("archive/{CERT}/cert1.pem"))
            .exists()
    );

    // `certificates` lists what is live.
    let out = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], CERT);
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[0]["sans"].as_array().unwrap().len(), 5);
    assert!(list[0]["days_left"].as_i64().unwrap() > 0);
    let out = cluster.ctl(&["certificates"]).await.unwrap();
    assert!(out.stdout.contains(&bundle2.serial), "{}", out.stdout);

    // An unknown certificate is a usage error that names it.
    let out = cluster.ctl(&["issue", "no-such-cert"]).await.unwrap();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("no-such-cert"), "{}", out.stderr);
}

/// The order's authorizations as Pebble reports them, read with the
/// coordinator's own account.
async fn authorization_statuses(
    cluster: &Cluster,
    order_url: &str,
) -> Vec<instant_acme::AuthorizationStatus> {
    let acme_dir = cluster.state_dir.join("acme");
    let creds_path = std::fs::read_dir(&acme_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let creds: instant_acme::AccountCredentials =
        serde_json::from_slice(&std::fs::read(creds_path).unwrap()).unwrap();
    let account = instant_acme::Account::builder_with_root(&cluster.pebble.listener_ca)
        .unwrap()
        .from_credentials(creds)
        .await
        .unwrap();
    let mut order = account.order(order_url.to_owned()).await.unwrap();
    let mut statuses = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        statuses.push(authz.unwrap().status);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_down_aborts_before_the_ca_is_asked_and_leaves_no_token() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    let down = 2;
    cluster.nodes[down].stop_agent();
    let (name, addr) = (cluster.nodes[down].name.clone(), cluster.nodes[down].grpc);

    let out = cluster.issue().await.unwrap();
    assert_eq!(
        out.code, 1,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    let last = out.last_json();
    assert_eq!(last["stage"], "failed");
    assert_eq!(last["error"]["kind"], "node");
    assert_eq!(last["error"]["node"], name.as_str());
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&name) && message.contains(&addr.to_string()),
        "error does not name {name} ({addr}): {message}"
    );
    // The human-readable output names it too.
    assert!(out.stdout.contains(&name));

    // No challenge was answered: every authorization is still pending.
    let order_url = last["error"]["order_url"].as_str().unwrap();
    assert!(!order_url.is_empty());
    let statuses = authorization_statuses(&cluster, order_url).await;
    assert_eq!(statuses.len(), cluster.sans.len());
    assert!(
        statuses
            .iter()
            .all(|s| *s == instant_acme::AuthorizationStatus::Pending),
        "{statuses:?}"
    );
    // The other nodes got their tokens back off.
    assert_no_tokens_left(&cluster).await;
    assert!(!cluster.live_dir().exists(), "a failed order wrote live/");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_failing_the_self_check_aborts_before_the_ca_is_asked() {
    // cn-orc-1's HTTP-01 address (as registered) points where nothing
    // listens: its agent accepts tokens, but the CA could never fetch them.
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let unused = cluster.subnet.unused();
    let unused_text = unused.to_string();
    cluster
        .readd_node(2, &["--http01", &unused_text])
        .await
        .unwrap();

    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    let last = out.last_json();
    assert_eq!(last["error"]["kind"], "self_check");
    assert_eq!(last["error"]["node"], "cn-orc-1");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&unused.to_string()) && message.contains("/.well-known/acme-challenge/"),
        "{message}"
    );
    let statuses =
        authorization_statuses(&cluster, last["error"]["order_url"].as_str().unwrap()).await;
    assert!(
        statuses
            .iter()
            .all(|s| *s == instant_acme::AuthorizationStatus::Pending),
        "{statuses:?}"
    );
    assert_no_tokens_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_injected_nonce_rejection_and_authorization_reuse() {
    let cluster = Cluster::start(ClusterSpec {
        pebble: PebbleOptions {
            nonce_reject: 50,
            authz_reuse: 50,
            external_account: None,
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let mut reused_seen = false;
    for version in 1..=5 {
        let out = cluster.issue().await.unwrap();
        let cert = issued(&cluster, &out);
        assert_eq!(cert["version"], version);
        let order = out
            .json_lines()
            .into_iter()
            .find(|e| e["stage"] == "order")
            .unwrap();
        reused_seen |= !order["message"]
            .as_str()
            .unwrap()
            .contains(" 0 already valid");
    }
    // With 50% reuse over five orders of five names, some were reused; the
    // flow must have skipped them rather than re-validating.
    assert!(reused_seen, "no authorization was reused in five orders");
    let fullchain = read(cluster.live_dir().join("fullchain.pem"));
    let root = cluster.pebble.root_pem().await.unwrap();
    chain_verifies(&fullchain, &root, &cluster.sans).unwrap();
    assert_no_tokens_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn issues_through_nginx_serving_the_webroot() {
    let cluster = Cluster::start(ClusterSpec {
        http01: Http01::WebrootNginx,
        ..Default::default()
    })
    .await
    .unwrap();
    let out = cluster.issue().await.unwrap();
    let cert = issued(&cluster, &out);
    assert_eq!(cert["version"], 1);
    // Pebble fetched the tokens from nginx: its access logs show them.
    let fetched = challenge_fetches(&cluster, "\" 200 ");
    assert!(
        fetched >= cluster.sans.len(),
        "nginx served {fetched} challenge fetches"
    );
    let fullchain = read(cluster.live_dir().join("fullchain.pem"));
    chain_verifies(
        &fullchain,
        &cluster.pebble.root_pem().await.unwrap(),
        &cluster.sans,
    )
    .unwrap();
    assert_no_tokens_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_self_check_follows_an_http_to_https_redirect_as_the_ca_does() {
    // Every node's nginx answers plain HTTP with 301 to HTTPS only, and
    // serves the webroot there: the self-check must follow the redirect,
    // as Pebble (and Let's Encrypt) do, rather than refuse the node.
    let cluster = Cluster::start(ClusterSpec {
        http01: Http01::WebrootNginxHttps,
        ..Default::default()
    })
    .await
    .unwrap();
    let out = cluster.issue().await.unwrap();
    let cert = issued(&cluster, &out);
    assert_eq!(cert["version"], 1);
    let (redirected, served) = (
        challenge_fetches(&cluster, "\" 301 "),
        challenge_fetches(&cluster, "\" 200 "),
    );
    assert!(
        redirected >= cluster.sans.len() && served >= cluster.sans.len(),
        "expected redirected and served challenge fetches: {redirected} redirected, {served} served"
    );
    assert_no_tokens_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_account_is_made_until_the_operator_accepts_the_terms() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let config = std::fs::read_to_string(&cluster.config_path)
        .unwrap()
        .replace("agree_tos = true\n", "");
    std::fs::write(&cluster.config_path, config).unwrap();
    cluster.coordinator.take();
    cluster.start_coordinator().await.unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    // Pebble's directory names its terms as a data: URL.
    assert!(
        said.contains("terms of service have not been accepted")
            && said.contains("data:text/plain")
            && said.contains("acme.agree_tos = true"),
        "{said}"
    );
    assert!(
        !cluster.state_dir.join("acme").exists()
            || std::fs::read_dir(cluster.state_dir.join("acme"))
                .unwrap()
                .count()
                == 0
    );
    // Terms accepted for another CA's directory are not these.
    let acme = cluster.state_dir.join("acme");
    std::fs::create_dir_all(&acme).unwrap();
    let marker = acme.join("terms-of-service-agreed");
    std::fs::write(
        &marker,
        "accepted for https://acme-staging.example/directory\n",
    )
    .unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("terms of service have not been accepted"),
        "{said}"
    );
    // `init --agree-tos` records the choice; the next issue makes the account.
    let init = std::process::Command::new(certfleet_tests::process::bin("certfleet-coordinator"))
        .arg("--config")
        .arg(&cluster.config_path)
        .args(["init", "--agree-tos"])
        .output()
        .unwrap();
    // On a cluster that has its CA, init only records the agreement, for
    // this CA's directory, beside the one recorded before.
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let recorded = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(
        recorded,
        format!(
            "accepted for https://acme-staging.example/directory\naccepted for {}\n",
            cluster.pebble.directory_url()
        )
    );
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cas_problem_document_reaches_the_cli_unchanged() {
    // Every node serves every token (the self-check passes), but DNS sends
    // cn-unm-1's name somewhere else, so the CA's own fetch fails.
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        shared_node: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    cluster
        .pebble
        .add_a("cn-unm-1.dataone.test", cluster.subnet.unused())
        .await
        .unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    let error = &out.last_json()["error"];
    assert_eq!(error["kind"], "acme");
    assert_eq!(error["acme_type"], "urn:ietf:params:acme:error:connection");
    let detail = error["acme_detail"].as_str().unwrap();
    assert!(detail.contains("cn-unm-1.dataone.test"), "{detail}");
    // The human output shows the same type and detail.
    let out = cluster.ctl(&["issue", CERT]).await.unwrap();
    assert!(
        out.stderr
            .contains("CA problem type:   urn:ietf:params:acme:error:"),
        "{}",
        out.stderr
    );
    assert_no_tokens_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn issues_with_an_rsa_key_when_configured() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        coordinator_extra: "key = \"rsa-2048\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = cluster.issue().await.unwrap();
    issued(&cluster, &out);
    let key = read(cluster.live_dir().join("privkey.pem"));
    let pair = rcgen::KeyPair::from_pem(&key).unwrap();
    assert!(
        pair.is_compatible(&rcgen::PKCS_RSA_SHA256),
        "not an RSA key"
    );
    let fullchain = read(cluster.live_dir().join("fullchain.pem"));
    Bundle::parse(&fullchain, Some(&key), &cluster.sans).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn binds_an_external_account_and_guards_its_key() {
    const KID: &str = "kid-1";
    const MAC: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        pebble: PebbleOptions {
            external_account: Some((KID, MAC)),
            ..Default::default()
        },
        coordinator_extra: format!(
            "\n[acme.external_account]\nkey_id = \"{KID}\"\nhmac_key = \"{MAC}\"\n"
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    // Pebble requires the binding: issuing works only because it is sent.
    let out = cluster.issue().await.unwrap();
    issued(&cluster, &out);

    // The same config, readable by every user, stops the coordinator.
    cluster.coordinator.take();
    std::fs::set_permissions(&cluster.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(certfleet_tests::process::bin("certfleet-coordinator"))
        .arg("--config")
        .arg(&cluster.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&cluster.config_path.display().to_string())
            && stderr.contains("acme.external_account.hmac_key")
            && stderr.contains("readable by every user"),
        "{stderr}"
    );
    assert!(!stderr.contains(MAC), "the refusal shows the key");
    assert!(
        !cluster.coordinator_log().contains(MAC),
        "the key reached the log"
    );
}

/// A CA having a bad hour rejects most nonces. Each rejection carries a
/// fresh nonce, so the coordinator sends the request again for as long as
/// the step's time allows. (100 orders in a row at 90% all succeed; see
/// BENCHMARKS.md.)
#[tokio::test(flavor = "multi_thread")]
async fn ten_orders_in_a_row_succeed_while_the_ca_rejects_nine_nonces_in_ten() {
    let cluster = Cluster::start(ClusterSpec {
        pebble: PebbleOptions {
            nonce_reject: 90,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    for version in 1..=10 {
        // Past the rate-limit guard's five: this is about nonces.
        let out = cluster
            .ctl(&["--json", "issue", "cn", "--force"])
            .await
            .unwrap();
        let cert = issued(&cluster, &out);
        assert_eq!(cert["version"], version);
    }
    let fullchain = read(cluster.live_dir().join("fullchain.pem"));
    let root = cluster.pebble.root_pem().await.unwrap();
    chain_verifies(&fullchain, &root, &cluster.sans).unwrap();
    assert_no_tokens_left(&cluster).await;
}
