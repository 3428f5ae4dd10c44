//! The repository invariant: whatever happened to the network, the server or the client, a
//! repository only serves complete, verified, signed, closure-consistent paths.
//!
//! ```text
//!   hash parts to check = the ones the test names  ∪  every narinfo in the server's database
//!        │ (there is no listing route; the database, SQLite or PostgreSQL, is read, never written)
//!        ▼
//!   GET <hash>.narinfo ── 404: not served (fine, unless the database says it is published)
//!        │ 200: parse (stowix::nix::narinfo), StorePath has this hash part
//!        ├─ Sig: a valid signature of the repository key over the fingerprint
//!        ├─ GET URL ── exists, FileSize and FileHash match the bytes
//!        │             decompress ── NarSize and NarHash match, nar::validate accepts it
//!        └─ every reference (but itself) has a narinfo served
//! ```
//! [`check`] panics with every violation it found, so a test shows all of them at once.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;

use sha2::{Digest as _, Sha256};
use stowix::nix::nar;
use stowix::nix::narinfo::NarInfo;
use stowix::nix::signing::PublicKey;

use crate::common::TestServer;

/// What the walk found.
#[derive(Debug, Default)]
pub struct Report {
    /// Hash parts with a narinfo served, each verified.
    pub served: BTreeSet<String>,
    /// NAR URLs of the served narinfos, by hash part.
    pub nar_urls: BTreeMap<String, String>,
    /// Hash parts checked and not served (404).
    pub not_served: BTreeSet<String>,
}

impl Report {
    /// True when no narinfo of `paths` (absolute store paths or hash parts) is served.
    pub fn serves_none_of(&self, paths: &[String]) -> bool {
        paths.iter().all(|p| !self.served.contains(hash_of(p)))
    }

    pub fn serves_all_of(&self, paths: &[String]) -> bool {
        paths.iter().all(|p| self.served.contains(hash_of(p)))
    }
}

/// The hash part of an absolute store path, or the argument itself when it is one.
pub fn hash_of(path: &str) -> &str {
    let base = path.strip_prefix("/nix/store/").unwrap_or(path);
    &base[..base.len().min(32)]
}

/// Walks `repo_url` over HTTP for `paths` (store paths or hash parts) plus every narinfo in the
/// database of `server` (when given; either backend) and panics on any violation of the
/// invariant.
pub async fn check(
    repo_url: &str,
    public_key: &str,
    server: Option<&TestServer>,
    paths: &[String],
) -> Report {
    let repo_url = repo_url.trim_end_matches('/');
    let repo = repo_url.rsplit('/').next().unwrap_or_default();
    let key = PublicKey::parse(public_key).expect("repository public key parses");
    let mut wanted: BTreeSet<String> = paths.iter().map(|p| hash_of(p).to_string()).collect();
    let in_db: BTreeSet<String> = server
        .map(|s| s.published_hashes(repo))
        .unwrap_or_default()
        .into_iter()
        .collect();
    wanted.extend(in_db.iter().cloned());

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client");
    let mut report = Report::default();
    let mut problems = Vec::new();
    let mut narinfos = BTreeMap::new();
    for hash in &wanted {
        match fetch_narinfo(&http, repo_url, hash).await {
            Ok(Some(text)) => {
                narinfos.insert(hash.clone(), text);
            }
            Ok(None) => {
                if in_db.contains(hash) {
                    problems.push(format!(
                        "{hash}: published in the database but its narinfo is not served"
                    ));
                }
                report.not_served.insert(hash.clone());
            }
            Err(e) => problems.push(format!("{hash}: {e}")),
        }
    }
    for (hash, text) in &narinfos {
        match verify_one(&http, repo_url, &key, hash, text).await {
            Ok(info) => {
                for reference in &info.references {
                    let rh = reference.hash_part();
                    if rh == hash {
                        continue;
                    }
                    let served = if narinfos.contains_key(rh) {
                        true
                    } else {
                        matches!(fetch_narinfo(&http, repo_url, rh).await, Ok(Some(_)))
                    };
                    if !served {
                        problems.push(format!(
                            "{hash}: reference {} has no narinfo served",
                            reference.basename()
                        ));
                    }
                }
                report.nar_urls.insert(hash.clone(), info.url.clone());
                report.served.insert(hash.clone());
            }
            Err(e) => problems.push(format!("{hash}: {e}")),
        }
    }
    assert!(
        problems.is_empty(),
        "repository invariant violated at {repo_url}:\n  {}",
        problems.join("\n  ")
    );
    report
}

