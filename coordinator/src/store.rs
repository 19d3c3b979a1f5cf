//! The certificate store, in certbot's layout so existing service configs
//! and tooling keep working:
//!
//! ```text
//! <state>/archive/<name>/{cert,chain,fullchain,privkey}<N>.pem
//! <state>/live/<name>/{cert,chain,fullchain,privkey}.pem -> ../../archive/<name>/…<N>.pem
//! ```
//!
//! Every file is written temp+fsync+rename. The four `live/` links must move
//! together (a service must never pair cert N with key N-1), so the new set
//! is built in a sibling directory and exchanged with `live/<name>` in one
//! `renameat2(RENAME_EXCHANGE)`.

use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Path, PathBuf};

use certfleet_proto::bundle::Bundle;
use certfleet_proto::fsio::{create_private_dir, sync_dir, write_atomic};
use nix::fcntl::{RenameFlags, renameat2};

/// The files of one version, in the order they are written: `cert` last,
/// so a version counts as present only once all its files are.
const FILES: [&str; 4] = ["privkey", "chain", "fullchain", "cert"];

#[derive(Debug, thiserror::Error)]
#[error("certificate store {path}: {source}")]
pub struct StoreError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError {
        path: path.to_owned(),
        source,
    }
}

/// Free space the store must have before an order is placed: a version is
/// a few KiB, and the database and logs share the disk.
pub const MIN_FREE_BYTES: u64 = 1 << 20;

/// A certificate the CA issued that the store could not take, and where
/// it was kept instead.
#[derive(Debug, thiserror::Error)]
#[error(
    "the CA issued certificate {name} (serial {serial}) but it could not be stored: {source}; {kept}"
)]
pub struct NotStored {
    pub name: String,
    pub serial: String,
    pub source: StoreError,
    /// Where the certificate and key are now, or why they could not be kept.
    pub kept: String,
}

/// A version as found in the store.
#[derive(Debug, Clone)]
pub struct Stored {
    pub name: String,
    pub version: u32,
    pub bundle: Bundle,
    pub live_dir: PathBuf,
}

