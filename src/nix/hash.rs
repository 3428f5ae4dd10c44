//! SHA-256 digests as Nix writes them: `sha256:<nix32>` in narinfo, SRI `sha256-<base64>` in
//! `nix path-info --json`, and `sha256:<hex>` accepted on input.

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid sha256 hash {text:?}: {reason}")]
pub struct HashParseError {
    pub text: String,
    pub reason: &'static str,
}

impl Sha256Hash {
    pub fn digest(data: &[u8]) -> Self {
        todo!("{data:?}")
    }
    /// Accepts `sha256:<nix32>`, `sha256:<hex>`, `sha256-<base64>` (SRI).
    pub fn parse(text: &str) -> Result<Self, HashParseError> {
        todo!("{text}")
    }
    /// The 52 nixbase32 characters without prefix.
    pub fn to_nix32(&self) -> String {
        todo!()
    }
    /// `sha256:<nix32>`, the form narinfo and fingerprints use.
    pub fn to_typed_nix32(&self) -> String {
        todo!()
    }
    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        todo!()
    }
}

impl std::fmt::Display for Sha256Hash {
    /// Same as [`Sha256Hash::to_typed_nix32`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_typed_nix32())
    }
}

impl std::fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sha256Hash({})", self.to_typed_nix32())
    }
}

/// An `io::Write` that hashes and counts what passes through it to an inner writer.
pub struct HashingWriter<W> {
    pub inner: W,
    // private hasher state
}

impl<W: std::io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        todo!("{}", std::any::type_name_of_val(&inner))
    }
    /// Bytes written so far and their sha256; consumes the writer and returns the inner one.
    pub fn finish(self) -> (W, Sha256Hash, u64) {
        todo!()
    }
}
