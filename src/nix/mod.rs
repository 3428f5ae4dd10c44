//! Nix formats shared by the push client and the server, with no I/O policy:
//! store paths, nixbase32, hashes, the NAR encoder and validating reader,
//! narinfo, ed25519 signing, and `nix path-info --json`.
//!
//! Everything here is checked against real Nix (see `tests/nix_formats.rs`).

pub mod base32;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod path_info;
pub mod signing;
pub mod store_path;

pub use hash::Sha256Hash;
pub use narinfo::NarInfo;
pub use store_path::StorePath;
