//! NAR (Nix ARchive): a streaming encoder that reads a store path from disk, and a
//! validating streaming reader for bytes that arrive from the network.
//!
//! ```text
//!   filesystem ──► dump_path ──► HashingWriter(sha256, size) ──► caller's Write (pieces)
//!   network bytes ──► validate ──► NarSummary { nar_hash, nar_size } | NarError
//! ```
//! Neither side holds a whole file in memory.

use super::Sha256Hash;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NarSummary {
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("I/O error at {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("I/O error writing NAR: {0}")]
    Write(std::io::Error),
    #[error("{path}: {what} cannot be stored in a NAR (only regular files, directories and symlinks can)")]
    UnsupportedFileType {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("malformed NAR at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
}

/// Writes the NAR serialisation of `path` (file, directory or symlink; symlinks are not
/// followed) to `out`, byte-identical to `nix-store --dump`, and returns its hash and size.
pub fn dump_path<W: std::io::Write>(path: &std::path::Path, out: W) -> Result<NarSummary, NarError> {
    todo!("{path:?}{}", std::any::type_name_of_val(&out))
}

/// Reads a whole NAR from `input`, checking every rule of the format (magic, tokens, padding,
/// entry order and names, limits) and returns its hash and size. Reads in bounded pieces.
pub fn validate<R: std::io::Read>(input: R) -> Result<NarSummary, NarError> {
    todo!("{}", std::any::type_name_of_val(&input))
}
