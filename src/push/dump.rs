//! Stage 3: NAR dump. A pool of plain threads serialises missing store paths with the native
//! streaming encoder and checks each result against what Nix recorded.
//!
//! ```text
//!   dump queue ──► worker: dump_path(store path) ──► 256 KiB pieces ──► NarStream ──► compress
//!                              └─ narHash/narSize ≠ path-info ──► End(Err(corrupt)) (never uploaded as valid)
//! ```
//! A worker blocks while its NAR's piece channel is full: that is the backpressure that keeps
//! memory at [`super::NAR_PIECES_PER_PATH`] pieces per worker, whatever the NAR size.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metrics::stage;
use super::progress::Progress;
use super::{NarPiece, NarStream, PathRef, PieceWriter, NAR_PIECES_PER_PATH};
use crate::nix::nar::{dump_path, NarError};

/// Runs `workers` dump threads until the input closes or the pipeline is cancelled.
pub fn run(
    workers: usize,
    input: mpsc::Receiver<PathRef>,
    output: crossbeam_channel::Sender<NarStream>,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) {
    // One receiver shared by the pool: whichever worker is free takes the next path.
    let input = Mutex::new(input);
    std::thread::scope(|scope| {
        for index in 0..workers.max(1) {
            let (input, output, progress, cancel) = (&input, output.clone(), &progress, &cancel);
            std::thread::Builder::new()
                .name(format!("stowix-dump-{index}"))
                .spawn_scoped(scope, move || worker(input, &output, progress, cancel))
                .expect("spawning a dump thread");
        }
    });
}

fn worker(
    input: &Mutex<mpsc::Receiver<PathRef>>,
    output: &crossbeam_channel::Sender<NarStream>,
    progress: &Progress,
    cancel: &CancellationToken,
) {
    loop {
        let next = {
            let mut input = input.lock().expect("dump queue lock");
            progress.queue_depth(stage::DUMP, input.len());
            input.blocking_recv()
        };
        let Some(info) = next else { return };
        if cancel.is_cancelled() {
            return;
        }
        let (pieces_tx, pieces_rx) = crossbeam_channel::bounded(NAR_PIECES_PER_PATH);
        progress.queue_depth(stage::COMPRESS, output.len());
        if output
            .send(NarStream {
                info: Arc::clone(&info),
                pieces: pieces_rx,
            })
            .is_err()
        {
            return; // compression stopped
        }
        let started = Instant::now();
        let mut blocked = Duration::ZERO;
        let verdict = {
            let writer = PieceWriter::new(|piece| {
                if cancel.is_cancelled() {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                let len = piece.len() as u64;
                let send_started = Instant::now();
                let sent = pieces_tx.send(NarPiece::Data(piece));
                blocked += send_started.elapsed();
                progress.nar_bytes_read(len);
                sent.map_err(|_| std::io::ErrorKind::BrokenPipe.into())
            });
            dump_verified(&info, writer)
        };
        progress.busy(stage::DUMP, started.elapsed().saturating_sub(blocked));
        match verdict {
            Ok(()) => {
                let _ = pieces_tx.send(NarPiece::End(Ok(())));
            }
            // Downstream gave up on this path (already stored, cancelled): nothing to report.
            Err(None) => {}
            Err(Some(reason)) => {
                let _ = pieces_tx.send(NarPiece::End(Err(reason)));
            }
        }
    }
}

/// Dumps the path and compares the result with path-info. `Err(None)`: the receiver is gone.
fn dump_verified<F>(info: &PathRef, mut writer: PieceWriter<F>) -> Result<(), Option<String>>
where
    F: FnMut(bytes::Bytes) -> std::io::Result<()>,
{
    let path = info.path.to_absolute();
    let summary = match dump_path(Path::new(&path), &mut writer) {
        Ok(summary) => summary,
        Err(NarError::Write(err))
            if matches!(
                err.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::Interrupted
            ) =>
        {
            return Err(None)
        }
        Err(err) => return Err(Some(format!("cannot read {path}: {err}"))),
    };
    if let Err(err) = writer.flush_piece() {
        return if matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::Interrupted
        ) {
            Err(None)
        } else {
            Err(Some(format!("writing the NAR of {path}: {err}")))
        };
    }
    if summary.nar_hash != info.nar_hash || summary.nar_size != info.nar_size {
        return Err(Some(format!(
            "store path {path} is corrupt: its contents have narHash {} and narSize {}, but the Nix \
             database records {} and {}\nhint: run `nix-store --verify --check-contents --repair`",
            summary.nar_hash, summary.nar_size, info.nar_hash, info.nar_size
        )));
    }
    Ok(())
}
