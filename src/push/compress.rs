//! Stage 4: compression (xz, zstd or none) on a pool of plain threads.
//!
//! ```text
//!   NarStream ──► worker ──► plan by method and nar_size ─┬─ small: one thread each
//!                                                         └─ large: multithreaded encoder, all cores
//!             ──► compressed stream ──► 256 KiB pieces ──► CompressedStream ──► upload
//! ```
//! Small NARs are spread across workers (one each); a large NAR takes the single "large lane"
//! and fans its xz blocks or zstd jobs out over every compression thread, so one huge NAR still
//! uses all cores while memory stays at one multithreaded encoder.
//!
//! Output is a pure function of (NAR bytes, [`EncoderPlan`]): a restarted client regenerates
//! byte-identical output and can resume an upload where the server's offset says. The plan's
//! descriptor travels in `CreateUpload.encoder` so only identical streams are resumed.

use std::io::Write;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use liblzma::stream::{Check, Filters, LzmaOptions, MtStreamBuilder, Stream};
use liblzma::write::XzEncoder;
use tokio::sync::mpsc;

use super::failure::{Health, PathFailure};
use super::metrics::stage;
use super::progress::Progress;
use super::{CompressedStream, Halt, NarStream, Piece, PieceWriter, COMPRESSED_PIECES_PER_PATH};
pub use crate::api::Compression;

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
/// A NAR goes to the multithreaded encoder when it spans more than this many blocks (xz) or
/// jobs (zstd); below that, splitting buys little parallelism and costs ratio.
const MT_MIN_BLOCKS: u64 = 2;
/// Memory the multithreaded encoder may use; above it liblzma runs fewer threads (the output
/// stays identical, only slower). Bounds a 64-core machine at preset 9.
const MT_MEMLIMIT: u64 = 2 << 30;

/// xz presets; 0 is fastest, 9 smallest.
pub const XZ_LEVELS: RangeInclusive<i32> = 0..=9;
/// zstd levels without `--ultra`: above 19 the window grows past 8 MiB, which costs every
/// substituter that much more memory for a few percent.
pub const ZSTD_LEVELS: RangeInclusive<i32> = 1..=19;
/// Default zstd level: zstd's own; pushed a closure of real binaries ~11x faster than xz
/// preset 2 for ~17% more bytes (docs/benchmarks.md, Run C).
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;
/// zstd window log of each level 1..=19 for inputs above 256 KiB (libzstd's `clevels.h`).
const ZSTD_WINDOW_LOG: [u32; 19] = [
    19, 20, 21, 21, 21, 21, 21, 21, 22, 22, 22, 22, 22, 22, 22, 22, 23, 23, 23,
];
/// zstd NARs up to this size are buffered whole and compressed knowing their size, so zstd
/// sizes its tables to the NAR instead of to the level's window (most store paths are small).
const ZSTD_WHOLE_MAX: u64 = 1 << 20;

