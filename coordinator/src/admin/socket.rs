//! The admin API's Unix socket: who may connect (file permissions) and who
//! did (SO_PEERCRED).

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;
use tonic::Request;

/// Mode of the admin socket: the owner and the `certfleet` group may call.
pub const SOCKET_MODE: u32 = 0o660;
/// The group whose members may use the admin socket.
pub const ADMIN_GROUP: &str = "certfleet";

/// Binds the admin socket at `path`, replacing a stale socket left by a
/// previous run (but never a file of another kind), with [`SOCKET_MODE`].
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    // Members of the `certfleet` group may administer, where the group exists.
    if let Ok(Some(group)) = nix::unistd::Group::from_name(ADMIN_GROUP) {
        nix::unistd::chown(path, None, Some(group.gid)).map_err(std::io::Error::from)?;
    }
    Ok(listener)
}

/// The calling process's uid, from the socket's SO_PEERCRED.
pub(super) fn caller_uid<T>(request: &Request<T>) -> Option<u32> {
    request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_any_other_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/admin.sock");
        drop(bind_socket(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        // The first listener is gone; its socket file is not.
        drop(bind_socket(&path).unwrap());
        let file = dir.path().join("run/not-a-socket");
        std::fs::write(&file, "keep me").unwrap();
        let err = bind_socket(&file).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}
