//! Trust between the coordinator and the agents, through the real
//! processes and real TLS: who may call whom, how nodes join and renew, and
//! what is refused (each refusal asserted by what it says).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certfleet_coordinator::db::Db;
use certfleet_proto::identity::{
    COORDINATOR_IDENTITY, ExpectIdentity, LiveIdentity, client_config, node_identity,
};
use certfleet_proto::pb;
use certfleet_proto::pb::enrollment_client::EnrollmentClient;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Credentials, join};
use certfleet_tests::process::{bin, eventually};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

async fn cluster(nodes: usize) -> Cluster {
    Cluster::start(ClusterSpec {
        nodes,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Waits until the agent's log says `needle` (refusals are logged as the
/// handshake fails, a moment after the client sees the connection drop).
async fn agent_logged(cluster: &Cluster, node: usize, needle: &str) {
    let log = cluster.nodes[node].dir.join("agent.log");
    let found = eventually(
        &format!("{needle:?} in {}", log.display()),
        Duration::from_secs(5),
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|text| text.contains(needle))
                    .map(|_| ())
            }
        },
    )
    .await;
    if let Err(e) = found {
        panic!(
            "{e}\n--- agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Waits (bounded) until the wall clock passes `unix` (a certificate's or
/// token's expiry that the test needs behind it).
/// Waits (bounded) until the file at `path` no longer holds `first`;
/// returns what it holds then.
async fn changed(what: &str, path: &Path, first: &str) -> String {
    eventually(what, Duration::from_secs(30), || async move {
        std::fs::read_to_string(path)
            .ok()
            .filter(|now| now != first)
    })
    .await
    .unwrap()
}

async fn wait_past(what: &str, unix: i64, timeout: Duration) {
    eventually(what, timeout, || async move {
        (unix_now() > unix).then_some(())
    })
    .await
    .unwrap();
}

/// A CSR for `node`'s identity on a fresh key.
fn csr_for(node: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    CertificateParams::new(vec![node_identity(node)])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

/// The call never reached the service: the connection was refused during
/// the TLS handshake (hyper reports the alert as a transport error).
fn assert_tls_refused(err: &tonic::Status) {
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    assert!(
        [
            "transport error",
            "h2 protocol error",
            "operation was canceled"
        ]
        .iter()
        .any(|m| err.message().contains(m)),
        "{err:?}"
    );
}

/// A CA that is not the cluster's, and a certificate from it that claims
/// to be the coordinator.
fn foreign_coordinator() -> Credentials {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "some other CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![COORDINATOR_IDENTITY.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Credentials {
        chain_pem: format!("{}{}", cert.pem(), ca.pem()),
        key_pem: key.serialize_pem(),
        ca_pem: ca.pem(),
    }
}

/// A certificate for `node` signed by the real cluster CA (read from the
/// coordinator's state, as only root could), already expired.
fn expired_node_identity(state_dir: &Path, node: &str) -> String {
    let ca_pem = std::fs::read_to_string(state_dir.join("ca/ca.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(state_dir.join("ca/ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![node_identity(node)]).unwrap();
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(2 * 86_400)).into();
    params.not_after = (now - Duration::from_secs(86_400)).into();
    let cert = params.signed_by(&key, &issuer).unwrap();
    format!("{}{}", key.serialize_pem(), cert.pem())
}

/// An Enrollment client presenting `creds` (or nothing).
fn enrollment_client(
    cluster: &Cluster,
    creds: Option<&Credentials>,
) -> EnrollmentClient<tonic::transport::Channel> {
    let ca_pem = std::fs::read_to_string(cluster.state_dir.join("ca/ca.pem")).unwrap();
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    let verifier = ExpectIdentity::new(&ca, COORDINATOR_IDENTITY.to_owned()).unwrap();
    let identity =
        creds.map(|c| Arc::new(LiveIdentity::from_pem(&c.chain_pem, &c.key_pem).unwrap()));
    let config = client_config(Arc::new(verifier), identity).unwrap();
    EnrollmentClient::new(certfleet_proto::tls::channel(
        cluster.enrollment,
        Arc::new(config),
        COORDINATOR_IDENTITY,
    ))
}

/// Writes an agent config for a node that is not part of the harness's set.
fn extra_agent_config(cluster: &Cluster, name: &str) -> PathBuf {
    let dir = cluster.dir.path().join("extra").join(name);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "node = \"{name}\"\nstate_dir = \"{}\"\n[grpc]\nlisten = \"127.0.0.1:1\"\n[http01]\nmode = \"standalone\"\nlisten = \"127.0.0.1:1\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_accept_only_the_coordinator() {
    let cluster = cluster(2).await;
    let status = pb::GetStatusRequest {};

    // The coordinator's own identity works (the control case).
    let ok = cluster.nodes[1]
        .client()
        .await
        .unwrap()
        .get_status(status)
        .await
        .unwrap();
    assert_eq!(ok.into_inner().node, "cn-unm-1");

    // A plaintext client.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.nodes[1].grpc))
            .unwrap()
            .connect_lazy();
    let err = certfleet_proto::pb::agent_client::AgentClient::new(plain)
        .get_status(status)
        .await
        .unwrap_err();
    assert_tls_refused(&err);
    agent_logged(&cluster, 1, "refused a TLS connection").await;
    agent_logged(&cluster, 1, "corrupt message").await;

    // No client certificate.
    let err = cluster.nodes[1]
        .client_as(None)
        .unwrap()
        .get_status(status)
        .await
        .unwrap_err();
    assert_tls_refused(&err);
    agent_logged(&cluster, 1, "peer sent no certificates").await;

    // A certificate from another CA claiming to be the coordinator.
    let foreign = foreign_coordinator();
    let err = cluster.nodes[1]
        .client_as(Some(&foreign))
        .unwrap()
        .get_status(status)
        .await
        .unwrap_err();
    assert_tls_refused(&err);
    agent_logged(&cluster, 1, "UnknownIssuer").await;

    // Node cn-ucsb-1's own certificate used to call cn-unm-1's agent.
    let neighbour = Credentials::node(&cluster.nodes[0].state_dir).unwrap();
    let err = cluster.nodes[1]
        .client_as(Some(&neighbour))
        .unwrap()
        .get_status(status)
        .await
        .unwrap_err();
    assert_tls_refused(&err);
    agent_logged(
        &cluster,
        1,
        "certificate belongs to node cn-ucsb-1, not the coordinator",
    )
    .await;

    // Still healthy for the coordinator afterwards.
    cluster.nodes[1]
        .client()
        .await
        .unwrap()
        .get_status(status)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_refuses_an_agent_with_an_expired_certificate() {
    let mut cluster = cluster(2).await;
    let node = &cluster.nodes[1];
    std::fs::write(
        node.state_dir.join("identity/node.pem"),
        expired_node_identity(&cluster.state_dir, &node.name),
    )
    .unwrap();
    cluster.nodes[1].start_agent().await.unwrap();

    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    let last = out.last_json();
    assert_eq!(last["error"]["node"], "cn-unm-1");
    let message = last["error"]["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("expired"), "{message}");
    // Its renewal with the expired certificate is refused too: the agent
    // logs the failure and keeps trying, it does not die.
    agent_logged(&cluster, 1, "renewing the node certificate failed").await;
    cluster.nodes[1]
        .agent
        .as_mut()
        .unwrap()
        .check_running()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_are_one_time_short_lived_and_pinned() {
    let cluster = cluster(1).await;
    let enrollment = cluster.enrollment.to_string();

    // A wrong CA pin: refused before the token is even sent.
    let config = extra_agent_config(&cluster, "cn-extra-1");
    let (token, pin) = cluster
        .node_add("cn-extra-1", "127.0.0.1:1".parse().unwrap(), &[])
        .await
        .unwrap();
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    let (code, stderr) = join(&config, &enrollment, &token, &wrong_pin).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no CA matching the pin"), "{stderr}");

    // The right pin: the same token still works, once.
    let (code, stderr) = join(&config, &enrollment, &token, &pin).unwrap();
    assert_eq!(code, 0, "{stderr}");
    let identity =
        std::fs::read_to_string(config.parent().unwrap().join("state/identity/node.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(config.parent().unwrap().join("state/identity/node.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Replayed.
    let replay = extra_agent_config(&cluster, "cn-replay-1");
    let (code, stderr) = join(&replay, &enrollment, &token, &pin).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("was already used"), "{stderr}");

    // Expired: a token valid for one second, used after that second.
    let out = cluster
        .ctl(&[
            "--json",
            "node",
            "add",
            "cn-late-1",
            "--agent",
            "127.0.0.1:1",
            "--token-ttl",
            "1",
        ])
        .await
        .unwrap();
    let added = out.last_json();
    let late_token = added["token"].as_str().unwrap().to_owned();
    let expires = added["expires_unix"].as_i64().unwrap();
    wait_past("the join token's expiry", expires, Duration::from_secs(5)).await;
    let late = extra_agent_config(&cluster, "cn-late-1");
    let (code, stderr) = join(&late, &enrollment, &late_token, &pin).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("has expired"), "{stderr}");

    // A token made for one node cannot enrol another name.
    let (token, _) = cluster
        .node_add("cn-other-1", "127.0.0.1:1".parse().unwrap(), &[])
        .await
        .unwrap();
    let impostor = extra_agent_config(&cluster, "cn-impostor-1");
    let (code, stderr) = join(&impostor, &enrollment, &token, &pin).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("made for node \"cn-other-1\""), "{stderr}");

    // An oversized CSR is refused by the decoder.
    let err = enrollment_client(&cluster, None)
        .join(pb::JoinRequest {
            token: "x.y".into(),
            csr_der: vec![0; 200 * 1024],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );

    // Nodes list what happened; secrets never reached the logs.
    let out = cluster.ctl(&["--json", "nodes"]).await.unwrap();
    let nodes: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let state = |name: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["state"].clone())
    };
    assert_eq!(state("cn-extra-1"), Some("active".into()));
    assert_eq!(state("cn-late-1"), Some("pending".into()));
    let secret = token.split_once('.').unwrap().1;
    assert!(!cluster.coordinator_log().contains(secret));
    assert!(!identity.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_node_is_refused_and_no_longer_contacted() {
    let cluster = cluster(3).await;
    let removed = Credentials::node(&cluster.nodes[1].state_dir).unwrap();
    let out = cluster.ctl(&["node", "remove", "cn-unm-1"]).await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);

    // Its certificate is refused for renewal.
    let csr = csr_for("cn-unm-1");
    let err = enrollment_client(&cluster, Some(&removed))
        .renew(pb::RenewRequest {
            csr_der: csr.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("node cn-unm-1 is removed"),
        "{err:?}"
    );
    // An active node renews the same way, and succeeds.
    let active = Credentials::node(&cluster.nodes[0].state_dir).unwrap();
    let csr0 = csr_for("cn-ucsb-1");
    enrollment_client(&cluster, Some(&active))
        .renew(pb::RenewRequest { csr_der: csr0 })
        .await
        .unwrap();

    // The coordinator no longer contacts it: the order goes to the others.
    // (DNS no longer sends any name to it: its own name and the shared name
    // now go to cn-ucsb-1, as an admin would arrange when retiring a node.)
    for name in ["cn-unm-1.dataone.test", "cn.dataone.test"] {
        cluster
            .pebble
            .add_a(name, cluster.nodes[0].ip)
            .await
            .unwrap();
    }
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, cluster.logs());
    assert!(!out.stdout.contains("cn-unm-1\""), "{}", out.stdout);
    let log = std::fs::read_to_string(cluster.nodes[1].dir.join("agent.log")).unwrap();
    assert!(
        !log.contains("placed tokens"),
        "the removed node was contacted:\n{log}"
    );

    // Naming it explicitly is a clear error.
    let out = cluster.ctl(&["nodes"]).await.unwrap();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("cn-unm-1") && l.contains("removed")),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_renew_their_certificate_and_keep_serving() {
    // Node certificates valid for 12 s: renewed at two thirds, 8 s.
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        agent_cert_validity_secs: Some(12),
        ..Default::default()
    })
    .await
    .unwrap();
    let path = cluster.nodes[0].state_dir.join("identity/node.pem");
    let first = std::fs::read_to_string(&path).unwrap();
    let not_after = |pem: &str| {
        let cert = &pem[pem.find("-----BEGIN CERTIFICATE-----").unwrap()..];
        certfleet_proto::bundle::Bundle::parse(cert, None, &[])
            .unwrap()
            .not_after
    };
    let first_not_after = not_after(&first);
    let renewed = changed("cn-ucsb-1's certificate renewal", &path, &first).await;
    assert!(not_after(&renewed) > first_not_after);
    // Past the first certificate's expiry, the coordinator still reaches the
    // agent: the renewed certificate is the one served.
    wait_past(
        "the first certificate's expiry",
        first_not_after,
        Duration::from_secs(20),
    )
    .await;
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, cluster.logs());
    assert_eq!(out.last_json()["certificate"]["version"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_a_log_and_every_admin_request_is_audited() {
    let cluster = cluster(2).await;
    // One more node through the whole join flow, so its token passes through.
    let config = extra_agent_config(&cluster, "cn-audit-1");
    let (token, pin) = cluster
        .node_add("cn-audit-1", "127.0.0.1:1".parse().unwrap(), &[])
        .await
        .unwrap();
    let (code, stderr) = join(&config, &cluster.enrollment.to_string(), &token, &pin).unwrap();
    assert_eq!(code, 0, "{stderr}");
    let out = cluster
        .ctl(&["--json", "node", "remove", "cn-audit-1"])
        .await
        .unwrap();
    assert_eq!(out.code, 0);
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stdout);

    // What must never be logged: the join secret, the certificate's key,
    // every node key, the CA key, the coordinator's key, the ACME account key.
    let body = |pem: &str| -> Vec<String> {
        pem.lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
            .map(str::to_owned)
            .collect()
    };
    let mut secrets = vec![token.split_once('.').unwrap().1.to_owned()];
    let state = &cluster.state_dir;
    for key in [
        state.join(format!("live/{CERT}/privkey.pem")),
        state.join("ca/ca.key"),
        state.join("identity/coordinator.key"),
    ] {
        secrets.extend(body(&std::fs::read_to_string(&key).unwrap()));
    }
    for node in &cluster.nodes {
        let pem = std::fs::read_to_string(node.state_dir.join("identity/node.pem")).unwrap();
        let key_only: String = pem
            .split("-----BEGIN CERTIFICATE-----")
            .next()
            .unwrap()
            .to_owned();
        secrets.extend(body(&key_only));
    }
    for entry in std::fs::read_dir(state.join("acme")).unwrap() {
        let creds: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap();
        secrets.push(creds["key_pkcs8"].as_str().unwrap().to_owned());
    }
    assert!(secrets.len() > 6);
    let mut logs = vec![("coordinator".to_owned(), cluster.coordinator_log())];
    for node in &cluster.nodes {
        logs.push((
            node.name.clone(),
            std::fs::read_to_string(node.dir.join("agent.log")).unwrap(),
        ));
    }
    for (who, log) in &logs {
        assert!(!log.is_empty(), "{who} logged nothing");
        for secret in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "{who}'s log contains a secret"
            );
        }
    }

    // The audit log has who (uid) asked for what.
    let audit = Db::open(state).unwrap().audit_log().unwrap();
    let uid = nix::unistd::getuid().as_raw();
    for action in ["node add", "node remove", "issue"] {
        assert!(
            audit
                .iter()
                .any(|e| e.action == action && e.uid == Some(uid)),
            "no {action} by uid {uid} in {audit:?}"
        );
    }
    assert!(
        audit
            .iter()
            .all(|e| !e.detail.contains(token.split_once('.').unwrap().1))
    );

    // The admin socket is 0660.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cluster.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

/// The serial of the first certificate in `pem`, in hex without DER's
/// leading zero bytes, as the coordinator names it.
fn serial_hex(pem: &str) -> String {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let mut hex = certfleet_proto::bundle::hex(cert.raw_serial());
    while hex.len() > 2 && hex.starts_with("00") {
        hex.drain(..2);
    }
    hex
}

#[tokio::test(flavor = "multi_thread")]
async fn a_superseded_node_certificate_cannot_renew() {
    let mut cluster = cluster(2).await;
    // The node's identity before it is removed and joined again (as an
    // admin would, moving the node to a new machine).
    let old = Credentials::node(&cluster.nodes[1].state_dir).unwrap();
    cluster.readd_node(1, &[]).await.unwrap();
    let new = Credentials::node(&cluster.nodes[1].state_dir).unwrap();
    let (old_serial, new_serial) = (serial_hex(&old.chain_pem), serial_hex(&new.chain_pem));
    assert_ne!(old_serial, new_serial);

    // The old certificate is still unexpired and from the cluster CA, so
    // TLS accepts it; Renew refuses it, naming both serials.
    let err = enrollment_client(&cluster, Some(&old))
        .renew(pb::RenewRequest {
            csr_der: csr_for("cn-unm-1"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(
        err.message(),
        format!(
            "node cn-unm-1 presented certificate serial {old_serial}, but its current certificate is serial {new_serial}: a superseded identity (the node was removed and joined again, or has renewed since) cannot renew"
        )
    );
    let log = plain(&cluster.coordinator_log());
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("renewal refused")
            && l.contains(&old_serial)),
        "{log}"
    );

    // The current certificate renews.
    let renewed = enrollment_client(&cluster, Some(&new))
        .renew(pb::RenewRequest {
            csr_der: csr_for("cn-unm-1"),
        })
        .await
        .unwrap()
        .into_inner();
    let renewed_serial = serial_hex(&renewed.certificate_pem);
    // From then on the renewed one is the node's current certificate: the
    // one it replaced is superseded too.
    let err = enrollment_client(&cluster, Some(&new))
        .renew(pb::RenewRequest {
            csr_der: csr_for("cn-unm-1"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "its current certificate is serial {renewed_serial}"
        )),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn join_reads_the_token_from_standard_input_not_from_its_arguments() {
    use tokio::io::AsyncWriteExt;
    let cluster = cluster(1).await;
    let config = extra_agent_config(&cluster, "cn-stdin-1");
    let (token, pin) = cluster
        .node_add("cn-stdin-1", "127.0.0.1:1".parse().unwrap(), &[])
        .await
        .unwrap();
    let secret = token.split_once('.').unwrap().1.to_owned();

    // `certfleet node add` prints the command to run, without the token.
    let out = cluster
        .ctl(&["node", "add", "cn-stdin-2", "--agent", "127.0.0.1:1"])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let printed = out
        .stdout
        .lines()
        .find(|l| l.contains("certfleet-agent"))
        .unwrap_or_else(|| panic!("no join command in {}", out.stdout));
    assert!(
        printed.ends_with(&format!("--ca-pin {pin} --token-file -")),
        "{printed}"
    );
    assert!(!printed.contains("--token="), "{printed}");

    // The agent waits for the token on its standard input; meanwhile, what
    // every local user can read of it holds no secret.
    let mut agent = tokio::process::Command::new(bin("certfleet-agent"))
        .arg("--config")
        .arg(&config)
        .args(["join", "--coordinator", &cluster.enrollment.to_string()])
        .args(["--ca-pin", &pin, "--token-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = agent.id().unwrap();
    // Right after spawn the child may not have exec'd yet: wait until its
    // command line is the agent's.
    let cmdline = eventually("the agent's exec", Duration::from_secs(10), || async move {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let text = String::from_utf8_lossy(&raw).replace('\0', " ");
        text.contains("join --coordinator").then_some(text)
    })
    .await
    .unwrap();
    assert!(
        !cmdline.contains(&secret),
        "the secret is in argv: {cmdline}"
    );
    let ps = std::process::Command::new("ps")
        .args(["-ww", "-o", "args=", "-p", &pid.to_string()])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        ps.contains("--token-file -") && !ps.contains(&secret),
        "{ps}"
    );
    assert!(
        agent.try_wait().unwrap().is_none(),
        "it did not wait for the token"
    );

    let mut stdin = agent.stdin.take().unwrap();
    stdin
        .write_all(format!("{token}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), agent.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("joined as node cn-stdin-1"),
        "{out:?}"
    );
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn join_with_the_token_as_an_argument_still_works_and_warns() {
    let cluster = cluster(1).await;
    let config = extra_agent_config(&cluster, "cn-argv-1");
    let (token, pin) = cluster
        .node_add("cn-argv-1", "127.0.0.1:1".parse().unwrap(), &[])
        .await
        .unwrap();
    let enrollment = cluster.enrollment.to_string();
    let run = |extra: &[String]| {
        std::process::Command::new(bin("certfleet-agent"))
            .arg("--config")
            .arg(&config)
            .args(["join", "--coordinator", &enrollment, "--ca-pin", &pin])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };

    // Exactly one of --token and --token-file: a usage error otherwise.
    for extra in [
        vec![],
        vec![format!("--token={token}"), "--token-file=-".to_owned()],
    ] {
        let out = run(&extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--token"), "{stderr}");
    }

    // `=`: a token may start with '-'.
    let out = run(&[format!("--token={token}")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "warning: --token shows the join token to every local user in the process list"
        ) && stderr.contains("--token-file"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(token.split_once('.').unwrap().1),
        "{stderr}"
    );
}

/// `log` without its ANSI colour codes, so fields read `key=value`.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC '[' parameters, up to a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `[enrollment.failed_joins]` for the throttling test: a short window.
const FAILED_JOIN_WINDOW_SECS: i64 = 3;

#[tokio::test(flavor = "multi_thread")]
async fn failed_joins_are_throttled_per_address_and_logged_as_a_summary() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        coordinator_extra: format!(
            "\n[enrollment.failed_joins]\nlimit = 5\nwindow_secs = {FAILED_JOIN_WINDOW_SECS}\n"
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let config = extra_agent_config(&cluster, "cn-late-1");
    let (token, pin) = cluster
        .node_add("cn-late-1", "127.0.0.1:1".parse().unwrap(), &[])
        .await
        .unwrap();
    let id = token.split_once('.').unwrap().0;
    let wrong = format!("{id}.not-the-secret");

    // 20 wrong secrets from one address, on one connection: the first 5
    // are looked at and refused, the rest are throttled.
    let mut client = enrollment_client(&cluster, None);
    let mut throttled = Vec::new();
    let mut window_opened = 0;
    for i in 0..20 {
        let err = client
            .join(pb::JoinRequest {
                token: wrong.clone(),
                csr_der: csr_for("cn-late-1"),
            })
            .await
            .unwrap_err();
        if i == 0 {
            // At the latest: the window opened at the first failure.
            window_opened = unix_now() + 1;
        }
        if i < 5 {
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{i}: {err:?}");
            assert!(err.message().contains("wrong secret"), "{err:?}");
        } else {
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{i}: {err:?}");
            throttled.push(err.message().to_owned());
        }
    }
    // "too many failed join attempts from ADDR; try again in N s"
    let source = throttled[0]
        .strip_prefix("too many failed join attempts from ")
        .and_then(|rest| rest.split_once("; try again in "))
        .map(|(source, _)| source.to_owned())
        .unwrap_or_else(|| panic!("{throttled:?}"));
    assert!(
        throttled.iter().all(|m| m.contains(&source)),
        "{throttled:?}"
    );

    // Past the window, the right token works from the same address.
    wait_past(
        "the failed-join window",
        window_opened + FAILED_JOIN_WINDOW_SECS,
        Duration::from_secs(10),
    )
    .await;
    let (code, stderr) = join(&config, &cluster.enrollment.to_string(), &token, &pin).unwrap();
    assert_eq!(code, 0, "{stderr}");
    let log = plain(&cluster.coordinator_log());
    assert!(
        log.lines()
            .any(|l| l.contains("node joined") && l.contains(&format!("source={source}"))),
        "the join came from another address than {source}:\n{log}"
    );

    // Logged: the first refusal, the start of the throttling, and one
    // summary of the other 18 attempts, not 20 lines.
    let summary = format!(
        "18 more failed join attempts from {source} in the last {FAILED_JOIN_WINDOW_SECS} s"
    );
    let logged = eventually("the summary line", Duration::from_secs(10), || {
        let log = plain(&cluster.coordinator_log());
        let summary = summary.clone();
        async move { log.contains(&summary).then_some(log) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.coordinator_log()));
    let warnings: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("join"))
        .collect();
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    assert!(warnings[0].contains("join refused") && warnings[0].contains("wrong secret"));
    assert!(warnings[1].contains("too many failed join attempts"));
    assert!(warnings[2].contains(&summary));
    assert!(!logged.contains(token.split_once('.').unwrap().1));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_renews_its_own_identity_without_a_restart() {
    // The coordinator's certificate lives 15 s: renewed at two thirds, 10 s.
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        coordinator_cert_validity_secs: Some(15),
        ..Default::default()
    })
    .await
    .unwrap();
    let path = cluster.state_dir.join("identity/coordinator.pem");
    let first = std::fs::read_to_string(&path).unwrap();
    let first_not_after = certfleet_proto::bundle::Bundle::parse(&first, None, &[])
        .unwrap()
        .not_after;
    changed("the coordinator's identity renewal", &path, &first).await;
    wait_past(
        "the first coordinator certificate's expiry",
        first_not_after,
        Duration::from_secs(30),
    )
    .await;
    // A fresh connection (the agent restarted) must be made with the
    // renewed identity: the agent refuses an expired one.
    cluster.nodes[0].start_agent().await.unwrap();
    let out = cluster.ctl(&["--json", "status", CERT]).await.unwrap();
    let v = out.last_json();
    assert!(
        v["nodes"][0]["error"].is_null(),
        "status could not reach the node: {v}\n{}",
        cluster.logs()
    );
    assert!(
        cluster
            .coordinator_log()
            .contains("renewed the coordinator's identity"),
        "{}",
        cluster.coordinator_log()
    );
}
