//! Validation of a PEM certificate chain and its private key.
//!
//! What the CA returns, and later what an agent is asked to install, is
//! untrusted until it passes [`Bundle::parse`]: every block is a certificate,
//! the chain is in order (leaf first, each certificate issued by the next),
//! the leaf covers every name the certificate must cover, and the key is the
//! leaf's key.

use std::fmt;

use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::pem;

/// Largest PEM chain accepted, in bytes. A 100-SAN leaf plus two
/// intermediates is about 10 KiB; this leaves room without being unbounded.
pub const MAX_CHAIN_PEM_BYTES: usize = 256 * 1024;
/// Largest PEM private key accepted, in bytes (RSA-4096 is about 3.3 KiB).
pub const MAX_KEY_PEM_BYTES: usize = 16 * 1024;
/// Most certificates a chain may hold.
pub const MAX_CHAIN_LEN: usize = 8;

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBundle {
    #[error("chain is {len} bytes; at most {MAX_CHAIN_PEM_BYTES} are allowed")]
    ChainTooLarge { len: usize },
    #[error("private key is {len} bytes; at most {MAX_KEY_PEM_BYTES} are allowed")]
    KeyTooLarge { len: usize },
    #[error("chain holds no certificate")]
    Empty,
    #[error("chain holds {len} certificates; at most {MAX_CHAIN_LEN} are allowed")]
    TooLong { len: usize },
    #[error("PEM block {index} of the chain is malformed: {reason}")]
    Pem { index: usize, reason: String },
    #[error("PEM block {index} of the chain is a {label:?}, not a CERTIFICATE")]
    NotACertificate { index: usize, label: String },
    #[error("certificate {index} of the chain does not parse: {reason}")]
    Certificate { index: usize, reason: String },
    #[error("chain out of order: certificate {index} was not issued by certificate {next}")]
    Order { index: usize, next: usize },
    #[error("leaf has no subjectAltName extension")]
    NoSans,
    #[error("leaf does not cover {missing:?}")]
    MissingNames { missing: Vec<String> },
    #[error("private key does not parse: {reason}")]
    Key { reason: String },
    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,
}

/// What a valid chain says about its leaf.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// DNS names the leaf covers, in the leaf's order.
    pub sans: Vec<String>,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// notBefore and notAfter, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the leaf's DER.
    pub leaf_sha256: [u8; 32],
    /// The leaf alone, PEM.
    pub leaf_pem: String,
    /// The certificates after the leaf, PEM, in order.
    pub chain_pem: String,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("sans", &self.sans)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("leaf_sha256", &hex(&self.leaf_sha256))
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// Validates `fullchain_pem` (leaf first) against the names it must
    /// cover and, when given, the private key that goes with it.
    pub fn parse(
        fullchain_pem: &str,
        key_pem: Option<&str>,
        required_names: &[String],
    ) -> Result<Self, InvalidBundle> {
        let blocks = pem_blocks(fullchain_pem)?;
        let mut certs = Vec::with_capacity(blocks.len());
        for (index, pem) in blocks.iter().enumerate() {
            let cert = pem.parse_x509().map_err(|e| InvalidBundle::Certificate {
                index,
                reason: e.to_string(),
            })?;
            certs.push(cert);
        }
        for (index, pair) in certs.windows(2).enumerate() {
            if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
                return Err(InvalidBundle::Order {
                    index,
                    next: index + 1,
                });
            }
        }
        let leaf = &certs[0];
        let sans = covered_names(leaf, required_names)?;
        if let Some(key_pem) = key_pem {
            check_key(leaf, key_pem)?;
        }
        let leaf_sha256: [u8; 32] = Sha256::digest(&blocks[0].contents).into();
        Ok(Self {
            sans,
            serial: hex(leaf.tbs_certificate.raw_serial()),
            not_before: leaf.validity().not_before.timestamp(),
            not_after: leaf.validity().not_after.timestamp(),
            leaf_sha256,
            leaf_pem: pem::certificate(&blocks[0].contents),
            chain_pem: blocks[1..]
                .iter()
                .map(|b| pem::certificate(&b.contents))
                .collect(),
        })
    }

    /// The leaf's SHA-256 as lowercase hex, the form `certfleet` prints.
    pub fn leaf_sha256_hex(&self) -> String {
        hex(&self.leaf_sha256)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The PEM blocks of a chain: at most [`MAX_CHAIN_LEN`] certificates and
/// [`MAX_CHAIN_PEM_BYTES`] bytes, nothing but certificates.
fn pem_blocks(fullchain_pem: &str) -> Result<Vec<Pem>, InvalidBundle> {
    if fullchain_pem.len() > MAX_CHAIN_PEM_BYTES {
        return Err(InvalidBundle::ChainTooLarge {
            len: fullchain_pem.len(),
        });
    }
    let mut blocks = Vec::new();
    for (index, pem) in Pem::iter_from_buffer(fullchain_pem.as_bytes()).enumerate() {
        if index >= MAX_CHAIN_LEN {
            return Err(InvalidBundle::TooLong { len: index + 1 });
        }
        let pem = pem.map_err(|e| InvalidBundle::Pem {
            index,
            reason: e.to_string(),
        })?;
        if pem.label != "CERTIFICATE" {
            return Err(InvalidBundle::NotACertificate {
                index,
                label: pem.label,
            });
        }
        blocks.push(pem);
    }
    if blocks.is_empty() {
        return Err(InvalidBundle::Empty);
    }
    Ok(blocks)
}

/// The leaf's DNS names, which must include every one of `required`.
fn covered_names(
    leaf: &X509Certificate<'_>,
    required: &[String],
) -> Result<Vec<String>, InvalidBundle> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| InvalidBundle::Certificate {
            index: 0,
            reason: e.to_string(),
        })?
        .ok_or(InvalidBundle::NoSans)?;
    let sans: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    let missing: Vec<String> = required
        .iter()
        .filter(|want| !sans.iter().any(|have| have.eq_ignore_ascii_case(want)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(InvalidBundle::MissingNames { missing });
    }
    Ok(sans)
}

