//! What every certfleet process shares: the contract between them and the
//! helpers each would otherwise write again.
//!
//! The contract:
//! - [`pb`] is the generated `certfleet.v1` gRPC code: the agent's service
//!   (`Agent`), the coordinator's admin service (`Admin`) and enrollment.
//! - [`challenge`] holds the HTTP-01 domain types (token, key authorization)
//!   and their checks. Both sides use them: the coordinator before it sends,
//!   the agent on everything it receives, because gRPC input is untrusted.
//! - [`bundle`] validates a PEM certificate chain and key: the coordinator
//!   checks what the CA returned, and agents check what they install.
//! - [`names`] holds the rules for node and certificate names.
//! - [`node_spec`] is what a node does with a certificate (files, services),
//!   read by the agent from its config and by the coordinator for SSH nodes.
//! - [`identity`] and [`tls`]: who is who in the cluster, and the TLS
//!   between the daemons that enforces it, with the one crypto provider
//!   ([`identity::provider`]).
//!
//! The helpers, one home each, so a rule is never kept in two places:
//! - [`fsio`]: atomic writes of a daemon's own state files.
//! - [`clock`]: the time as certfleet stores it (Unix seconds) and shows it.
//! - [`pem`]: DER certificates back to PEM.
//! - [`cause_chain`] shows an error with every cause below it, the way the
//!   CLI, the coordinator's node errors and the logs print them.
//! - [`logging`] sets up both daemons' logs (text or JSON, colour only on a
//!   terminal), and [`restrict_umask`] their umask.
//! - [`metrics`]: the `/metrics` endpoint both daemons serve, and
//!   [`cli_docs`]: every binary's completions and man pages.
//!
//! Wire types stay here. Conversions to domain types are `TryFrom` impls with
//! typed errors, so prost's `Option`s and unchecked strings never reach the
//! daemons' logic.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod cause_chain;
pub mod challenge;
pub mod cli_docs;
pub mod clock;
pub mod fsio;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod node_spec;
pub mod pem;
pub mod tls;

/// Generated `certfleet.v1` messages, clients and servers.
#[allow(unreachable_pub, clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("certfleet.v1");
}

/// What both daemons do first: umask 0027, since nothing certfleet writes
/// is for the world to read. Logging is [`logging::init`].
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
}

/// Largest gRPC message either side encodes or decodes, in bytes.
///
/// Sized for the largest legitimate message: a 100-SAN chain plus key, or
/// [`challenge::MAX_TOKENS_PER_REQUEST`] tokens, each far below this. tonic's
/// own 4 MiB default is not a policy, so every server and client sets this.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

impl std::fmt::Debug for pb::InstallCertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallCertificateRequest")
            .field("certificate", &self.certificate)
            .field("version", &self.version)
            .field(
                "fullchain_pem",
                &format_args!("<{} bytes>", self.fullchain_pem.len()),
            )
            .field("key_pem", &"<redacted>")
            .field("names", &self.names)
            .finish()
    }
}

impl pb::ServedEndpoint {
    /// What a probe of `address` found: the served leaf's SHA-256, or why
    /// it failed. The wire keeps the two in separate fields.
    pub fn from_probe(service: String, address: String, result: Result<String, String>) -> Self {
        let (leaf_sha256, error) = match result {
            Ok(sha) => (sha, String::new()),
            Err(e) => (String::new(), e),
        };
        Self {
            service,
            address,
            leaf_sha256,
            error,
        }
    }

    /// The probe's result, as [`Self::from_probe`] took it.
    pub fn into_probe(self) -> (String, String, Result<String, String>) {
        let result = if self.error.is_empty() {
            Ok(self.leaf_sha256)
        } else {
            Err(self.error)
        };
        (self.service, self.address, result)
    }
}

impl std::fmt::Debug for pb::JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.token.split_once('.').map_or("", |(id, _)| id);
        f.debug_struct("JoinRequest")
            .field("token_id", &id)
            .field("csr_der", &format_args!("<{} bytes>", self.csr_der.len()))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for pb::AddNodeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddNodeResponse")
            .field("ca_pin", &self.ca_pin)
            .field("expires_unix", &self.expires_unix)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for pb::ImportRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportRequest")
            .field("certificate", &self.certificate)
            .field("lineage", &self.lineage)
            .field("domains", &self.domains)
            .field(
                "fullchain_pem",
                &format_args!("<{} bytes>", self.fullchain_pem.len()),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_import_request_debug_hides_the_key() {
        let import = super::pb::ImportRequest {
            lineage: "cn".into(),
            privkey_pem: "-----BEGIN PRIVATE KEY-----SECRETPART".into(),
            ..Default::default()
        };
        let shown = format!("{import:?}");
        assert!(!shown.contains("SECRETPART"), "{shown}");
        assert!(shown.contains("cn"), "{shown}");
    }

    #[test]
    fn join_messages_debug_hide_the_secret() {
        let join = super::pb::JoinRequest {
            token: "abc.SECRETPART".into(),
            csr_der: vec![1, 2],
        };
        let added = super::pb::AddNodeResponse {
            token: "abc.SECRETPART".into(),
            join_command: "certfleet-agent join --token=abc.SECRETPART".into(),
            ..Default::default()
        };
        for shown in [format!("{join:?}"), format!("{added:?}")] {
            assert!(!shown.contains("SECRETPART"), "{shown}");
        }
    }

    #[test]
    fn install_request_debug_redacts_the_key() {
        let request = super::pb::InstallCertificateRequest {
            certificate: "cn".into(),
            version: 1,
            fullchain_pem: "CHAIN".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----SECRET".into(),
            names: vec![],
        };
        let shown = format!("{request:?}");
        assert!(
            !shown.contains("SECRET") && shown.contains("redacted"),
            "{shown}"
        );
    }
}
