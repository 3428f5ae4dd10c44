//! Stage 4: xz compression on a pool of plain threads.
//!
//! ```text
//!   NarStream ──► worker ──► plan by nar_size ─┬─ small: one thread, dictionary sized to the NAR
//!                                              └─ large: liblzma multithreaded encoder, all cores
//!             ──► xz stream ──► 256 KiB pieces ──► CompressedStream ──► upload
//! ```
//! Small NARs are spread across workers (one each); a large NAR takes the single "large lane"
//! and fans its xz blocks out over every compression thread, so one huge NAR still uses all
//! cores while memory stays at one multithreaded encoder.
//!
//! Output is a pure function of (NAR bytes, [`EncoderPlan`]): a restarted client regenerates
//! byte-identical output and can resume an upload where the server's offset says. The plan's
//! descriptor travels in `CreateUpload.encoder` so only identical streams are resumed.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use liblzma::stream::{Check, Filters, LzmaOptions, MtStreamBuilder, Stream};
use liblzma::write::XzEncoder;
use tokio::sync::mpsc;

use super::failure::{Health, PathFailure};
use super::metrics::stage;
use super::progress::Progress;
use super::{CompressedStream, Halt, NarStream, Piece, PieceWriter, COMPRESSED_PIECES_PER_PATH};

/// Dictionary size of each xz preset 0..=9 (from xz's documentation).
const PRESET_DICT: [u32; 10] = [
    256 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
    4 << 20,
    8 << 20,
    8 << 20,
    16 << 20,
    32 << 20,
    64 << 20,
];
/// The x86 branch-call-jump filter in front of LZMA2 on x86_64 hosts, whose store paths are
/// mostly x86 machine code: it makes calls' relative addresses absolute so repeated targets
/// compress, about 1.5% fewer bytes on a closure of host binaries and libraries at the same
/// speed (see docs/benchmarks.md). Every liblzma since 4.999 decodes it, so every Nix does.
/// Other architectures' filters are newer (ARM64 needs liblzma 5.4), so they are not used.
const X86_BCJ: bool = cfg!(target_arch = "x86_64");
/// LZMA2's smallest dictionary.
const MIN_DICT: u32 = 4096;
/// Like xz: blocks of three dictionaries, at least 1 MiB, so each block compresses about as
/// well as a single stream would while blocks still spread over threads.
const MIN_BLOCK: u64 = 1 << 20;
/// A NAR goes to the multithreaded encoder when it spans more than this many blocks; below
/// that, splitting buys little parallelism and costs ratio.
const MT_MIN_BLOCKS: u64 = 2;
/// Memory the multithreaded encoder may use; above it liblzma runs fewer threads (the output
/// stays identical, only slower). Bounds a 64-core machine at preset 9.
const MT_MEMLIMIT: u64 = 2 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressConfig {
    /// xz preset 0..=9.
    pub level: u32,
    pub threads: u32,
}

/// How one NAR is encoded; everything that influences the output bytes is in here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderPlan {
    /// Single-threaded, one xz block, LZMA2 with this dictionary.
    Single { level: u32, dict: u32 },
    /// Multithreaded, independent blocks of `block` bytes.
    Multi { level: u32, block: u64 },
}

impl EncoderPlan {
    pub fn for_nar(nar_size: u64, level: u32) -> Self {
        let level = level.min(9);
        let preset_dict = PRESET_DICT[level as usize];
        let block = (3 * u64::from(preset_dict)).max(MIN_BLOCK);
        if nar_size > MT_MIN_BLOCKS * block {
            return Self::Multi { level, block };
        }
        // The preset's full dictionary costs more to set up than a small NAR takes to
        // compress; a dictionary as large as the NAR compresses it identically well.
        let fitted = nar_size.max(u64::from(MIN_DICT)).next_power_of_two();
        let dict = fitted.min(u64::from(preset_dict)) as u32;
        Self::Single { level, dict }
    }

