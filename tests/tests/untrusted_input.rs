//! Bad input is refused with an error that names it, and nothing is
//! written: gRPC requests to a real agent, HTTP requests to its responder,
//! and bad configs and arguments to the real binaries.

use std::path::Path;
use std::process::Command;

use certfleet_proto::pb;
use certfleet_tests::cluster::{Cluster, ClusterSpec, Http01};
use certfleet_tests::net::http;
use certfleet_tests::process::bin;
use tonic::Code;

const THUMB: &str = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI";

fn good_token(n: usize) -> String {
    format!("{:A>43}", n)
}

fn tok(token: &str, key_authorization: &str) -> pb::Http01Token {
    pb::Http01Token {
        token: token.to_owned(),
        key_authorization: key_authorization.to_owned(),
    }
}

fn assert_refused(result: Result<u32, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("request was accepted");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "refusal {:?} does not mention {needle:?}",
        status.message()
    );
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_refuses_malformed_tokens_and_writes_nothing() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        http01: Http01::WebrootNginx,
        ..Default::default()
    })
    .await
    .unwrap();
    let node = &cluster.nodes[0];
    let webroot = node.webroot.clone().unwrap();
    let before = files_under(&node.dir);

    let cases: Vec<(pb::Http01Token, &str)> = vec![
        (
            tok("../../../../etc/cron.d/evil000000", &format!("x.{THUMB}")),
            "'.'",
        ),
        (
            tok("abcdefghijklmnopqrstuvwxyz/etc", &format!("x.{THUMB}")),
            "'/'",
        ),
        (
            tok("abcdefghijklmnopqrstuvwxyz%2e%2e", &format!("x.{THUMB}")),
            "'%'",
        ),
        (
            tok("abcdefghijklmnopqrstuvwxyz\0", &format!("x.{THUMB}")),
            "'\\0'",
        ),
        (tok("short", &format!("short.{THUMB}")), "5 characters"),
        (
            tok(&"a".repeat(129), &format!("x.{THUMB}")),
            "129 characters",
        ),
        (tok("", ""), "token is empty"),
        (
            tok(&good_token(1), &format!("{}.{THUMB}", good_token(2))),
            "names a different token",
        ),
        (tok(&good_token(1), &good_token(1)), "not of the form"),
        (
            tok(&good_token(1), &format!("{}.abc", good_token(1))),
            "3-character thumbprint",
        ),
        (
            tok(
                &good_token(1),
                &format!("{}.{}/x", good_token(1), &THUMB[..41]),
            ),
            "thumbprint",
        ),
    ];
    for (bad, needle) in cases {
        let shown = format!("{bad:?}");
        let result = node
            .place_tokens(vec![
                tok(&good_token(7), &format!("{}.{THUMB}", good_token(7))),
                bad,
            ])
            .await;
        let status = result.expect_err(&format!("{shown} was accepted"));
        assert_eq!(status.code(), Code::InvalidArgument, "{shown}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{shown}: {:?} lacks {needle:?}",
            status.message()
        );
    }
    // All or nothing: the good token in each refused batch was not placed.
    assert!(node.tokens().await.unwrap().is_empty());

    // Too many tokens in one call.
    let many: Vec<_> = (0..257)
        .map(|i| tok(&good_token(i), &format!("{}.{THUMB}", good_token(i))))
        .collect();
    assert_refused(
        node.place_tokens(many).await,
        Code::InvalidArgument,
        "257 tokens",
    );

    // An oversized message is refused by the decoder before any work.
    let huge = tok(&good_token(1), &"a".repeat(2 * 1024 * 1024));
    let status = node.place_tokens(vec![huge]).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");

    // RemoveTokens checks its input the same way.
    let mut client = node.client().await.unwrap();
    let status = client
        .remove_tokens(pb::RemoveTokensRequest {
            tokens: vec!["../agent.toml".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Nothing was written anywhere, and the agent is still healthy.
    let state_files = |files: Vec<String>| -> Vec<String> {
        files
            .into_iter()
            .filter(|f| !f.contains("/nginx/") && !f.ends_with(".log"))
            .collect()
    };
    assert_eq!(
        state_files(files_under(&node.dir)),
        state_files(before),
        "a refused request wrote a file"
    );
    assert!(files_under(&webroot).is_empty());
    let status = client
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            status.node.as_str(),
            status.tokens,
            status.http01_mode.as_str()
        ),
        ("cn-ucsb-1", 0, "webroot")
    );

    // A good one is placed as a file nginx serves, and removed again.
    let t = good_token(3);
    assert_eq!(
        node.place_tokens(vec![tok(&t, &format!("{t}.{THUMB}"))])
            .await
            .unwrap(),
        1
    );
    assert_eq!(node.webroot_files(), vec![t.clone()]);
    let removed = client
        .remove_tokens(pb::RemoveTokensRequest { tokens: vec![t] })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 1);
    assert!(node.webroot_files().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_responder_serves_only_challenge_paths() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let node = &cluster.nodes[0];
    let (ip, port) = (node.ip, cluster.pebble.http_port);
    let t = good_token(5);
    let ka = format!("{t}.{THUMB}");
    node.place_tokens(vec![tok(&t, &ka)]).await.unwrap();

    let base = format!("http://{ip}:{port}");
    let get = |path: String| {
        let url = format!("{base}{path}");
        async move {
            http(http::Method::GET, &url, Some("cn.dataone.test"), None)
                .await
                .unwrap()
        }
    };
    let (status, body) = get(format!("/.well-known/acme-challenge/{t}")).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, ka.as_str()));
    for path in [
        "/".to_owned(),
        "/.well-known/acme-challenge/".to_owned(),
        "/.well-known/acme-challenge/..%2f..%2fagent.toml".to_owned(),
        format!("/.well-known/acme-challenge/{}", good_token(6)),
        format!("/other/{t}"),
    ] {
        let (status, _) = get(path.clone()).await;
        assert_eq!(status.as_u16(), 404, "{path}");
    }
    let url = format!("{base}/.well-known/acme-challenge/{t}");
    let (status, _) = http(http::Method::POST, &url, None, Some("x".into()))
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 405);
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const COORDINATOR: &str = r#"
state_dir = "/nonexistent/certfleet-state"
admin_socket = "/nonexistent/admin.sock"
[acme]
directory = "https://127.0.0.1:14000/dir"
[enrollment]
listen = "127.0.0.1:7444"
[[certificates]]
name = "cn"
sans = ["cn.dataone.test"]
"#;

