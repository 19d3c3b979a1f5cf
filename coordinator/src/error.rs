//! The coordinator's one family of failures.
//!
//! Every error type of this crate says what kind of failure it is with a
//! `kind()`, an [`ErrorKind`]. The admin API turns a kind into the wire's
//! `Failure.kind` and a refused request's status code in one place
//! (`admin::convert`), and the CLI picks its exit code from it: `config`
//! is exit code 2, like every usage or config error.
//!
//! The kinds of errors defined in modules whose job is elsewhere (the
//! order's [`IssueError`], the store's [`StoreError`]) sit here too, so the
//! whole family can be read in one file.

use crate::challenge::NodeError;
use crate::issue::IssueError;
use crate::store::StoreError;

/// What kind of failure an error is, whatever module it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The config or the request is wrong (an unknown certificate or
    /// version, a node that is not registered or not active): the admin
    /// must change something before trying again.
    Config,
    /// Another operation holds the certificate's lock.
    Busy,
    /// A node failed a step or could not be reached.
    Node,
    /// A node did not serve a token when the coordinator fetched it.
    SelfCheck,
    /// The ACME CA refused or failed, or the account could not be set up.
    Acme,
    /// The CA returned a certificate certfleet refuses.
    Certificate,
    /// The certificate store or the registry could not be read or written.
    Store,
    /// A rollout halted: a node failed its restart and was rolled back.
    Rollout,
    /// The coordinator itself failed: a bug, or a setup it cannot redo.
    Internal,
    /// certfleet's rate-limit guard refused an order that would pass the
    /// CA's limits: wait until the time the message names, or `--force`.
    /// Exit code 1, as an operation that failed: nothing is wrong with the
    /// request, only its time.
    RateLimited,
}

impl ErrorKind {
    /// Every kind, for exhaustive tests of the mappings.
    pub const ALL: [Self; 10] = [
        Self::Config,
        Self::Busy,
        Self::Node,
        Self::SelfCheck,
        Self::Acme,
        Self::Certificate,
        Self::Store,
        Self::Rollout,
        Self::Internal,
        Self::RateLimited,
    ];
}

impl IssueError {
    /// The kind of failure that ended an order.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Fleet(e) => e.kind(),
            // Every error of a step is of that step's kind.
            Self::Nodes { errors, .. } => errors.first().map_or(ErrorKind::Node, NodeError::kind),
            Self::Setup(_)
            | Self::Acme { .. }
            | Self::Authorization { .. }
            | Self::NoHttp01(_)
            | Self::BadToken { .. } => ErrorKind::Acme,
            Self::Certificate(_) => ErrorKind::Certificate,
            Self::Key(_) | Self::KeyLost => ErrorKind::Internal,
            Self::OrderGone(_) => ErrorKind::Acme,
            Self::RateLimited(_) => ErrorKind::RateLimited,
            Self::History(e) => e.kind(),
            Self::NoStagingDirectory => ErrorKind::Config,
            Self::Store(_) | Self::NotStored(_) | Self::Journal(_) | Self::SaveKey { .. } => {
                ErrorKind::Store
            }
        }
    }
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Store
    }
}
