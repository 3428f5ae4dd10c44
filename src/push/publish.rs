//! Stage 6: publication. A narinfo goes up only when its NAR is stored and every reference is
//! published (or present, or earlier in the same request), so the repository never serves a
//! narinfo whose closure is incomplete, whenever the run is interrupted.
//!
//! ```text
//!   Present / Stored / Failed events ──► Ledger (dependency bookkeeping)
//!        ready paths ──► batch (≤ max_batch, or LINGER after the first) ──► POST narinfos
//!        rejected or failed ──► every waiting dependent fails: "reference X failed"
//! ```
//! The ledger is pure bookkeeping with no I/O, unit-tested below.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::failure::{Health, PathFailure, Stop};
use super::metrics::stage;
use super::progress::Progress;
use super::{PathRef, PublishEvent};
use crate::api::{codes, PublishEntry, PublishRequest, UpstreamProof};
use crate::client::PushClient;
use crate::nix::StorePath;

/// How long a ready narinfo waits for companions before its batch goes up: long enough to
/// gather the burst of a closure's small paths, short against any upload.
const LINGER: Duration = Duration::from_millis(20);
/// Narinfos per request when the server allows more.
pub const DEFAULT_BATCH: usize = 500;

/// Where each path stands; see the module docs.
#[derive(Default)]
pub struct Ledger {
    /// Published on the server (before this run or by it), or in a request already sent.
    published: HashSet<String>,
    /// Stored and ready, waiting in the next batch.
    batch: Vec<PathRef>,
    batched: HashSet<String>,
    /// Stored, waiting for references: path -> (info, references still missing).
    waiting: HashMap<String, (PathRef, usize)>,
    /// reference hash -> paths waiting for it.
    dependents: HashMap<String, Vec<String>>,
    failed: HashSet<String>,
    /// Paths whose NAR this run uploaded (for the summary).
    uploaded: HashSet<String>,
    /// Paths an upstream cache serves: they satisfy references, and requests carry their
    /// proofs.
    upstream: HashMap<String, PathRef>,
    /// Refused because the repository lost a reference or the NAR after presence said it
    /// held them: left to a repair round, with what they fail with if none remains.
    deferred: Vec<Deferred>,
}

/// A path left to a repair round, with the failure it ends with if no round remains.
pub type Deferred = (PathRef, PathFailure);

/// What the stage must report after a ledger step.
#[derive(Debug, Default)]
pub struct Verdicts {
    pub failed: Vec<(PathRef, PathFailure)>,
}

fn hash_of(info: &PathRef) -> String {
    info.path.hash_part().to_owned()
}

impl Ledger {
    pub fn present(&mut self, info: &PathRef) -> Verdicts {
        let hash = hash_of(info);
        self.published.insert(hash.clone());
        self.release(&hash)
    }

    /// `info` is served by a trusted upstream cache: it satisfies references like a published
    /// path, and [`Ledger::proofs_for`] hands its proof to the requests that need it.
    pub fn upstream(&mut self, info: PathRef) -> Verdicts {
        let hash = hash_of(&info);
        self.published.insert(hash.clone());
        self.upstream.insert(hash.clone(), info);
        self.release(&hash)
    }

    /// Proofs for the upstream paths `batch` refers to.
    pub fn proofs_for(&self, batch: &[PathRef]) -> Vec<UpstreamProof> {
        let mut seen = HashSet::new();
        batch
            .iter()
            .flat_map(|info| info.references.iter())
            .filter_map(|reference| self.upstream.get(reference.hash_part()))
            .filter(|info| seen.insert(info.path.hash_part()))
            .map(|info| UpstreamProof {
                store_path: info.path.to_absolute(),
                nar_hash: info.nar_hash.to_typed_nix32(),
                nar_size: info.nar_size,
                references: info.references.iter().map(|r| r.to_absolute()).collect(),
                signatures: info.signatures.clone(),
            })
            .collect()
    }

    /// The NAR of `info` is stored on the server.
    pub fn stored(&mut self, info: PathRef, uploaded: bool) -> Verdicts {
        let hash = hash_of(&info);
        if uploaded {
            self.uploaded.insert(hash.clone());
        }
        let references: Vec<String> = info
            .references
            .iter()
            .map(|r| r.hash_part().to_owned())
            .filter(|r| *r != hash)
            .collect();
        if let Some(bad) = references.iter().find(|r| self.failed.contains(*r)) {
            let name = info
                .references
                .iter()
                .find(|r| r.hash_part() == bad)
                .map(ToString::to_string)
                .unwrap_or_default();
            return self.fail(info, PathFailure::ReferenceFailed { reference: name });
        }
        let missing: Vec<&String> = references
            .iter()
            .filter(|r| !self.published.contains(*r) && !self.batched.contains(*r))
            .collect();
        if missing.is_empty() {
            self.enqueue(info)
        } else {
            for reference in &missing {
                self.dependents
                    .entry((*reference).clone())
                    .or_default()
                    .push(hash.clone());
            }
            self.waiting.insert(hash, (info, missing.len()));
            Verdicts::default()
        }
    }

