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

/// The record of a presented token, or the 401 that says why it is not valid here: checked
/// before (and whatever) the repository, so the answer does not depend on which repositories
/// exist.
pub fn authenticate(meta: &dyn Metadata, token: &str) -> Result<TokenRecord, ServerError> {
    let unauthorized =
        |code: &str, message: String| ServerError::new(StatusCode::UNAUTHORIZED, code, message);
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
    Ok(record)
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
    let record = authenticate(meta, token)?;
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
    fn v6(prefix: u64, host: u64) -> std::net::IpAddr {
        std::net::IpAddr::V6(std::net::Ipv6Addr::from(
            (u128::from(prefix) << 64) | u128::from(host),
        ))
    }

    #[test]
    fn failure_table_stays_bounded_after_a_million_addresses() {
        let now = std::time::Instant::now();
        let mut table = FailureTable::new(4096, std::time::Duration::from_secs(60));
        for i in 0..1_000_000u64 {
            // Half distinct /64s, half distinct IPv4 addresses, all inside one window.
            let addr = if i % 2 == 0 {
                v6(i, 1)
            } else {
                std::net::IpAddr::V4(std::net::Ipv4Addr::from(i as u32))
            };
            table.record(addr, now);
        }
        assert!(table.len() <= table.capacity(), "{} slots", table.len());
        assert_eq!(table.capacity(), 4096);
        // A client failing right now is still counted (a fresh entry evicts the oldest).
        let attacker = std::net::IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9));
        for _ in 0..3 {
            table.record(attacker, now);
        }
        assert!(table.wait(attacker, 3, now).is_some());
    }

    #[test]
    fn failure_cost_does_not_grow_with_the_number_of_addresses() {
        let now = std::time::Instant::now();
        let mut table = FailureTable::new(1024, std::time::Duration::from_secs(60));
        let mut before = 0;
        for round in 0..10u32 {
            for i in 0..100_000u32 {
                let addr = std::net::IpAddr::V4(std::net::Ipv4Addr::from(round * 100_000 + i));
                table.record(addr, now);
            }
            let cost = table.examined - before;
            before = table.examined;
            // Each failure looks at one set, however full the table is and however many
            // addresses came before: no sweep.
            assert!(
                cost <= 100_000 * 2 * FailureTable::WAYS as u64,
                "round {round}: {cost} slots examined for 100 000 failures"
            );
            assert_eq!(table.slots.len(), 1024, "the table was resized");
        }
    }

    #[test]
    fn rotating_ipv6_addresses_share_their_prefix_budget() {
        let now = std::time::Instant::now();
        let mut table = FailureTable::new(4096, std::time::Duration::from_secs(60));
        for host in 0..5 {
            table.record(v6(0x2001_0db8_0000_0001, host * 7919 + 1), now);
        }
        // A never-seen address of the same /64 is already over a budget of 5.
        assert!(table
            .wait(v6(0x2001_0db8_0000_0001, 0xdead_beef), 5, now)
            .is_some());
        // Another /64 is not.
        assert!(table.wait(v6(0x2001_0db8_0000_0002, 1), 5, now).is_none());
        // IPv4 and IPv4-mapped IPv6 are one client.
        let v4 = std::net::Ipv4Addr::new(192, 0, 2, 1);
        for _ in 0..5 {
            table.record(std::net::IpAddr::V4(v4), now);
        }
        assert!(table
            .wait(std::net::IpAddr::V6(v4.to_ipv6_mapped()), 5, now)
            .is_some());
    }

    #[test]
    fn failure_windows_expire() {
        let start = std::time::Instant::now();
        let mut table = FailureTable::new(64, std::time::Duration::from_secs(60));
        let addr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
        for _ in 0..3 {
            table.record(addr, start);
        }
        let wait = table.wait(addr, 3, start + std::time::Duration::from_secs(20));
        assert_eq!(wait, Some(std::time::Duration::from_secs(40)));
        assert_eq!(
            table.wait(addr, 3, start + std::time::Duration::from_secs(61)),
            None
        );
        table.record(addr, start + std::time::Duration::from_secs(61));
        assert_eq!(
            table.wait(addr, 1, start + std::time::Duration::from_secs(61)),
            Some(std::time::Duration::from_secs(60))
        );
    }
}

