//! Local users are adversaries: the web server's user owns the webroot and
//! postgres owns its data directory, and either may rearrange them while the
//! root agent works there. Every attack runs as the real unprivileged user
//! (`runuser -u www-data` / `-u postgres`), and each test checks what an
//! admin would: nothing outside the intended directory was written,
//! chmodded or chowned, and the error names the path.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use certfleet_proto::pb;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Http01, NGINX_TARGETS, Node};
use certfleet_tests::hostile::{as_user, root_only_dir, snapshot};
use certfleet_tests::process::{bin, eventually};

const THUMB: &str = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI";

fn token(n: usize) -> pb::Http01Token {
    let token = format!("{n:B>43}");
    pb::Http01Token {
        key_authorization: format!("{token}.{THUMB}"),
        token,
    }
}

async fn remove(node: &Node, tokens: &[pb::Http01Token]) {
    let mut client = node.client().await.unwrap();
    let _ = client
        .remove_tokens(pb::RemoveTokensRequest {
            tokens: tokens.iter().map(|t| t.token.clone()).collect(),
        })
        .await;
}

async fn webroot_node() -> Cluster {
    Cluster::start(ClusterSpec {
        nodes: 1,
        http01: Http01::WebrootNginx,
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinked_challenge_directories_are_refused_and_nothing_outside_changes() {
    let cluster = webroot_node().await;
    let node = &cluster.nodes[0];
    let webroot = node.webroot.clone().unwrap();
    let target = root_only_dir(&cluster, "sudoers.d");
    let before = snapshot(&target);

    // acme-challenge is a link: `certfleet issue` fails on this node, by path.
    as_user(
        "www-data",
        &format!(
            "mkdir {w}/.well-known && ln -s {t} {w}/.well-known/acme-challenge",
            w = webroot.display(),
            t = target.display()
        ),
    );
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    let link = webroot.join(".well-known/acme-challenge");
    assert!(
        said.contains(&link.display().to_string()) && said.contains("symbolic link"),
        "the error should name {}: {said}",
        link.display()
    );
    assert_eq!(snapshot(&target), before, "root's directory changed");

    // .well-known itself is a link to a directory that has acme-challenge.
    as_user(
        "www-data",
        &format!(
            "rm -rf {w}/.well-known && ln -s {t} {w}/.well-known",
            w = webroot.display(),
            t = target.display()
        ),
    );
    let err = node.place_tokens(vec![token(1)]).await.unwrap_err();
    assert!(
        err.message()
            .contains(&webroot.join(".well-known").display().to_string())
            && err.message().contains("symbolic link"),
        "{err:?}"
    );
    assert_eq!(snapshot(&target), before, "root's directory changed");
    assert!(node.tokens().await.unwrap().is_empty());

    // Once the web server's user puts things right, the first issue works
    // from a webroot without .well-known: the agent makes it 0755, so the
    // workers (www-data) can serve the tokens.
    as_user("www-data", &format!("rm {}/.well-known", webroot.display()));
    let out = cluster.issue().await.unwrap();
    assert_eq!(
        out.code,
        0,
        "{}{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
    for d in [".well-known", ".well-known/acme-challenge"] {
        let meta = std::fs::metadata(webroot.join(d)).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o755, "{d}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hard_link_at_a_token_name_is_replaced_not_written_through() {
    let cluster = webroot_node().await;
    let node = &cluster.nodes[0];
    let webroot = node.webroot.clone().unwrap();
    // A file of www-data's own outside the webroot (protected_hardlinks lets
    // a user link only files it owns).
    let outside = cluster.dir.path().join("www-home");
    std::fs::create_dir(&outside).unwrap();
    let (uid, gid) = certfleet_tests::cluster::web_user().unwrap();
    std::os::unix::fs::chown(&outside, Some(uid), Some(gid)).unwrap();
    let t = token(2);
    as_user(
        "www-data",
        &format!(
            "umask 077; echo mine > {o}/file; mkdir -p {w}/.well-known/acme-challenge; ln {o}/file {w}/.well-known/acme-challenge/{t}",
            o = outside.display(),
            w = webroot.display(),
            t = t.token
        ),
    );
    let before = snapshot(&outside);
    assert_eq!(node.place_tokens(vec![t.clone()]).await.unwrap(), 1);
    let served = webroot.join(".well-known/acme-challenge").join(&t.token);
    assert_eq!(
        std::fs::read_to_string(&served).unwrap(),
        t.key_authorization
    );
    assert_eq!(std::fs::metadata(&served).unwrap().mode() & 0o7777, 0o644);
    remove(node, std::slice::from_ref(&t)).await;
    assert!(!served.exists());
    assert_eq!(snapshot(&outside), before, "www-data's file changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_symlink_swaps_never_move_a_write_or_chmod_outside_the_webroot() {
    const PLACEMENTS: usize = 200;
    let cluster = webroot_node().await;
    let node = &cluster.nodes[0];
    let webroot = node.webroot.clone().unwrap();
    let target = root_only_dir(&cluster, "etc-like");
    let before = snapshot(&target);
    // www-data swaps .well-known, and acme-challenge inside it, between a
    // directory and a link to root's directory as fast as it can, while the
    // agent places and removes tokens. Each round is counted, so the test
    // knows the race ran; a stop file ends it (setpriv execs, so no shell is
    // left behind if the test dies).
    let www_home = cluster.dir.path().join("www-home");
    std::fs::create_dir(&www_home).unwrap();
    let (uid, gid) = certfleet_tests::cluster::web_user().unwrap();
    std::os::unix::fs::chown(&www_home, Some(uid), Some(gid)).unwrap();
    let (stop, rounds) = (www_home.join("stop"), www_home.join("rounds"));
    let script = format!(
        "exec 2>/dev/null; cd {w}; i=0; while [ ! -e {stop} ]; do i=$((i+1)); \
         mv .well-known .gone-$i; ln -s {t} .well-known; rm -f .well-known; \
         mkdir .well-known; ln -s {t}/acme-challenge .well-known/acme-challenge; \
         rm -f .well-known/acme-challenge; echo $i >> {rounds}; done",
        w = webroot.display(),
        t = target.display(),
        stop = stop.display(),
        rounds = rounds.display(),
    );
    let mut swapper = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn()
        .unwrap();
    let mut placed = 0;
    for i in 0..PLACEMENTS {
        let t = token(1000 + i);
        if node.place_tokens(vec![t.clone()]).await.is_ok() {
            placed += 1;
        }
        remove(node, &[t]).await;
    }
    std::fs::write(&stop, "").unwrap();
    let _ = swapper.wait();
    let swaps = std::fs::read_to_string(&rounds)
        .unwrap_or_default()
        .lines()
        .count();
    eprintln!("{placed} of {PLACEMENTS} placements succeeded during {swaps} swaps");
    assert!(swaps > 0, "the swapper never ran");
    // Between swaps the agent still works: refusing everything would also
    // leave root's directory alone.
    assert!(placed > 0, "no placement succeeded during the race");
    assert_eq!(
        snapshot(&target),
        before,
        "a file outside the webroot was written, chmodded or chowned"
    );
}

/// The nginx targets with the key moved into postgres' own directory tree,
/// as Debian keeps postgres' data under /var/lib/postgresql/15/main.
fn postgres_dir_targets(dir_owner: bool) -> String {
    let owner_line = if dir_owner {
        "dir_owner = \"postgres\"\n"
    } else {
        ""
    };
    NGINX_TARGETS.replace(
        "path = \"{dir}/ssl/private/server.key\"\n",
        &format!("path = \"{{dir}}/pg/15/main/server.key\"\n{owner_line}"),
    )
}

/// Makes `{node}/pg/15/main` and gives the tree to postgres.
fn postgres_tree(node: &Node) -> PathBuf {
    let main = node.dir.join("pg/15/main");
    std::fs::create_dir_all(&main).unwrap();
    let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    for d in ["pg", "pg/15", "pg/15/main"] {
        std::os::unix::fs::chown(
            node.dir.join(d),
            Some(pg.uid.as_raw()),
            Some(pg.gid.as_raw()),
        )
        .unwrap();
    }
    std::fs::set_permissions(&main, std::fs::Permissions::from_mode(0o700)).unwrap();
    main
}

async fn postgres_cluster() -> Cluster {
    certfleet_tests::cluster::ensure_ssl_cert_group().unwrap();
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        agent_certificates: postgres_dir_targets(true),
        ..Default::default()
    })
    .await
    .unwrap();
    postgres_tree(&cluster.nodes[0]);
    postgres_tree(&cluster.nodes[1]);
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    cluster
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ancestor_swapped_for_a_link_stops_the_install_on_that_node_only() {
    let mut cluster = postgres_cluster().await;
    let key = cluster.nodes[0].dir.join("pg/15/main/server.key");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o640,
        "installed into postgres' directory"
    );
    let target = root_only_dir(&cluster, "root-only");
    let before = snapshot(&target);
    // postgres moves its data directory aside and leaves a link to root's.
    let main = cluster.nodes[0].dir.join("pg/15/main");
    as_user(
        "postgres",
        &format!(
            "mv {m} {m}.old && ln -s {t} {m}",
            m = main.display(),
            t = target.display()
        ),
    );
    // A new version: node 0 refuses by path, node 1 installs it.
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains(&main.display().to_string()) && said.contains("symbolic link"),
        "the error should name {}: {said}",
        main.display()
    );
    assert_eq!(snapshot(&target), before, "root's directory changed");
    let v2 = std::fs::read_to_string(cluster.nodes[1].dir.join("pg/15/main/server.key")).unwrap();
    let live = std::fs::read_to_string(cluster.live_dir().join("privkey.pem")).unwrap();
    assert_eq!(v2.trim(), live.trim(), "node 1 got version 2");

    // Without `dir_owner`, a target under postgres' directories is refused
    // when the agent starts, naming the directory, its owner and mode.
    let node = &mut cluster.nodes[1];
    let config = std::fs::read_to_string(&node.config_path)
        .unwrap()
        .replace("dir_owner = \"postgres\"\n", "");
    std::fs::write(&node.config_path, config).unwrap();
    node.stop_agent();
    let out = Command::new(bin("certfleet-agent"))
        .arg("--config")
        .arg(&node.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let pg = node.dir.join("pg");
    assert!(
        stderr.contains(&format!(
            "its directory {} is owned by postgres",
            pg.display()
        )) && stderr.contains("dir_owner"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_at_a_target_is_reported_by_path_and_blocks_nothing() {
    let mut cluster = postgres_cluster().await;
    let key = cluster.nodes[0].dir.join("pg/15/main/server.key");
    as_user(
        "postgres",
        &format!("rm -f {k} && mkfifo {k}", k = key.display()),
    );
    // status answers for both nodes, promptly, and names the FIFO.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        cluster.ctl(&["--json", "status", CERT]),
    )
    .await
    .expect("status hung on a FIFO")
    .unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let v = out.last_json();
    let nodes = v["nodes"].as_array().unwrap();
    let bad = nodes.iter().find(|n| n["node"] == "cn-ucsb-1").unwrap();
    let problem = bad["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains(&key.display().to_string()) && problem.contains("FIFO"),
        "{v}"
    );
    let good = nodes.iter().find(|n| n["node"] == "cn-unm-1").unwrap();
    assert_eq!(good["intact"], true, "{v}");
    // distribute puts a regular file back in its place.
    let out = cluster.ctl(&["distribute", CERT]).await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(std::fs::symlink_metadata(&key).unwrap().is_file());
    // And a FIFO again does not keep SIGTERM from stopping the agent.
    as_user(
        "postgres",
        &format!("rm -f {k} && mkfifo {k}", k = key.display()),
    );
    let _ = cluster.ctl(&["status", CERT]).await.unwrap();
    let agent = cluster.nodes[0].agent.as_mut().unwrap();
    let pid = nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually(
        "the agent to stop on SIGTERM",
        Duration::from_secs(15),
        || {
            let stopped = agent.check_running().is_err();
            async move { stopped.then_some(()) }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_webroot_agent_leaves_no_token_after_it_starts_again() {
    let mut cluster = webroot_node().await;
    let tokens: Vec<pb::Http01Token> = (0..5).map(|i| token(100 + i)).collect();
    assert_eq!(
        cluster.nodes[0].place_tokens(tokens.clone()).await.unwrap(),
        5
    );
    let node = &mut cluster.nodes[0];
    assert_eq!(node.webroot_files().len(), 5);
    node.stop_agent(); // SIGKILL: no chance to clean up
    assert_eq!(node.webroot_files().len(), 5, "killed, the files stay");
    node.start_agent().await.unwrap();
    assert!(
        node.webroot_files().is_empty(),
        "left after restart: {:?}",
        node.webroot_files()
    );
}
