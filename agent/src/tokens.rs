//! The HTTP-01 responses an agent serves.
//!
//! Tokens live in memory and, in webroot mode, as files under
//! `<webroot>/.well-known/acme-challenge/` ([`Webroot`]). Every token has a
//! deadline; a sweeper drops expired ones even if the coordinator never comes
//! back to remove them (it crashed, or lost the node). The sweeper sleeps
//! until the next deadline, so an idle agent does no work at all.
//!
//! The webroot belongs to the web server's user, who may rearrange it at
//! any moment; every file operation there goes through [`crate::dir`], which
//! never follows a link. The names of the files written are kept in a
//! manifest in the agent's state directory before they are written, so a
//! killed agent removes exactly its own leftovers when it starts again.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certfleet_proto::challenge::{Http01Response, Token};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{Http01Config, Http01Mode, MAX_TOKEN_TTL};
use crate::dir::{Dir, DirError, TEMP_PREFIX, Trust};

/// Most tokens an agent holds at once, across all orders. A flood of
/// PlaceTokens calls is refused past this rather than exhausting memory or disk.
pub const MAX_HELD_TOKENS: usize = 4096;

/// The path under a webroot where HTTP-01 responses live (RFC 8555 §8.3).
pub const CHALLENGE_DIR: [&str; 2] = [".well-known", "acme-challenge"];
/// Mode of a token file: the web server's user must read it, and a key
/// authorization is public anyway.
pub const TOKEN_FILE_MODE: u32 = 0o644;
/// The manifest of token files written, in the agent's state directory.
const MANIFEST: &str = "webroot-tokens";

/// Why tokens could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(
        "agent already holds {held} tokens; placing {asked} more would pass the limit of {MAX_HELD_TOKENS}"
    )]
    Full { held: usize, asked: usize },
    #[error("webroot: {0}")]
    Webroot(#[from] DirError),
}

/// The token files in a webroot, and the manifest that remembers them.
struct Webroot {
    root: PathBuf,
    state_dir: PathBuf,
    /// Token files that may exist; guards every file operation, so the
    /// manifest on disk always lists at least what is in the webroot.
    written: Mutex<BTreeSet<String>>,
}

impl Webroot {
    /// `<root>/.well-known/acme-challenge`, reached without following links.
    fn challenge_dir(&self, create: bool) -> Result<Dir, DirError> {
        let mut dir = Dir::open_root(&self.root)?;
        for name in CHALLENGE_DIR {
            dir = dir.child(OsStr::new(name), create)?;
        }
        Ok(dir)
    }

    fn save_manifest(&self, written: &BTreeSet<String>) -> Result<(), DirError> {
        let mut text = String::new();
        for name in written {
            text.push_str(name);
            text.push('\n');
        }
        Dir::open(&self.state_dir, Trust::default(), true)?.write_atomic(
            OsStr::new(MANIFEST),
            text.as_bytes(),
            None,
            0o600,
        )
    }

    /// Writes each `(token, key_authorization)` as a file, all or nothing.
    fn write(&self, files: &[(String, String)]) -> Result<(), DirError> {
        let mut written = self.written.lock().expect("webroot lock poisoned");
        let before = written.clone();
        written.extend(files.iter().map(|(t, _)| t.clone()));
        // Listed before written: a crash from here on leaves nothing the
        // next start does not know to remove.
        self.save_manifest(&written)?;
        let result = self.challenge_dir(true).and_then(|dir| {
            for (token, key_authorization) in files {
                let name = OsStr::new(token);
                if let Err(e) =
                    dir.write_atomic(name, key_authorization.as_bytes(), None, TOKEN_FILE_MODE)
                {
                    for (done, _) in files.iter().take_while(|(t, _)| t != token) {
                        let _ = dir.remove(OsStr::new(done));
                    }
                    return Err(e);
                }
            }
            Ok(())
        });
        if result.is_err() {
            *written = before;
            let _ = self.save_manifest(&written);
        }
        result
    }

    /// Removes the files of `tokens`; what cannot be removed stays listed.
    fn delete(&self, tokens: &[String]) {
        let mut written = self.written.lock().expect("webroot lock poisoned");
        let dir = match self.challenge_dir(false) {
            Ok(dir) => Some(dir),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                warn!(error = %e, "cannot reach the webroot's challenge directory to remove tokens");
                return;
            }
        };
        for token in tokens {
            let removed = dir
                .as_ref()
                .map_or(Ok(false), |d| d.remove(OsStr::new(token)));
            match removed {
                Ok(_) => {
                    written.remove(token);
                }
                Err(e) => warn!(error = %e, "cannot remove token file"),
            }
        }
        if let Some(dir) = &dir {
            let _ = dir.sync();
        }
        if let Err(e) = self.save_manifest(&written) {
            warn!(error = %e, "cannot update the token manifest");
        }
    }

    /// At start: removes every token file the manifest lists (a previous
    /// run was killed before it could) and temporary files of ours.
    fn recover(&self) -> Result<(), DirError> {
        let manifest = Dir::open(&self.state_dir, Trust::default(), true)?;
        let listed: Vec<String> = match manifest.read_regular(OsStr::new(MANIFEST), 1 << 20)? {
            Some(file) => String::from_utf8_lossy(&file.data)
                .lines()
                .filter(|l| Token::parse(l).is_ok())
                .map(str::to_owned)
                .collect(),
            None => Vec::new(),
        };
        if let Ok(dir) = self.challenge_dir(false) {
            for temp in dir.names_starting_with(TEMP_PREFIX)? {
                dir.remove(&temp)?;
            }
        }
        if !listed.is_empty() {
            info!(
                count = listed.len(),
                "removing token files a previous run left in the webroot"
            );
            self.written
                .lock()
                .expect("webroot lock poisoned")
                .extend(listed.iter().cloned());
            self.delete(&listed);
        }
        Ok(())
    }
}

