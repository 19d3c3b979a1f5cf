//! Installing a certificate version into the files this node's config
//! declares, so that services never see a key with the wrong certificate.
//!
//! 1. The bundle is validated (chain in order, key matches leaf, names
//!    covered) before anything is written.
//! 2. Every target is written as a temp file beside it (owner, group, mode
//!    set, fsynced).
//! 3. One record of the version (its chain, key and every temp→target
//!    rename) is written and fsynced as `<state>/certs/<name>/<version>.json`,
//!    the agent's own archive (the last [`KEEP_VERSIONS`] kept, for
//!    rollback), and linked as `journal.json`. Only then are the temps
//!    renamed over the targets. Each
//!    target's directory is reached through [`crate::dir`]: no link is
//!    followed, and every directory on the way must pass the target's
//!    [`Trust`] rule, so a service user cannot steer these writes.
//! 4. If the agent dies between 3 and the end, the journal is rolled
//!    forward when it starts again, before it serves anything: the targets
//!    hold the old set or the new set, never a mix. Dying before the journal
//!    exists leaves only temp files, which are removed.
//! 5. Once every rename is synced, the journal is renamed to `current.json`:
//!    the installed version is the record linked there.
//!
//! Each file an install creates costs the file system a new inode, and each
//! one it replaces frees one; on a busy node (or a thousand agents sharing a
//! disk) that allocation is most of an install's cost. So an install makes
//! only what the steps above need: a temp per target and one record, which
//! is the archive, the journal and then `current.json` under three names
//! (links, not copies). Agents before this layout kept a directory per version
//! (`<version>/{fullchain,privkey}.pem`) and the version alone in `current`;
//! both are still read, and pruned or replaced as new versions come.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use certfleet_proto::bundle::{Bundle, InvalidBundle, hex};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::config::{CertificateTargets, Content, TargetFile};
use crate::dir::{Dir, DirError, TEMP_PREFIX, Trust};

/// The highest version an install may name: far past any certificate's
/// life (a version a day for 2,700 years), and far from `u32::MAX`, where
/// "the next version" would wrap.
pub const MAX_VERSION: u32 = 1_000_000;

