//! Verifies a staged compressed NAR before it becomes visible, in one pass over the file:
//!
//! ```text
//!   file ──► sha256 + size (FileHash, FileSize) ──► decompress ──► output cap ──► nar::validate
//!                                    (memory limit)   (declared NarSize    (structure, NarHash, NarSize)
//!                                                      or max_nar_bytes)
//! ```
//! Anything after the end of the compressed stream is refused, so FileHash covers exactly the
//! bytes a client will download and decompress.
//!
//! A compressed file is a promise the server pays for: 150 KB of xz can claim a 4 GiB dictionary
//! and expand to 1 GiB. So the decoders run under a memory limit fitted to what Stowix and Nix
//! write, and decompression stops as soon as the output passes the size the upload declared
//! (or the server's `max_nar_bytes` when nothing is declared yet).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::api::Compression;
use crate::nix::nar::{self, NarSummary};
use crate::nix::Sha256Hash;

/// The compressions a repository accepts, with the file suffix Nix gives each.
pub fn compression_suffix(compression: &str) -> Option<&'static str> {
    Compression::from_name(compression).map(Compression::suffix)
}

/// The compression a NAR file name implies (`<nix32>.nar.xz` -> `xz`) and its nix32 part.
pub fn parse_nar_file_name(name: &str) -> Option<(&str, &'static str)> {
    Compression::ALL.into_iter().find_map(|compression| {
        name.strip_suffix(compression.suffix())
            .map(|stem| (stem, compression.name()))
    })
}

/// Memory the xz decoder may use. The largest dictionary any xz preset uses is 64 MiB (xz -9,
/// -9e; Stowix's `--compression-level 9`; Nix's `compression-level = 9`, whose default 6 uses
/// 8 MiB), and liblzma needs that dictionary plus well under 1 MiB of decoder state. LZMA2's
/// next dictionary size after 64 MiB is 96 MiB, which no preset produces: 80 MiB admits every
/// preset stream with headroom for liblzma's bookkeeping, and refuses a header claiming more
/// before anything is allocated.
pub const XZ_MEMLIMIT: u64 = 80 << 20;
/// Largest zstd window, as a power of two: 2^27 = 128 MiB, what `zstd --ultra -22` and
/// `--long` use at most, and libzstd's own default decoder limit, so Nix cannot read a bigger
/// window either.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// How much NAR output decompression may produce before it is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputLimit {
    pub bytes: u64,
    /// True when `bytes` is the NarSize the client declared, false when it is the server's cap.
    pub declared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub file_hash: Sha256Hash,
    pub file_size: u64,
    pub nar: NarSummary,
    /// The NAR's listing (Nix's `<hash>.ls` JSON), written during the same walk; `None` past
    /// [`LISTING_LIMIT`].
    pub listing: Option<String>,
}

/// Largest listing kept per NAR: about 40 000 files. Verification holds it in memory, so
/// this bounds what a NAR of millions of tiny files costs; past it the path just has no
/// listing, and Nix falls back to the NAR.
pub const LISTING_LIMIT: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}", Compression::unsupported(.0))]
    UnsupportedCompression(String),
    #[error("the file is not valid {compression} data: {detail}")]
    Decompress { compression: String, detail: String },
    #[error("the NAR inside is invalid: {0}")]
    InvalidNar(String),
    #[error("{0} bytes follow the end of the compressed stream")]
    TrailingData(u64),
    #[error("decompressing this {compression} file needs more memory than this server allows ({detail}); recompress with a standard preset (xz -0..-9, zstd up to --ultra -22)")]
    DecoderMemory { compression: String, detail: String },
    #[error("{}", too_much_output(.0))]
    TooMuchOutput(OutputLimit),
    #[error("reading the staged upload: {0}")]
    Io(#[from] std::io::Error),
}

/// Hashes and counts every byte read from the file.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn too_much_output(limit: &OutputLimit) -> String {
    if limit.declared {
        format!(
            "the file decompresses to more than the declared NarSize of {} bytes; decompression was stopped there",
            limit.bytes
        )
    } else {
        format!(
            "the file decompresses to more than this server's max_nar_bytes of {} bytes; decompression was stopped there",
            limit.bytes
        )
    }
}

/// Marks the read error [`CappedReader`] raises, so it can be told from a decoder's own.
#[derive(Debug)]
struct OutputCapReached;

impl std::fmt::Display for OutputCapReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("decompressed output over its limit")
    }
}

impl std::error::Error for OutputCapReached {}

/// Fails the first read that takes the output past `limit` bytes, so a decoder is never asked
/// for more than one read buffer beyond it: enough for the NAR validator to see the overrun.
struct CappedReader<'a, R> {
    inner: &'a mut R,
    limit: u64,
    produced: u64,
    counter: ::metrics::Counter,
}