/// Failed authentications per client, over a one-minute window, in a table of fixed size.
///
/// Set-associative: an address hashes (with a per-process random key, so a client cannot aim at
/// one set) to a set of [`FailureTable::WAYS`] slots; a new address takes an empty or expired
/// slot, else the one whose window started first. Every call examines at most one set, so the
/// cost per failure is constant and the table never grows, however many addresses fail.
/// IPv6 clients are keyed by their /64 (what one subscriber or one host is given), so rotating
/// through the addresses of a prefix neither escapes the budget nor fills the table. A client
/// that controls more prefixes than the table has slots can push its own entries out; that
/// costs it as many distinct /64s as there are slots, and each still gets its full budget only.
pub struct FailureTable {
    slots: Vec<Option<FailureSlot>>,
    hasher: std::collections::hash_map::RandomState,
    window: std::time::Duration,
    /// Slots looked at so far: what a failure costs, for the tests.
    examined: u64,
}

#[derive(Clone, Copy)]
struct FailureSlot {
    key: u128,
    start: std::time::Instant,
    count: u32,
}

impl FailureTable {
    pub const WAYS: usize = 8;
    /// 32 768 slots of 40 bytes: about 1.3 MB, allocated once.
    pub const DEFAULT_SLOTS: usize = 32_768;

    pub fn new(slots: usize, window: std::time::Duration) -> Self {
        let slots = slots.max(Self::WAYS).next_multiple_of(Self::WAYS);
        FailureTable {
            slots: vec![None; slots],
            hasher: std::collections::hash_map::RandomState::new(),
            window,
            examined: 0,
        }
    }

    /// The budget key of an address: IPv4 whole, IPv6 by its /64 (tagged apart from IPv4).
    pub fn key(addr: std::net::IpAddr) -> u128 {
        match addr {
            std::net::IpAddr::V4(v4) => u128::from(u32::from(v4)),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => u128::from(u32::from(v4)),
                None => (u128::from(v6) & !((1u128 << 64) - 1)) | (1 << 32),
            },
        }
    }

    fn set(&self, key: u128) -> std::ops::Range<usize> {
        use std::hash::BuildHasher;
        let sets = self.slots.len() / Self::WAYS;
        let set = (self.hasher.hash_one(key) % sets as u64) as usize;
        set * Self::WAYS..(set + 1) * Self::WAYS
    }

    /// Counts one failure for `addr` at `now`.
    pub fn record(&mut self, addr: std::net::IpAddr, now: std::time::Instant) {
        let key = Self::key(addr);
        let range = self.set(key);
        let window = self.window;
        let live = |slot: &FailureSlot| now.saturating_duration_since(slot.start) < window;
        self.examined += 2 * range.len() as u64;
        let set = &mut self.slots[range];
        if let Some(slot) = set.iter_mut().flatten().find(|slot| slot.key == key) {
            if !live(slot) {
                *slot = FailureSlot {
                    key,
                    start: now,
                    count: 0,
                };
            }
            slot.count = slot.count.saturating_add(1);
            return;
        }
        let victim = set
            .iter()
            .position(|slot| slot.as_ref().is_none_or(|slot| !live(slot)))
            .unwrap_or_else(|| {
                (0..set.len())
                    .min_by_key(|&i| set[i].map(|slot| slot.start))
                    .unwrap_or(0)
            });
        set[victim] = Some(FailureSlot {
            key,
            start: now,
            count: 1,
        });
    }

    /// How long `addr` must wait when it has failed `limit` times in the current window.
    pub fn wait(
        &self,
        addr: std::net::IpAddr,
        limit: u32,
        now: std::time::Instant,
    ) -> Option<std::time::Duration> {
        let key = Self::key(addr);
        let slot = self.slots[self.set(key)]
            .iter()
            .flatten()
            .find(|slot| slot.key == key)?;
        let elapsed = now.saturating_duration_since(slot.start);
        (elapsed < self.window && slot.count >= limit).then(|| self.window - elapsed)
    }

    /// Occupied slots (expired ones included): never more than the capacity.
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}