    /// The path failed before publication (dump, compression, upload, or the server refused it).
    pub fn fail(&mut self, info: PathRef, reason: PathFailure) -> Verdicts {
        let mut verdicts = Verdicts::default();
        let mut work = vec![(info, reason)];
        while let Some((info, reason)) = work.pop() {
            let hash = hash_of(&info);
            if !self.failed.insert(hash.clone()) {
                continue;
            }
            self.waiting.remove(&hash);
            if self.batched.remove(&hash) {
                self.batch.retain(|b| hash_of(b) != hash);
            }
            // Every path still held here that refers to this one, whether waiting or batched
            // on the strength of an optimistic publication: none of them may go up.
            let doomed: Vec<PathRef> = self
                .waiting
                .values()
                .map(|(dependent, _)| dependent)
                .chain(self.batch.iter())
                .filter(|d| {
                    hash_of(d) != hash && d.references.iter().any(|r| r.hash_part() == hash)
                })
                .cloned()
                .collect();
            for dependent in doomed {
                work.push((
                    dependent,
                    PathFailure::ReferenceFailed {
                        reference: info.path.to_absolute(),
                    },
                ));
            }
            verdicts.failed.push((info, reason));
        }
        verdicts
    }

    fn enqueue(&mut self, info: PathRef) -> Verdicts {
        let hash = hash_of(&info);
        self.batched.insert(hash.clone());
        self.batch.push(info);
        self.release(&hash)
    }

    /// `hash` is (about to be) published: dependents with nothing else missing become ready.
    fn release(&mut self, hash: &str) -> Verdicts {
        let mut ready = Vec::new();
        let mut work = vec![hash.to_owned()];
        while let Some(hash) = work.pop() {
            for dependent in self.dependents.remove(&hash).unwrap_or_default() {
                let Some((_, missing)) = self.waiting.get_mut(&dependent) else {
                    continue;
                };
                *missing -= 1;
                if *missing == 0 {
                    let (info, _) = self.waiting.remove(&dependent).expect("present");
                    self.batched.insert(dependent.clone());
                    ready.push(info);
                    work.push(dependent);
                }
            }
        }
        // Released paths follow their references in the batch: the server may check in order.
        self.batch.extend(ready);
        Verdicts::default()
    }

    pub fn batch_len(&self) -> usize {
        self.batch.len()
    }

    pub fn take_batch(&mut self, max: usize) -> Vec<PathRef> {
        let take = self.batch.len().min(max);
        let batch: Vec<PathRef> = self.batch.drain(..take).collect();
        for info in &batch {
            let hash = hash_of(info);
            self.batched.remove(&hash);
            // Optimistic: a rejection below undoes it through `fail`.
            self.published.insert(hash);
        }
        batch
    }

    pub fn was_uploaded(&self, info: &PathRef) -> bool {
        self.uploaded.contains(info.path.hash_part())
    }

    /// `info` was refused for something the repository lost while the push ran (see
    /// [`is_repairable`]). Its dependents keep waiting for it, and [`Ledger::finish`] defers them
    /// with it.
    pub fn defer(&mut self, info: PathRef, failure: PathFailure) {
        self.unpublish(info.path.hash_part());
        self.deferred.push((info, failure));
    }

    /// What is left when the input has ended: paths to hand to a repair round, and paths that
    /// never became ready although nothing they wait for was deferred (a bug upstream).
    pub fn finish(&mut self) -> (Vec<Deferred>, Vec<PathRef>) {
        let waiting: Vec<PathRef> = self.waiting.drain().map(|(_, (info, _))| info).collect();
        let mut deferred = std::mem::take(&mut self.deferred);
        if deferred.is_empty() {
            return (deferred, waiting);
        }
        // Whatever still waits can only wait (directly or through other waiting paths) for a
        // deferred path: the repair round publishes them in order.
        let because = deferred[0].0.path.to_absolute();
        deferred.extend(waiting.into_iter().map(|info| {
            (
                info,
                PathFailure::ReferenceFailed {
                    reference: because.clone(),
                },
            )
        }));
        (deferred, Vec::new())
    }

    pub fn unpublish(&mut self, hash: &str) {
        self.published.remove(hash);
    }
}

/// A refusal that means the repository lost, after presence answered, something the path
/// needs: a reference or its NAR, collected by garbage collection or deleted by an
/// administrator. Pushing again repairs it; any other refusal would be refused again.
pub fn is_repairable(code: &str) -> bool {
    code == codes::MISSING_REFERENCES || code == codes::NAR_NOT_STORED
}