struct Entry {
    key_authorization: Arc<str>,
    expires: Instant,
}

/// The set of served tokens.
pub struct Tokens {
    entries: Mutex<HashMap<Token, Entry>>,
    /// `Some` in webroot mode: where the files go.
    webroot: Option<Arc<Webroot>>,
    default_ttl: Duration,
    changed: Notify,
}

impl Tokens {
    /// The token set for `config`; in webroot mode the manifest lives in
    /// `state_dir`. Call [`Tokens::recover`] before serving.
    pub fn new(config: &Http01Config, state_dir: &Path) -> Self {
        let webroot = match &config.mode {
            Http01Mode::Webroot { webroot } => Some(Arc::new(Webroot {
                root: webroot.clone(),
                state_dir: state_dir.to_owned(),
                written: Mutex::new(BTreeSet::new()),
            })),
            Http01Mode::Standalone { .. } => None,
        };
        Self {
            entries: Mutex::new(HashMap::new()),
            webroot,
            default_ttl: config.token_ttl,
            changed: Notify::new(),
        }
    }

    /// Serves every response in `batch` until `ttl` passes (`None`: the
    /// configured default; capped at [`MAX_TOKEN_TTL`]). All or nothing: if
    /// one file cannot be written, the ones this call wrote are removed.
    pub async fn place(
        &self,
        batch: Vec<Http01Response>,
        ttl: Option<Duration>,
    ) -> Result<usize, PlaceError> {
        {
            let entries = self.entries.lock().expect("token map poisoned");
            let new = batch
                .iter()
                .filter(|r| !entries.contains_key(r.token()))
                .count();
            if entries.len() + new > MAX_HELD_TOKENS {
                return Err(PlaceError::Full {
                    held: entries.len(),
                    asked: new,
                });
            }
        }
        if let Some(webroot) = &self.webroot {
            let webroot = Arc::clone(webroot);
            let files: Vec<(String, String)> = batch
                .iter()
                .map(|r| (r.token().to_string(), r.key_authorization().to_owned()))
                .collect();
            tokio::task::spawn_blocking(move || webroot.write(&files))
                .await
                .expect("token writer panicked")?;
        }
        let expires = Instant::now() + ttl.unwrap_or(self.default_ttl).min(MAX_TOKEN_TTL);
        let placed = batch.len();
        {
            let mut entries = self.entries.lock().expect("token map poisoned");
            for r in batch {
                let key_authorization = Arc::from(r.key_authorization());
                entries.insert(
                    r.token().clone(),
                    Entry {
                        key_authorization,
                        expires,
                    },
                );
            }
        }
        self.changed.notify_one();
        Ok(placed)
    }

    /// Stops serving `tokens`; returns how many were being served.
    pub async fn remove(&self, tokens: &[Token]) -> usize {
        let removed: Vec<Token> = {
            let mut entries = self.entries.lock().expect("token map poisoned");
            tokens
                .iter()
                .filter(|t| entries.remove(*t).is_some())
                .cloned()
                .collect()
        };
        self.delete_files(&removed).await;
        removed.len()
    }

    /// The key authorization to serve for `token`, if it is live.
    pub fn get(&self, token: &Token) -> Option<Arc<str>> {
        let entries = self.entries.lock().expect("token map poisoned");
        entries
            .get(token)
            .filter(|e| e.expires > Instant::now())
            .map(|e| Arc::clone(&e.key_authorization))
    }

    /// Every live token with the time it has left.
    pub fn list(&self) -> Vec<(Token, Duration)> {
        let now = Instant::now();
        let entries = self.entries.lock().expect("token map poisoned");
        entries
            .iter()
            .filter(|(_, e)| e.expires > now)
            .map(|(t, e)| (t.clone(), e.expires - now))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("token map poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired tokens as their deadlines pass, until `stop` completes.
    /// On stop, webroot files are removed too: a stopped agent leaves no
    /// token behind for a web server to keep serving.
    pub async fn sweep_until(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let next = self.sweep().await;
            let wait = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stop => break,
                _ = wait => {}
                _ = self.changed.notified() => {}
            }
        }
        let all: Vec<Token> = {
            let mut entries = self.entries.lock().expect("token map poisoned");
            entries.drain().map(|(t, _)| t).collect()
        };
        self.delete_files(&all).await;
    }

