//! The agent's one error family: every error it returns has a [`kind`],
//! and [`to_status`] is the one place a kind becomes a gRPC code, so the
//! coordinator (and an admin reading its message) can tell "you asked for
//! something this node does not have" from "this node's disk is broken".
//!
//! [`kind`]: ErrorKind

use tonic::Status;

use crate::config::ConfigError;
use crate::dir::DirError;
use crate::identity::IdentityError;
use crate::install::InstallError;
use crate::tokens::PlaceError;

/// What kind of failure an agent error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request names something this node's config does not have.
    Unknown,
    /// The request itself is malformed or refused (bad bundle, version).
    Invalid,
    /// The node cannot do it in its present state (no previous version, a
    /// target path that breaks the rule, not joined).
    Precondition,
    /// A limit was reached (tokens held).
    Exhausted,
    /// The coordinator could not be reached or refused (joining, renewing).
    Coordinator,
    /// The node's own files or system failed.
    Internal,
}

/// The gRPC status for an error of `kind` saying `message`.
pub fn to_status(kind: ErrorKind, message: impl Into<String>) -> Status {
    let message = message.into();
    match kind {
        ErrorKind::Unknown => Status::not_found(message),
        ErrorKind::Invalid => Status::invalid_argument(message),
        ErrorKind::Precondition => Status::failed_precondition(message),
        ErrorKind::Exhausted => Status::resource_exhausted(message),
        ErrorKind::Coordinator => Status::unavailable(message),
        ErrorKind::Internal => Status::internal(message),
    }
}

impl InstallError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unknown(_) => ErrorKind::Unknown,
            Self::Invalid { .. } | Self::Version(_) => ErrorKind::Invalid,
            Self::NoPrevious { .. } => ErrorKind::Precondition,
            Self::Target(e) => e.kind(),
            Self::Io { .. } => ErrorKind::Internal,
        }
    }
}

impl DirError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { .. } => ErrorKind::Internal,
            // A link, a non-directory, an untrusted ancestor: the node's
            // tree must be put right by its admin.
            _ => ErrorKind::Precondition,
        }
    }
}

impl PlaceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Full { .. } => ErrorKind::Exhausted,
            Self::Webroot(e) => e.kind(),
        }
    }
}

impl IdentityError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotJoined(_) => ErrorKind::Precondition,
            Self::Address { .. } => ErrorKind::Invalid,
            Self::Refused(_) | Self::Unreachable { .. } | Self::Answer(_) => ErrorKind::Coordinator,
            Self::File { .. } | Self::Key(_) => ErrorKind::Internal,
        }
    }
}

impl ConfigError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn each_kind_has_its_own_code_and_errors_keep_theirs() {
        let kinds = [
            ErrorKind::Unknown,
            ErrorKind::Invalid,
            ErrorKind::Precondition,
            ErrorKind::Exhausted,
            ErrorKind::Coordinator,
            ErrorKind::Internal,
        ];
        let codes: std::collections::HashSet<_> =
            kinds.iter().map(|k| to_status(*k, "x").code()).collect();
        assert_eq!(codes.len(), kinds.len());
        // The codes the coordinator already relies on.
        let unknown = InstallError::Unknown("cn".into());
        assert_eq!(to_status(unknown.kind(), "").code(), tonic::Code::NotFound);
        let link = InstallError::Target(DirError::Symlink {
            path: PathBuf::from("/x"),
        });
        assert_eq!(
            to_status(link.kind(), "").code(),
            tonic::Code::FailedPrecondition
        );
        let full = PlaceError::Full { held: 1, asked: 1 };
        assert_eq!(
            to_status(full.kind(), "").code(),
            tonic::Code::ResourceExhausted
        );
    }
}
