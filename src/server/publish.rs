//! Publication: the one place narinfos become visible, shared by the push API and `nix copy`.
//!
//! ```text
//!   candidates (narinfo + the stored NAR it names), upstream proofs
//!     ──► proofs checked against the repository's upstream keys
//!     ──► closure check: every reference is self, already published, an accepted candidate,
//!         or proven to be served by a trusted upstream cache
//!     ──► sign with the repository key ──► one metadata transaction
//! ```
//! The check runs to a fixed point ([`closure_check`], pure), so a batch holding a path and its
//! references publishes together, and a path whose reference is missing is refused with the
//! names of what is missing: a repository never serves a narinfo whose NAR or references are
//! absent. References match whole store paths, name included.

use std::collections::{HashMap, HashSet};

use super::error::ServerResult;
use super::metadata::{closure_check, NarRecord, PublishState, PublishedNarInfo, RepoRecord};
use super::metrics;
use super::AppState;
use crate::api::{codes, PublishRejection, UpstreamProof};
use crate::nix::signing::{signed_by, PublicKey, SecretKey};
use crate::nix::{NarInfo, Sha256Hash, StorePath};

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
    upstream: Vec<UpstreamProof>,
) -> ServerResult<Outcome> {
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
    let stored_paths = state
        .db(move |meta| meta.published_store_paths(&repo_name, &query))
        .await?;
    let mut published = HashMap::new();
    for (hash, path) in lookup.into_iter().zip(stored_paths) {
        if let Some(path) = path {
            let path = StorePath::from_absolute(&path).map_err(|err| {
                super::error::ServerError::internal(format!("published store path: {err}"))
            })?;
            published.insert(hash, path);
        }
    }
    let key = SecretKey::parse(&repo.secret_key).map_err(|err| {
        super::error::ServerError::internal(format!("repository {} key: {err}", repo.name))
    })?;
    // Checking thousands of references and signing thousands of narinfos is CPU work: off the
    // async workers, so other requests keep being answered meanwhile.
    let upstream_keys: Vec<PublicKey> = repo
        .upstream_keys
        .iter()
        .filter_map(|text| PublicKey::parse(text).ok())
        .collect();
    let (mut outcome, rows, exempt) = tokio::task::spawn_blocking(move || {
        let proven = proven_upstream(&upstream, &upstream_keys);
        let exempt: HashSet<String> = proven.iter().map(|p| p.hash_part().to_string()).collect();
        decide_and_sign(candidates, &published, &proven, &key).map(|(o, r)| (o, r, exempt))
    })
    .await??;
    let repo_name = repo.name.clone();
    let hashes: Vec<String> = rows.iter().map(|r| r.hash.clone()).collect();
    let at = super::gc::now();
    let states = state
        .db(move |meta| meta.publish_checked(&repo_name, &rows, &exempt, at))
        .await?;
    // Between the check above and this transaction, a concurrent request may have published
    // some of these, and a collection may have removed a reference or a NAR: the transaction
    // checks again under lock, and what it refuses is refused here with a code the client acts on.
    for (hash, published) in hashes.into_iter().zip(states) {
        match published {
            PublishState::New => outcome.published.push(hash),
            PublishState::Already => outcome.already_published.push(hash),
            PublishState::MissingReferences(missing) => outcome.rejected.push(PublishRejection {
                hash,
                code: codes::MISSING_REFERENCES.into(),
                message: format!(
                    "references paths this repository no longer has (collected meanwhile): {}; push them again",
                    missing.join(", ")
                ),
            }),
            PublishState::NarGone(url) => outcome.rejected.push(PublishRejection {
                hash,
                code: codes::NAR_NOT_STORED.into(),
                message: format!("the NAR {url} was collected meanwhile: upload it again"),
            }),
        }
    }
    ::metrics::counter!(metrics::NARINFOS_PUBLISHED_TOTAL)
        .increment(outcome.published.len() as u64);
    Ok(outcome)
}

/// The store paths of `proofs` that one of `keys` signed (the fingerprint rebuilt from the
/// proof's own fields, so a signature of other contents proves nothing).
pub fn proven_upstream(proofs: &[UpstreamProof], keys: &[PublicKey]) -> HashSet<StorePath> {
    if keys.is_empty() {
        return HashSet::new();
    }
    proofs
        .iter()
        .filter_map(|proof| {
            let path = StorePath::from_absolute(&proof.store_path).ok()?;
            let nar_hash = Sha256Hash::parse(&proof.nar_hash).ok()?;
            let references = proof
                .references
                .iter()
                .map(|r| StorePath::from_absolute(r))
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let fingerprint =
                crate::nix::narinfo::fingerprint(&path, &nar_hash, proof.nar_size, &references);
            signed_by(keys, &fingerprint, &proof.signatures).map(|_| path)
        })
        .collect()
}