    /// Removes expired tokens; returns the next deadline.
    async fn sweep(&self) -> Option<Instant> {
        let now = Instant::now();
        let (expired, next) = {
            let mut entries = self.entries.lock().expect("token map poisoned");
            let expired: Vec<Token> = entries
                .iter()
                .filter(|(_, e)| e.expires <= now)
                .map(|(t, _)| t.clone())
                .collect();
            for t in &expired {
                entries.remove(t);
            }
            (expired, entries.values().map(|e| e.expires).min())
        };
        if !expired.is_empty() {
            debug!(count = expired.len(), "dropped expired tokens");
            self.delete_files(&expired).await;
        }
        next
    }

    async fn delete_files(&self, tokens: &[Token]) {
        let Some(webroot) = &self.webroot else { return };
        if tokens.is_empty() {
            return;
        }
        let webroot = Arc::clone(webroot);
        let names: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        let _ = tokio::task::spawn_blocking(move || webroot.delete(&names)).await;
    }

    /// Removes what a killed run left in the webroot (see [`Webroot`]).
    pub async fn recover(&self) -> Result<(), DirError> {
        let Some(webroot) = &self.webroot else {
            return Ok(());
        };
        let webroot = Arc::clone(webroot);
        tokio::task::spawn_blocking(move || webroot.recover())
            .await
            .expect("token recovery panicked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Http01Config;
    use std::os::unix::fs::PermissionsExt;

    fn response(n: u8) -> Http01Response {
        let token = format!("{}{}", "t".repeat(42), n % 10);
        let ka = format!("{token}.{}", "k".repeat(43));
        Http01Response::new(Token::parse(&token).unwrap(), &ka).unwrap()
    }

    fn webroot(dir: &Path) -> Http01Config {
        Http01Config {
            mode: Http01Mode::Webroot {
                webroot: dir.to_owned(),
            },
            token_ttl: Duration::from_secs(60),
            limits: Default::default(),
        }
    }

    #[tokio::test]
    async fn webroot_files_follow_place_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(&webroot(dir.path()), &dir.path().join("state"));
        let r = response(1);
        tokens.place(vec![r.clone()], None).await.unwrap();
        let path = dir
            .path()
            .join(CHALLENGE_DIR.join("/"))
            .join(r.token().as_str());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            r.key_authorization()
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(tokens.remove(&[r.token().clone()]).await, 1);
        assert!(!path.exists());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_without_removal() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Arc::new(Tokens::new(&webroot(dir.path()), &dir.path().join("state")));
        let stop = tokio_util::sync::CancellationToken::new();
        let sweeper = tokio::spawn(Arc::clone(&tokens).sweep_until(stop.clone().cancelled_owned()));
        let r = response(2);
        tokens
            .place(vec![r.clone()], Some(Duration::from_secs(30)))
            .await
            .unwrap();
        let path = dir
            .path()
            .join(CHALLENGE_DIR.join("/"))
            .join(r.token().as_str());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(tokens.get(r.token()).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            tokens.get(r.token()).is_none(),
            "expired token still served"
        );
        // The sweeper runs on the paused clock; let it and its file removal finish.
        for _ in 0..100 {
            if !path.exists() && tokens.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(tokens.is_empty());
        assert!(!path.exists(), "expired token file left in the webroot");
        stop.cancel();
        sweeper.await.unwrap();
    }

    #[tokio::test]
    async fn a_restart_removes_only_the_files_a_killed_run_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let killed = Tokens::new(&webroot(dir.path()), &state);
        let (ours, theirs) = (response(3), response(4));
        killed.place(vec![ours.clone()], None).await.unwrap();
        // Killed: nothing removed the file. Someone else's file sits beside it.
        drop(killed);
        let challenge = dir.path().join(CHALLENGE_DIR.join("/"));
        let their_path = challenge.join(theirs.token().as_str());
        std::fs::write(&their_path, "not ours").unwrap();
        assert!(challenge.join(ours.token().as_str()).exists());

        let restarted = Tokens::new(&webroot(dir.path()), &state);
        restarted.recover().await.unwrap();
        assert!(!challenge.join(ours.token().as_str()).exists());
        assert_eq!(std::fs::read_to_string(&their_path).unwrap(), "not ours");
        let manifest = std::fs::read_to_string(state.join(MANIFEST)).unwrap();
        assert!(manifest.is_empty(), "{manifest}");
    }

    #[tokio::test]
    async fn refuses_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(&webroot(dir.path()), &dir.path().join("state"));
        let many: Vec<Http01Response> = (0..=MAX_HELD_TOKENS)
            .map(|i| {
                let token = format!("{:0>43}", i);
                let ka = format!("{token}.{}", "k".repeat(43));
                Http01Response::new(Token::parse(&token).unwrap(), &ka).unwrap()
            })
            .collect();
        let err = tokens.place(many, None).await.unwrap_err();
        assert!(matches!(err, PlaceError::Full { .. }), "{err}");
        assert!(tokens.is_empty());
    }
}
