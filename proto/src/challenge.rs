//! HTTP-01 tokens and key authorizations (RFC 8555 §8.1, §8.3).
//!
//! A token ends up in a URL path and, in webroot mode, as a file name, so its
//! syntax is checked before anything else touches it: base64url only, which
//! also rules out `/`, `.` and every other path character.

use std::fmt;

use crate::pb;

/// Fewest characters a token may have: RFC 8555 §8.1 asks for at least
/// 128 bits of entropy, which base64url encodes in 22 characters.
pub const MIN_TOKEN_LEN: usize = 22;
/// Most characters a token may have. Let's Encrypt and Pebble send 43.
pub const MAX_TOKEN_LEN: usize = 128;
/// A JWK thumbprint is a base64url SHA-256 digest: 32 bytes, 43 characters.
pub const THUMBPRINT_LEN: usize = 43;
/// Most tokens one PlaceTokens or RemoveTokens call may carry. An order has
/// at most 100 identifiers (Let's Encrypt's limit), so this leaves headroom
/// for two concurrent orders without admitting unbounded requests.
pub const MAX_TOKENS_PER_REQUEST: usize = 256;

/// What is wrong with a token or key authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChallenge {
    #[error("token is empty")]
    EmptyToken,
    #[error("token is {len} characters; it must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN}")]
    TokenLength { len: usize },
    #[error(
        "token has {found:?} at byte {at}; only base64url characters (A-Z a-z 0-9 - _) are allowed"
    )]
    TokenCharacter { found: char, at: usize },
    #[error("key authorization for token {token} is not of the form <token>.<thumbprint>")]
    KeyAuthorizationShape { token: String },
    #[error("key authorization for token {token} names a different token")]
    KeyAuthorizationToken { token: String },
    #[error(
        "key authorization for token {token} has a {len}-character thumbprint; it must be {THUMBPRINT_LEN} base64url characters"
    )]
    Thumbprint { token: String, len: usize },
    #[error("{count} tokens in one request; at most {MAX_TOKENS_PER_REQUEST} are allowed")]
    TooMany { count: usize },
}

/// A checked HTTP-01 challenge token.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

impl Token {
    /// Checks `s` against RFC 8555 §8.3: base64url characters, no padding,
    /// between [`MIN_TOKEN_LEN`] and [`MAX_TOKEN_LEN`] characters.
    pub fn parse(s: &str) -> Result<Self, InvalidChallenge> {
        if s.is_empty() {
            return Err(InvalidChallenge::EmptyToken);
        }
        // Length is checked on chars too, so an oversized multibyte string is
        // reported as too long rather than by its first odd character.
        let len = s.chars().count();
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&len) {
            return Err(InvalidChallenge::TokenLength { len });
        }
        if let Some((at, found)) = s.char_indices().find(|(_, c)| !is_base64url(*c)) {
            return Err(InvalidChallenge::TokenCharacter { found, at });
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.0)
    }
}

fn is_base64url(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// One HTTP-01 response: what `GET /.well-known/acme-challenge/<token>` must
/// return. The key authorization is public by design (the CA fetches it over
/// plain HTTP), so it may be logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http01Response {
    token: Token,
    key_authorization: String,
}

impl Http01Response {
    /// Checks that `key_authorization` is `<token>.<thumbprint>` for this
    /// very token, with a well-formed thumbprint (RFC 8555 §8.1).
    pub fn new(token: Token, key_authorization: &str) -> Result<Self, InvalidChallenge> {
        let Some((prefix, thumbprint)) = key_authorization.split_once('.') else {
            return Err(InvalidChallenge::KeyAuthorizationShape {
                token: token.0.clone(),
            });
        };
        if prefix != token.as_str() {
            return Err(InvalidChallenge::KeyAuthorizationToken {
                token: token.0.clone(),
            });
        }
        if thumbprint.len() != THUMBPRINT_LEN || !thumbprint.chars().all(is_base64url) {
            return Err(InvalidChallenge::Thumbprint {
                token: token.0.clone(),
                len: thumbprint.chars().count(),
            });
        }
        Ok(Self {
            token,
            key_authorization: key_authorization.to_owned(),
        })
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    pub fn key_authorization(&self) -> &str {
        &self.key_authorization
    }
}

impl TryFrom<pb::Http01Token> for Http01Response {
    type Error = InvalidChallenge;

