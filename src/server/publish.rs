//! Publication: the one place narinfos become visible, shared by the push API and `nix copy`.
//!
//! ```text
//!   candidates (narinfo + the stored NAR it names)
//!     ──► closure check: every reference is self, already published, or an accepted candidate
//!     ──► sign with the repository key ──► one metadata transaction
//! ```
//! The check runs to a fixed point, so a batch holding a path and its references publishes
//! together, and a path whose reference is missing is refused with the names of what is missing:
//! a repository never serves a narinfo whose NAR or references are absent.

use std::collections::{HashMap, HashSet};

use super::error::ServerResult;
use super::metadata::{NarRecord, PublishedNarInfo, RepoRecord};
use super::metrics;
use super::AppState;
use crate::api::{codes, PublishRejection};
use crate::nix::signing::SecretKey;
use crate::nix::{NarInfo, Sha256Hash};

pub struct Candidate {
    /// The client's narinfo; URL, compression and file fields are replaced from `nar`.
    pub info: NarInfo,
    pub nar: NarRecord,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub published: Vec<String>,
    pub already_published: Vec<String>,
    pub rejected: Vec<PublishRejection>,
}

pub async fn publish(
    state: &AppState,
    repo: &RepoRecord,
    candidates: Vec<Candidate>,
) -> ServerResult<Outcome> {
    let mut outcome = Outcome::default();
    // One lookup for the batch's own paths and everything they reference: a path published
    // earlier is left as it is (and satisfies references), whatever this request says of it.
    let mut lookup: Vec<String> = candidates
        .iter()
        .flat_map(|c| {
            std::iter::once(c.info.store_path.hash_part().to_string())
                .chain(c.info.references.iter().map(|r| r.hash_part().to_string()))
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    lookup.sort();
    let repo_name = repo.name.clone();
    let query = lookup.clone();
    let published_flags = state
        .db(move |meta| meta.published_among(&repo_name, &query))
        .await?;
    let published: HashSet<String> = lookup
        .into_iter()
        .zip(published_flags)
        .filter_map(|(hash, published)| published.then_some(hash))
        .collect();
    let (already, candidates): (Vec<Candidate>, Vec<Candidate>) = candidates
        .into_iter()
        .partition(|c| published.contains(c.info.store_path.hash_part()));
    outcome.already_published = already
        .iter()
        .map(|c| c.info.store_path.hash_part().to_string())
        .collect();
    let published_outside = published;

    // Fixed point: drop candidates with a reference that is neither published nor accepted.
    let mut accepted: HashMap<String, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.info.store_path.hash_part().to_string(), i))
        .collect();
    let mut missing_of: HashMap<usize, Vec<String>> = HashMap::new();
    loop {
        let mut dropped = Vec::new();
        for (hash, &i) in &accepted {
            let info = &candidates[i].info;
            let missing: Vec<String> = info
                .references
                .iter()
                .filter(|r| {
                    r.hash_part() != hash
                        && !published_outside.contains(r.hash_part())
                        && !accepted.contains_key(r.hash_part())
                })
                .map(|r| r.to_absolute())
                .collect();
            if !missing.is_empty() {
                dropped.push(hash.clone());
                missing_of.insert(i, missing);
            }
        }
        if dropped.is_empty() {
            break;
        }
        for hash in dropped {
            accepted.remove(&hash);
        }
    }

    let key = SecretKey::parse(&repo.secret_key).map_err(|err| {
        super::error::ServerError::internal(format!("repository {} key: {err}", repo.name))
    })?;
    let mut rows = Vec::new();
    for (i, candidate) in candidates.into_iter().enumerate() {
        let hash = candidate.info.store_path.hash_part().to_string();
        if let Some(missing) = missing_of.remove(&i) {
            outcome.rejected.push(PublishRejection {
                hash,
                code: codes::MISSING_REFERENCES.into(),
                message: format!(
                    "{} references paths this repository does not have: {}; push them first (or in the same request)",
                    candidate.info.store_path,
                    missing.join(", ")
                ),
            });
            continue;
        }
        let signed = sign(candidate, &key)?;
        rows.push(PublishedNarInfo {
            hash,
            store_path: signed.store_path.to_absolute(),
            nar_hash: signed.nar_hash.to_typed_nix32(),
            text: signed.render(),
        });
    }
    let repo_name = repo.name.clone();
    let hashes: Vec<String> = rows.iter().map(|r| r.hash.clone()).collect();
    let newly = state
        .db(move |meta| meta.publish(&repo_name, &rows))
        .await?;
    // A concurrent request may have published some of these between the check and the write.
    for (hash, new) in hashes.into_iter().zip(newly) {
        if new {
            outcome.published.push(hash);
        } else {
            outcome.already_published.push(hash);
        }
    }
    ::metrics::counter!(metrics::NARINFOS_PUBLISHED_TOTAL)
        .increment(outcome.published.len() as u64);
    Ok(outcome)
}

/// Completes the narinfo from the stored NAR and signs it. Signatures the client carried along
/// are kept (Nix does the same), except any under this repository's key name: only the server
/// signs for its own key.
fn sign(candidate: Candidate, key: &SecretKey) -> ServerResult<NarInfo> {
    let Candidate { mut info, nar } = candidate;
    info.url = nar.url;
    info.compression = nar.compression;
    info.file_hash =
        Some(Sha256Hash::parse(&nar.file_hash).map_err(|err| {
            super::error::ServerError::internal(format!("stored file hash: {err}"))
        })?);
    info.file_size = Some(nar.file_size);
    let own_prefix = format!("{}:", key.name());
    info.sigs.retain(|sig| !sig.starts_with(&own_prefix));
    info.sigs.push(key.sign(&info.fingerprint()));
    Ok(info)
}
