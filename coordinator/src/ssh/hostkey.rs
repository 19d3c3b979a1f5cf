//! SSH host keys: reading what a node presents, and recording it in
//! certfleet's own known_hosts once an admin has confirmed its fingerprint.
//!
//! Nothing here trusts a key by itself. `certfleet node trust-host` asks
//! for the key's fingerprint first ([`scan`]), shows it, and only a second
//! request naming that fingerprint records it ([`trust`]); a key that
//! changed in between does not match and is not recorded.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};

use super::SshDestination;

/// A host key a node presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`.
    pub key_type: String,
    /// As `ssh-keygen -l` shows it: `SHA256:` and the unpadded base64 of
    /// the SHA-256 of the key blob.
    pub fingerprint: String,
    /// The key blob, base64, as known_hosts holds it.
    pub blob: String,
}

/// Why a node's host key could not be read or recorded.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("ssh-keyscan {host}: {reason}")]
    Scan { host: String, reason: String },
    #[error("{host} presented no host key")]
    NoKey { host: String },
    #[error(
        "{host} presents {presented}, not {wanted}: nothing recorded. Check the fingerprint on the node's console"
    )]
    Mismatch {
        host: String,
        wanted: String,
        presented: String,
    },
    #[error("known_hosts {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The fingerprint of a key blob (base64), as `ssh-keygen -l` prints it.
pub fn fingerprint(blob_b64: &str) -> Option<String> {
    let blob = base64::engine::general_purpose::STANDARD
        .decode(blob_b64)
        .ok()?;
    let digest = Sha256::digest(&blob);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

/// The host keys `dest` presents, read with `ssh-keyscan` (from
/// openssh-client), which trusts nothing and records nothing.
pub fn scan(dest: &SshDestination, timeout: Duration) -> Result<Vec<HostKey>, HostKeyError> {
    let host = dest.known_hosts_name();
    let out = Command::new("ssh-keyscan")
        .arg("-T")
        .arg(timeout.as_secs().max(1).to_string())
        .arg("-p")
        .arg(dest.port.to_string())
        .arg("--")
        .arg(&dest.host)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| HostKeyError::Scan {
            host: host.clone(),
            reason: format!("{e} (install openssh-client)"),
        })?;
    let keys: Vec<HostKey> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (_, key_type, blob) = (parts.next()?, parts.next()?, parts.next()?);
            Some(HostKey {
                key_type: key_type.to_owned(),
                fingerprint: fingerprint(blob)?,
                blob: blob.to_owned(),
            })
        })
        .collect();
    if keys.is_empty() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if why.is_empty() || out.status.success() {
            return Err(HostKeyError::NoKey { host });
        }
        return Err(HostKeyError::Scan { host, reason: why });
    }
    Ok(keys)
}

/// Records the key of `dest` whose fingerprint is `wanted` in
/// `known_hosts`, replacing what was recorded for that host. The key is
/// read again here, so it must still be the one the admin confirmed.
pub fn trust(
    known_hosts: &Path,
    dest: &SshDestination,
    wanted: &str,
    timeout: Duration,
) -> Result<HostKey, HostKeyError> {
    let host = dest.known_hosts_name();
    let keys = scan(dest, timeout)?;
    let Some(key) = keys.iter().find(|k| k.fingerprint == wanted).cloned() else {
        return Err(HostKeyError::Mismatch {
            host,
            wanted: wanted.to_owned(),
            presented: keys
                .iter()
                .map(|k| format!("{} {}", k.key_type, k.fingerprint))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let write_err = |source| HostKeyError::Write {
        path: known_hosts.display().to_string(),
        source,
    };
    let old = match std::fs::read_to_string(known_hosts) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(write_err(e)),
    };
    let mut text: String = old
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(host.as_str()))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!("{host} {} {}\n", key.key_type, key.blob));
    if let Some(dir) = known_hosts.parent() {
        certfleet_proto::fsio::create_private_dir(dir).map_err(write_err)?;
    }
    certfleet_proto::fsio::write_atomic(known_hosts, text.as_bytes(), 0o644).map_err(write_err)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_what_ssh_keygen_prints() {
        // ssh-keygen -lf on this public key prints this fingerprint.
        let blob = "AAAAC3NzaC1lZDI1NTE5AAAAIJyld6k1KTA9QaFHJE3mtG968WXzpf8krTVKfQdKrQq/";
        assert_eq!(
            fingerprint(blob).unwrap(),
            "SHA256:E5SXQ5WzE8V2HsxC+QrkilUXO46vgDpX8CyklnUO6nw"
        );
    }
}
