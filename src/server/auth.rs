//! API tokens: `stx_live_<26-char id>_<24-char secret>`.
//!
//! The id is stored in clear (it names the token in `token list` and logs); only the sha256 of
//! the secret is stored, compared in constant time. A 24-character alphanumeric secret carries
//! ~142 bits of entropy, so a fast hash is enough: there is nothing to brute-force offline.
//! Tokens arrive as `Authorization: Bearer <token>` or as the password of HTTP Basic (so Nix's
//! netrc works), and never reach a log line.

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ServerError;
use super::metadata::{now_unix, Metadata, RepoRecord, Scope, TokenRecord};
use crate::api::codes;

pub const TOKEN_PREFIX: &str = "stx_live_";
pub const TOKEN_ID_LEN: usize = 26;
pub const TOKEN_SECRET_LEN: usize = 24;

const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A token split into its parts; `Debug` never shows the secret.
pub struct ParsedToken<'a> {
    pub id: &'a str,
    secret: &'a str,
}

impl std::fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParsedToken({}, <secret>)", self.id)
    }
}

pub fn parse_token(text: &str) -> Option<ParsedToken<'_>> {
    let rest = text.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_at_checked(TOKEN_ID_LEN)?;
    let secret = secret.strip_prefix('_')?;
    let id_ok = id.bytes().all(|b| ID_ALPHABET.contains(&b));
    let secret_ok =
        secret.len() == TOKEN_SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (id_ok && secret_ok).then_some(ParsedToken { id, secret })
}

pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

/// A new token record and the token text to hand to the user (shown once, never stored).
pub fn generate_token(
    scope: Scope,
    repos: Vec<String>,
    description: String,
) -> (TokenRecord, String) {
    let id = random_string(ID_ALPHABET, TOKEN_ID_LEN);
    let secret = random_string(SECRET_ALPHABET, TOKEN_SECRET_LEN);
    let text = format!("{TOKEN_PREFIX}{id}_{secret}");
    let record = TokenRecord {
        id,
        secret_sha256: secret_digest(&secret),
        scope,
        repos,
        description,
        created_at: now_unix(),
        revoked_at: None,
    };
    (record, text)
}

/// The credential a request carries, if any: Bearer, or the password of Basic.
pub fn presented_token(headers: &HeaderMap) -> Result<Option<String>, ServerError> {
    let mut values = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let malformed = || {
        ServerError::new(
            StatusCode::UNAUTHORIZED,
            codes::MALFORMED_TOKEN,
            "the Authorization header is malformed: send `Bearer stx_live_...` or HTTP Basic with the token as password",
        )
    };
    // Two different credentials are ambiguous, and honouring either could let a proxy's
    // header override the client's: refuse.
    if values.any(|other| other != value) {
        return Err(ServerError::new(
            StatusCode::UNAUTHORIZED,
            codes::MALFORMED_TOKEN,
            "the request carries several different Authorization headers: send one",
        ));
    }
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, credentials) = value.split_once(' ').ok_or_else(malformed)?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Some(credentials.trim().to_string()))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .map_err(|_| malformed())?;
        let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
        let (_user, password) = decoded.split_once(':').ok_or_else(malformed)?;
        Ok(Some(password.to_string()))
    } else {
        Err(malformed())
    }
}

/// What a request may do in a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Push,
}

