//! The names an admin chooses, checked the same way wherever one arrives:
//! in either daemon's config, in an admin request, on the command line.
//!
//! - A node's name becomes part of its TLS identity
//!   ([`crate::identity::node_identity`]), so it is one DNS label.
//! - A certificate's name becomes a directory name in the coordinator's
//!   store and in every agent's state directory, so it is one plain path
//!   component that cannot be `.`, `..` or hidden.
//!
//! Each rule has a `…_RULE` constant that says it in words, for messages.

/// What a node name may be, for messages: [`is_valid_node_name`] in words.
pub const NODE_NAME_RULE: &str =
    "must be 1-63 characters of a-z 0-9 and '-', not starting or ending with '-' (one DNS label)";

/// The one check of a node name, for every config, request and command
/// that takes one: `Err` says what is wrong with it in words.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if is_valid_node_name(name) {
        Ok(())
    } else {
        Err(format!("node name {name:?} {NODE_NAME_RULE}"))
    }
}

/// A node name is one DNS label: 1-63 of a-z 0-9 '-', not starting or
/// ending with '-'. It becomes part of the node's identity.
pub fn is_valid_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Longest certificate name, in bytes.
pub const MAX_CERTIFICATE_NAME: usize = 64;

/// What a certificate name may be, for messages:
/// [`is_valid_certificate_name`] in words.
pub const CERTIFICATE_NAME_RULE: &str = "must be 1-64 characters of A-Z a-z 0-9 - _ .";

/// The one check of a certificate name (`[[certificates]] name` in both
/// configs): `Err` says what is wrong with it in words.
pub fn check_certificate_name(name: &str) -> Result<(), String> {
    if is_valid_certificate_name(name) {
        Ok(())
    } else {
        Err(format!("{name:?} {CERTIFICATE_NAME_RULE}"))
    }
}

/// A certificate name is 1 to [`MAX_CERTIFICATE_NAME`] of A-Z a-z 0-9 '-'
/// '_' '.', not starting with '.' (so never `.`, `..` or a hidden file,
/// which the store's listing skips).
pub fn is_valid_certificate_name(name: &str) -> bool {
    (1..=MAX_CERTIFICATE_NAME).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels() {
        assert!(is_valid_node_name("cn-ucsb-1"));
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_valid_node_name(bad), "{bad:?}");
        }
        assert_eq!(
            check_node_name("A").unwrap_err(),
            format!("node name \"A\" {NODE_NAME_RULE}")
        );
    }

    #[test]
    fn certificate_names_are_one_plain_path_component() {
        for good in ["cn", "dataone.org", "a_b-C.9", &"a".repeat(64)] {
            assert!(is_valid_certificate_name(good), "{good:?}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(!is_valid_certificate_name(bad), "{bad:?}");
        }
        assert_eq!(
            check_certificate_name("a/b").unwrap_err(),
            "\"a/b\" must be 1-64 characters of A-Z a-z 0-9 - _ ."
        );
    }
}
