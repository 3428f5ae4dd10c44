//! The files `nix copy --to` writes beside NARs and narinfos, and the commands that read them:
//! build logs (`nix store copy-log --to`, read by `nix log --store`), NAR listings
//! (`<hash>.ls`, `?write-nar-listing=1`) and debug-info links (`debuginfo/<build-id>`,
//! `?index-debug-info=true`).
//!
//! ```text
//!   PUT log/<drv>            ──► size-limited, stored as sent (with its Content-Encoding)
//!   PUT <hash>.ls            ──► accepted, not stored: the server wrote its own while verifying
//!   PUT debuginfo/<build-id> ──► checked JSON link to a NAR member, stored
//!   GET any of them          ──► the repository's read rules, like narinfos
//! ```
//! Listings come from the verifier's walk of every NAR (`upload::listing_key`), so every path
//! pushed by any client has one, and none can describe a NAR other than the one stored.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ServerError, ServerResult};
use super::routes_cache::{published_narinfo, stream_object};
use super::upload::{self, BodyPace, ReceiveError};
use super::{Authorized, CacheReadAccess, PushAccess, SharedState};
use crate::api::codes;
use crate::nix::store_path::StorePath;
use crate::nix::NarInfo;

/// Content-Encodings Nix sends logs with (its `log-compression` setting); a log is stored and
/// served under the encoding it arrived with, since the client decodes by the header.
const LOG_ENCODINGS: &[&str] = &["identity", "br", "xz", "zstd", "gzip", "bzip2"];

/// Nix's debuginfo links are a few hundred bytes of JSON.
const DEBUGINFO_BODY_LIMIT: usize = 4 << 10;
/// What a client's own listing may be: drained, not kept.
const LISTING_BODY_LIMIT: usize = 64 << 20;

fn log_key(repo: &str, encoding: &str, drv: &StorePath) -> String {
    format!("{repo}/log/{encoding}/{}", drv.basename())
}

fn parse_drv(file: &str) -> ServerResult<StorePath> {
    StorePath::from_basename(file)
        .ok()
        .filter(|path| path.name().ends_with(".drv"))
        .ok_or_else(|| {
            ServerError::not_found(format!(
                "{:?} is not a derivation's file name (<hash>-<name>.drv): build logs live at log/<drv>",
                file.chars().take(80).collect::<String>()
            ))
        })
}

/// `GET log/<drv>`.
pub async fn get_log(
    State(state): State<SharedState>,
    Authorized { repo, .. }: CacheReadAccess,
    Path((_, file)): Path<(String, String)>,
) -> ServerResult<Response> {
    let drv = parse_drv(&file)?;
    for encoding in LOG_ENCODINGS {
        if let Some((len, reader)) = state
            .storage
            .get(&log_key(&repo.name, encoding, &drv))
            .await?
        {
            let mut response = stream_object(len, reader, "text/plain; charset=utf-8");
            if *encoding != "identity" {
                response
                    .headers_mut()
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
            }
            return Ok(response);
        }
    }
    Err(ServerError::not_found(
        "no build log for this derivation in this repository",
    ))
}