#[test]
fn bad_configs_exit_2_naming_the_key_and_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            COORDINATOR.replace("[acme]", "colour = \"blue\"\n[acme]"),
            "colour",
        ),
        (
            format!("{COORDINATOR}nodes = [\"cn ucsb\"]\n"),
            "certificates[0].nodes[0]",
        ),
        (
            COORDINATOR.replace("127.0.0.1:7444", "somewhere"),
            "enrollment.listen",
        ),
        (
            format!("{COORDINATOR}nodes = []\n"),
            "certificates[0].nodes",
        ),
        (
            COORDINATOR.replace("cn.dataone.test", "*.dataone.test"),
            "certificates[0].sans[0]",
        ),
        (
            COORDINATOR.replace("[acme]", "[acme]\nvalidation_port = 0"),
            "acme.validation_port",
        ),
        (
            COORDINATOR.replace("[acme]", "[acme]\nvalidation_port = 99999"),
            "validation_port",
        ),
        (COORDINATOR.replace("https://", "http://"), "acme.directory"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("coordinator-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = run(Command::new(bin("certfleet-coordinator"))
            .arg("--config")
            .arg(&path));
        assert_eq!(code, 2, "case {i}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains(key),
            "case {i}: {stderr:?} does not name the file and {key}"
        );
    }
    assert!(
        !Path::new("/nonexistent").exists(),
        "a bad config had a side effect"
    );

    let agent = "node = \"cn-ucsb-1\"\n[grpc]\nlisten = \"127.0.0.2:7443\"\n[http01]\nmode = \"standalone\"\nlisten = \"127.0.0.2:80\"\n";
    let cases = [
        (agent.replace("[grpc]", "role = \"x\"\n[grpc]"), "role"),
        (agent.replace("standalone", "magic"), "http01.mode"),
        (
            agent.replace("listen = \"127.0.0.2:80\"", "webroot = \"/var/www\""),
            "http01",
        ),
        (agent.replace("127.0.0.2:7443", "localhost"), "grpc.listen"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("agent-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = run(Command::new(bin("certfleet-agent"))
            .arg("--config")
            .arg(&path));
        assert_eq!(code, 2, "agent case {i}: {stderr}");
        assert!(
            stderr.contains(key),
            "agent case {i}: {stderr:?} does not name {key}"
        );
    }
    let (code, stderr) = run(Command::new(bin("certfleet-coordinator"))
        .arg("--config")
        .arg(dir.path().join("missing.toml")));
    assert_eq!(code, 2);
    assert!(stderr.contains("missing.toml"), "{stderr}");

    // CLI usage errors.
    let (code, _) = run(Command::new(bin("certfleet")).arg("issue"));
    assert_eq!(code, 2);
    let (code, _) = run(Command::new(bin("certfleet")).arg("--frobnicate"));
    assert_eq!(code, 2);
}