impl<R: Read> Read for CappedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.produced += n as u64;
        self.counter.increment(n as u64);
        if self.produced > self.limit {
            return Err(std::io::Error::other(OutputCapReached));
        }
        Ok(n)
    }
}

// Large reads: the decompressor wants big slices, and a remote object arrives in big pieces.
const READ_BUFFER: usize = 1 << 20;

pub fn verify_file(
    path: &Path,
    compression: &str,
    limit: OutputLimit,
) -> Result<Verified, VerifyError> {
    verify_reader(std::fs::File::open(path)?, compression, limit)
}

/// [`verify_file`] over any byte source: an object streamed back from S3 (through
/// `tokio_util::io::SyncIoBridge` on a blocking thread) is read exactly once.
pub fn verify_reader<R: Read>(
    source: R,
    compression: &str,
    limit: OutputLimit,
) -> Result<Verified, VerifyError> {
    verify_buffered(source, READ_BUFFER, compression, limit)
}

/// [`verify_file`] of a file held in memory (a NAR of a batch upload): its read buffer is
/// sized to the file, not the 1 MiB a stream gets.
pub fn verify_bytes(
    file: &[u8],
    compression: &str,
    limit: OutputLimit,
) -> Result<Verified, VerifyError> {
    verify_buffered(file, file.len().clamp(1, READ_BUFFER), compression, limit)
}

fn verify_buffered<R: Read>(
    source: R,
    buffer: usize,
    compression: &str,
    limit: OutputLimit,
) -> Result<Verified, VerifyError> {
    let hashing = HashingReader {
        inner: source,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let buffered = BufReader::with_capacity(buffer, hashing);
    let decompress_error = |err: &dyn std::fmt::Display| VerifyError::Decompress {
        compression: compression.to_string(),
        detail: err.to_string(),
    };
    let (nar, mut rest) = match compression {
        "xz" => {
            let stream = liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0)
                .map_err(|e| decompress_error(&e))?;
            let mut decoder = liblzma::bufread::XzDecoder::new_stream(buffered, stream);
            let nar = validate_classifying(&mut decoder, compression, limit)?;
            (nar, decoder.into_inner())
        }
        "zstd" => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| decompress_error(&e))?
                .single_frame();
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| decompress_error(&e))?;
            let nar = validate_classifying(&mut decoder, compression, limit)?;
            (nar, decoder.finish())
        }
        "none" => {
            let mut reader = buffered;
            let nar = validate_classifying(&mut reader, compression, limit)?;
            (nar, reader)
        }
        other => return Err(VerifyError::UnsupportedCompression(other.to_string())),
    };
    let trailing = drain(&mut rest)?;
    if trailing > 0 {
        return Err(VerifyError::TrailingData(trailing));
    }
    let hashing = rest.into_inner();
    let (nar, listing) = nar;
    Ok(Verified {
        file_hash: Sha256Hash(hashing.hasher.finalize().into()),
        file_size: hashing.bytes,
        nar,
        listing,
    })
}

/// Tells a decompression failure (the client sent bad compressed bytes) from a bad NAR, and
/// both from a file that asks for more memory or output than the server gives it.
fn validate_classifying<R: Read>(
    reader: &mut R,
    compression: &str,
    limit: OutputLimit,
) -> Result<(NarSummary, Option<String>), VerifyError> {
    let capped = CappedReader {
        inner: reader,
        limit: limit.bytes,
        produced: 0,
        counter: ::metrics::counter!(super::metrics::VERIFIED_NAR_BYTES_TOTAL),
    };
    nar::validate_with_listing(capped, LISTING_LIMIT).map_err(|err| match err {
        nar::NarError::Io { source, .. } | nar::NarError::Write(source) => {
            classify_read_error(source, compression, limit)
        }
        other => VerifyError::InvalidNar(other.to_string()),
    })
}

fn classify_read_error(
    source: std::io::Error,
    compression: &str,
    limit: OutputLimit,
) -> VerifyError {
    let inner = source.get_ref();
    if inner.is_some_and(|e| e.is::<OutputCapReached>()) {
        return VerifyError::TooMuchOutput(limit);
    }
    let xz_memlimit = inner
        .and_then(|e| e.downcast_ref::<liblzma::stream::Error>())
        .is_some_and(|e| matches!(e, liblzma::stream::Error::MemLimit));
    // libzstd reports a window over the limit only as text (ZSTD_error_frameParameter_windowTooLarge).
    let zstd_window = compression == "zstd" && source.to_string().contains("too much memory");
    if xz_memlimit || zstd_window {
        return VerifyError::DecoderMemory {
            compression: compression.to_string(),
            detail: source.to_string(),
        };
    }
    VerifyError::Decompress {
        compression: compression.to_string(),
        detail: source.to_string(),
    }
}

fn drain<R: BufRead>(reader: &mut R) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        let available = reader.fill_buf()?.len();
        if available == 0 {
            return Ok(total);
        }
        total += available as u64;
        reader.consume(available);
    }
}
