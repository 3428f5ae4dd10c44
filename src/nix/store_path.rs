//! Store paths `/nix/store/<32 nix32 chars>-<name>` and their hash parts, the key of
//! everything in a binary cache.

pub const STORE_DIR: &str = "/nix/store";
pub const HASH_PART_LEN: usize = 32;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct StorePath {
    // private: basename "<hash>-<name>"
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{text:?} is not a valid Nix store path: {reason}")]
pub struct StorePathError {
    pub text: String,
    pub reason: &'static str,
}

impl StorePath {
    /// `/nix/store/<hash>-<name>`, exactly (no trailing slash, nothing below it).
    pub fn from_absolute(text: &str) -> Result<Self, StorePathError> {
        todo!("{text}")
    }
    /// `<hash>-<name>`.
    pub fn from_basename(text: &str) -> Result<Self, StorePathError> {
        todo!("{text}")
    }
    /// The path's root for anything at or below it: `/nix/store/h-n/bin/x` -> `/nix/store/h-n`.
    pub fn from_path_below(text: &str) -> Result<Self, StorePathError> {
        todo!("{text}")
    }
    pub fn hash_part(&self) -> &str {
        todo!()
    }
    pub fn name(&self) -> &str {
        todo!()
    }
    pub fn basename(&self) -> &str {
        todo!()
    }
    pub fn to_absolute(&self) -> String {
        todo!()
    }
}

impl std::fmt::Display for StorePath {
    /// The absolute path.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_absolute())
    }
}

/// 32 nixbase32 characters: what the server accepts as `<hash>` in any route.
pub fn is_valid_hash_part(text: &str) -> bool {
    todo!("{text}")
}
