//! Directories opened by descriptor, for a root process among users who own
//! parts of the file tree.
//!
//! The agent writes into a web server's webroot (owned by www-data) and
//! beside services' keys. A path names nothing stable there: between the
//! agent resolving `/var/www/html/.well-known` and writing into it, the web
//! server user may swap a directory for a symbolic link to `/etc`. So the
//! agent never resolves a path twice and never follows a link it did not
//! expect:
//!
//! - A [`Dir`] is an open directory descriptor. It is reached from `/` one
//!   component at a time with `openat(O_DIRECTORY | O_NOFOLLOW)`, and each
//!   directory is checked on the descriptor just opened ([`Trust`]).
//! - Files are created inside a `Dir` with `O_CREAT | O_EXCL | O_NOFOLLOW`
//!   under a fresh temporary name, `fchown`/`fchmod`ed and fsynced through
//!   that descriptor, then `renameat`ed over the final name in the same
//!   directory: a link or a hard link at the final name is replaced, never
//!   written through.
//! - Existing files are read only if `lstat` and `fstat` both say "regular
//!   file", opened `O_NONBLOCK` (a FIFO cannot block the reader), and read up
//!   to a cap.
//!
//! `docs/ARCHITECTURE.md` ("Files on a node") states the rule for where
//! targets may live; [`Trust`] is that rule in code.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

/// Prefix of every temporary file the agent creates beside a target or a
/// token (the same as its state files'); recovery removes only names that
/// start with it.
pub use certfleet_proto::fsio::TEMP_PREFIX;
/// Mode of every directory the agent creates: services and web servers
/// running as other users must traverse them; files carry their own modes.
pub const DIR_MODE: u32 = 0o755;

/// What went wrong with a path, naming it.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is a symbolic link; the agent does not follow links here (replace it with a directory owned by root)"
    )]
    Symlink { path: PathBuf },
    #[error("{path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error(
        "{path} is not a regular file (it is a {kind}); the agent neither reads nor writes through it"
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{path}: its directory {ancestor} is owned by {owner} (uid {uid}) with mode {mode:04o}; \
         every directory above a file the agent writes must be owned by root and writable by no one else \
         (sticky directories such as /tmp excepted){hint}"
    )]
    Untrusted {
        path: PathBuf,
        ancestor: PathBuf,
        owner: String,
        uid: u32,
        mode: u32,
        hint: &'static str,
    },
    #[error("{path}: `..` is not allowed in a path the agent writes")]
    ParentComponent { path: PathBuf },
}

impl DirError {
    fn io(path: &Path, errno: Errno) -> Self {
        Self::Io {
            path: path.to_owned(),
            source: errno.into(),
        }
    }

    /// Whether the error means only "it does not exist (yet)".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Who may own the directories on a path the agent writes under.
///
/// A directory is trusted when its owner is root (or the agent's own user),
/// or [`Trust::service_owner`], and neither its group nor others may write
/// to it, unless it is sticky and owned by root (`/tmp`: others cannot
/// rename or remove what they do not own there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trust {
    /// A service user whose own directories may hold the file (postgres'
    /// data directory), from the target's `dir_owner` key.
    pub service_owner: Option<u32>,
}

impl Trust {
    fn check(&self, stat: &Stat, dir: &Path, path: &Path) -> Result<(), DirError> {
        let uid = stat.st_uid;
        let mode = stat.st_mode & 0o7777;
        let me = rustix::process::geteuid().as_raw();
        let owner_ok = uid == 0 || uid == me || Some(uid) == self.service_owner;
        let sticky_root = mode & 0o1000 != 0 && uid == 0;
        if owner_ok && (mode & 0o022 == 0 || sticky_root) {
            return Ok(());
        }
        Err(DirError::Untrusted {
            path: path.to_owned(),
            ancestor: dir.to_owned(),
            owner: user_name(uid),
            uid,
            mode,
            hint: if owner_ok {
                ""
            } else {
                "; if a service must keep the file in its own directory, set `dir_owner` to that user for this file"
            },
        })
    }
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// What `lstat` says a directory entry is, for messages.
fn kind(stat: &Stat) -> &'static str {
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "special file",
    }
}

