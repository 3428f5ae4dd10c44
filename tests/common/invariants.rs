//! The repository invariant, checked over HTTP as a substituter sees it: for every narinfo the
//! repository serves, its NAR downloads and matches FileHash/FileSize/NarHash/NarSize, every
//! reference's narinfo is served too, and the signature verifies with the repository's key.
//! Retention tests run it after each collection; any test may run it at any moment.
//!
//! ```text
//!   hash parts to probe ──► GET <hash>.narinfo ── 404: not served (fine: collected or never pushed)
//!                                │ 200
//!                                ├─► signature by the repository key over the fingerprint
//!                                ├─► GET <URL> ──► FileSize, FileHash ──► decompress ──► NarSize, NarHash
//!                                └─► every reference: GET <ref>.narinfo is 200
//! ```

use std::collections::BTreeMap;

use stowix::nix::signing::{signed_by, PublicKey};
use stowix::nix::NarInfo;

use super::{bearer, http, sha256_nix32, unxz};

/// Checks every narinfo among `hashes` that `repo_url` serves; returns the served ones' hash
/// parts (sorted), or every broken one with what is wrong.
pub async fn check_served(
    repo_url: &str,
    public_key: &str,
    token: Option<&str>,
    hashes: &[String],
) -> Result<Vec<String>, String> {
    let key = PublicKey::parse(public_key).map_err(|e| format!("public key: {e}"))?;
    let keys = [key];
    let mut served = BTreeMap::new();
    let mut problems = Vec::new();
    for hash in hashes {
        match get(repo_url, &format!("{hash}.narinfo"), token).await? {
            None => {}
            Some(body) => {
                let text = String::from_utf8(body).map_err(|_| format!("{hash}: not UTF-8"))?;
                match NarInfo::parse(&text) {
                    Ok(info) => {
                        served.insert(hash.clone(), info);
                    }
                    Err(err) => problems.push(format!("{hash}.narinfo: {err}")),
                }
            }
        }
    }
    for (hash, info) in &served {
        if signed_by(&keys, &info.fingerprint(), &info.sigs).is_none() {
            problems.push(format!("{hash}: no valid signature by {public_key}"));
        }
        match get(repo_url, &info.url, token).await? {
            None => problems.push(format!("{hash}: its NAR {} is not served", info.url)),
            Some(file) => {
                if Some(file.len() as u64) != info.file_size {
                    problems.push(format!(
                        "{hash}: FileSize {:?}, got {}",
                        info.file_size,
                        file.len()
                    ));
                }
                if info.file_hash.map(|h| h.to_typed_nix32()) != Some(sha256_nix32(&file)) {
                    problems.push(format!("{hash}: FileHash differs from the NAR's"));
                }
                let nar = match info.compression.as_str() {
                    "xz" => unxz(&file),
                    "zstd" => zstd::decode_all(file.as_slice()).map_err(|e| e.to_string())?,
                    "none" => file,
                    other => return Err(format!("{hash}: compression {other} not handled here")),
                };
                if nar.len() as u64 != info.nar_size {
                    problems.push(format!(
                        "{hash}: NarSize {}, got {}",
                        info.nar_size,
                        nar.len()
                    ));
                }
                if sha256_nix32(&nar) != info.nar_hash.to_typed_nix32() {
                    problems.push(format!("{hash}: NarHash differs from the NAR's"));
                }
            }
        }
        for reference in &info.references {
            let ref_hash = reference.hash_part();
            if ref_hash == hash {
                continue;
            }
            if !served.contains_key(ref_hash)
                && get(repo_url, &format!("{ref_hash}.narinfo"), token)
                    .await?
                    .is_none()
            {
                problems.push(format!("{hash}: its reference {reference} is not served"));
            }
        }
    }
    if problems.is_empty() {
        Ok(served.into_keys().collect())
    } else {
        Err(problems.join("\n"))
    }
}

/// The body of `GET repo_url/file`, `None` on 404; any other status is an error.
async fn get(repo_url: &str, file: &str, token: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    let mut request = http().get(format!("{repo_url}/{file}"));
    if let Some(token) = token {
        request = request.header("Authorization", bearer(token));
    }
    let resp = request
        .send()
        .await
        .map_err(|e| format!("GET {file}: {e}"))?;
    match resp.status().as_u16() {
        200 => Ok(Some(
            resp.bytes().await.map_err(|e| e.to_string())?.to_vec(),
        )),
        404 => Ok(None),
        status => Err(format!("GET {file} answered {status}")),
    }
}
