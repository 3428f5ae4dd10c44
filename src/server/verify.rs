//! Verifies a staged compressed NAR before it becomes visible, in one pass over the file:
//!
//! ```text
//!   file ──► sha256 + size (FileHash, FileSize) ──► decompress ──► nar::validate
//!                                                                   (structure, NarHash, NarSize)
//! ```
//! Anything after the end of the compressed stream is refused, so FileHash covers exactly the
//! bytes a client will download and decompress.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::nix::nar::{self, NarSummary};
use crate::nix::Sha256Hash;

/// The compressions a repository accepts, with the file suffix Nix gives each.
pub fn compression_suffix(compression: &str) -> Option<&'static str> {
    match compression {
        "xz" => Some(".nar.xz"),
        "zstd" => Some(".nar.zst"),
        "none" => Some(".nar"),
        _ => None,
    }
}

/// The compression a NAR file name implies (`<nix32>.nar.xz` -> `xz`) and its nix32 part.
pub fn parse_nar_file_name(name: &str) -> Option<(&str, &'static str)> {
    for (suffix, compression) in [(".nar.xz", "xz"), (".nar.zst", "zstd"), (".nar", "none")] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return Some((stem, compression));
        }
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub file_hash: Sha256Hash,
    pub file_size: u64,
    pub nar: NarSummary,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("compression {0:?} is not supported (use xz, zstd or none)")]
    UnsupportedCompression(String),
    #[error("the file is not valid {compression} data: {detail}")]
    Decompress { compression: String, detail: String },
    #[error("the NAR inside is invalid: {0}")]
    InvalidNar(String),
    #[error("{0} bytes follow the end of the compressed stream")]
    TrailingData(u64),
    #[error("reading the staged file: {0}")]
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

// Large reads: the file is on local disk and the decompressor wants big slices.
const READ_BUFFER: usize = 1 << 20;

pub fn verify_file(path: &Path, compression: &str) -> Result<Verified, VerifyError> {
    let file = std::fs::File::open(path)?;
    let hashing = HashingReader {
        inner: file,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let buffered = BufReader::with_capacity(READ_BUFFER, hashing);
    let decompress_error = |err: &dyn std::fmt::Display| VerifyError::Decompress {
        compression: compression.to_string(),
        detail: err.to_string(),
    };
    let (nar, mut rest) = match compression {
        "xz" => {
            let mut decoder = liblzma::bufread::XzDecoder::new(buffered);
            let nar = validate_classifying(&mut decoder, compression)?;
            (nar, decoder.into_inner())
        }
        "zstd" => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| decompress_error(&e))?
                .single_frame();
            let nar = validate_classifying(&mut decoder, compression)?;
            (nar, decoder.finish())
        }
        "none" => {
            let mut reader = buffered;
            let nar = validate_classifying(&mut reader, compression)?;
            (nar, reader)
        }
        other => return Err(VerifyError::UnsupportedCompression(other.to_string())),
    };
    let trailing = drain(&mut rest)?;
    if trailing > 0 {
        return Err(VerifyError::TrailingData(trailing));
    }
    let hashing = rest.into_inner();
    Ok(Verified {
        file_hash: Sha256Hash(hashing.hasher.finalize().into()),
        file_size: hashing.bytes,
        nar,
    })
}

/// Tells a decompression failure (the client sent bad compressed bytes) from a bad NAR.
fn validate_classifying<R: Read>(
    reader: &mut R,
    compression: &str,
) -> Result<NarSummary, VerifyError> {
    nar::validate(reader).map_err(|err| match err {
        nar::NarError::Io { source, .. } | nar::NarError::Write(source) => {
            VerifyError::Decompress {
                compression: compression.to_string(),
                detail: source.to_string(),
            }
        }
        other => VerifyError::InvalidNar(other.to_string()),
    })
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
