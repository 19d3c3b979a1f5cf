//! An error's whole cause chain, in words.
//!
//! Wrappers such as tonic's `transport error` or hyper's `client error
//! (Connect)` say little on their own; the reason (`connection refused`,
//! `invalid peer certificate: UnknownIssuer`) is further down `source()`.
//! [`Chain`] walks it and joins every link with `": "`, once: a link whose
//! words are already in the text is left out, as wrappers often repeat
//! their source. Operating-system errors read as words (`permission
//! denied`), without the `(os error 13)` suffix.
//!
//! Hints ("add yourself to group certfleet") belong to the code that knows
//! what was being done; it appends them after the chain in parentheses.

use std::error::Error;
use std::fmt;

/// Displays `.0` and every error below it: see the module docs.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&join(links(self.0)))
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A gRPC status's message and every error below it. tonic's own Display
/// lists code, details and metadata, which are no help to a reader.
///
/// tonic often takes the message from deep in the chain: a connection that
/// failed gets its `ConnectError`'s text (`Connection refused`) as message
/// and `transport error`, which wraps it, as source. What wraps the error
/// the message came from says nothing more, so only what lies below that
/// error follows the message.
pub fn status(status: &tonic::Status) -> String {
    let message = words(status.message());
    let below = status.source().map(links).unwrap_or_default();
    let from = below
        .iter()
        .position(|link| link.eq_ignore_ascii_case(&message))
        .map_or(0, |at| at + 1);
    join(
        std::iter::once(message)
            .chain(below.into_iter().skip(from))
            .collect(),
    )
}

/// The first error of type `T` in `err`'s chain, including errors an
/// `io::Error` carries (rustls' errors reach hyper inside one, or two).
pub fn find<'a, T: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = cause(e);
    }
    None
}

/// Each link's own words, top first.
fn links(err: &(dyn Error + 'static)) -> Vec<String> {
    let mut parts = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = match e.downcast_ref::<tonic::Status>() {
            Some(status) => status.message().to_owned(),
            None => e.to_string(),
        };
        parts.push(words(&text));
        next = cause(e);
    }
    parts
}

/// The error below `e`. An `io::Error` that carries another error shows
/// that error's text as its own, but its `source()` skips past it to the
/// carried error's source, so the walk steps into the carried error itself.
fn cause<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a (dyn Error + 'static)> {
    match e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        Some(carried) => Some(carried as &(dyn Error + 'static)),
        None => e.source(),
    }
}

/// Joins `parts` with `": "`, leaving out empty ones and ones whose words
/// (ignoring case) are already in the text.
fn join(parts: Vec<String>) -> String {
    let mut text = String::new();
    for part in parts {
        if part.is_empty() || text.to_lowercase().contains(&part.to_lowercase()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// `text` with every ` (os error N)` dropped; if there was one, the text is
/// the system's description of an errno, which reads better in lower case
/// in the middle of a sentence (`connect …: permission denied`).
fn words(text: &str) -> String {
    const MARK: &str = " (os error ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut found = false;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with(')') {
            out.push_str(&rest[..at]);
            rest = &after[digits + 1..];
            found = true;
        } else {
            out.push_str(&rest[..at + MARK.len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    if found { lower_first(&out) } else { out }
}

/// `Permission denied` → `permission denied`; `EOF …` stays as it is.
fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if first.is_uppercase() && second.is_lowercase() => first
            .to_lowercase()
            .chain(text[first.len_utf8()..].chars())
            .collect(),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    /// An error with a message and an optional source, like most wrappers.
    #[derive(Debug)]
    struct Wrap(&'static str, Option<Box<dyn Error + Send + Sync>>);

    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    fn refused() -> io::Error {
        io::Error::from_raw_os_error(111)
    }

    #[test]
    fn every_link_is_shown_once_in_words() {
        let err = Wrap(
            "transport error",
            Some(Box::new(Wrap(
                "tcp connect error",
                Some(Box::new(refused())),
            ))),
        );
        assert_eq!(
            Chain(&err).to_string(),
            "transport error: tcp connect error: connection refused"
        );
        // A wrapper that repeats its source (tonic's ConnectError does) does
        // not double it, whatever the case or the errno suffix.
        let err = Wrap(
            "Connection refused (os error 111)",
            Some(Box::new(refused())),
        );
        assert_eq!(Chain(&err).to_string(), "connection refused");
        let err = Wrap("", Some(Box::new(Wrap("inner", None))));
        assert_eq!(Chain(&err).to_string(), "inner");
    }

    #[test]
    fn os_errors_read_as_words() {
        assert_eq!(
            Chain(&io::Error::from_raw_os_error(13)).to_string(),
            "permission denied"
        );
        assert_eq!(
            Chain(&io::Error::from_raw_os_error(2)).to_string(),
            "no such file or directory"
        );
        assert_eq!(words("a (os error x) b"), "a (os error x) b");
        assert_eq!(words("EOF (os error 5)"), "EOF");
        assert_eq!(words("TLS handshake"), "TLS handshake");
    }

    #[test]
    fn a_status_shows_its_message_and_its_causes() {
        let status = tonic::Status::from_error(Box::new(Wrap(
            "error trying to connect",
            Some(Box::new(refused())),
        )));
        assert_eq!(
            super::status(&status),
            "error trying to connect: connection refused"
        );
        // As tonic reports a connection that failed: the message from the
        // ConnectError, its wrapper as the source.
        let status = tonic::Status::from_error(Box::new(Wrap(
            "transport error",
            Some(Box::new(tonic::ConnectError(Box::new(refused())))),
        )));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(super::status(&status), "connection refused");
        let plain = tonic::Status::not_found("no certificate named \"x\"");
        assert_eq!(super::status(&plain), "no certificate named \"x\"");
        // As a link further down, a status shows its message, not its Debug.
        let err = Wrap("rpc failed", Some(Box::new(plain)));
        assert_eq!(
            Chain(&err).to_string(),
            "rpc failed: no certificate named \"x\""
        );
    }

    /// What rustls puts inside an `io::Error`, in miniature.
    #[derive(Debug)]
    struct Untrusted;

    impl fmt::Display for Untrusted {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("invalid peer certificate: UnknownIssuer")
        }
    }

    impl Error for Untrusted {}

    #[test]
    fn find_looks_inside_io_errors() {
        // As hyper-rustls hands on a failed handshake: rustls' error in
        // tokio-rustls' io::Error in its own io::Error.
        let io = io::Error::other(io::Error::new(io::ErrorKind::InvalidData, Untrusted));
        let err = Wrap("client error (Connect)", Some(Box::new(io)));
        assert!(find::<Untrusted>(&err).is_some());
        assert!(find::<io::Error>(&err).is_some());
        assert!(find::<tonic::Status>(&err).is_none());
        assert_eq!(
            Chain(&err).to_string(),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }
}