pub struct Store {
    archive: PathBuf,
    live: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let store = Self {
            archive: state_dir.join("archive"),
            live: state_dir.join("live"),
        };
        for dir in [&store.archive, &store.live] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(at(dir))?;
        }
        Ok(store)
    }

    /// Before an order: the store can be written and has [`MIN_FREE_BYTES`],
    /// so a certificate the CA issues (and counts against its rate limit) is
    /// not thrown away for want of a disk.
    pub fn preflight(&self) -> Result<(), StoreError> {
        let stat =
            nix::sys::statvfs::statvfs(&self.archive).map_err(|e| at(&self.archive)(e.into()))?;
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        if free < MIN_FREE_BYTES {
            return Err(at(&self.archive)(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "only {free} bytes free, at least {MIN_FREE_BYTES} are needed before an order is placed; free some space"
                ),
            )));
        }
        let probe = self.archive.join(".certfleet-preflight");
        write_atomic(&probe, b"ok\n", 0o600)
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(at(&probe))
    }

    /// [`Store::save`], and when that fails, keeps the certificate and key
    /// in `rescue_dir/<name>/` (mode 0600) for [`Store::store_rescued`].
    pub fn save_or_rescue(
        &self,
        name: &str,
        bundle: &Bundle,
        key_pem: &str,
        rescue_dir: &Path,
    ) -> Result<(u32, PathBuf), NotStored> {
        let source = match self.save(name, bundle, key_pem) {
            Ok(saved) => return Ok(saved),
            Err(e) => e,
        };
        let dir = rescue_dir.join(name);
        let fullchain = format!("{}{}", bundle.leaf_pem, bundle.chain_pem);
        let kept = create_private_dir(&dir)
            .and_then(|()| write_atomic(&dir.join("fullchain.pem"), fullchain.as_bytes(), 0o600))
            .and_then(|()| write_atomic(&dir.join("privkey.pem"), key_pem.as_bytes(), 0o600));
        let kept = match kept {
            Ok(()) => format!(
                "kept in {} (fullchain.pem, privkey.pem); once the store can be written, the next `certfleet issue {name}` stores it without a new order",
                dir.display()
            ),
            Err(e) => format!("keeping it in {} failed too: {e}", dir.display()),
        };
        Err(NotStored {
            name: name.to_owned(),
            serial: bundle.serial.clone(),
            source,
            kept,
        })
    }

    /// Stores a certificate an earlier order could not store (see
    /// [`Store::save_or_rescue`]), if one is waiting and still matches
    /// `sans`; returns its new version.
    pub fn store_rescued(
        &self,
        name: &str,
        sans: &[String],
        rescue_dir: &Path,
    ) -> Result<Option<(u32, Bundle)>, StoreError> {
        let dir = rescue_dir.join(name);
        let read = |file: &str| std::fs::read_to_string(dir.join(file));
        let (Ok(fullchain), Ok(key)) = (read("fullchain.pem"), read("privkey.pem")) else {
            return Ok(None);
        };
        // Only one that is still good for these names; otherwise order anew.
        let Ok(bundle) = Bundle::parse(&fullchain, Some(&key), sans) else {
            return Ok(None);
        };
        let (version, _) = self.save(name, &bundle, &key)?;
        std::fs::remove_dir_all(&dir).map_err(at(&dir))?;
        Ok(Some((version, bundle)))
    }

    /// The highest complete version of `name` in the archive, 0 if none;
    /// after a [`Store::delete`], at least the last version it had, so
    /// numbering goes on.
    pub fn latest_version(&self, name: &str) -> Result<u32, StoreError> {
        let deleted = self.deleted_version(name)?;
        let dir = self.archive.join(name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(deleted),
            Err(e) => return Err(at(&dir)(e)),
        };
        let mut latest = deleted;
        for entry in entries {
            let entry = entry.map_err(at(&dir))?;
            let file = entry.file_name();
            let version = file
                .to_str()
                .and_then(|f| f.strip_prefix("cert"))
                .and_then(|f| f.strip_suffix(".pem"))
                .and_then(|n| n.parse::<u32>().ok());
            latest = latest.max(version.unwrap_or(0));
        }
        Ok(latest)
    }

    /// Writes a validated bundle as the next version and points `live/` at
    /// it. Returns the version number.
    pub fn save(
        &self,
        name: &str,
        bundle: &Bundle,
        key_pem: &str,
    ) -> Result<(u32, PathBuf), StoreError> {
        let version = self.latest_version(name)? + 1;
        let dir = self.archive.join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(at(&dir))?;
        let fullchain = format!("{}{}", bundle.leaf_pem, bundle.chain_pem);
        for file in FILES {
            let (data, mode) = match file {
                "privkey" => (key_pem, 0o600),
                "chain" => (bundle.chain_pem.as_str(), 0o644),
                "fullchain" => (fullchain.as_str(), 0o644),
                _ => (bundle.leaf_pem.as_str(), 0o644),
            };
            let path = dir.join(format!("{file}{version}.pem"));
            write_atomic(&path, data.as_bytes(), mode).map_err(at(&path))?;
        }
        let live_dir = self.live.join(name);
        self.point_live(name, version, &live_dir)?;
        Ok((version, live_dir))
    }

    fn point_live(&self, name: &str, version: u32, live_dir: &Path) -> Result<(), StoreError> {
        let staging = self.live.join(format!(".{name}.new"));
        match std::fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(at(&staging)(e)),
            _ => {}
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(at(&staging))?;
        for file in FILES {
            let link = staging.join(format!("{file}.pem"));
            symlink(format!("../../archive/{name}/{file}{version}.pem"), &link)
                .map_err(at(&link))?;
        }
        sync_dir(&staging).map_err(at(&staging))?;
        let live = std::fs::File::open(&self.live).map_err(at(&self.live))?;
        if live_dir.exists() {
            renameat2(
                &live,
                staging.as_path(),
                &live,
                live_dir,
                RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(|e| at(live_dir)(e.into()))?;
            // `staging` now holds the previous links.
            std::fs::remove_dir_all(&staging).map_err(at(&staging))?;
        } else {
            std::fs::rename(&staging, live_dir).map_err(at(live_dir))?;
        }
        sync_dir(&self.live).map_err(at(&self.live))
    }

    /// Version `version` of `name` from the archive: (fullchain, key) PEM.
    pub fn read_version(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<(String, String)>, StoreError> {
        let dir = self.archive.join(name);
        let read = |file: &str| {
            let path = dir.join(format!("{file}{version}.pem"));
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(at(&path)(e)),
            }
        };
        match (read("fullchain")?, read("privkey")?) {
            (Some(fullchain), Some(key)) => Ok(Some((fullchain, key))),
            _ => Ok(None),
        }
    }

    /// The version `live/<name>` points at, read back and parsed.
    pub fn live(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        let live_dir = self.live.join(name);
        let fullchain = live_dir.join("fullchain.pem");
        let target = match std::fs::read_link(&fullchain) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(at(&fullchain)(e)),
        };
        let version = target
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix("fullchain"))
            .and_then(|f| f.strip_suffix(".pem"))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                at(&fullchain)(std::io::Error::other(format!(
                    "links to {}, not to an archive version",
                    target.display()
                )))
            })?;
        let pem = std::fs::read_to_string(&fullchain).map_err(at(&fullchain))?;
        let bundle = Bundle::parse(&pem, None, &[])
            .map_err(|e| at(&fullchain)(std::io::Error::other(e.to_string())))?;
        Ok(Some(Stored {
            name: name.to_owned(),
            version,
            bundle,
            live_dir,
        }))
    }

    /// Every certificate with a live version, sorted by name.
    pub fn list(&self) -> Result<Vec<Stored>, StoreError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.live).map_err(at(&self.live))? {
            let entry = entry.map_err(at(&self.live))?;
            if let Some(name) = entry.file_name().to_str()
                && !name.starts_with('.')
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(stored) = self.live(&name)? {
                out.push(stored);
            }
        }
        Ok(out)
    }
}