    /// Goes into `CreateUpload.encoder`.
    pub fn descriptor(&self) -> String {
        let bcj = if X86_BCJ { "-x86" } else { "" };
        match self {
            Self::Single { level, dict } => format!("xz{bcj}-p{level}-d{dict}-crc64"),
            Self::Multi { level, block } => format!("xz-mt{bcj}-p{level}-b{block}-crc64"),
        }
    }

    fn filters(level: u32, dict: Option<u32>) -> Result<Filters, liblzma::stream::Error> {
        let mut options = LzmaOptions::new_preset(level)?;
        if let Some(dict) = dict {
            options.dict_size(dict);
        }
        let mut filters = Filters::new();
        if X86_BCJ {
            filters.x86();
        }
        filters.lzma2(&options);
        Ok(filters)
    }

    fn stream(&self, threads: u32) -> Result<Stream, liblzma::stream::Error> {
        match *self {
            Self::Single { level, dict } => {
                Stream::new_stream_encoder(&Self::filters(level, Some(dict))?, Check::Crc64)
            }
            Self::Multi { level, block } => MtStreamBuilder::new()
                .filters(Self::filters(level, None)?)
                .block_size(block)
                .threads(threads.max(1))
                .memlimit_threading(MT_MEMLIMIT)
                .check(Check::Crc64)
                .encoder(),
        }
    }
}

/// Runs `config.threads` compression workers until the input closes or the run is cancelled.
pub fn run(
    config: CompressConfig,
    input: crossbeam_channel::Receiver<NarStream>,
    output: mpsc::Sender<CompressedStream>,
    progress: Arc<Progress>,
    health: Arc<Health>,
) {
    let large_lane = Mutex::new(());
    std::thread::scope(|scope| {
        for index in 0..config.threads.max(1) {
            let (input, output, progress, health, large_lane) = (
                input.clone(),
                output.clone(),
                &progress,
                &health,
                &large_lane,
            );
            let cancel = health.stop_token();
            std::thread::Builder::new()
                .name(format!("stowix-xz-{index}"))
                .spawn_scoped(scope, move || {
                    while let Ok(stream) = input.recv() {
                        progress.queue_depth(stage::COMPRESS, input.len());
                        if cancel.is_cancelled() {
                            return;
                        }
                        let plan = EncoderPlan::for_nar(stream.info.nar_size, config.level);
                        let _lane = matches!(plan, EncoderPlan::Multi { .. })
                            .then(|| large_lane.lock().expect("large lane"));
                        if !compress_one(stream, plan, config.threads, &output, progress, health) {
                            return;
                        }
                    }
                })
                .expect("spawning a compression thread");
        }
    });
}

