//! `.narinfo` files: rendering, strict-enough parsing, and the signature fingerprint.

use super::{Sha256Hash, StorePath};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative to the repository URL, e.g. `nar/<nix32 file hash>.nar.xz`.
    pub url: String,
    /// `xz`, `zstd`, `none`, ... (a missing key parses as `bzip2`, as Nix does).
    pub compression: String,
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Basenames, self included when the path refers to itself; kept sorted.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    /// `name:base64` each.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid narinfo: {0}")]
pub struct NarInfoError(pub String);

impl NarInfo {
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        todo!("{text}")
    }
    /// Keys in the order Nix writes them; every line ends in `\n`.
    pub fn render(&self) -> String {
        todo!()
    }
    /// `1;<store path>;sha256:<nix32>;<nar size>;<sorted full reference paths, comma-joined>`
    pub fn fingerprint(&self) -> String {
        todo!()
    }
}