/// Sorts the candidates into already published, refused and signed rows to write. `published`
/// maps hash parts to the store paths this repository already publishes under them; `proven`
/// holds the paths a trusted upstream cache serves.
fn decide_and_sign(
    candidates: Vec<Candidate>,
    published: &HashMap<String, StorePath>,
    proven: &HashSet<StorePath>,
    key: &SecretKey,
) -> ServerResult<(Outcome, Vec<PublishedNarInfo>)> {
    let mut outcome = Outcome::default();
    let mut fresh = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let path = &candidate.info.store_path;
        match published.get(path.hash_part()) {
            None => fresh.push(candidate),
            Some(existing) if existing == path => {
                outcome.already_published.push(path.hash_part().to_string())
            }
            Some(existing) => outcome.rejected.push(PublishRejection {
                hash: path.hash_part().to_string(),
                code: codes::BAD_REQUEST.into(),
                message: format!(
                    "{path} cannot be published: this repository already publishes {existing} under the same hash part"
                ),
            }),
        }
    }
    let published_paths: HashSet<&StorePath> = published.values().chain(proven).collect();
    let closure: Vec<(&StorePath, &[StorePath])> = fresh
        .iter()
        .map(|c| (&c.info.store_path, c.info.references.as_slice()))
        .collect();
    let missing_of: Vec<Vec<String>> = closure_check(&closure, &published_paths)
        .into_iter()
        .map(|missing| missing.iter().map(|r| r.to_absolute()).collect())
        .collect();
    drop(closure);
    let mut rows = Vec::new();
    for (candidate, missing) in fresh.into_iter().zip(missing_of) {
        let hash = candidate.info.store_path.hash_part().to_string();
        if !missing.is_empty() {
            outcome.rejected.push(PublishRejection {
                hash,
                code: codes::MISSING_REFERENCES.into(),
                message: format!(
                    "{} references paths this repository does not have: {}; push them first (or in the same request), or prove them with a signature by one of the repository's upstream keys",
                    candidate.info.store_path,
                    missing.join(", ")
                ),
            });
            continue;
        }
        let signed = sign(candidate, key)?;
        rows.push(PublishedNarInfo {
            hash,
            store_path: signed.store_path.to_absolute(),
            nar_hash: signed.nar_hash.to_typed_nix32(),
            text: signed.render(),
        });
    }
    Ok((outcome, rows))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn path(hash_char: char, name: &str) -> StorePath {
        let hash: String = std::iter::repeat_n(hash_char, 32).collect();
        StorePath::from_basename(&format!("{hash}-{name}")).unwrap()
    }

    /// Runs the check and names each candidate's missing references by basename.
    fn check(
        candidates: &[(StorePath, Vec<StorePath>)],
        published: &[StorePath],
    ) -> Vec<Vec<String>> {
        let borrowed: Vec<(&StorePath, &[StorePath])> = candidates
            .iter()
            .map(|(p, refs)| (p, refs.as_slice()))
            .collect();
        let published: HashSet<&StorePath> = published.iter().collect();
        closure_check(&borrowed, &published)
            .into_iter()
            .map(|missing| missing.iter().map(|p| p.basename().to_string()).collect())
            .collect()
    }

    #[test]
    fn a_batch_with_its_references_is_accepted_whole() {
        let (a, b, c) = (path('a', "a"), path('b', "b"), path('c', "c"));
        let result = check(
            &[
                (a.clone(), vec![a.clone(), b.clone()]),
                (b.clone(), vec![c.clone()]),
                (c.clone(), vec![]),
            ],
            &[],
        );
        assert!(result.iter().all(Vec::is_empty), "{result:?}");
    }

    #[test]
    fn published_references_satisfy_only_by_their_exact_path() {
        let published = path('p', "lib");
        let same = (path('a', "app"), vec![published.clone()]);
        let renamed = (path('b', "bin"), vec![path('p', "other-name")]);
        let result = check(&[same, renamed], std::slice::from_ref(&published));
        assert_eq!(result[0], Vec::<String>::new());
        assert_eq!(
            result[1],
            vec![path('p', "other-name").basename().to_string()]
        );
    }

    #[test]
    fn a_self_reference_under_another_name_is_missing() {
        let me = path('a', "app");
        let result = check(&[(me.clone(), vec![me.clone(), path('a', "not-app")])], &[]);
        assert_eq!(result[0], vec![path('a', "not-app").basename().to_string()]);
    }

    #[test]
    fn a_batch_reference_under_another_name_is_missing() {
        let lib = path('l', "lib");
        let app = path('a', "app");
        let result = check(
            &[(lib.clone(), vec![]), (app, vec![path('l', "lib-renamed")])],
            &[],
        );
        assert!(result[0].is_empty());
        assert_eq!(
            result[1],
            vec![path('l', "lib-renamed").basename().to_string()]
        );
    }

    #[test]
    fn refusals_propagate_along_a_chain_in_any_order() {
        // d -> c -> b -> a -> (missing x); f is independent.
        let p: Vec<StorePath> = ['a', 'b', 'c', 'd', 'f']
            .iter()
            .map(|&c| path(c, &c.to_string()))
            .collect();
        let x = path('x', "x");
        let mut candidates = vec![
            (p[3].clone(), vec![p[2].clone()]),
            (p[0].clone(), vec![x.clone()]),
            (p[4].clone(), vec![p[4].clone()]),
            (p[2].clone(), vec![p[1].clone()]),
            (p[1].clone(), vec![p[0].clone()]),
        ];
        for _ in 0..candidates.len() {
            candidates.rotate_left(1);
            let result = check(&candidates, &[]);
            for ((path, _), missing) in candidates.iter().zip(&result) {
                let expected: Vec<String> = match path.name() {
                    "a" => vec![x.basename().into()],
                    "b" => vec![p[0].basename().into()],
                    "c" => vec![p[1].basename().into()],
                    "d" => vec![p[2].basename().into()],
                    _ => vec![],
                };
                assert_eq!(missing, &expected, "{}", path.name());
            }
        }
    }

    #[test]
    fn a_cycle_inside_the_batch_is_accepted() {
        let (a, b) = (path('a', "a"), path('b', "b"));
        let result = check(
            &[(a.clone(), vec![b.clone()]), (b.clone(), vec![a.clone()])],
            &[],
        );
        assert!(result.iter().all(Vec::is_empty), "{result:?}");
    }
}