/// Compresses one NAR. Returns false when the upload stage is gone (stop the worker).
fn compress_one(
    stream: NarStream,
    plan: EncoderPlan,
    threads: u32,
    output: &mpsc::Sender<CompressedStream>,
    progress: &Progress,
    health: &Health,
) -> bool {
    let cancel = health.stop_token();
    let (tx, rx) = mpsc::channel(COMPRESSED_PIECES_PER_PATH);
    progress.queue_depth(stage::UPLOAD, output.max_capacity() - output.capacity());
    if output
        .blocking_send(CompressedStream {
            info: Arc::clone(&stream.info),
            plan,
            pieces: rx,
        })
        .is_err()
    {
        return false;
    }
    // Compressing for a server that answers nothing only piles up work: wait for it. Checked
    // after the hand-over, which may have blocked for long.
    if !health.online_blocking() {
        return false;
    }
    progress.started(stage::COMPRESS, &stream.info);
    let started = Instant::now();
    let mut blocked = Duration::ZERO;
    let mut compressed_size = 0u64;
    let result = (|| -> Result<(), Halt> {
        let encoder_stream = plan.stream(threads).map_err(|err| {
            Halt::Failed(PathFailure::Compression(format!(
                "cannot start the encoder: {err}"
            )))
        })?;
        let writer = PieceWriter::new(|piece| {
            if cancel.is_cancelled() {
                // Not `Interrupted`: `write_all` retries that kind forever, and a cancelled
                // run must stop this stream, not spin on it.
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            compressed_size += piece.len() as u64;
            let send_started = Instant::now();
            let sent = tx.blocking_send(Piece::Data(piece));
            blocked += send_started.elapsed();
            sent.map_err(|_| std::io::ErrorKind::BrokenPipe.into())
        });
        let mut encoder = XzEncoder::new_stream(writer, encoder_stream);
        let gone = |err: std::io::Error| match err.kind() {
            std::io::ErrorKind::BrokenPipe => Halt::Gone,
            _ => Halt::Failed(PathFailure::Compression(err.to_string())),
        };
        loop {
            match stream.pieces.recv() {
                Ok(Piece::Data(data)) => encoder.write_all(&data).map_err(gone)?,
                Ok(Piece::End(Ok(()))) => break,
                Ok(Piece::End(Err(failure))) => return Err(Halt::Failed(failure)),
                Err(_) => {
                    return Err(if cancel.is_cancelled() {
                        Halt::Gone
                    } else {
                        Halt::Failed(PathFailure::DumpStopped)
                    })
                }
            }
        }
        let mut writer = encoder.finish().map_err(gone)?;
        writer.flush_piece().map_err(gone)?;
        Ok(())
    })();
    let elapsed = started.elapsed();
    progress.busy(stage::COMPRESS, elapsed.saturating_sub(blocked));
    match result {
        Ok(()) => {
            progress.compressed(&stream.info, compressed_size, elapsed);
            let _ = tx.blocking_send(Piece::End(Ok(())));
        }
        Err(Halt::Failed(failure)) => {
            let _ = tx.blocking_send(Piece::End(Err(failure)));
        }
        Err(Halt::Gone) => {}
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn small_nars_get_a_dictionary_sized_to_them() {
        assert_eq!(
            EncoderPlan::for_nar(100, 6),
            EncoderPlan::Single {
                level: 6,
                dict: 4096
            }
        );
        assert_eq!(
            EncoderPlan::for_nar(5000, 6),
            EncoderPlan::Single {
                level: 6,
                dict: 8192
            }
        );
        assert_eq!(
            EncoderPlan::for_nar(3 << 20, 2),
            EncoderPlan::Single {
                level: 2,
                dict: 2 << 20
            }
        );
        assert_eq!(
            EncoderPlan::for_nar(13 << 20, 2),
            EncoderPlan::Multi {
                level: 2,
                block: 6 << 20
            }
        );
        let expected = if cfg!(target_arch = "x86_64") {
            "xz-x86-p0-d4096-crc64"
        } else {
            "xz-p0-d4096-crc64"
        };
        assert_eq!(EncoderPlan::for_nar(1, 0).descriptor(), expected);
    }

    fn compress(plan: EncoderPlan, threads: u32, data: &[u8]) -> Vec<u8> {
        let mut encoder = XzEncoder::new_stream(Vec::new(), plan.stream(threads).unwrap());
        for piece in data.chunks(100_000) {
            encoder.write_all(piece).unwrap();
        }
        encoder.finish().unwrap()
    }

    /// Resuming an upload after a restart relies on this: same plan, same bytes, whatever the
    /// number of threads or how the input was cut into pieces.
    #[test]
    fn output_depends_only_on_the_plan() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let plan = EncoderPlan::Multi {
            level: 0,
            block: 1 << 20,
        };
        let one = compress(plan, 1, &data);
        let three = compress(plan, 3, &data);
        assert_eq!(one, three);
        let mut decoded = Vec::new();
        liblzma::read::XzDecoder::new(&one[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, data);

        let small = EncoderPlan::for_nar(4000, 2);
        assert_eq!(
            compress(small, 1, &data[..4000]),
            compress(small, 4, &data[..4000])
        );
    }
}
