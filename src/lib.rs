//! Stowix: push Nix closures into a binary cache, and serve that cache.
//!
//! Import direction (nothing points back up):
//!
//! ```text
//!   cli ──► push ──► client ──► api ──► nix
//!    └────► server ───────────► api, nix
//! ```
//!
//! `push` and `server` never import each other; `nix` imports nothing of ours.

pub mod api;
pub mod cli;
pub mod client;
pub mod nix;
pub mod push;
pub mod server;