    fn try_from(value: pb::Http01Token) -> Result<Self, Self::Error> {
        let token = Token::parse(&value.token)?;
        Self::new(token, &value.key_authorization)
    }
}

impl From<&Http01Response> for pb::Http01Token {
    fn from(value: &Http01Response) -> Self {
        Self {
            token: value.token.0.clone(),
            key_authorization: value.key_authorization.clone(),
        }
    }
}

/// Checks a whole PlaceTokens request: the count first (so an oversized
/// request is refused before any work), then every entry.
pub fn parse_place_request(
    tokens: Vec<pb::Http01Token>,
) -> Result<Vec<Http01Response>, InvalidChallenge> {
    check_count(tokens.len())?;
    tokens.into_iter().map(Http01Response::try_from).collect()
}

/// Checks a whole RemoveTokens request.
pub fn parse_token_list(tokens: &[String]) -> Result<Vec<Token>, InvalidChallenge> {
    check_count(tokens.len())?;
    tokens.iter().map(|t| Token::parse(t)).collect()
}

fn check_count(count: usize) -> Result<(), InvalidChallenge> {
    if count > MAX_TOKENS_PER_REQUEST {
        return Err(InvalidChallenge::TooMany { count });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    const THUMB: &str = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI";

    #[test]
    fn accepts_pebble_shaped_token() {
        let token = Token::parse(TOKEN).unwrap();
        let rsp = Http01Response::new(token, &format!("{TOKEN}.{THUMB}")).unwrap();
        assert_eq!(rsp.key_authorization(), format!("{TOKEN}.{THUMB}"));
    }

    #[test]
    fn refuses_traversal_and_path_characters() {
        for bad in [
            "../../../../etc/passwd0000000000",
            "abcdefghijklmnopqrstuv/w",
            "abcdefghijklmnopqrstuv.w",
            "abcdefghijklmnopqrstuv%2f",
            "abcdefghijklmnopqrstuv=",
            "abcdefghijklmnopqrstuv\0",
        ] {
            let err = Token::parse(bad).unwrap_err();
            assert!(
                matches!(err, InvalidChallenge::TokenCharacter { .. }),
                "{bad:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn refuses_bad_lengths() {
        assert_eq!(Token::parse(""), Err(InvalidChallenge::EmptyToken));
        assert_eq!(
            Token::parse("short"),
            Err(InvalidChallenge::TokenLength { len: 5 })
        );
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            Token::parse(&long),
            Err(InvalidChallenge::TokenLength {
                len: MAX_TOKEN_LEN + 1
            })
        );
    }

    #[test]
    fn refuses_mismatched_key_authorization() {
        let token = Token::parse(TOKEN).unwrap();
        let other = "A".repeat(43);
        assert!(matches!(
            Http01Response::new(token.clone(), &format!("{other}.{THUMB}")),
            Err(InvalidChallenge::KeyAuthorizationToken { .. })
        ));
        assert!(matches!(
            Http01Response::new(token.clone(), TOKEN),
            Err(InvalidChallenge::KeyAuthorizationShape { .. })
        ));
        assert!(matches!(
            Http01Response::new(token, &format!("{TOKEN}.short")),
            Err(InvalidChallenge::Thumbprint { len: 5, .. })
        ));
    }

    #[test]
    fn refuses_too_many_tokens() {
        let tokens = vec![TOKEN.to_owned(); MAX_TOKENS_PER_REQUEST + 1];
        assert_eq!(
            parse_token_list(&tokens),
            Err(InvalidChallenge::TooMany {
                count: MAX_TOKENS_PER_REQUEST + 1
            })
        );
    }

    proptest! {
        #[test]
        fn token_parse_never_panics_and_accepts_only_base64url(s in "\\PC{0,200}") {
            if let Ok(t) = Token::parse(&s) {
                prop_assert!(t.as_str().chars().all(is_base64url));
                prop_assert!((MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&t.as_str().len()));
            }
        }

        #[test]
        fn key_authorization_accepted_only_when_well_formed(
            t in "[A-Za-z0-9_-]{22,128}",
            ka in "[A-Za-z0-9_.-]{0,200}",
        ) {
            let token = Token::parse(&t).unwrap();
            if let Ok(rsp) = Http01Response::new(token, &ka) {
                let (prefix, thumb) = rsp.key_authorization().split_once('.').unwrap();
                prop_assert_eq!(prefix, t.as_str());
                prop_assert_eq!(thumb.len(), THUMBPRINT_LEN);
                prop_assert!(thumb.chars().all(is_base64url));
            }
        }
    }
}