async fn fetch_narinfo(
    http: &reqwest::Client,
    repo_url: &str,
    hash: &str,
) -> Result<Option<String>, String> {
    let resp = http
        .get(format!("{repo_url}/{hash}.narinfo"))
        .send()
        .await
        .map_err(|e| format!("GET narinfo: {e}"))?;
    match resp.status().as_u16() {
        200 => resp
            .text()
            .await
            .map(Some)
            .map_err(|e| format!("read narinfo: {e}")),
        404 => Ok(None),
        other => Err(format!("GET narinfo answered {other}")),
    }
}

async fn verify_one(
    http: &reqwest::Client,
    repo_url: &str,
    key: &PublicKey,
    hash: &str,
    text: &str,
) -> Result<NarInfo, String> {
    let info = NarInfo::parse(text).map_err(|e| format!("{e}\n{text}"))?;
    if info.store_path.hash_part() != hash {
        return Err(format!("narinfo names another path: {}", info.store_path));
    }
    let fingerprint = info.fingerprint();
    if !info.sigs.iter().any(|sig| key.verify(&fingerprint, sig)) {
        return Err(format!(
            "no valid signature of {} (Sig: {:?})",
            key.name(),
            info.sigs
        ));
    }
    let resp = http
        .get(format!("{repo_url}/{}", info.url))
        .send()
        .await
        .map_err(|e| format!("GET {}: {e}", info.url))?;
    if resp.status() != 200 {
        return Err(format!("GET {} answered {}", info.url, resp.status()));
    }
    let file = resp
        .bytes()
        .await
        .map_err(|e| format!("read {}: {e}", info.url))?;
    if let Some(size) = info.file_size {
        if size != file.len() as u64 {
            return Err(format!(
                "{}: FileSize {size} but {} bytes served",
                info.url,
                file.len()
            ));
        }
    }
    let file_hash = stowix::nix::Sha256Hash(Sha256::digest(&file).into());
    if let Some(expected) = &info.file_hash {
        if *expected != file_hash {
            return Err(format!(
                "{}: FileHash {} but the file hashes to {}",
                info.url,
                expected.to_typed_nix32(),
                file_hash.to_typed_nix32()
            ));
        }
    }
    let nar_bytes =
        decompress(&info.compression, &file).map_err(|e| format!("{}: {e}", info.url))?;
    if nar_bytes.len() as u64 != info.nar_size {
        return Err(format!(
            "NarSize {} but the NAR has {} bytes",
            info.nar_size,
            nar_bytes.len()
        ));
    }
    let nar_hash = stowix::nix::Sha256Hash(Sha256::digest(&nar_bytes).into());
    if nar_hash != info.nar_hash {
        return Err(format!(
            "NarHash {} but the NAR hashes to {}",
            info.nar_hash.to_typed_nix32(),
            nar_hash.to_typed_nix32()
        ));
    }
    nar::validate(&nar_bytes[..]).map_err(|e| format!("the NAR is not valid: {e}"))?;
    Ok(info)
}

fn decompress(compression: &str, file: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match compression {
        "xz" => liblzma::read::XzDecoder::new(file)
            .read_to_end(&mut out)
            .map_err(|e| format!("xz: {e}"))?,
        "zstd" => zstd::stream::read::Decoder::new(file)
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| format!("zstd: {e}"))?,
        "none" => {
            out.extend_from_slice(file);
            0
        }
        other => return Err(format!("unexpected compression {other:?}")),
    };
    Ok(out)
}
