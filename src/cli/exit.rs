//! Exit codes, documented in the README. Scripts branch on these, so they never change meaning.

/// Everything worked.
pub const SUCCESS: i32 = 0;
/// An unexpected internal or I/O error.
pub const FAILURE: i32 = 1;
/// Bad command line or input: missing/malformed flag, URL or token, not a store path.
pub const USAGE: i32 = 2;
/// The server refused the credentials (401) or their scope (403).
pub const AUTH: i32 = 3;
/// The push ran, but some paths failed; the others were published.
pub const PARTIAL: i32 = 4;
/// Nix is missing, or `nix path-info` failed (e.g. a path is not in the store).
pub const NIX: i32 = 5;
/// The server could not be reached, spoke TLS wrongly, or is not a Stowix server.
pub const UNREACHABLE: i32 = 6;
/// The server cannot store more (HTTP 507, its storage is full): nothing more can succeed
/// until its administrator makes room; a re-run then resumes.
pub const SERVER_FULL: i32 = 7;
/// Refused to protect data: `stowix admin path delete` of a path other published paths still
/// reference (without `--with-dependents`).
pub const REFUSED: i32 = 8;
/// A pin named a store path the repository has not published (`nix pin`, `nix push --pin`).
pub const NOT_PUBLISHED: i32 = 9;
/// `admin migrate`: the source data dir is missing, not a directory or unreadable.
pub const NO_SOURCE: i32 = 10;
/// `admin migrate`: the source is not an embedded installation this stowix reads (no
/// `stowix.db`, not a stowix database, or a schema version other than this binary's).
pub const NOT_EMBEDDED: i32 = 11;
/// `admin migrate`: the target database or storage is the source's own.
pub const SAME_AS_TARGET: i32 = 12;
/// `admin migrate`: the target holds a repository or token of the same name with different
/// secrets; nothing was overwritten.
pub const CONFLICT: i32 = 13;
/// Stopped by Ctrl-C (128 + SIGINT, the shell convention); unfinished uploads stay resumable.
pub const INTERRUPTED: i32 = 130;
