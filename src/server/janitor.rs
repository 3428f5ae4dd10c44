//! The janitor: removes what an interrupted upload or a crashed replica left behind, so the
//! database and the bucket never disagree in a way anyone sees for longer than a grace period.
//! At most one runs at a time across all replicas (`Metadata::try_singleton("janitor")`); it
//! runs every `janitor_interval_secs` in `serve`, and once from `stowix admin janitor`.
//!
//! ```text
//!   uploads inactive past upload_expiry_hours ──► staging.discard (abort multipart / rm .part)
//!                                               ──► delete the session row
//!   object intents older than orphan_grace_secs ──► a nars row knows the key? clear the intent
//!                                                  an open upload owns it?   leave it
//!                                                  (a tail: only the upload's current one)
//!                                                  otherwise                 delete object, clear
//!   bucket listing (S3 only), NAR and upload objects (`<repo>/nar/`, `<repo>/uploads/`) older
//!   than the grace period, unknown to every nars row and to every open upload ──► delete
//!   (listings, logs and debuginfo links are not the janitor's)
//! ```
//! Before each step that deletes, the janitor checks it still holds the lock; a lost lock (its
//! PostgreSQL connection died) stops the pass with a warning.
//!
//! The grace period must outlast the longest verification of a completed upload (the object
//! exists before its nars row): the default is a day.

use super::backend::metadata::{now_unix, SingletonGuard};
use super::error::{ServerError, ServerResult};
use super::staging::{upload_id_of_key, upload_id_of_tail_key};
use super::AppState;

/// What one pass did (logged, and printed by `stowix admin janitor`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub uploads_expired: u64,
    pub orphans_deleted: u64,
}

/// Keys checked against the database per query.
const BATCH: usize = 500;

/// One pass; `None` when another replica's janitor holds the lock.
pub async fn run(state: &AppState) -> ServerResult<Option<Swept>> {
    let Some(guard) = state.db(|meta| meta.try_singleton("janitor")).await? else {
        return Ok(None);
    };
    let mut guard = Some(guard);
    let mut swept = Swept::default();
    let now = now_unix();

    let cutoff = now - (state.config.upload_expiry_hours as i64) * 3600;
    let expired = state
        .db(move |meta| meta.uploads_inactive_since(cutoff))
        .await?;
    for upload in expired {
        let last = state.staging.last_activity(state, &upload).await;
        if last.is_some_and(|at| at >= cutoff) {
            continue;
        }
        still_the_janitor(&mut guard, &swept).await?;
        let lock = state.upload_lock(&upload.id);
        let _held = lock.lock().await;
        state.staging.discard(state, &upload).await?;
        let id = upload.id.clone();
        state.db(move |meta| meta.delete_upload(&id)).await?;
        swept.uploads_expired += 1;
    }

    let grace_cutoff = now - state.config.orphan_grace_secs as i64;
    loop {
        still_the_janitor(&mut guard, &swept).await?;
        let intents = state
            .db(move |meta| meta.object_intents_before(grace_cutoff, BATCH))
            .await?;
        let last_batch = intents.len() < BATCH;
        let unknown = unknown_keys(state, intents).await?;
        let mut progressed = false;
        for (key, deletable) in unknown {
            if deletable {
                state.storage.delete(&key).await?;
                swept.orphans_deleted += 1;
            }
            let intent = key.clone();
            // An open upload's intent stays until the upload completes or is discarded.
            if deletable || !owned_by_open_upload(state, &key).await? {
                state
                    .db(move |meta| meta.clear_object_intent(&intent))
                    .await?;
                progressed = true;
            }
        }
        if last_batch || !progressed {
            break;
        }
    }

    if let Some(listed) = state.storage.list("").await? {
        let old: Vec<String> = listed
            .into_iter()
            .filter(|object| object.last_modified < grace_cutoff && holds_nar_bytes(&object.key))
            .map(|object| object.key)
            .collect();
        for batch in old.chunks(BATCH) {
            still_the_janitor(&mut guard, &swept).await?;
            for (key, deletable) in unknown_keys(state, batch.to_vec()).await? {
                if deletable {
                    state.storage.delete(&key).await?;
                    swept.orphans_deleted += 1;
                }
            }
        }
    }
    drop(guard);
    Ok(Some(swept))
}

/// Before each step that deletes: the pass stops once its lock may be another replica's (on
/// PostgreSQL the lock lives on one connection, and goes silently with it), so two janitors
/// never sweep at once.
async fn still_the_janitor(guard: &mut Option<SingletonGuard>, swept: &Swept) -> ServerResult<()> {
    let Some(held) = guard.take() else {
        return Err(lost(swept));
    };
    let (held, still) = tokio::task::spawn_blocking(move || {
        let still = held.still_held();
        (held, still)
    })
    .await?;
    if !still {
        return Err(lost(swept));
    }
    *guard = Some(held);
    Ok(())
}

fn lost(swept: &Swept) -> ServerError {
    let message = format!(
        "the janitor lost its lock (the database connection holding it closed); stopped this pass after {} expired uploads and {} orphans, the next pass takes over",
        swept.uploads_expired, swept.orphans_deleted
    );
    // Logged by the caller (`serve`'s janitor loop warns, `stowix admin janitor` prints it).
    ServerError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        crate::api::codes::UNAVAILABLE,
        message,
    )
}

/// For each key: whether it may be deleted (no nars row and no open upload refers to it).
/// Keys a nars row knows come back as not deletable.
async fn unknown_keys(state: &AppState, keys: Vec<String>) -> ServerResult<Vec<(String, bool)>> {
    let lookup = keys.clone();
    let known = state
        .db(move |meta| meta.known_object_keys(&lookup))
        .await?;
    let mut out = Vec::with_capacity(keys.len());
    for (key, known) in keys.into_iter().zip(known) {
        let deletable = !known && !owned_by_open_upload(state, &key).await?;
        out.push((key, deletable));
    }
    Ok(out)
}

/// NARs and assembled uploads are what `nars` rows account for; listings, build logs and
/// debuginfo links live beside them under their own rules and are never swept here.
fn holds_nar_bytes(key: &str) -> bool {
    matches!(key.split('/').nth(1), Some("nar" | "uploads"))
}

/// An upload's object is owned while the upload is open; a tail only while it is the open
/// upload's current tail (one superseded by a later chunk, left by a replica that died before
/// deleting it, is garbage even while the upload goes on).
async fn owned_by_open_upload(state: &AppState, key: &str) -> ServerResult<bool> {
    if let Some(id) = upload_id_of_key(key) {
        let id = id.to_string();
        return Ok(state.db(move |meta| meta.upload(&id)).await?.is_some());
    }
    let Some(id) = upload_id_of_tail_key(key) else {
        return Ok(false);
    };
    let id = id.to_string();
    let parts = state.db(move |meta| meta.upload_parts(&id)).await?;
    Ok(parts.last().and_then(|part| part.tail_key()) == Some(key))
}