pub fn entry(info: &PathRef) -> PublishEntry {
    PublishEntry {
        store_path: info.path.to_absolute(),
        nar_hash: info.nar_hash.to_typed_nix32(),
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| r.to_absolute()).collect(),
        deriver: info.deriver.as_ref().map(|d| d.to_absolute()),
        ca: info.ca.clone(),
        signatures: info.signatures.clone(),
    }
}

/// How the stage batches, and where the derivers of what it published go.
pub struct PublishConfig {
    /// Narinfos per request.
    pub max_batch: usize,
    /// `--logs`: the derivers of newly published paths, for the logs task.
    pub logs: Option<mpsc::Sender<StorePath>>,
}

pub async fn run(
    client: Arc<PushClient>,
    PublishConfig { max_batch, logs }: PublishConfig,
    mut input: mpsc::Receiver<PublishEvent>,
    progress: Arc<Progress>,
    health: Arc<Health>,
) -> Vec<Deferred> {
    let cancel = health.stop_token().clone();
    let max_batch = max_batch.max(1);
    let mut ledger = Ledger::default();
    let mut first_ready: Option<Instant> = None;
    let mut open = true;
    while open || ledger.batch_len() > 0 {
        if cancel.is_cancelled() {
            return Vec::new();
        }
        let due = first_ready.map(|t| t + LINGER);
        // A full batch (or closed input) flushes without waiting for more events.
        let event = if !open || ledger.batch_len() >= max_batch {
            None
        } else {
            tokio::select! {
                event = input.recv() => {
                    if event.is_none() { open = false; }
                    event
                }
                () = sleep_until(due) => None,
                () = cancel.cancelled() => return Vec::new(),
            }
        };
        if let Some(event) = event {
            progress.queue_depth(stage::PUBLISH, input.len());
            let verdicts = match event {
                PublishEvent::Present(info) => {
                    progress.present(&info);
                    ledger.present(&info)
                }
                PublishEvent::Upstream(info) => ledger.upstream(info),
                PublishEvent::Stored { info, uploaded } => ledger.stored(info, uploaded),
                PublishEvent::Failed { info, failure } => ledger.fail(info, failure),
            };
            report(&progress, verdicts);
            if ledger.batch_len() > 0 && first_ready.is_none() {
                first_ready = Some(Instant::now());
            }
            continue;
        }
        // Flush: the batch is full, LINGER passed, or the input ended.
        if ledger.batch_len() == 0 {
            first_ready = None;
            continue;
        }
        let batch = ledger.take_batch(max_batch);
        first_ready = (ledger.batch_len() > 0).then(Instant::now);
        let started = Instant::now();
        let request = PublishRequest {
            narinfos: batch.iter().map(entry).collect(),
            upstream: ledger.proofs_for(&batch),
        };
        let mut rounds = 0;
        let answer = loop {
            match health.guarded(client.publish(&request)).await {
                Ok(Ok(answer)) => break Ok(answer),
                Ok(Err(error)) => match health.after_failure(error, &mut rounds).await {
                    Ok(()) => continue,
                    Err(stop) => break Err(stop),
                },
                Err(stop) => break Err(stop),
            }
        };
        progress.busy(stage::PUBLISH, started.elapsed());
        match answer {
            Ok(answer) => {
                let rejected: HashMap<&str, &crate::api::PublishRejection> = answer
                    .rejected
                    .iter()
                    .map(|r| (r.hash.as_str(), r))
                    .collect();
                let newly: HashSet<&str> = answer.published.iter().map(String::as_str).collect();
                for info in batch {
                    match rejected.get(info.path.hash_part()) {
                        None => {
                            progress.published(&info, ledger.was_uploaded(&info));
                            if let (Some(logs), Some(drv)) = (&logs, &info.deriver) {
                                if newly.contains(info.path.hash_part()) {
                                    // The logs task only ends after this stage: it is there.
                                    let _ = logs.send(drv.clone()).await;
                                }
                            }
                        }
                        Some(rejection) => {
                            let failure = PathFailure::Refused {
                                step: "publication",
                                status: None,
                                code: rejection.code.clone(),
                                message: rejection.message.clone(),
                            };
                            if is_repairable(&rejection.code) {
                                ledger.defer(info, failure);
                            } else {
                                ledger.unpublish(info.path.hash_part());
                                let verdicts = ledger.fail(info, failure);
                                report(&progress, verdicts);
                            }
                        }
                    }
                }
            }
            // The run is over: nothing in the batch was published, nor failed.
            Err(Stop::Run) => return Vec::new(),
            Err(Stop::Path(error)) => {
                let failure = PathFailure::from_client("publication", error);
                for info in batch {
                    ledger.unpublish(info.path.hash_part());
                    let verdicts = ledger.fail(info, failure.clone());
                    report(&progress, verdicts);
                }
            }
        }
    }
    let (deferred, stranded) = ledger.finish();
    for (info, failure) in &deferred {
        progress.deferred(info, failure);
    }
    for info in stranded {
        progress.failed(&info.path, &PathFailure::Stranded);
    }
    deferred
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

fn report(progress: &Progress, verdicts: Verdicts) {
    for (info, failure) in verdicts.failed {
        progress.failed(&info.path, &failure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{Sha256Hash, StorePath};

    fn path(hash_char: char, name: &str, refs: &[&PathRef]) -> PathRef {
        let store_path =
            StorePath::from_basename(&format!("{}-{name}", hash_char.to_string().repeat(32)))
                .unwrap();
        let mut references: Vec<StorePath> = refs.iter().map(|r| r.path.clone()).collect();
        references.push(store_path.clone()); // a self-reference never blocks publication
        Arc::new(PathInfo {
            path: store_path,
            nar_hash: Sha256Hash([0; 32]),
            nar_size: 1,
            references,
            deriver: None,
            ca: None,
            signatures: Vec::new(),
        })
    }

    fn names(batch: &[PathRef]) -> Vec<&str> {
        batch.iter().map(|p| p.path.name()).collect()
    }

    use crate::nix::path_info::PathInfo;

    #[test]
    fn a_path_waits_for_its_references_and_follows_them_in_the_batch() {
        let mut ledger = Ledger::default();
        let lib = path('a', "lib", &[]);
        let present = path('b', "present", &[]);
        let app = path('c', "app", &[&lib, &present]);
        ledger.stored(Arc::clone(&app), true);
        assert_eq!(ledger.batch_len(), 0, "app must wait for lib and present");
        ledger.present(&present);
        assert_eq!(ledger.batch_len(), 0, "app must still wait for lib");
        ledger.stored(Arc::clone(&lib), true);
        assert_eq!(names(&ledger.take_batch(10)), ["lib", "app"]);
        assert!(ledger.was_uploaded(&app));
        assert!(ledger.finish().1.is_empty());
    }

    #[test]
    fn a_deferred_path_takes_its_waiting_dependents_to_the_repair_round_and_fails_nothing() {
        let mut ledger = Ledger::default();
        let base = path('a', "base", &[]);
        let mid = path('b', "mid", &[&base]);
        let other = path('c', "other", &[]);
        ledger.stored(Arc::clone(&base), true);
        ledger.stored(Arc::clone(&other), true);
        let sent = ledger.take_batch(10);
        assert_eq!(names(&sent), ["base", "other"]);
        // The server lost a reference of base: it is deferred, not failed.
        ledger.defer(Arc::clone(&base), PathFailure::Stranded);
        // mid arrives after the refusal: it must wait for base, not go up on its own.
        assert!(ledger.stored(Arc::clone(&mid), true).failed.is_empty());
        assert_eq!(ledger.batch_len(), 0);
        let (deferred, stranded) = ledger.finish();
        let mut deferred: Vec<&str> = deferred.iter().map(|(p, _)| p.path.name()).collect();
        deferred.sort_unstable();
        assert_eq!(deferred, ["base", "mid"]);
        assert!(stranded.is_empty());
    }

    #[test]
    fn without_a_deferral_a_path_that_never_becomes_ready_is_stranded() {
        let mut ledger = Ledger::default();
        let base = path('a', "base", &[]);
        let mid = path('b', "mid", &[&base]);
        ledger.stored(Arc::clone(&mid), true);
        let (deferred, stranded) = ledger.finish();
        assert!(deferred.is_empty());
        assert_eq!(names(&stranded), ["mid"]);
    }

    #[test]
    fn a_failure_fails_every_dependent_waiting_batched_or_later() {
        let mut ledger = Ledger::default();
        let base = path('a', "base", &[]);
        let mid = path('b', "mid", &[&base]);
        let top = path('c', "top", &[&mid]);
        let late = path('d', "late", &[&base]);
        ledger.stored(Arc::clone(&top), true);
        ledger.stored(Arc::clone(&base), true);
        ledger.stored(Arc::clone(&mid), true);
        assert_eq!(ledger.batch_len(), 3);
        // The server rejects base: mid and top, batched behind it, must not go up.
        let verdicts = ledger.fail(Arc::clone(&base), PathFailure::Stranded);
        let mut failed: Vec<&str> = verdicts.failed.iter().map(|(p, _)| p.path.name()).collect();
        failed.sort_unstable();
        assert_eq!(failed, ["base", "mid", "top"]);
        assert_eq!(ledger.batch_len(), 0);
        let verdicts = ledger.stored(late, true);
        assert_eq!(verdicts.failed.len(), 1);
        assert!(
            matches!(verdicts.failed[0].1, PathFailure::ReferenceFailed { .. }),
            "{}",
            verdicts.failed[0].1
        );
    }
}
