//! Helpers for tests where local users are adversaries: acting as the real
//! unprivileged user, and proving nothing outside a directory changed.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::Cluster;

/// Runs `script` with `sh` as `user`; panics with its output if it fails.
pub fn as_user(user: &str, script: &str) {
    let out = Command::new("runuser")
        .args(["-u", user, "--", "sh", "-ec", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as {user}: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Owner, group, mode and contents of everything under `dir` (links not
/// followed): what must not change when an attack fails.
pub type Snapshot = BTreeMap<PathBuf, (u32, u32, u32, Vec<u8>)>;

pub fn snapshot(dir: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let data = if meta.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
        out.insert(p, (meta.uid(), meta.gid(), meta.mode(), data));
    }
    out
}

/// A directory only root may write, holding a secret 0600 file and an
/// `acme-challenge` directory of mode 0700, as /etc/sudoers.d would be.
pub fn root_only_dir(cluster: &Cluster, name: &str) -> PathBuf {
    let dir = cluster.dir.path().join(name);
    std::fs::create_dir_all(dir.join("acme-challenge")).unwrap();
    std::fs::set_permissions(
        dir.join("acme-challenge"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(dir.join("secret"), "root only\n").unwrap();
    std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}
