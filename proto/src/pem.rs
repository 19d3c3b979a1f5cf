//! PEM encoding (RFC 7468) of the DER certificates certfleet passes on.
//!
//! Parsing stays with the parsers ([`crate::bundle`] for chains, rustls'
//! `PemObject` for a single certificate); this is only the way back.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Base64 characters per line, as RFC 7468 §2 asks generators to write.
const LINE: usize = 64;

/// `der` as one PEM `CERTIFICATE` block, ending in a newline.
pub fn certificate(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / LINE + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(LINE) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn a_certificate_comes_back_from_its_pem() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = certificate(cert.der());
        assert_eq!(pem, cert.pem());
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), cert.der().as_ref());
    }

    #[test]
    fn lines_are_at_most_64_characters() {
        let pem = certificate(&[0xA5; 200]);
        assert!(
            pem.lines()
                .all(|l| l.len() <= LINE || l.starts_with("-----"))
        );
        // 200 bytes are 268 base64 characters: four full lines and one of 12.
        assert_eq!(pem.lines().count(), 2 + 5);
    }
}
