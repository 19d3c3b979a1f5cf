//! The HTTP-01 responses an agent serves.
//!
//! Tokens live in memory and, in webroot mode, as files under
//! `<webroot>/.well-known/acme-challenge/` written by write-temp, fsync,
//! rename, so a web server never serves half a file. Every token has a
//! deadline; a sweeper drops expired ones even if the coordinator never comes
//! back to remove them (it crashed, or lost the node). The sweeper sleeps
//! until the next deadline, so an idle agent does no work at all.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certfleet_proto::challenge::{Http01Response, Token};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::{Http01Config, Http01Mode, MAX_TOKEN_TTL};

/// Most tokens an agent holds at once, across all orders. A flood of
/// PlaceTokens calls is refused past this rather than exhausting memory or disk.
pub const MAX_HELD_TOKENS: usize = 4096;

/// The path under a webroot where HTTP-01 responses live (RFC 8555 §8.3).
pub const CHALLENGE_DIR: &str = ".well-known/acme-challenge";

/// Why tokens could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(
        "agent already holds {held} tokens; placing {asked} more would pass the limit of {MAX_HELD_TOKENS}"
    )]
    Full { held: usize, asked: usize },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Entry {
    key_authorization: Arc<str>,
    expires: Instant,
}

/// The set of served tokens.
pub struct Tokens {
    entries: Mutex<HashMap<Token, Entry>>,
    /// `Some` in webroot mode: the directory the files go into.
    dir: Option<PathBuf>,
    default_ttl: Duration,
    changed: Notify,
}

impl Tokens {
    pub fn new(config: &Http01Config) -> Self {
        let dir = match &config.mode {
            Http01Mode::Webroot { webroot } => Some(webroot.join(CHALLENGE_DIR)),
            Http01Mode::Standalone { .. } => None,
        };
        Self {
            entries: Mutex::new(HashMap::new()),
            dir,
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
        if let Some(dir) = &self.dir {
            let dir = dir.clone();
            let files: Vec<(String, String)> = batch
                .iter()
                .map(|r| (r.token().to_string(), r.key_authorization().to_owned()))
                .collect();
            tokio::task::spawn_blocking(move || write_files(&dir, &files))
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
        let Some(dir) = &self.dir else { return };
        if tokens.is_empty() {
            return;
        }
        let paths: Vec<PathBuf> = tokens.iter().map(|t| dir.join(t.as_str())).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for path in paths {
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    warn!(path = %path.display(), error = %e, "cannot remove token file");
                }
            }
        })
        .await;
    }
}

/// Writes each `(token, key_authorization)` as `dir/token`, atomically.
/// The token is already checked to be base64url, so `dir.join(token)` can
/// only name a file directly inside `dir`.
fn write_files(dir: &Path, files: &[(String, String)]) -> Result<(), PlaceError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| PlaceError::Write { path, source }
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err(dir))?;
    }
    let mut written = Vec::with_capacity(files.len());
    let result = files.iter().try_for_each(|(token, key_authorization)| {
        let path = dir.join(token);
        let mut tmp = tempfile::Builder::new()
            .prefix(".certfleet-")
            .tempfile_in(dir)
            .map_err(err(&path))?;
        tmp.write_all(key_authorization.as_bytes())
            .map_err(err(&path))?;
        tmp.as_file().sync_all().map_err(err(&path))?;
        // The web server (often www-data) must read it; it is public anyway.
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(err(&path))?;
        tmp.persist(&path).map_err(|e| PlaceError::Write {
            path: path.clone(),
            source: e.error,
        })?;
        written.push(path);
        Ok(())
    });
    if result.is_err() {
        for path in written {
            let _ = std::fs::remove_file(path);
        }
    }
    result?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Http01Config;

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
        }
    }

    #[tokio::test]
    async fn webroot_files_follow_place_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(&webroot(dir.path()));
        let r = response(1);
        tokens.place(vec![r.clone()], None).await.unwrap();
        let path = dir.path().join(CHALLENGE_DIR).join(r.token().as_str());
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
        let tokens = Arc::new(Tokens::new(&webroot(dir.path())));
        let stop = tokio_util::sync::CancellationToken::new();
        let sweeper = tokio::spawn(Arc::clone(&tokens).sweep_until(stop.clone().cancelled_owned()));
        let r = response(2);
        tokens
            .place(vec![r.clone()], Some(Duration::from_secs(30)))
            .await
            .unwrap();
        let path = dir.path().join(CHALLENGE_DIR).join(r.token().as_str());
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
    async fn refuses_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(&webroot(dir.path()));
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