/// Checks `token` against `repo` for `needed` access. `Ok(Some(scope))` when a valid token was
/// presented, `Ok(None)` when none was and none is needed (public read).
pub fn authorize(
    meta: &dyn Metadata,
    repo: &RepoRecord,
    token: Option<&str>,
    needed: Access,
) -> Result<Option<Scope>, ServerError> {
    let unauthorized =
        |code: &str, message: String| ServerError::new(StatusCode::UNAUTHORIZED, code, message);
    let Some(token) = token else {
        return match (needed, repo.private) {
            (Access::Read, false) => Ok(None),
            (Access::Read, true) => Err(unauthorized(
                codes::MISSING_TOKEN,
                format!(
                    "repository '{}' is private: pass a read or push token",
                    repo.name
                ),
            )),
            (Access::Push, _) => Err(unauthorized(
                codes::MISSING_TOKEN,
                format!("pushing to repository '{}' needs a push token", repo.name),
            )),
        };
    };
    let Some(parsed) = parse_token(token) else {
        return Err(unauthorized(
            codes::MALFORMED_TOKEN,
            "the token is malformed: tokens look like stx_live_<26 characters>_<24 characters>"
                .into(),
        ));
    };
    let record = meta.token(parsed.id)?;
    let secret_matches = match &record {
        Some(record) => bool::from(secret_digest(parsed.secret).ct_eq(&record.secret_sha256)),
        // Hash anyway so a wrong id and a wrong secret take the same time.
        None => {
            let _ = secret_digest(parsed.secret);
            false
        }
    };
    let record = match record {
        Some(record) if secret_matches => record,
        _ => {
            return Err(unauthorized(
                codes::INVALID_TOKEN,
                format!(
                    "token {} is not valid on this server: check that it was copied whole",
                    parsed.id
                ),
            ))
        }
    };
    if record.revoked_at.is_some() {
        return Err(unauthorized(
            codes::REVOKED_TOKEN,
            format!("token {} has been revoked: create a new one", record.id),
        ));
    }
    if !record.repos.iter().any(|r| r == &repo.name) {
        return Err(ServerError::new(
            StatusCode::FORBIDDEN,
            codes::WRONG_REPOSITORY,
            format!(
                "token {} is for repository {}, not '{}'",
                record.id,
                record
                    .repos
                    .iter()
                    .map(|r| format!("'{r}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
                repo.name
            ),
        ));
    }
    if needed == Access::Push && record.scope != Scope::Push {
        return Err(ServerError::new(
            StatusCode::FORBIDDEN,
            codes::INSUFFICIENT_SCOPE,
            format!(
                "token {} has read scope on repository '{}'; pushing needs a push token",
                record.id, repo.name
            ),
        ));
    }
    Ok(Some(record.scope))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_match_their_digest() {
        let (record, text) = generate_token(Scope::Push, vec!["r".into()], String::new());
        assert!(text.starts_with("stx_live_"));
        assert_eq!(text.len(), 9 + 26 + 1 + 24);
        let parsed = parse_token(&text).unwrap();
        assert_eq!(parsed.id, record.id);
        assert_eq!(secret_digest(parsed.secret), record.secret_sha256);
        assert!(!format!("{parsed:?}").contains(parsed.secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "stx_live_",
            "stx_test_abcdefghijklmnopqrstuvwxyz_ABCDEFGHIJKLMNOPQRSTUVWX",
            "stx_live_abcdefghijklmnopqrstuvwxy_ABCDEFGHIJKLMNOPQRSTUVWXZ",
            "stx_live_ABCDEFGHIJKLMNOPQRSTUVWXYZ_ABCDEFGHIJKLMNOPQRSTUVWX",
            "stx_live_abcdefghijklmnopqrstuvwxyz_ABCDEFGHIJKLMNOPQRSTUVW",
            "stx_live_abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWX",
            "stx_live_abcdefghijklmnopqrstuvwxyz_ABCDEFGHIJKLMNOPQRSTUV/X",
        ] {
            assert!(parse_token(bad).is_none(), "{bad:?}");
        }
        assert!(
            parse_token("stx_live_abcdefghijklmnopqrstuvwxyz_ABCDEFGHIJKLMNOPQRSTUVWX").is_some()
        );
    }

    #[test]
    fn basic_and_bearer_credentials_are_read() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer tok".parse().unwrap());
        assert_eq!(presented_token(&headers).unwrap().as_deref(), Some("tok"));
        let basic = base64::engine::general_purpose::STANDARD.encode("any:tok2");
        headers.insert("authorization", format!("Basic {basic}").parse().unwrap());
        assert_eq!(presented_token(&headers).unwrap().as_deref(), Some("tok2"));
        headers.insert("authorization", "Digest x".parse().unwrap());
        assert!(presented_token(&headers).is_err());
    }
}
