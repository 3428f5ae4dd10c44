//! Store paths `/nix/store/<32 nix32 chars>-<name>` and their hash parts, the key of
//! everything in a binary cache.
//!
//! Name rules follow Nix 2.8 (what Debian ships and what many pushers run): 1..=211 characters
//! of `[0-9a-zA-Z+\-._?=]`, and not `.` or `..`. Nix 2.21+ also refuses names starting with
//! `.-` or `..-`, but 2.8 creates such paths (`nix-store --add ./.-x` works), so a cache that
//! rejected them could not store a closure an older Nix made.

use super::base32;

pub const STORE_DIR: &str = "/nix/store";
pub const HASH_PART_LEN: usize = 32;

/// Longest name Nix allows (so that `<hash>-<name>` fits in 255 bytes with some slack).
pub const MAX_NAME_LEN: usize = 211;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct StorePath {
    /// `<hash>-<name>`, validated. Ordering by it equals Nix's ordering of store paths.
    basename: String,
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
        let basename = strip_store_dir(text)?;
        if basename.contains('/') {
            return Err(error(text, "expected nothing below the store path"));
        }
        Self::validated(basename, text)
    }

    /// `<hash>-<name>`.
    pub fn from_basename(text: &str) -> Result<Self, StorePathError> {
        Self::validated(text, text)
    }

    /// The path's root for anything at or below it: `/nix/store/h-n/bin/x` -> `/nix/store/h-n`.
    ///
    /// The part below must not contain `..`, since `/nix/store/h-n/../x` is not below `h-n`.
    pub fn from_path_below(text: &str) -> Result<Self, StorePathError> {
        let rest = strip_store_dir(text)?;
        let (basename, below) = rest.split_once('/').unwrap_or((rest, ""));
        if below.split('/').any(|component| component == "..") {
            return Err(error(text, "`..` below a store path leaves it"));
        }
        Self::validated(basename, text)
    }

    pub fn hash_part(&self) -> &str {
        &self.basename[..HASH_PART_LEN]
    }

    pub fn name(&self) -> &str {
        &self.basename[HASH_PART_LEN + 1..]
    }

    pub fn basename(&self) -> &str {
        &self.basename
    }

    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.basename)
    }

    /// `original` is what the caller passed, so the error names it rather than a fragment.
    fn validated(basename: &str, original: &str) -> Result<Self, StorePathError> {
        if basename.len() < HASH_PART_LEN + 2 {
            return Err(error(original, "too short for `<32-char hash>-<name>`"));
        }
        // Byte-indexing is safe below: a non-ASCII byte fails the hash-part check first or
        // makes the name invalid.
        let bytes = basename.as_bytes();
        if !bytes[..HASH_PART_LEN]
            .iter()
            .all(|&c| base32::is_base32_char(c))
        {
            return Err(error(original, "hash part is not 32 nixbase32 characters"));
        }
        if bytes[HASH_PART_LEN] != b'-' {
            return Err(error(original, "expected `-` after the 32-character hash"));
        }
        check_name(&basename[HASH_PART_LEN + 1..]).map_err(|reason| error(original, reason))?;
        Ok(Self {
            basename: basename.to_owned(),
        })
    }
}

impl std::fmt::Display for StorePath {
    /// The absolute path.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_absolute())
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;

    /// Parses an absolute store path (see [`StorePath::from_absolute`]).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_absolute(text)
    }
}

/// 32 nixbase32 characters: what the server accepts as `<hash>` in any route.
pub fn is_valid_hash_part(text: &str) -> bool {
    text.len() == HASH_PART_LEN && text.bytes().all(base32::is_base32_char)
}

/// The name part of a store path (after `<hash>-`), as Nix 2.8 checks it.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name is longer than 211 characters");
    }
    if name == "." || name == ".." {
        return Err("name must not be `.` or `..`");
    }
    let allowed = |c: u8| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c);
    if !name.bytes().all(allowed) {
        return Err("name has a character outside [0-9a-zA-Z+-._?=]");
    }
    Ok(())
}