/// Deleting a certificate from the store.
///
/// The numbering of a deleted certificate goes on where it stopped: nodes
/// left with its files (a delete without `--from-nodes`) still hold version
/// N in their agent's archive, and an agent takes a re-sent version N as a
/// no-op or overwrites its archived copy of it, and rolls back by number.
/// A fresh version 1 after a delete would be older, to a node, than what it
/// holds. So the last version is kept in `archive/.<name>.deleted` and
/// [`Store::latest_version`] counts it.
impl Store {
    /// The marker that keeps a deleted certificate's last version number.
    fn deleted_marker(&self, name: &str) -> PathBuf {
        self.archive.join(format!(".{name}.deleted"))
    }

    /// The last version `name` had when it was deleted; 0 if it never was.
    fn deleted_version(&self, name: &str) -> Result<u32, StoreError> {
        let marker = self.deleted_marker(name);
        match std::fs::read_to_string(&marker) {
            Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(at(&marker)(e)),
        }
    }

    /// Removes `live/<name>` and `archive/<name>`; returns the last
    /// version it had, or `None` when the store held nothing of it.
    ///
    /// `live/<name>` goes first, in one rename into a hidden trash entry,
    /// so a crash at any point never leaves `live/` linking into a half
    /// removed archive: the certificate is either listed whole or not at
    /// all. The archive follows the same way; trash a crash left behind is
    /// removed by the next delete of the name. The version number is
    /// recorded before anything moves.
    pub fn delete(&self, name: &str) -> Result<Option<u32>, StoreError> {
        let (live_dir, archive_dir) = (self.live.join(name), self.archive.join(name));
        let (live_trash, archive_trash) = (
            self.live.join(format!(".{name}.trash")),
            self.archive.join(format!(".{name}.trash")),
        );
        for trash in [&live_trash, &archive_trash] {
            remove_tree(trash)?;
        }
        let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        if !exists(&live_dir) && !exists(&archive_dir) {
            return Ok(None);
        }
        let last = self.latest_version(name)?;
        let marker = self.deleted_marker(name);
        write_atomic(&marker, format!("{last}\n").as_bytes(), 0o600).map_err(at(&marker))?;
        for (dir, trash, parent) in [
            (&live_dir, &live_trash, &self.live),
            (&archive_dir, &archive_trash, &self.archive),
        ] {
            match std::fs::rename(dir, trash) {
                Ok(()) => sync_dir(parent).map_err(at(parent))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(at(dir)(e)),
            }
            remove_tree(trash)?;
        }
        Ok(Some(last))
    }
}

/// Removes the tree at `path`, if there is one.
fn remove_tree(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn delete_removes_live_and_archive_and_numbering_goes_on() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let (b1, k1) = bundle("a.example.org");
        store.save("web", &b1, &k1).unwrap();
        store.save("web", &b1, &k1).unwrap();
        store.save("other", &b1, &k1).unwrap();
        assert_eq!(store.delete("web").unwrap(), Some(2));
        assert!(store.live("web").unwrap().is_none());
        assert!(!state.path().join("archive/web").exists());
        let names: Vec<_> = store.list().unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["other"]);
        assert_eq!(store.delete("web").unwrap(), None, "nothing left to delete");
        // The next issue is version 3, not 1.
        assert_eq!(store.save("web", &b1, &k1).unwrap().0, 3);
        // A crash after live/ went but before the archive did: the next
        // delete finishes it.
        std::fs::rename(
            state.path().join("live/web"),
            state.path().join("live/.web.trash"),
        )
        .unwrap();
        assert!(store.live("web").unwrap().is_none());
        assert_eq!(store.delete("web").unwrap(), Some(3));
        assert!(!state.path().join("archive/web").exists());
        assert!(!state.path().join("live/.web.trash").exists());
        assert_eq!(store.live("other").unwrap().unwrap().version, 1);
    }

    fn bundle(name: &str) -> (Bundle, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key_pem = key.serialize_pem();
        let b = Bundle::parse(&cert.pem(), Some(&key_pem), &[name.to_owned()]).unwrap();
        (b, key_pem)
    }

    #[test]
    fn versions_advance_and_live_moves_as_a_set() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let (b1, k1) = bundle("a.example.org");
        let (b2, k2) = bundle("a.example.org");
        assert_eq!(store.save("web", &b1, &k1).unwrap().0, 1);
        let (v, live_dir) = store.save("web", &b2, &k2).unwrap();
        assert_eq!(v, 2);
        let live = store.live("web").unwrap().unwrap();
        assert_eq!(live.version, 2);
        assert_eq!(live.bundle.leaf_sha256, b2.leaf_sha256);
        assert_eq!(
            std::fs::read_to_string(live_dir.join("privkey.pem")).unwrap(),
            k2
        );
        assert_eq!(
            std::fs::read_link(live_dir.join("cert.pem")).unwrap(),
            PathBuf::from("../../archive/web/cert2.pem")
        );
        let mode = std::fs::metadata(state.path().join("archive/web/privkey2.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Version 1 is kept for rollback.
        assert!(state.path().join("archive/web/cert1.pem").exists());
        assert_eq!(store.list().unwrap().len(), 1);
    }
}
