//! Stage 3: NAR dump. A pool of plain threads serialises missing store paths with the native
//! streaming encoder and checks each result against what Nix recorded.
//!
//! ```text
//!   dump queue ──► worker: dump_path(store path) ──► 256 KiB pieces ──► NarStream ──► compress
//!                              └─ narHash/narSize ≠ path-info ──► End(Err(Corrupt)) (never uploaded as valid)
//! ```
//! A worker blocks while its NAR's piece channel is full: that is the backpressure that keeps
//! memory at [`super::NAR_PIECES_PER_PATH`] pieces per worker, whatever the NAR size. It starts
//! no new path while the server is unreachable (the health gate is closed).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::failure::{Health, PathFailure};
use super::metrics::stage;
use super::progress::Progress;
use super::{Halt, NarStream, PathRef, Piece, PieceWriter, NAR_PIECES_PER_PATH};
use crate::nix::nar::{dump_path, NarError};

/// Runs `workers` dump threads until the input closes or the pipeline is cancelled.
pub fn run(
    workers: usize,
    input: mpsc::Receiver<PathRef>,
    output: crossbeam_channel::Sender<NarStream>,
    progress: Arc<Progress>,
    health: Arc<Health>,
) {
    // One receiver shared by the pool: whichever worker is free takes the next path.
    let input = Mutex::new(input);
    std::thread::scope(|scope| {
        for index in 0..workers.max(1) {
            let (input, output, progress, health) = (&input, output.clone(), &progress, &health);
            std::thread::Builder::new()
                .name(format!("stowix-dump-{index}"))
                .spawn_scoped(scope, move || worker(input, &output, progress, health))
                .expect("spawning a dump thread");
        }
    });
}

fn worker(
    input: &Mutex<mpsc::Receiver<PathRef>>,
    output: &crossbeam_channel::Sender<NarStream>,
    progress: &Progress,
    health: &Health,
) {
    let cancel = health.stop_token();
    loop {
        let next = {
            let mut input = input.lock().expect("dump queue lock");
            progress.queue_depth(stage::DUMP, input.len());
            input.blocking_recv()
        };
        let Some(info) = next else { return };
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
        // Dumping for a server that answers nothing only piles up work: wait for it. Checked
        // after the hand-over, which may have blocked for long.
        if !health.online_blocking() {
            return;
        }
        progress.started(stage::DUMP, &info);
        let started = Instant::now();
        let mut blocked = Duration::ZERO;
        let verdict = {
            let writer = PieceWriter::new(|piece| {
                if cancel.is_cancelled() {
                    // Not `Interrupted`: `write_all` retries that kind forever, and a cancelled
                    // run must stop this stream, not spin on it.
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                let len = piece.len() as u64;
                let send_started = Instant::now();
                let sent = pieces_tx.send(Piece::Data(piece));
                blocked += send_started.elapsed();
                progress.nar_bytes_read(len);
                sent.map_err(|_| std::io::ErrorKind::BrokenPipe.into())
            });
            dump_verified(&info, writer)
        };
        progress.busy(stage::DUMP, started.elapsed().saturating_sub(blocked));
        match verdict {
            Ok(()) => {
                let _ = pieces_tx.send(Piece::End(Ok(())));
            }
            Err(Halt::Gone) => {}
            Err(Halt::Failed(failure)) => {
                let _ = pieces_tx.send(Piece::End(Err(failure)));
            }
        }
    }
}

/// Dumps the path and compares the result with path-info.
fn dump_verified<F>(info: &PathRef, mut writer: PieceWriter<F>) -> Result<(), Halt>
where
    F: FnMut(bytes::Bytes) -> std::io::Result<()>,
{
    let path = info.path.to_absolute();
    let gone = |err: &std::io::Error| err.kind() == std::io::ErrorKind::BrokenPipe;
    let summary = match dump_path(Path::new(&path), &mut writer) {
        Ok(summary) => summary,
        Err(NarError::Write(err)) if gone(&err) => return Err(Halt::Gone),
        Err(err) => {
            return Err(Halt::Failed(PathFailure::Unreadable {
                path,
                detail: err.to_string(),
            }))
        }
    };
    if let Err(err) = writer.flush_piece() {
        return Err(if gone(&err) {
            Halt::Gone
        } else {
            Halt::Failed(PathFailure::Unreadable {
                path,
                detail: format!("writing its NAR: {err}"),
            })
        });
    }
    if summary.nar_hash != info.nar_hash || summary.nar_size != info.nar_size {
        return Err(Halt::Failed(PathFailure::Corrupt {
            path,
            nar_hash: summary.nar_hash.to_string(),
            nar_size: summary.nar_size,
            expected_hash: info.nar_hash.to_string(),
            expected_size: info.nar_size,
        }));
    }
    Ok(())
}