fn strip_store_dir(text: &str) -> Result<&str, StorePathError> {
    text.strip_prefix(STORE_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(|| error(text, "not in /nix/store"))
}

fn error(text: &str, reason: &'static str) -> StorePathError {
    StorePathError {
        text: text.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "aydqv8w8w8z0kdv2y7cs5mxhw8j7dh98";

    #[test]
    fn parts() {
        let p = StorePath::from_absolute(&format!("/nix/store/{HASH}-a+b?c=d")).unwrap();
        assert_eq!(p.hash_part(), HASH);
        assert_eq!(p.name(), "a+b?c=d");
        assert_eq!(p.basename(), format!("{HASH}-a+b?c=d"));
        assert_eq!(p.to_absolute(), format!("/nix/store/{HASH}-a+b?c=d"));
        assert_eq!(p.to_string(), p.to_absolute());
        assert_eq!(StorePath::from_basename(p.basename()), Ok(p.clone()));
        assert_eq!(p.to_absolute().parse::<StorePath>(), Ok(p));
    }

    #[test]
    fn valid_names() {
        let long = "x".repeat(211);
        for name in [
            "hello-2.12.1",
            "a",
            "A_Z",
            "?=+",
            "-",
            "...",
            ".foo",
            ".-x", // Nix 2.8 creates these; 2.21+ refuses them
            "..-x",
            "foo.drv",
            long.as_str(),
        ] {
            let text = format!("{HASH}-{name}");
            let p = StorePath::from_basename(&text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.name(), name);
        }
    }

    #[test]
    fn invalid_basenames() {
        let long = "x".repeat(212);
        for (text, reason) in [
            (format!("{HASH}-"), "too short"),
            (HASH.to_string(), "too short"),
            (format!("{HASH}-{long}"), "longer than 211"),
            (format!("{HASH}-."), "`.` or `..`"),
            (format!("{HASH}-.."), "`.` or `..`"),
            (format!("{HASH}-a b"), "outside"),
            (format!("{HASH}-a/b"), "outside"),
            (format!("{HASH}-é"), "outside"),
            (format!("{HASH}-a~"), "outside"),
            (format!("{HASH}_name"), "expected `-`"),
            (format!("e{}-name", &HASH[1..]), "nixbase32"),
            (format!("{}-name", HASH.to_uppercase()), "nixbase32"),
            (format!("é{}-name", &HASH[2..]), "nixbase32"),
            (String::new(), "too short"),
        ] {
            let err = StorePath::from_basename(&text).unwrap_err();
            assert_eq!(err.text, text);
            assert!(err.reason.contains(reason), "{text}: {}", err.reason);
        }
    }

    #[test]
    fn absolute_forms() {
        let base = format!("{HASH}-foo");
        assert!(StorePath::from_absolute(&format!("/nix/store/{base}")).is_ok());
        for bad in [
            base.clone(),
            format!("/nix/store/{base}/"),
            format!("/nix/store/{base}/bin"),
            format!("/nix/store//{base}"),
            format!("/nix/store{base}"),
            format!("/gnu/store/{base}"),
            format!("nix/store/{base}"),
            "/nix/store".to_string(),
            "/nix/store/".to_string(),
        ] {
            let err = StorePath::from_absolute(&bad).unwrap_err();
            assert_eq!(err.text, bad);
        }
    }

    #[test]
    fn path_below() {
        let root = format!("/nix/store/{HASH}-foo");
        for text in [
            root.clone(),
            format!("{root}/"),
            format!("{root}/bin/foo"),
            format!("{root}/share/./x"),
        ] {
            let p = StorePath::from_path_below(&text).unwrap();
            assert_eq!(p.to_absolute(), root, "{text}");
        }
        for bad in [
            format!("{root}/../other"),
            format!("{root}/a/../../x"),
            "/nix/store/x/bin".to_string(),
            "/usr/bin".to_string(),
        ] {
            assert!(StorePath::from_path_below(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ordering_matches_nix() {
        // Nix sorts store paths as strings; with one store dir that is the basename order.
        let mut v: Vec<StorePath> = ["zzz", "0aa", "1aa"]
            .iter()
            .map(|p| StorePath::from_basename(&format!("{p}{}-x", &HASH[3..])).unwrap())
            .collect();
        v.sort();
        let hashes: Vec<&str> = v.iter().map(|p| &p.hash_part()[..3]).collect();
        assert_eq!(hashes, ["0aa", "1aa", "zzz"]);
    }

    #[test]
    fn hash_parts() {
        assert!(is_valid_hash_part(HASH));
        assert!(!is_valid_hash_part(&HASH[1..]));
        assert!(!is_valid_hash_part(&format!("{HASH}0")));
        assert!(!is_valid_hash_part(&format!("{}e", &HASH[1..])));
        assert!(!is_valid_hash_part(&format!("{}E", &HASH[1..])));
        assert!(!is_valid_hash_part(""));
    }
}