/// The levels `method` accepts; `None` when it takes no level.
pub fn levels(method: Compression) -> Option<RangeInclusive<i32>> {
    match method {
        Compression::Xz => Some(XZ_LEVELS),
        Compression::Zstd => Some(ZSTD_LEVELS),
        Compression::None => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressConfig {
    pub method: Compression,
    /// Within [`levels`] of `method` (ignored for `none`).
    pub level: i32,
    pub threads: u32,
}

/// How one NAR is encoded; everything that influences the output bytes is in here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderPlan {
    /// xz, single-threaded, one block, LZMA2 with this dictionary.
    Single { level: u32, dict: u32 },
    /// xz, multithreaded, independent blocks of `block` bytes.
    Multi { level: u32, block: u64 },
    /// zstd, the whole NAR in one call, with its size in the frame header.
    ZstdWhole { level: i32 },
    /// zstd, streamed on one thread.
    ZstdStream { level: i32 },
    /// zstd, multithreaded, jobs of `job` bytes.
    ZstdMulti { level: i32, job: u32 },
    /// Stored as is.
    None,
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

    pub fn new(method: Compression, nar_size: u64, level: i32) -> Self {
        match method {
            Compression::Xz => Self::for_nar(nar_size, level.clamp(0, 9) as u32),
            Compression::Zstd => {
                let level = level.clamp(*ZSTD_LEVELS.start(), *ZSTD_LEVELS.end());
                // libzstd's default job: four windows, so each job compresses about as well as
                // one stream would.
                let job = 4u32 << ZSTD_WINDOW_LOG[level as usize - 1];
                if nar_size > MT_MIN_BLOCKS * u64::from(job) {
                    Self::ZstdMulti { level, job }
                } else if nar_size <= ZSTD_WHOLE_MAX {
                    Self::ZstdWhole { level }
                } else {
                    Self::ZstdStream { level }
                }
            }
            Compression::None => Self::None,
        }
    }

    pub fn compression(&self) -> Compression {
        match self {
            Self::Single { .. } | Self::Multi { .. } => Compression::Xz,
            Self::ZstdWhole { .. } | Self::ZstdStream { .. } | Self::ZstdMulti { .. } => {
                Compression::Zstd
            }
            Self::None => Compression::None,
        }
    }

    /// Goes into `CreateUpload.encoder`. zstd's output changes between library versions more
    /// often than liblzma's, so its version is part of the identity.
    pub fn descriptor(&self) -> String {
        let bcj = if X86_BCJ { "-x86" } else { "" };
        let zstd = zstd::zstd_safe::version_number();
        match self {
            Self::Single { level, dict } => format!("xz{bcj}-p{level}-d{dict}-crc64"),
            Self::Multi { level, block } => format!("xz-mt{bcj}-p{level}-b{block}-crc64"),
            Self::ZstdWhole { level } => format!("zstd{zstd}-l{level}-whole-xxh64"),
            Self::ZstdStream { level } => format!("zstd{zstd}-l{level}-xxh64"),
            Self::ZstdMulti { level, job } => format!("zstd{zstd}-mt-l{level}-j{job}-xxh64"),
            Self::None => "none".to_owned(),
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

    /// An encoder writing to `out`.
    pub fn encoder<W: Write>(&self, threads: u32, out: W) -> std::io::Result<Encoder<W>> {
        let xz = |stream: Result<Stream, liblzma::stream::Error>| {
            stream.map_err(|err| std::io::Error::other(format!("cannot start the encoder: {err}")))
        };
        Ok(match *self {
            Self::Single { level, dict } => Encoder::Xz(XzEncoder::new_stream(
                out,
                xz(Stream::new_stream_encoder(
                    &Self::filters(level, Some(dict)).map_err(std::io::Error::other)?,
                    Check::Crc64,
                ))?,
            )),
            Self::Multi { level, block } => Encoder::Xz(XzEncoder::new_stream(
                out,
                xz(MtStreamBuilder::new()
                    .filters(Self::filters(level, None).map_err(std::io::Error::other)?)
                    .block_size(block)
                    .threads(threads.max(1))
                    .memlimit_threading(MT_MEMLIMIT)
                    .check(Check::Crc64)
                    .encoder())?,
            )),
            Self::ZstdWhole { level } => Encoder::ZstdWhole {
                level,
                nar: Vec::new(),
                out,
            },
            Self::ZstdStream { level } => Encoder::Zstd(zstd_encoder(out, level, None)?),
            Self::ZstdMulti { level, job } => {
                let mut encoder = zstd_encoder(out, level, None)?;
                encoder.multithread(threads.max(1))?;
                encoder.set_parameter(zstd::zstd_safe::CParameter::JobSize(job))?;
                Encoder::Zstd(encoder)
            }
            Self::None => Encoder::Plain(out),
        })
    }
}

fn zstd_encoder<W: Write>(
    out: W,
    level: i32,
    size: Option<u64>,
) -> std::io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
    // What xz's crc64 is to xz: a plain `zstd -d` or a substituter detects a damaged file.
    encoder.include_checksum(true)?;
    encoder.set_pledged_src_size(size)?;
    Ok(encoder)
}

/// One NAR's encoder. Never flushed midway: a zstd flush would end a block early and make the
/// output depend on how the input was cut.
pub enum Encoder<W: Write> {
    Xz(XzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    /// Buffered until the end (at most [`ZSTD_WHOLE_MAX`]), then compressed in one call.
    ZstdWhole {
        level: i32,
        nar: Vec<u8>,
        out: W,
    },
    Plain(W),
}

impl<W: Write> Encoder<W> {
    pub fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Xz(encoder) => encoder.write_all(data),
            Self::Zstd(encoder) => encoder.write_all(data),
            Self::ZstdWhole { nar, .. } => {
                nar.extend_from_slice(data);
                Ok(())
            }
            Self::Plain(out) => out.write_all(data),
        }
    }

    pub fn finish(self) -> std::io::Result<W> {
        match self {
            Self::Xz(encoder) => encoder.finish(),
            Self::Zstd(encoder) => encoder.finish(),
            Self::ZstdWhole { level, nar, out } => {
                let mut encoder = zstd_encoder(out, level, Some(nar.len() as u64))?;
                encoder.write_all(&nar)?;
                encoder.finish()
            }
            Self::Plain(out) => Ok(out),
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
                .name(format!("stowix-compress-{index}"))
                .spawn_scoped(scope, move || {
                    while let Ok(stream) = input.recv() {
                        progress.queue_depth(stage::COMPRESS, input.len());
                        if cancel.is_cancelled() {
                            return;
                        }
                        let plan =
                            EncoderPlan::new(config.method, stream.info.nar_size, config.level);
                        let _lane = matches!(
                            plan,
                            EncoderPlan::Multi { .. } | EncoderPlan::ZstdMulti { .. }
                        )
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
        let mut encoder = plan
            .encoder(threads, writer)
            .map_err(|err| Halt::Failed(PathFailure::Compression(err.to_string())))?;
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
        compress_cut(plan, threads, data, 100_000)
    }

    fn compress_cut(plan: EncoderPlan, threads: u32, data: &[u8], cut: usize) -> Vec<u8> {
        let mut encoder = plan.encoder(threads, Vec::new()).unwrap();
        for piece in data.chunks(cut) {
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

    fn sample(len: u32) -> Vec<u8> {
        (0..len)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    fn unzstd(data: &[u8]) -> Vec<u8> {
        zstd::stream::decode_all(data).unwrap()
    }

    #[test]
    fn zstd_plans_follow_the_nar_size() {
        assert_eq!(
            EncoderPlan::new(Compression::Zstd, 1000, 3),
            EncoderPlan::ZstdWhole { level: 3 }
        );
        assert_eq!(
            EncoderPlan::new(Compression::Zstd, 2 << 20, 3),
            EncoderPlan::ZstdStream { level: 3 }
        );
        assert_eq!(
            EncoderPlan::new(Compression::Zstd, 17 << 20, 3),
            EncoderPlan::ZstdMulti {
                level: 3,
                job: 8 << 20
            }
        );
        assert_eq!(
            EncoderPlan::new(Compression::Zstd, 17 << 20, 19),
            EncoderPlan::ZstdStream { level: 19 }
        );
        assert_eq!(
            EncoderPlan::new(Compression::None, 17 << 20, 0),
            EncoderPlan::None
        );
        assert_eq!(
            EncoderPlan::new(Compression::Xz, 100, 6),
            EncoderPlan::for_nar(100, 6)
        );
        // A resume must never continue another encoder's bytes.
        let descriptors: std::collections::HashSet<String> = [
            EncoderPlan::ZstdWhole { level: 3 },
            EncoderPlan::ZstdStream { level: 3 },
            EncoderPlan::ZstdStream { level: 4 },
            EncoderPlan::ZstdMulti {
                level: 3,
                job: 8 << 20,
            },
            EncoderPlan::None,
            EncoderPlan::for_nar(100, 3),
        ]
        .iter()
        .map(EncoderPlan::descriptor)
        .collect();
        assert_eq!(descriptors.len(), 6);
        for plan in [EncoderPlan::ZstdWhole { level: 3 }, EncoderPlan::None] {
            assert_ne!(plan.compression(), Compression::Xz);
        }
    }

    /// Every zstd plan decodes back to the NAR, and its bytes depend only on the plan: not on
    /// the threads, nor on how the input was cut (a resumed upload regenerates them).
    #[test]
    fn zstd_round_trips_and_is_deterministic() {
        let data = sample(5_000_000);
        let small = &data[..300_000];
        let whole = EncoderPlan::ZstdWhole { level: 3 };
        let a = compress_cut(whole, 1, small, 1000);
        assert_eq!(a, compress_cut(whole, 4, small, 65536));
        assert_eq!(unzstd(&a), small);
        assert!(a.len() < small.len() / 4, "{} bytes", a.len());

        let stream = EncoderPlan::ZstdStream { level: 3 };
        let a = compress_cut(stream, 1, &data, 1000);
        assert_eq!(a, compress_cut(stream, 1, &data, 256 << 10));
        assert_eq!(unzstd(&a), data);

        // Level 1: jobs of 2 MiB, so 5 MB spans three jobs.
        let multi = EncoderPlan::new(Compression::Zstd, data.len() as u64, 1);
        assert_eq!(
            multi,
            EncoderPlan::ZstdMulti {
                level: 1,
                job: 2 << 20
            }
        );
        let one = compress_cut(multi, 1, &data, 256 << 10);
        assert_eq!(one, compress_cut(multi, 3, &data, 100_000));
        assert_eq!(one, compress_cut(multi, 2, &data, 7777));
        assert_eq!(unzstd(&one), data);
    }

    #[test]
    fn zstd_detects_a_damaged_file_and_none_stores_the_nar() {
        let data = sample(200_000);
        let mut file = compress(EncoderPlan::ZstdWhole { level: 3 }, 1, &data);
        let middle = file.len() / 2;
        file[middle] ^= 0x40;
        assert!(zstd::stream::decode_all(&file[..]).is_err());
        assert_eq!(compress(EncoderPlan::None, 1, &data), data);
    }
}
