//! The Nix binary cache side of a repository: what `substituters = [ URL ]` reads, and the
//! PUTs `nix copy --to URL` makes (NAR first, narinfo last), with the same verification,
//! closure check and signing as the push API.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ServerError, ServerResult};
use super::publish::{self, Candidate};
use super::upload::{self, Expected};
use super::{verify, Authorized, CacheReadAccess, PushAccess, SharedState};
use crate::api::codes;
use crate::nix::store_path::is_valid_hash_part;
use crate::nix::{base32, NarInfo, Sha256Hash};

/// Nix's cap for a narinfo is far below this; anything bigger is not a narinfo.
const NARINFO_BODY_LIMIT: usize = 1 << 20;

pub async fn metrics(State(state): State<SharedState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn invalid_hash_part(text: &str) -> ServerError {
    ServerError::bad_request(
        codes::INVALID_HASH_PART,
        format!(
            "{:?} is not a store path hash part (32 nixbase32 characters)",
            text.chars().take(80).collect::<String>()
        ),
    )
}

/// `nix-cache-info` and `<hash>.narinfo` (GET and HEAD).
pub async fn get_file(
    State(state): State<SharedState>,
    Authorized { repo, .. }: CacheReadAccess,
    Path((_, file)): Path<(String, String)>,
) -> ServerResult<Response> {
    if file == "nix-cache-info" {
        let body = format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
            crate::nix::store_path::STORE_DIR,
            repo.priority
        );
        return Ok(([(header::CONTENT_TYPE, "text/x-nix-cache-info")], body).into_response());
    }
    if let Some(hash) = file.strip_suffix(".ls") {
        if !is_valid_hash_part(hash) {
            return Err(invalid_hash_part(hash));
        }
        return super::routes_files::get_listing(&state, &repo.name, hash.to_string()).await;
    }
    let Some(hash) = file.strip_suffix(".narinfo") else {
        return Err(ServerError::not_found(format!(
            "no file {file:?} in this repository"
        )));
    };
    if !is_valid_hash_part(hash) {
        return Err(invalid_hash_part(hash));
    }
    let Some(text) = published_narinfo(&state, &repo.name, hash).await? else {
        return Err(ServerError::not_found("no such path in this repository"));
    };
    Ok((
        [(header::CONTENT_TYPE, "text/x-nix-narinfo")],
        Body::from(bytes::Bytes::from_owner(ArcText(text))),
    )
        .into_response())
}

/// The published narinfo of `hash`, from the cache when it holds it (misses go to the
/// database every time: a path published a moment ago is found at once).
pub(super) async fn published_narinfo(
    state: &SharedState,
    repo: &str,
    hash: &str,
) -> ServerResult<Option<std::sync::Arc<str>>> {
    let key = format!("{repo}/{hash}");
    if let Some(text) = state.narinfos.get(&key) {
        return Ok(Some(text));
    }
    let (name, lookup) = (repo.to_string(), hash.to_string());
    let Some(text) = state.db(move |meta| meta.narinfo(&name, &lookup)).await? else {
        return Ok(None);
    };
    let text: std::sync::Arc<str> = text.into();
    state.narinfos.insert(key, std::sync::Arc::clone(&text));
    Ok(Some(text))
}

/// Lets a cached narinfo be a response body without copying it.
struct ArcText(std::sync::Arc<str>);

impl AsRef<[u8]> for ArcText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// `nix copy --to` writes `nix-cache-info` only when reading it failed, and `<hash>.narinfo`
/// after the NAR it names.
pub async fn put_file(
    State(state): State<SharedState>,
    Authorized { repo, .. }: PushAccess,
    Path((_, file)): Path<(String, String)>,
    body: Body,
) -> ServerResult<Response> {
    if file == "nix-cache-info" {
        // The server owns this file; accepting keeps `nix copy` happy without changing it.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if let Some(hash) = file.strip_suffix(".ls") {
        if !is_valid_hash_part(hash) {
            return Err(invalid_hash_part(hash));
        }
        return super::routes_files::put_listing(&state, body).await;
    }
    let Some(hash) = file.strip_suffix(".narinfo") else {
        return Err(ServerError::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            format!("{file:?} cannot be uploaded here: only NARs, narinfos, listings, build logs (log/<drv>) and debuginfo links are stored"),
        ));
    };
    if !is_valid_hash_part(hash) {
        return Err(invalid_hash_part(hash));
    }
    let bytes = upload::read_small_body(
        body,
        NARINFO_BODY_LIMIT,
        upload::BodyPace::new(&state.config),
    )
    .await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        ServerError::bad_request(codes::INVALID_NARINFO, "the narinfo is not UTF-8 text")
    })?;
    let info = NarInfo::parse(text)
        .map_err(|err| ServerError::bad_request(codes::INVALID_NARINFO, err.to_string()))?;
    if info.store_path.hash_part() != hash {
        return Err(ServerError::bad_request(
            codes::INVALID_NARINFO,
            format!(
                "the narinfo is for {}, but was uploaded as {hash}.narinfo",
                info.store_path
            ),
        ));
    }
    let name = repo.name.clone();
    let url = info.url.clone();
    let nar = state
        .db(move |meta| meta.nar_by_url(&name, &url))
        .await?
        .ok_or_else(|| {
            ServerError::bad_request(
                codes::NAR_NOT_STORED,
                format!(
                    "the NAR {} this narinfo names is not stored: upload it first",
                    info.url
                ),
            )
        })?;
    let file_hash = info.file_hash.map(|h| h.to_typed_nix32());
    let mismatches = [
        (
            codes::NAR_HASH_MISMATCH,
            "NarHash",
            info.nar_hash.to_typed_nix32(),
            nar.nar_hash.clone(),
        ),
        (
            codes::NAR_SIZE_MISMATCH,
            "NarSize",
            info.nar_size.to_string(),
            nar.nar_size.to_string(),
        ),
        (
            codes::FILE_HASH_MISMATCH,
            "FileHash",
            file_hash.unwrap_or_else(|| nar.file_hash.clone()),
            nar.file_hash.clone(),
        ),
        (
            codes::FILE_SIZE_MISMATCH,
            "FileSize",
            info.file_size.unwrap_or(nar.file_size).to_string(),
            nar.file_size.to_string(),
        ),
    ];
    if let Some((code, field, declared, stored)) = mismatches
        .into_iter()
        .find(|(_, _, declared, stored)| declared != stored)
    {
        return Err(ServerError::unprocessable(
            code,
            format!(
                "the narinfo declares {field} {declared}, but the stored {} has {stored}",
                nar.url
            ),
        ));
    }
    let outcome =
        publish::publish(&state, &repo, vec![Candidate { info, nar }], Vec::new()).await?;
    if let Some(rejection) = outcome.rejected.into_iter().next() {
        return Err(ServerError::unprocessable(
            &rejection.code,
            rejection.message,
        ));
    }
    Ok(StatusCode::OK.into_response())
}