/// The key in `key_pem` is the leaf's.
fn check_key(leaf: &X509Certificate<'_>, key_pem: &str) -> Result<(), InvalidBundle> {
    if key_pem.len() > MAX_KEY_PEM_BYTES {
        return Err(InvalidBundle::KeyTooLarge { len: key_pem.len() });
    }
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| InvalidBundle::Key {
        reason: e.to_string(),
    })?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != leaf.tbs_certificate.subject_pki.raw {
        return Err(InvalidBundle::KeyMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    struct Chain {
        fullchain: String,
        key: String,
    }

    fn chain(names: &[&str]) -> Chain {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let leaf = params.signed_by(&key, &issuer).unwrap();
        Chain {
            fullchain: format!("{}{}", leaf.pem(), ca.pem()),
            key: key.serialize_pem(),
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_a_good_chain_and_reports_its_leaf() {
        let c = chain(&["cn.example.org", "cn-1.example.org"]);
        let b = Bundle::parse(&c.fullchain, Some(&c.key), &names(&["CN.example.org"])).unwrap();
        assert_eq!(b.sans, names(&["cn.example.org", "cn-1.example.org"]));
        assert!(b.leaf_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(b.chain_pem.matches("BEGIN CERTIFICATE").count(), 1);
        // The re-encoded leaf must be the leaf we were given.
        assert!(c.fullchain.starts_with(&b.leaf_pem));
    }

    #[test]
    fn refuses_reversed_chain() {
        let c = chain(&["a.example.org"]);
        let mut blocks: Vec<&str> = c
            .fullchain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .collect();
        blocks.reverse();
        let err = Bundle::parse(&blocks.concat(), None, &[]).unwrap_err();
        assert!(
            matches!(err, InvalidBundle::Order { index: 0, next: 1 }),
            "{err}"
        );
    }

    #[test]
    fn refuses_missing_name_and_wrong_key() {
        let c = chain(&["a.example.org"]);
        let err = Bundle::parse(&c.fullchain, None, &names(&["b.example.org"])).unwrap_err();
        assert_eq!(
            err,
            InvalidBundle::MissingNames {
                missing: names(&["b.example.org"])
            }
        );
        let other = KeyPair::generate().unwrap().serialize_pem();
        let err = Bundle::parse(&c.fullchain, Some(&other), &[]).unwrap_err();
        assert_eq!(err, InvalidBundle::KeyMismatch);
    }

    #[test]
    fn refuses_non_certificate_blocks_and_oversize() {
        let c = chain(&["a.example.org"]);
        let with_key = format!("{}{}", c.fullchain, c.key);
        assert!(matches!(
            Bundle::parse(&with_key, None, &[]).unwrap_err(),
            InvalidBundle::NotACertificate { index: 2, .. }
        ));
        assert_eq!(
            Bundle::parse("", None, &[]).unwrap_err(),
            InvalidBundle::Empty
        );
        let big = "x".repeat(MAX_CHAIN_PEM_BYTES + 1);
        assert!(matches!(
            Bundle::parse(&big, None, &[]).unwrap_err(),
            InvalidBundle::ChainTooLarge { .. }
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_garbage(s in "\\PC{0,400}") {
            let _ = Bundle::parse(&s, Some(&s), &[]);
        }

        #[test]
        fn parse_never_panics_on_mangled_pem(cut in 0usize..2000, junk in "[A-Za-z0-9+/=\n-]{0,40}") {
            let c = chain(&["a.example.org"]);
            let mut s = c.fullchain.clone();
            let at = cut.min(s.len());
            s.insert_str(at, &junk);
            if let Ok(b) = Bundle::parse(&s, None, &[]) {
                // Anything accepted is a well-formed leaf covering its names.
                prop_assert!(!b.sans.is_empty());
                prop_assert!(b.leaf_pem.starts_with("-----BEGIN CERTIFICATE-----"));
            }
        }
    }
}
