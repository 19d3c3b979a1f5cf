//! A coordinator whose state disk is full or read-only never throws away a
//! certificate the CA issued (every issuance counts against the CA's rate
//! limit): a full store stops the order before the CA is asked, and a store
//! that fails after issuance keeps the certificate elsewhere and stores it
//! on the next `certfleet issue` without a new order.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs of `size` over `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir));
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `chattr +i` on `dir` until dropped: even root cannot add files there.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Self {
        run(Command::new("chattr").arg("+i").arg(dir));
        Self(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_store_stops_the_order_before_the_ca_is_asked() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let archive = cluster.state_dir.join("archive");
    let _full = Tmpfs::mount(&archive, "256k");
    // Fill it.
    let _ = std::fs::write(archive.join("filler"), vec![0u8; 512 * 1024]);
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains(&archive.display().to_string())
            && said.contains("bytes free")
            && !said.contains("order https://"),
        "the order should stop before the CA is asked: {said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_the_store_cannot_take_is_kept_and_stored_on_the_next_issue() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    // The archive passes the preflight, but version 2's files cannot land.
    let cert_dir = cluster.state_dir.join("archive").join(CERT);
    let immutable = Immutable::set(&cert_dir);
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    let rescued = cluster.socket.parent().unwrap().join("rescued").join(CERT);
    assert!(
        said.contains("the CA issued certificate cn")
            && said.contains(&rescued.display().to_string()),
        "{said}"
    );
    for file in ["fullchain.pem", "privkey.pem"] {
        let meta = std::fs::metadata(rescued.join(file)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "{file}");
    }
    let chain = std::fs::read_to_string(rescued.join("fullchain.pem")).unwrap();
    let key = std::fs::read_to_string(rescued.join("privkey.pem")).unwrap();
    let kept = Bundle::parse(&chain, Some(&key), &cluster.sans).unwrap();

    // Space again: the next issue stores that certificate, no new order.
    drop(immutable);
    let out = cluster.issue().await.unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("no new order placed"), "{}", out.stdout);
    let live = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    let live = Bundle::parse(&live, None, &[]).unwrap();
    assert_eq!(live.serial, kept.serial);
    assert_eq!(out.last_json()["certificate"]["version"], 2);
    assert!(!rescued.exists());
}