/// `nar/<nix32 file hash>.nar.xz` (and `.nar.zst`, `.nar`): the name must be a file hash we
/// can check, so nothing else can be stored or read through this route.
fn parse_nar_file(file: &str) -> ServerResult<(Sha256Hash, &'static str)> {
    let bad = || {
        ServerError::not_found(format!(
            "{:?} is not a NAR file name (<52 nixbase32 characters>.nar.xz, .nar.zst or .nar)",
            file.chars().take(80).collect::<String>()
        ))
    };
    let (stem, compression) = verify::parse_nar_file_name(file).ok_or_else(bad)?;
    let bytes = base32::decode(stem, 32).map_err(|_| bad())?;
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes);
    Ok((Sha256Hash(hash), compression))
}

pub async fn get_nar(
    State(state): State<SharedState>,
    Authorized { repo, .. }: CacheReadAccess,
    Path((_, file)): Path<(String, String)>,
) -> ServerResult<Response> {
    parse_nar_file(&file)?;
    let not_found = || ServerError::not_found("no such NAR in this repository");
    // The row, not the bucket, says where the bytes are (and that they were verified).
    let name = repo.name.clone();
    let url = format!("nar/{file}");
    let nar = state
        .db(move |meta| meta.nar_by_url(&name, &url))
        .await?
        .ok_or_else(not_found)?;
    // A download is a use (a narinfo lookup is not: substituters probe paths they never fetch).
    state
        .last_use
        .record_nar(&repo.name, &nar.url, super::gc::now());
    if state.config.s3_presign_secs > 0 {
        let expires = std::time::Duration::from_secs(state.config.s3_presign_secs);
        // The access check above already ran: a private repository's URL goes only to a
        // token holder, and it is valid for `s3_presign_secs` only.
        if let Some(url) = state.storage.presign_get(&nar.object_key, expires).await? {
            return Ok((
                StatusCode::TEMPORARY_REDIRECT,
                [
                    (header::LOCATION, url),
                    (header::CACHE_CONTROL, "private, no-store".to_string()),
                ],
            )
                .into_response());
        }
    }
    let Some((len, reader)) = state.storage.get(&nar.object_key).await? else {
        return Err(not_found());
    };
    // Never Content-Encoding: clients decompress according to the narinfo, and Nix 2.34+
    // fails on a NAR served with `Content-Encoding: xz`.
    Ok(stream_object(len, reader, "application/x-nix-nar"))
}

/// A stored object as a response body, streamed. The read buffer follows the object's size:
/// 256 KiB for a NAR, no more than the object for a small listing or link.
pub(super) fn stream_object(
    len: u64,
    reader: super::storage::ObjectReader,
    content_type: &'static str,
) -> Response {
    let buffer = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .clamp(4 << 10, 256 << 10);
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, buffer)),
    )
        .into_response()
}

pub async fn put_nar(
    State(state): State<SharedState>,
    Authorized { repo, token_id, .. }: PushAccess,
    Path((_, file)): Path<(String, String)>,
    body: Body,
) -> ServerResult<Response> {
    let (file_hash, compression) = parse_nar_file(&file)?;
    let url = format!("nar/{file}");
    let name = repo.name.clone();
    let lookup = url.clone();
    if state
        .db(move |meta| meta.nar_by_url(&name, &lookup))
        .await?
        .is_some()
    {
        return Ok(StatusCode::OK.into_response());
    }
    let expected = Expected {
        file_hash: Some(file_hash),
        ..Expected::default()
    };
    let limit = state.config.max_single_upload_bytes;
    let result = upload::receive_verify_store(
        &state,
        upload::Uploader {
            repo: &repo.name,
            token_id: token_id.as_deref(),
        },
        body,
        limit,
        compression,
        expected,
        || upload::ReceiveError::TooLarge { limit }.into(),
    )
    .await;
    result?;
    Ok(StatusCode::OK.into_response())
}