/// `PUT log/<drv>`: `nix store copy-log --to`.
pub async fn put_log(
    State(state): State<SharedState>,
    Authorized { repo, .. }: PushAccess,
    Path((_, file)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ServerResult<Response> {
    let drv = parse_drv(&file)?;
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => "identity",
        Some(value) => LOG_ENCODINGS
            .iter()
            .copied()
            .find(|known| value.as_bytes().eq_ignore_ascii_case(known.as_bytes()))
            .ok_or_else(|| {
                ServerError::unprocessable(
                    codes::UNSUPPORTED_COMPRESSION,
                    format!(
                        "a build log's Content-Encoding must be one of {}",
                        LOG_ENCODINGS.join(", ")
                    ),
                )
            })?,
    };
    let staged = tempfile::NamedTempFile::new_in(&state.tmp_dir)?;
    let mut out = tokio::fs::File::from_std(staged.reopen()?);
    let limit = state.config.max_log_bytes;
    match upload::receive_into(body, &mut out, limit, BodyPace::new(&state.config)).await {
        Err(ReceiveError::TooLarge { .. }) => {
            return Err(ServerError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::PAYLOAD_TOO_LARGE,
                format!("a build log may be at most {limit} bytes here (max_log_bytes); compress it (log-compression = br) or truncate it"),
            ))
        }
        other => other?,
    };
    drop(out);
    let (staged_file, staged_path) = staged.into_parts();
    drop(staged_file);
    // A later upload in another encoding replaces the earlier one rather than hiding behind it.
    for other in LOG_ENCODINGS.iter().filter(|e| **e != encoding) {
        state
            .storage
            .delete(&log_key(&repo.name, other, &drv))
            .await?;
    }
    let result = state
        .storage
        .put_file(&log_key(&repo.name, encoding, &drv), &staged_path)
        .await;
    let _ = staged_path.close();
    result?;
    ::metrics::counter!(super::metrics::FILES_STORED_TOTAL, "kind" => "log").increment(1);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET <hash>.ls`: the listing of a published path's NAR.
pub async fn get_listing(state: &SharedState, repo: &str, hash: String) -> ServerResult<Response> {
    let not_found = || ServerError::not_found("no listing for this path in this repository");
    // Only a published path has a listing: the narinfo says which NAR it is.
    let text = published_narinfo(state, repo, &hash)
        .await?
        .ok_or_else(not_found)?;
    let info = NarInfo::parse(&text).map_err(ServerError::internal)?;
    let key = upload::listing_key(repo, &info.nar_hash);
    match state.storage.get(&key).await? {
        Some((len, reader)) => Ok(stream_object(len, reader, "application/json")),
        None => Err(not_found()),
    }
}

/// `PUT <hash>.ls`: accepted so `nix copy --to '...?write-nar-listing=1'` succeeds, and drained
/// unread: the server's own listing, written from the verified NAR, is the one served.
pub async fn put_listing(state: &SharedState, body: Body) -> ServerResult<Response> {
    upload::read_small_body(body, LISTING_BODY_LIMIT, BodyPace::new(&state.config)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A debuginfo link as Nix writes it.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct DebugInfoLink {
    /// `../nar/<file>`, relative to `debuginfo/`.
    archive: String,
    /// `lib/debug/.build-id/xx/<38 hex>.debug`.
    member: String,
}

/// The 40 hex digits of the ELF build id. Nix names the link after the debug file
/// (`<build id>.debug`); readers such as dwarffs ask for the bare id: both are one link.
fn parse_build_id(file: &str) -> ServerResult<&str> {
    let id = file.strip_suffix(".debug").unwrap_or(file);
    if id.len() == 40 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(id)
    } else {
        Err(ServerError::not_found(
            "debug info links live at debuginfo/<40 lowercase hex digits of a build id>[.debug]",
        ))
    }
}

pub async fn get_debuginfo(
    State(state): State<SharedState>,
    Authorized { repo, .. }: CacheReadAccess,
    Path((_, file)): Path<(String, String)>,
) -> ServerResult<Response> {
    let id = parse_build_id(&file)?;
    match state
        .storage
        .get(&format!("{}/debuginfo/{id}", repo.name))
        .await?
    {
        Some((len, reader)) => Ok(stream_object(len, reader, "application/json")),
        None => Err(ServerError::not_found(
            "no debug info link for this build id",
        )),
    }
}

pub async fn put_debuginfo(
    State(state): State<SharedState>,
    Authorized { repo, .. }: PushAccess,
    Path((_, file)): Path<(String, String)>,
    body: Body,
) -> ServerResult<Response> {
    let id = parse_build_id(&file)?.to_string();
    let bytes =
        upload::read_small_body(body, DEBUGINFO_BODY_LIMIT, BodyPace::new(&state.config)).await?;
    let link: DebugInfoLink = serde_json::from_slice(&bytes).map_err(|err| {
        ServerError::bad_request(
            codes::BAD_REQUEST,
            format!("a debuginfo link is JSON {{\"archive\": \"../nar/<file>\", \"member\": \"lib/debug/.build-id/...\"}}: {err}"),
        )
    })?;
    let member_ok = link.member.starts_with("lib/debug/.build-id/")
        && !link
            .member
            .split('/')
            .any(|part| part.is_empty() || part == "..");
    let archive_ok = link
        .archive
        .strip_prefix("../nar/")
        .is_some_and(|nar| super::verify::parse_nar_file_name(nar).is_some());
    if !member_ok || !archive_ok {
        return Err(ServerError::bad_request(
            codes::BAD_REQUEST,
            "a debuginfo link must point at ../nar/<file> of this repository and a member under lib/debug/.build-id/",
        ));
    }
    // Stored re-serialised: what is served is exactly the checked fields.
    let canonical = serde_json::to_vec(&link).map_err(ServerError::internal)?;
    state
        .storage
        .put_bytes(&format!("{}/debuginfo/{id}", repo.name), canonical.into())
        .await?;
    ::metrics::counter!(super::metrics::FILES_STORED_TOTAL, "kind" => "debuginfo").increment(1);
    Ok(StatusCode::NO_CONTENT.into_response())
}