/// An existing regular file's owner, mode and (capped) contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regular {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// At most the cap given to [`Dir::read_regular`] plus one byte, so a
    /// longer file never compares equal to expected contents.
    pub data: Vec<u8>,
}

/// An open directory, reached without following a link.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Dir {
    /// Opens the absolute `path`, checking `/` and every directory below it
    /// with `trust`. With `create`, missing directories are made
    /// ([`DIR_MODE`], owned by the agent's user).
    pub fn open(path: &Path, trust: Trust, create: bool) -> Result<Self, DirError> {
        Self::walk(path, path, trust, create, true)
    }

    /// Opens the absolute `root` (a webroot), checking every directory
    /// above it with the default [`Trust`] but not `root` itself, which may
    /// belong to a service user. It must exist.
    pub fn open_root(root: &Path) -> Result<Self, DirError> {
        Self::walk(root, root, Trust::default(), false, false)
    }

    /// Checks that `path`'s directory (the part that exists so far) may hold
    /// a file the agent writes; a missing tail is fine, as the agent will
    /// create it.
    pub fn check_parent(path: &Path, trust: Trust) -> Result<(), DirError> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        match Self::walk(parent, path, trust, false, true) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(drop),
        }
    }

    fn walk(
        target: &Path,
        reported: &Path,
        trust: Trust,
        create: bool,
        check_last: bool,
    ) -> Result<Self, DirError> {
        let root = Path::new("/");
        let fd =
            rustix::fs::open(root, DIR_FLAGS, Mode::empty()).map_err(|e| DirError::io(root, e))?;
        let mut dir = Self {
            fd,
            path: root.to_owned(),
        };
        let names: Vec<&OsStr> = target
            .components()
            .filter_map(|c| match c {
                Component::Normal(name) => Some(Ok(name)),
                Component::ParentDir => Some(Err(())),
                _ => None,
            })
            .collect::<Result<_, _>>()
            .map_err(|()| DirError::ParentComponent {
                path: reported.to_owned(),
            })?;
        dir.check(trust, reported)?;
        for (i, name) in names.iter().enumerate() {
            dir = dir.child(name, create)?;
            if check_last || i + 1 < names.len() {
                dir.check(trust, reported)?;
            }
        }
        Ok(dir)
    }

    fn check(&self, trust: Trust, reported: &Path) -> Result<(), DirError> {
        let stat = rustix::fs::fstat(&self.fd).map_err(|e| DirError::io(&self.path, e))?;
        trust.check(&stat, &self.path, reported)
    }

    /// The path this directory was reached by (for messages only).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the subdirectory `name` without following a link, making it
    /// ([`DIR_MODE`]) when missing and `create` is set.
    pub fn child(&self, name: &OsStr, create: bool) -> Result<Self, DirError> {
        let path = self.path.join(name);
        let opened = match rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(DirError::io(&path, e)),
                }
                let fd = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())
                    .map_err(|e| self.classify(name, e))?;
                // The umask (0027 for the daemon) would leave it 0750, which
                // a web server running as www-data cannot enter. Only a
                // directory this process owns is changed: if someone swapped
                // in their own, it stays theirs, as it was.
                let stat = rustix::fs::fstat(&fd).map_err(|e| DirError::io(&path, e))?;
                if stat.st_uid == rustix::process::geteuid().as_raw()
                    && stat.st_mode & 0o7777 != DIR_MODE
                {
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE))
                        .map_err(|e| DirError::io(&path, e))?;
                }
                Ok(fd)
            }
            other => other,
        };
        let fd = opened.map_err(|e| self.classify(name, e))?;
        Ok(Self { fd, path })
    }

    /// Turns a failed `openat` of `name` into an error that says what is there.
    fn classify(&self, name: &OsStr, errno: Errno) -> DirError {
        let path = self.path.join(name);
        if matches!(errno, Errno::LOOP | Errno::NOTDIR) {
            match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    return DirError::Symlink { path };
                }
                Ok(_) => return DirError::NotDirectory { path },
                Err(_) => {}
            }
        }
        DirError::io(&path, errno)
    }

    /// Writes `data` to a new temporary file here, owned by `owner`
    /// (`(uid, gid)`, or left to the agent), with `mode`, fsynced. Returns
    /// its name, for [`Dir::rename`].
    pub fn stage(
        &self,
        data: &[u8],
        owner: Option<(u32, u32)>,
        mode: u32,
    ) -> Result<OsString, DirError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let flags = OFlags::WRONLY
            .union(OFlags::CREATE)
            .union(OFlags::EXCL)
            .union(OFlags::NOFOLLOW)
            .union(OFlags::CLOEXEC);
        let (name, fd) = loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let name = OsString::from(format!(
                "{TEMP_PREFIX}{}-{}-{nanos:08x}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            match rustix::fs::openat(
                &self.fd,
                name.as_os_str(),
                flags,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => break (name, fd),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(DirError::io(&self.path.join(&name), e)),
            }
        };
        let path = self.path.join(&name);
        let written = (|| {
            let err = |e: Errno| DirError::io(&path, e);
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(err)?;
            }
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(err)?;
            let mut file = File::from(fd);
            file.write_all(data).map_err(|source| DirError::Io {
                path: path.clone(),
                source,
            })?;
            file.sync_all().map_err(|source| DirError::Io {
                path: path.clone(),
                source,
            })
        })();
        match written {
            Ok(()) => Ok(name),
            Err(e) => {
                let _ = rustix::fs::unlinkat(&self.fd, name.as_os_str(), AtFlags::empty());
                Err(e)
            }
        }
    }

    /// Renames `from` over `to`, both in this directory.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> Result<(), DirError> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to)
            .map_err(|e| DirError::io(&self.path.join(to), e))
    }

    /// Links `to` to the file `from`, both in this directory (`to` must
    /// not exist; `from` is not followed if it is a link).
    pub fn link(&self, from: &OsStr, to: &OsStr) -> Result<(), DirError> {
        rustix::fs::linkat(&self.fd, from, &self.fd, to, AtFlags::empty())
            .map_err(|e| DirError::io(&self.path.join(to), e))
    }

    /// fsyncs the regular file `name` (its data and inode, such as a link
    /// count just changed); never follows a link or opens anything else.
    pub fn sync_entry(&self, name: &OsStr) -> Result<(), DirError> {
        let path = self.path.join(name);
        let flags = OFlags::RDONLY
            .union(OFlags::NOFOLLOW)
            .union(OFlags::NONBLOCK)
            .union(OFlags::NOCTTY)
            .union(OFlags::CLOEXEC);
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::empty())
            .map_err(|e| self.classify(name, e))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| DirError::io(&path, e))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(DirError::NotRegular {
                path,
                kind: kind(&stat),
            });
        }
        rustix::fs::fsync(&fd).map_err(|e| DirError::io(&path, e))
    }

    /// Writes `name` atomically: a staged temp renamed over it, then the
    /// directory fsynced.
    pub fn write_atomic(
        &self,
        name: &OsStr,
        data: &[u8],
        owner: Option<(u32, u32)>,
        mode: u32,
    ) -> Result<(), DirError> {
        self.replace(name, data, owner, mode)?;
        self.sync()
    }

    /// Like [`Self::write_atomic`], but leaves the directory's fsync to the
    /// caller, who changes several entries here and syncs once: each sync
    /// is a disk flush, and an install makes a dozen of them.
    pub fn replace(
        &self,
        name: &OsStr,
        data: &[u8],
        owner: Option<(u32, u32)>,
        mode: u32,
    ) -> Result<(), DirError> {
        let temp = self.stage(data, owner, mode)?;
        if let Err(e) = self.rename(&temp, name) {
            let _ = self.remove(&temp);
            return Err(e);
        }
        Ok(())
    }

    /// Removes the entry `name` (never a directory); `false` if it was not there.
    pub fn remove(&self, name: &OsStr) -> Result<bool, DirError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(DirError::io(&self.path.join(name), e)),
        }
    }

    /// Whether `name` exists here (as anything; links are not followed).
    pub fn contains(&self, name: &OsStr) -> Result<bool, DirError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(DirError::io(&self.path.join(name), e)),
        }
    }

    /// fsyncs the directory, so renames in it survive a crash.
    pub fn sync(&self) -> Result<(), DirError> {
        rustix::fs::fsync(&self.fd).map_err(|e| DirError::io(&self.path, e))
    }

    /// The names in this directory that start with `prefix`.
    pub fn names_starting_with(&self, prefix: &str) -> Result<Vec<OsString>, DirError> {
        let err = |e| DirError::io(&self.path, e);
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_bytes();
            if name.starts_with(prefix.as_bytes()) {
                names.push(OsStr::from_bytes(name).to_owned());
            }
        }
        Ok(names)
    }

    /// Reads the regular file `name`: `None` if it does not exist, an error
    /// naming it if it is anything but a regular file. At most `max + 1`
    /// bytes are read.
    pub fn read_regular(&self, name: &OsStr, max: usize) -> Result<Option<Regular>, DirError> {
        let path = self.path.join(name);
        let lstat = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(DirError::io(&path, e)),
        };
        let not_regular = |st: &Stat| DirError::NotRegular {
            path: path.clone(),
            kind: kind(st),
        };
        if FileType::from_raw_mode(lstat.st_mode) != FileType::RegularFile {
            return Err(not_regular(&lstat));
        }
        let flags = OFlags::RDONLY
            .union(OFlags::NOFOLLOW)
            .union(OFlags::NONBLOCK)
            .union(OFlags::NOCTTY)
            .union(OFlags::CLOEXEC);
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.classify(name, e)),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| DirError::io(&path, e))?;
        // Swapped between lstat and open: report what is there now.
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(not_regular(&stat));
        }
        let mut data = Vec::with_capacity(max.min(1 << 20) + 1);
        File::from(fd)
            .take(max as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|source| DirError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Some(Regular {
            uid: stat.st_uid,
            gid: stat.st_gid,
            mode: stat.st_mode & 0o7777,
            data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn creates_missing_directories_0755_whatever_the_umask() {
        let dir = tempdir();
        let deep = dir.path().join("a/b/c");
        let opened = Dir::open(&deep, Trust::default(), true).unwrap();
        opened
            .write_atomic(OsStr::new("f"), b"x", None, 0o640)
            .unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(dir.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, DIR_MODE, "{d}");
        }
        let meta = std::fs::metadata(deep.join("f")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read(deep.join("f")).unwrap(), b"x");
        assert!(opened.names_starting_with(TEMP_PREFIX).unwrap().is_empty());
    }

    #[test]
    fn refuses_a_symlink_anywhere_on_the_path() {
        let dir = tempdir();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        symlink(&outside, dir.path().join("root/link")).unwrap();
        let err = Dir::open(&dir.path().join("root/link/sub"), Trust::default(), true).unwrap_err();
        assert!(matches!(err, DirError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("root/link"), "{err}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn a_group_writable_ancestor_is_named_with_owner_and_mode() {
        let dir = tempdir();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o775)).unwrap();
        let target = shared.join("x/key.pem");
        let err = Dir::check_parent(&target, Trust::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&*shared.to_string_lossy()) && text.contains("0775"),
            "{text}"
        );
        // A missing tail under trusted directories is fine.
        Dir::check_parent(&dir.path().join("new/dir/key.pem"), Trust::default()).unwrap();
    }

    #[test]
    fn writes_replace_links_and_reads_refuse_fifos() {
        let dir = tempdir();
        let d = Dir::open(dir.path(), Trust::default(), false).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&victim, dir.path().join("sym")).unwrap();
        std::fs::hard_link(&victim, dir.path().join("hard")).unwrap();
        d.write_atomic(OsStr::new("sym"), b"new", None, 0o644)
            .unwrap();
        d.write_atomic(OsStr::new("hard"), b"new", None, 0o644)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(
            std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o600
        );
        rustix::fs::mkfifoat(&d.fd, "fifo", Mode::from_raw_mode(0o600)).unwrap();
        let err = d.read_regular(OsStr::new("fifo"), 10).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        symlink(&victim, dir.path().join("sym2")).unwrap();
        assert!(matches!(
            d.read_regular(OsStr::new("sym2"), 10),
            Err(DirError::NotRegular { .. })
        ));
        let read = d.read_regular(OsStr::new("hard"), 2).unwrap().unwrap();
        assert_eq!(
            read.data, b"new",
            "a cap of 2 reads 3 bytes, enough to see it differs"
        );
        assert_eq!(d.read_regular(OsStr::new("none"), 2).unwrap(), None);
    }
}
