//! `nix path-info --recursive --json` output, in both of its forms: the array of Nix <= 2.18
//! and the object keyed by path of Nix 2.19+.

use super::{Sha256Hash, StorePath};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Self included when the path refers to itself.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    /// Verbatim, e.g. `fixed:r:sha256:...`.
    pub ca: Option<String>,
    pub signatures: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PathInfoError {
    #[error("cannot parse `nix path-info --json` output: {0}")]
    Json(String),
    #[error("`nix path-info` output has an invalid entry: {0}")]
    Entry(String),
}

/// Parsed output: valid paths, and the paths Nix reported as not valid (not in the store).
#[derive(Debug, Default)]
pub struct PathInfoOutput {
    pub valid: Vec<PathInfo>,
    pub invalid: Vec<String>,
}

pub fn parse_path_info_json(json: &[u8]) -> Result<PathInfoOutput, PathInfoError> {
    todo!("{json:?}")
}