/// Versions kept in the agent's archive per certificate (current, previous,
/// one more).
pub const KEEP_VERSIONS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("certificate {0:?} has no install targets in this agent's config")]
    Unknown(String),
    #[error("certificate {name} version {version} refused: {source}")]
    Invalid {
        name: String,
        version: u32,
        source: InvalidBundle,
    },
    #[error("version {0} is not between 1 and {MAX_VERSION}")]
    Version(u32),
    #[error("certificate {name} has no version before {current} to roll back to")]
    NoPrevious { name: String, current: u32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Target(#[from] DirError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A target file as it is on disk after an install.
#[derive(Debug, Clone)]
pub struct FileState {
    pub target: TargetFile,
    pub sha256: String,
}

/// The outcome of an install.
#[derive(Debug, Clone)]
pub struct Installed {
    pub version: u32,
    pub leaf_sha256: String,
    pub changed: bool,
    pub files: Vec<FileState>,
}

/// What is installed for a certificate.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub version: u32,
    pub leaf_sha256: String,
    /// Every target holds exactly what `version` should.
    pub intact: bool,
    /// Why not, naming the first target that differs.
    pub problem: Option<String>,
    /// The installed leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

/// The outcome of [`Installer::remove`].
#[derive(Debug, Clone, Default)]
pub struct Removed {
    /// The version that was installed; 0 when none was.
    pub version: u32,
    /// The target paths removed.
    pub removed: Vec<String>,
    /// Targets left in place, each with why.
    pub kept: Vec<String>,
}

/// A version as the agent keeps it: archived as `<version>.json`, linked
/// as [`JOURNAL`] while its install renames the targets, then as
/// [`CURRENT`].
#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    /// Each staged temp and the target it replaces, as the version was
    /// last installed.
    renames: Vec<(PathBuf, PathBuf)>,
    /// Absent from the journal an older agent wrote (it archived the
    /// version apart): such a journal is still rolled forward.
    #[serde(default)]
    fullchain_pem: String,
    #[serde(default)]
    key_pem: String,
}

/// An install in progress: the renames still to finish.
const JOURNAL: &str = "journal.json";
/// Where the next journal is linked before it is renamed over [`JOURNAL`].
const JOURNAL_NEW: &str = "journal.json.new";
/// The last install finished: its journal, renamed.
const CURRENT: &str = "current.json";
/// What older agents kept instead of [`CURRENT`]: the version as text.
const LEGACY_CURRENT: &str = "current";

/// An archived version's entry in a certificate's directory.
enum ArchiveEntry {
    /// `<version>.json`.
    File(u32),
    /// `<version>/{fullchain,privkey}.pem`, as older agents kept it.
    Legacy(u32),
}

impl ArchiveEntry {
    fn parse(name: &OsStr) -> Option<Self> {
        let name = name.to_str()?;
        match name.strip_suffix(".json") {
            Some(version) => version.parse().ok().map(Self::File),
            None => name.parse().ok().map(Self::Legacy),
        }
    }

    fn version(&self) -> u32 {
        match self {
            Self::File(v) | Self::Legacy(v) => *v,
        }
    }

    fn name(&self) -> OsString {
        match self {
            Self::File(v) => format!("{v}.json").into(),
            Self::Legacy(v) => v.to_string().into(),
        }
    }

    fn path(&self, dir: &Path) -> PathBuf {
        dir.join(self.name())
    }

    fn remove(&self, dir: &Path) -> Result<(), InstallError> {
        let path = self.path(dir);
        match self {
            Self::File(_) => std::fs::remove_file(&path),
            Self::Legacy(_) => std::fs::remove_dir_all(&path),
        }
        .map_err(io(&path))
    }
}

/// Installs certificates; one install at a time on this node.
pub struct Installer {
    root: PathBuf,
    /// Replaced whole when the config is reloaded (SIGHUP); an install
    /// already running keeps the targets it started with.
    targets: RwLock<HashMap<String, Arc<CertificateTargets>>>,
    lock: std::sync::Mutex<()>,
}

impl Installer {
    /// Opens the archive under `state_dir` and finishes any install a crash
    /// interrupted.
    pub fn open(state_dir: &Path, targets: &[CertificateTargets]) -> Result<Self, InstallError> {
        let this = Self {
            root: state_dir.join("certs"),
            targets: RwLock::new(by_name(targets)),
            lock: std::sync::Mutex::new(()),
        };
        for t in targets {
            this.recover(t)?;
        }
        Ok(this)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The configured targets and services of `name`.
    pub fn targets(&self, name: &str) -> Result<Arc<CertificateTargets>, InstallError> {
        self.targets
            .read()
            .expect("targets lock poisoned")
            .get(name)
            .cloned()
            .ok_or_else(|| InstallError::Unknown(name.to_owned()))
    }

    /// Replaces every certificate's targets and services with `targets`
    /// (a reloaded config's), and finishes any interrupted install of the
    /// certificates it adds; if that fails, the old targets stay (blocking:
    /// call from a blocking thread).
    /// Waits for an install in progress, so none straddles the change.
    /// Installed versions stay; a target that moved is written at the next
    /// install, and `status` reports it as not intact until then.
    pub fn replace_targets(&self, targets: &[CertificateTargets]) -> Result<(), InstallError> {
        let _guard = self.lock.lock().expect("install lock poisoned");
        // Recovery finds a target's trust rule in the map: the new one.
        let old = std::mem::replace(
            &mut *self.targets.write().expect("targets lock poisoned"),
            by_name(targets),
        );
        for t in targets {
            if let Err(e) = self.recover(t) {
                *self.targets.write().expect("targets lock poisoned") = old;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Installs `version` (blocking: call from a blocking thread).
    pub fn install(
        &self,
        name: &str,
        version: u32,
        fullchain_pem: &str,
        key_pem: &str,
        names: &[String],
    ) -> Result<Installed, InstallError> {
        let targets = self.targets(name)?;
        if version == 0 || version > MAX_VERSION {
            return Err(InstallError::Version(version));
        }
        let bundle = Bundle::parse(fullchain_pem, Some(key_pem), names).map_err(|source| {
            InstallError::Invalid {
                name: name.to_owned(),
                version,
                source,
            }
        })?;
        let _guard = self.lock.lock().expect("install lock poisoned");
        let contents = contents(&bundle, key_pem, &targets);
        if self.current(name)? == version && self.differs(&contents).is_none() {
            return Ok(self.report(version, &bundle, &contents, false));
        }
        self.swap(name, version, fullchain_pem, key_pem, &contents)?;
        info!(certificate = name, version, "installed");
        if let Err(e) = self.prune(name, version) {
            warn!(certificate = name, error = %e, "cannot prune the archive");
        }
        Ok(self.report(version, &bundle, &contents, true))
    }

    fn report(
        &self,
        version: u32,
        bundle: &Bundle,
        contents: &[(TargetFile, Vec<u8>)],
        changed: bool,
    ) -> Installed {
        Installed {
            version,
            leaf_sha256: bundle.leaf_sha256_hex(),
            changed,
            files: contents
                .iter()
                .map(|(t, data)| FileState {
                    target: t.clone(),
                    sha256: hex(&Sha256::digest(data)),
                })
                .collect(),
        }
    }

    /// Reinstalls the newest archived version older than the current one.
    pub fn rollback(&self, name: &str) -> Result<Installed, InstallError> {
        self.targets(name)?;
        let (current, previous) = {
            let _guard = self.lock.lock().expect("install lock poisoned");
            let current = self.current(name)?;
            let previous = self
                .archived(name)?
                .iter()
                .map(ArchiveEntry::version)
                .filter(|v| *v < current)
                .max();
            (current, previous)
        };
        let previous = previous.ok_or_else(|| InstallError::NoPrevious {
            name: name.to_owned(),
            current,
        })?;
        let (fullchain, key) = self.read_archived(name, previous)?;
        let installed = self.install(name, previous, &fullchain, &key, &[])?;
        warn!(
            certificate = name,
            from = current,
            to = previous,
            "rolled back"
        );
        Ok(installed)
    }

    /// Removes the targets of `name` that still hold exactly what the
    /// agent installed (the current version, as its archive records it),
    /// then forgets the installed versions (blocking: call from a blocking
    /// thread).
    ///
    /// A target someone changed since is not the agent's any more: it is
    /// kept, and named with why. Each target is reached through
    /// [`crate::dir`] like an install's, so no link is followed, and a
    /// link or anything else that is not a regular file is never removed.
    /// Directories stay: the agent cannot tell which it made.
    pub fn remove(&self, name: &str) -> Result<Removed, InstallError> {
        let targets = self.targets(name)?;
        let _guard = self.lock.lock().expect("install lock poisoned");
        let version = self.current(name)?;
        let mut removed = Removed {
            version,
            ..Removed::default()
        };
        if version == 0 {
            return Ok(removed);
        }
        let (fullchain, key) = self.read_archived(name, version)?;
        let bundle =
            Bundle::parse(&fullchain, Some(&key), &[]).map_err(|source| InstallError::Invalid {
                name: name.to_owned(),
                version,
                source,
            })?;
        for (target, data) in contents(&bundle, &key, &targets) {
            let path = target.path.display().to_string();
            let found = open_parent(&target, false)
                .and_then(|(dir, file)| Ok((dir.read_regular(&file, data.len())?, dir, file)));
            match found {
                Ok((Some(file), dir, name)) if file.data == data => {
                    dir.remove(&name)?;
                    dir.sync()?;
                    removed.removed.push(path);
                }
                Ok((Some(_), _, _)) => removed
                    .kept
                    .push(format!("{path} does not hold what the agent installed")),
                Ok((None, _, _)) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => removed.kept.push(e.to_string()),
            }
        }
        self.forget(name)?;
        info!(
            certificate = name,
            version,
            removed = removed.removed.len(),
            kept = removed.kept.len(),
            "removed"
        );
        Ok(removed)
    }

    /// Drops `name`'s `current` record and archived versions: the next
    /// install starts as on a fresh node, whatever version it names.
    fn forget(&self, name: &str) -> Result<(), InstallError> {
        let dir = Dir::open(&self.dir(name), Trust::default(), false)?;
        dir.remove(OsStr::new(CURRENT))?;
        dir.remove(OsStr::new(LEGACY_CURRENT))?;
        dir.sync()?;
        for entry in self.archived(name)? {
            entry.remove(dir.path())?;
        }
        Ok(dir.sync()?)
    }

    /// The archived versions of `name`, in either layout.
    fn archived(&self, name: &str) -> Result<Vec<ArchiveEntry>, InstallError> {
        let dir = self.dir(name);
        Ok(std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| ArchiveEntry::parse(&e.ok()?.file_name()))
            .collect())
    }

    /// The chain and key of an archived version.
    fn read_archived(&self, name: &str, version: u32) -> Result<(String, String), InstallError> {
        let path = ArchiveEntry::File(version).path(&self.dir(name));
        match std::fs::read(&path) {
            Ok(bytes) => {
                let record: Record = serde_json::from_slice(&bytes).map_err(|e| {
                    io(&path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                })?;
                return Ok((record.fullchain_pem, record.key_pem));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let dir = ArchiveEntry::Legacy(version).path(&self.dir(name));
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(io(&path))
        };
        Ok((read("fullchain.pem")?, read("privkey.pem")?))
    }

    /// What is installed for `name`, checked against the files on disk.
    pub fn status(&self, name: &str) -> Result<Status, InstallError> {
        let targets = self.targets(name)?;
        let _guard = self.lock.lock().expect("install lock poisoned");
        let version = self.current(name)?;
        if version == 0 {
            return Ok(Status::default());
        }
        let (fullchain, key) = self.read_archived(name, version)?;
        let Ok(bundle) = Bundle::parse(&fullchain, Some(&key), &[]) else {
            return Ok(Status {
                version,
                ..Status::default()
            });
        };
        let problem = self.differs(&contents(&bundle, &key, &targets));
        Ok(Status {
            version,
            leaf_sha256: bundle.leaf_sha256_hex(),
            intact: problem.is_none(),
            problem,
            not_after: bundle.not_after,
        })
    }

    /// The installed version: [`CURRENT`]'s, else (an agent upgraded
    /// before its first install) [`LEGACY_CURRENT`]'s; 0 for none.
    fn current(&self, name: &str) -> Result<u32, InstallError> {
        let path = self.dir(name).join(CURRENT);
        match std::fs::read(&path) {
            Ok(bytes) => {
                return Ok(serde_json::from_slice::<Record>(&bytes).map_or(0, |r| r.version));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let path = self.dir(name).join(LEGACY_CURRENT);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The first way a target differs from its expected bytes, owner and
    /// mode, naming its path; `None` when every target is as expected.
    /// Never blocks: a FIFO or device at a target is reported, not opened.
    fn differs(&self, contents: &[(TargetFile, Vec<u8>)]) -> Option<String> {
        for (target, data) in contents {
            let path = target.path.display();
            let found = open_parent(target, false)
                .and_then(|(dir, name)| dir.read_regular(&name, data.len()));
            let file = match found {
                Ok(Some(file)) => file,
                Ok(None) => return Some(format!("{path} is missing")),
                Err(e) if e.is_not_found() => return Some(format!("{path} is missing")),
                Err(e) => return Some(e.to_string()),
            };
            if (file.uid, file.gid, file.mode) != (target.uid, target.gid, target.mode) {
                return Some(format!(
                    "{path} is uid {} gid {} mode {:04o}, not {}:{} {:04o}",
                    file.uid, file.gid, file.mode, target.owner, target.group, target.mode
                ));
            }
            if file.data != *data {
                return Some(format!("{path} does not hold the installed version"));
            }
        }
        None
    }

    /// Keeps the newest [`KEEP_VERSIONS`] archived versions.
    fn prune(&self, name: &str, keep_at_least: u32) -> Result<(), InstallError> {
        let dir = self.dir(name);
        let mut versions = self.archived(name)?;
        versions.sort_unstable_by_key(|e| std::cmp::Reverse(e.version()));
        for old in versions.into_iter().skip(KEEP_VERSIONS) {
            if old.version() != keep_at_least {
                let _ = old.remove(&dir);
            }
        }
        Ok(())
    }

    fn swap(
        &self,
        name: &str,
        version: u32,
        fullchain: &str,
        key: &str,
        contents: &[(TargetFile, Vec<u8>)],
    ) -> Result<(), InstallError> {
        // Stage every temp; if any fails (disk full, a refused directory),
        // the ones already written are removed and the targets are untouched.
        let mut staged: Vec<(Dir, OsString, &TargetFile)> = Vec::with_capacity(contents.len());
        for (target, data) in contents {
            let result = open_parent(target, true).and_then(|(dir, _)| {
                let temp = dir.stage(data, Some((target.uid, target.gid)), target.mode)?;
                Ok((dir, temp))
            });
            match result {
                Ok((dir, temp)) => staged.push((dir, temp, target)),
                Err(e) => {
                    for (dir, temp, _) in &staged {
                        let _ = dir.remove(temp);
                    }
                    return Err(e.into());
                }
            }
        }
        let renames: Vec<(PathBuf, PathBuf)> = staged
            .iter()
            .map(|(dir, temp, target)| (dir.path().join(temp), target.path.clone()))
            .collect();
        let record = Record {
            version,
            renames,
            fullchain_pem: fullchain.to_owned(),
            key_pem: key.to_owned(),
        };
        if let Err(e) = self.journal(name, &record) {
            for (dir, temp, _) in &staged {
                let _ = dir.remove(temp);
            }
            return Err(e);
        }
        self.roll_forward(name, &record)
    }

    /// Writes `record` as its version's archive and links it as the
    /// journal, both on the disk before this returns: one new file.
    fn journal(&self, name: &str, record: &Record) -> Result<(), InstallError> {
        let dir = Dir::open(&self.dir(name), Trust::default(), false)?;
        let json = serde_json::to_vec(record).expect("a record serializes");
        let archived = ArchiveEntry::File(record.version).name();
        let temp = dir.stage(&json, None, 0o600)?;
        if let Err(e) = dir.rename(&temp, &archived) {
            let _ = dir.remove(&temp);
            return Err(e.into());
        }
        // Linked beside it, then renamed over a journal a failed install
        // left, so there is a journal at every moment from here.
        dir.remove(OsStr::new(JOURNAL_NEW))?;
        dir.link(&archived, OsStr::new(JOURNAL_NEW))?;
        dir.rename(OsStr::new(JOURNAL_NEW), OsStr::new(JOURNAL))?;
        // The file's link count, then the directory's entries.
        dir.sync_entry(&archived)?;
        Ok(dir.sync()?)
    }

    /// The trust rule of the configured target at `path` (a journal may
    /// name a target the config no longer has: the default rule then).
    fn trust_of(&self, path: &Path) -> Trust {
        self.targets
            .read()
            .expect("targets lock poisoned")
            .values()
            .flat_map(|t| &t.files)
            .find(|f| f.path == path)
            .map(TargetFile::trust)
            .unwrap_or_default()
    }

    /// Finishes the renames a journal names, then makes the journal the
    /// record of what is installed.
    fn roll_forward(&self, name: &str, journal: &Record) -> Result<(), InstallError> {
        let mut dirs: Vec<Dir> = Vec::new();
        for (temp, target) in &journal.renames {
            let (Some(dir_path), Some(temp_name), Some(target_name)) =
                (target.parent(), temp.file_name(), target.file_name())
            else {
                continue;
            };
            let dir = Dir::open(dir_path, self.trust_of(target), false)?;
            if dir.contains(temp_name)? {
                dir.rename(temp_name, target_name)?;
            }
            // Each directory is synced once, however many targets it holds.
            if !dirs.iter().any(|d| d.path() == dir.path()) {
                dirs.push(dir);
            }
        }
        for dir in &dirs {
            dir.sync()?;
        }
        // The journal becomes `current.json` by a rename, which makes no
        // new file (the record before it stays as its archive, or goes if
        // pruned); an older agent's `current` goes in the same sync.
        let dir = Dir::open(&self.dir(name), Trust::default(), false)?;
        dir.rename(OsStr::new(JOURNAL), OsStr::new(CURRENT))?;
        dir.remove(OsStr::new(LEGACY_CURRENT))?;
        Ok(dir.sync()?)
    }

    /// At start: roll an interrupted install forward, and remove temps a
    /// crash left before its journal existed.
    fn recover(&self, targets: &CertificateTargets) -> Result<(), InstallError> {
        let dir = self.dir(&targets.name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let own = Dir::open(&dir, Trust::default(), false)?;
        own.remove(OsStr::new(JOURNAL_NEW))?;
        for temp in own.names_starting_with(TEMP_PREFIX)? {
            own.remove(&temp)?;
        }
        let journal_path = dir.join(JOURNAL);
        match std::fs::read(&journal_path) {
            Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(journal) => {
                    warn!(certificate = %targets.name, version = journal.version, "finishing an install a crash interrupted");
                    self.roll_forward(&targets.name, &journal)?;
                }
                Err(e) => {
                    // Written and synced before it was linked, so a torn
                    // journal means it never became the journal: the
                    // targets were never touched.
                    warn!(certificate = %targets.name, error = %e, "discarding an unreadable journal");
                    std::fs::remove_file(&journal_path).map_err(io(&journal_path))?;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&journal_path)(e)),
        }
        for target in &targets.files {
            let Ok((dir, _)) = open_parent(target, false) else {
                continue;
            };
            for temp in dir.names_starting_with(TEMP_PREFIX).unwrap_or_default() {
                let _ = dir.remove(&temp);
            }
        }
        Ok(())
    }
}

/// The bytes each target gets.
/// `targets` keyed by certificate name.
fn by_name(targets: &[CertificateTargets]) -> HashMap<String, Arc<CertificateTargets>> {
    targets
        .iter()
        .map(|t| (t.name.clone(), Arc::new(t.clone())))
        .collect()
}

fn contents(
    bundle: &Bundle,
    key_pem: &str,
    targets: &CertificateTargets,
) -> Vec<(TargetFile, Vec<u8>)> {
    let fullchain = format!("{}{}", bundle.leaf_pem, bundle.chain_pem);
    let key = if key_pem.ends_with('\n') {
        key_pem.to_owned()
    } else {
        format!("{key_pem}\n")
    };
    targets
        .files
        .iter()
        .map(|t| {
            let data = match t.content {
                Content::Cert => bundle.leaf_pem.clone(),
                Content::Chain => bundle.chain_pem.clone(),
                Content::Fullchain => fullchain.clone(),
                Content::Privkey => key.clone(),
                Content::KeyFullchain => format!("{key}{fullchain}"),
            };
            (t.clone(), data.into_bytes())
        })
        .collect()
}

/// The directory holding `target`, opened under its trust rule (made when
/// missing and `create`), and the file's name in it.
fn open_parent(target: &TargetFile, create: bool) -> Result<(Dir, OsString), DirError> {
    let parent = target.path.parent().unwrap_or(Path::new("/"));
    let name = target.path.file_name().unwrap_or(OsStr::new("")).to_owned();
    Ok((Dir::open(parent, target.trust(), create)?, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};
    use std::os::unix::fs::MetadataExt;

    fn bundle(name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn targets(dir: &Path) -> CertificateTargets {
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let file = |content, name: &str, mode| TargetFile {
            content,
            path: dir.join(name),
            owner: String::new(),
            uid,
            group: String::new(),
            gid,
            mode,
            dir_owner: None,
        };
        CertificateTargets {
            name: "web".into(),
            files: vec![
                file(Content::Fullchain, "live/fullchain.pem", 0o644),
                file(Content::Privkey, "private/server.key", 0o640),
            ],
            services: Vec::new(),
        }
    }

    /// Stages every target of `t` for `bundle`, as an install does before
    /// its journal: each temp and the target it is for.
    fn stage_all(t: &CertificateTargets, bundle: &Bundle, key: &str) -> Vec<(PathBuf, PathBuf)> {
        contents(bundle, key, t)
            .iter()
            .map(|(target, data)| {
                let (dir, _) = open_parent(target, false).unwrap();
                let temp = dir
                    .stage(data, Some((target.uid, target.gid)), target.mode)
                    .unwrap();
                (dir.path().join(temp), target.path.clone())
            })
            .collect()
    }

    #[test]
    fn installs_once_reports_no_op_and_repairs_drift() {
        let dir = tempfile::tempdir().unwrap();
        let t = targets(dir.path());
        let installer =
            Installer::open(&dir.path().join("state"), std::slice::from_ref(&t)).unwrap();
        let (chain, key) = bundle("a.example.org");
        let names = vec!["a.example.org".to_owned()];
        let first = installer.install("web", 1, &chain, &key, &names).unwrap();
        assert!(first.changed);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("private/server.key")).unwrap(),
            key
        );
        let mode = std::fs::metadata(dir.path().join("private/server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert!(
            !installer
                .install("web", 1, &chain, &key, &names)
                .unwrap()
                .changed
        );
        // Drift: someone edits a target; the same version is rewritten.
        std::fs::write(dir.path().join("live/fullchain.pem"), "edited").unwrap();
        assert!(!installer.status("web").unwrap().intact);
        assert!(
            installer
                .install("web", 1, &chain, &key, &names)
                .unwrap()
                .changed
        );
        assert!(installer.status("web").unwrap().intact);
        // A wrong key or a missing name is refused before anything is written.
        let (_, other_key) = bundle("a.example.org");
        assert!(matches!(
            installer.install("web", 2, &chain, &other_key, &names),
            Err(InstallError::Invalid { .. })
        ));
        assert!(matches!(
            installer.install("web", 2, &chain, &key, &["b.example.org".to_owned()]),
            Err(InstallError::Invalid { .. })
        ));
        assert!(matches!(
            installer.install("nope", 1, &chain, &key, &names),
            Err(InstallError::Unknown(_))
        ));
        // A version no coordinator would send ("next" would wrap).
        for version in [0, MAX_VERSION + 1, u32::MAX] {
            let err = installer
                .install("web", version, &chain, &key, &names)
                .unwrap_err();
            assert!(
                matches!(err, InstallError::Version(v) if v == version),
                "{err}"
            );
        }
        assert_eq!(installer.status("web").unwrap().version, 1);
    }

    #[test]
    fn remove_takes_only_what_the_agent_installed() {
        let dir = tempfile::tempdir().unwrap();
        let t = targets(dir.path());
        let installer =
            Installer::open(&dir.path().join("state"), std::slice::from_ref(&t)).unwrap();
        // Nothing installed: nothing to do, and no error.
        assert_eq!(installer.remove("web").unwrap().version, 0);
        let (chain, key) = bundle("a.example.org");
        installer.install("web", 3, &chain, &key, &[]).unwrap();
        // Someone else's file beside the targets, and an edited target.
        let other = dir.path().join("live/other.pem");
        std::fs::write(&other, "not ours").unwrap();
        let key_path = dir.path().join("private/server.key");
        std::fs::write(&key_path, "edited by hand").unwrap();
        let removed = installer.remove("web").unwrap();
        assert_eq!(removed.version, 3);
        let fullchain = dir.path().join("live/fullchain.pem");
        assert_eq!(removed.removed, [fullchain.display().to_string()]);
        assert_eq!(
            removed.kept,
            [format!(
                "{} does not hold what the agent installed",
                key_path.display()
            )]
        );
        assert!(!fullchain.exists());
        assert_eq!(
            std::fs::read_to_string(&key_path).unwrap(),
            "edited by hand"
        );
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "not ours");
        assert_eq!(installer.status("web").unwrap().version, 0);
        // A later install starts afresh, at whatever version it names.
        installer.install("web", 4, &chain, &key, &[]).unwrap();
        assert_eq!(installer.status("web").unwrap().version, 4);
        assert!(
            installer.rollback("web").is_err(),
            "version 3 was forgotten"
        );
    }

    #[test]
    fn an_interrupted_swap_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let t = targets(dir.path());
        let installer = Installer::open(&state, std::slice::from_ref(&t)).unwrap();
        let (chain1, key1) = bundle("a.example.org");
        installer.install("web", 1, &chain1, &key1, &[]).unwrap();
        // Stage version 2 and write its journal, then "crash" after the
        // first rename: the key is new, the chain is old.
        let (chain2, key2) = bundle("a.example.org");
        let b2 = Bundle::parse(&chain2, Some(&key2), &[]).unwrap();
        let renames = stage_all(&t, &b2, &key2);
        let journal = Record {
            version: 2,
            renames,
            fullchain_pem: chain2.clone(),
            key_pem: key2.clone(),
        };
        installer.journal("web", &journal).unwrap();
        // A crash's leftovers in the agent's own directory, too.
        let web = state.join("certs/web");
        std::fs::write(web.join(JOURNAL_NEW), "torn").unwrap();
        std::fs::write(web.join(format!("{TEMP_PREFIX}1-2-3")), "torn").unwrap();
        let (temp, target) = &journal.renames[1];
        std::fs::rename(temp, target).unwrap();
        drop(installer);

        let installer = Installer::open(&state, std::slice::from_ref(&t)).unwrap();
        let fullchain = std::fs::read_to_string(dir.path().join("live/fullchain.pem")).unwrap();
        let key = std::fs::read_to_string(dir.path().join("private/server.key")).unwrap();
        Bundle::parse(&fullchain, Some(&key), &[]).expect("the pair matches after recovery");
        assert_eq!(key, key2);
        let status = installer.status("web").unwrap();
        assert_eq!((status.version, status.intact), (2, true));
        let mut left: Vec<String> = std::fs::read_dir(&web)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["1.json", "2.json", CURRENT]);
        // One record under two names: the archive and what is installed.
        let ino = |name: &str| std::fs::metadata(web.join(name)).unwrap().ino();
        assert_eq!(ino("2.json"), ino(CURRENT));
        assert_ne!(ino("1.json"), ino(CURRENT));
    }

    #[test]
    fn replaced_targets_apply_to_the_next_install() {
        let dir = tempfile::tempdir().unwrap();
        let t = targets(dir.path());
        let installer =
            Installer::open(&dir.path().join("state"), std::slice::from_ref(&t)).unwrap();
        let (chain, key) = bundle("a.example.org");
        installer.install("web", 1, &chain, &key, &[]).unwrap();
        // The reloaded config moves web's chain and adds a certificate.
        let mut moved = t.clone();
        moved.files[0].path = dir.path().join("moved/fullchain.pem");
        let mail = CertificateTargets {
            name: "mail".into(),
            ..t.clone()
        };
        installer.replace_targets(&[moved.clone(), mail]).unwrap();
        assert_eq!(*installer.targets("web").unwrap(), moved);
        assert!(installer.targets("mail").is_ok());
        // Installed where it was, not where the config now says.
        assert!(!installer.status("web").unwrap().intact);
        assert!(
            installer
                .install("web", 1, &chain, &key, &[])
                .unwrap()
                .changed
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("moved/fullchain.pem")).unwrap(),
            chain
        );
        // A certificate the config dropped is unknown from then on.
        installer.replace_targets(&[]).unwrap();
        assert!(matches!(
            installer.targets("web"),
            Err(InstallError::Unknown(_))
        ));
    }

    /// A fresh agent's state under a temporary directory with `version`
    /// installed, the installer closed: (the directory, its state, the
    /// targets, the version's chain and key).
    fn installed_once(
        version: u32,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        CertificateTargets,
        (String, String),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let t = targets(dir.path());
        let installer = Installer::open(&state, std::slice::from_ref(&t)).unwrap();
        let (chain, key) = bundle("a.example.org");
        installer
            .install("web", version, &chain, &key, &[])
            .unwrap();
        (dir, state, t, (chain, key))
    }

    /// `version` archived as agents before the one-file archive kept it.
    fn archive_as_older_agents_did(web: &Path, version: u32, chain: &str, key: &str) {
        let legacy = web.join(version.to_string());
        std::fs::create_dir(&legacy).unwrap();
        std::fs::write(legacy.join("fullchain.pem"), chain).unwrap();
        std::fs::write(legacy.join("privkey.pem"), key).unwrap();
    }

    #[test]
    fn an_older_agents_interrupted_install_is_finished() {
        let (dir, state, t, _) = installed_once(1);
        // An older agent staged version 2, archived it in a directory,
        // wrote a journal of version and renames only, and was killed.
        let (chain2, key2) = bundle("a.example.org");
        let b2 = Bundle::parse(&chain2, Some(&key2), &[]).unwrap();
        let web = state.join("certs/web");
        archive_as_older_agents_did(&web, 2, &chain2, &key2);
        let renames = stage_all(&t, &b2, &key2);
        let old_journal = serde_json::json!({ "version": 2, "renames": renames });
        std::fs::write(web.join(JOURNAL), old_journal.to_string()).unwrap();

        let installer = Installer::open(&state, std::slice::from_ref(&t)).unwrap();
        let status = installer.status("web").unwrap();
        assert_eq!((status.version, status.intact), (2, true));
        let key = std::fs::read_to_string(dir.path().join("private/server.key")).unwrap();
        assert_eq!(key, key2);
        assert!(!web.join(JOURNAL).exists());
    }

    #[test]
    fn an_older_agents_archive_and_current_are_read_and_replaced() {
        let (dir, state, t, (chain, key)) = installed_once(2);
        // What an agent before the one-file archive left: a directory per
        // version and the installed version as text in `current`.
        let web = state.join("certs/web");
        let (chain1, key1) = bundle("a.example.org");
        archive_as_older_agents_did(&web, 1, &chain1, &key1);
        archive_as_older_agents_did(&web, 2, &chain, &key);
        std::fs::remove_file(web.join("2.json")).unwrap();
        std::fs::remove_file(web.join(CURRENT)).unwrap();
        std::fs::write(web.join(LEGACY_CURRENT), "2\n").unwrap();

        let installer = Installer::open(&state, std::slice::from_ref(&t)).unwrap();
        let status = installer.status("web").unwrap();
        assert_eq!((status.version, status.intact), (2, true));
        // Rolled back to a version only the old layout holds.
        assert_eq!(installer.rollback("web").unwrap().version, 1);
        let key_path = dir.path().join("private/server.key");
        assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key1);
        assert!(!web.join(LEGACY_CURRENT).exists());
        // New versions push the old layout out of the newest three, which
        // both layouts count towards.
        installer.install("web", 3, &chain, &key, &[]).unwrap();
        installer.install("web", 4, &chain, &key, &[]).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&web)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["2", "3.json", "4.json", CURRENT]);
        assert_eq!(installer.rollback("web").unwrap().version, 3);
        assert_eq!(installer.rollback("web").unwrap().version, 2);
        assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key);
        assert_eq!(installer.status("web").unwrap().version, 2);
    }
}
