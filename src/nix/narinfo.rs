//! `.narinfo` files: rendering, strict-enough parsing, and the signature fingerprint.
//!
//! ```text
//!   StorePath: /nix/store/<hash>-<name>
//!   URL: nar/<nix32 file hash>.nar.xz
//!   Compression: xz
//!   FileHash: sha256:<nix32>
//!   FileSize: <bytes>
//!   NarHash: sha256:<nix32>
//!   NarSize: <bytes>
//!   References: <basename> <basename> ...     (note the trailing space when empty)
//!   Deriver: <basename>.drv
//!   Sig: <key name>:<base64>                   (repeatable)
//!   CA: fixed:r:sha256:<nix32>
//! ```
//! Parsing is stricter than Nix's where Nix's leniency only hides corruption (duplicate
//! single-valued keys, lines without `": "`), and more lenient where it costs nothing (a missing
//! final newline, which Nix 2.8 rejects). Unknown keys (e.g. `System`) are ignored, as Nix does.

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

/// What Nix writes (and older Nix wrote) as the Deriver of a path with none.
const UNKNOWN_DERIVER: &str = "unknown-deriver";

impl NarInfo {
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut fields = Fields::default();
        for (index, line) in text.split_terminator('\n').enumerate() {
            let (key, value) = line.split_once(": ").ok_or_else(|| {
                NarInfoError(format!("line {} is not `Key: value`: {line:?}", index + 1))
            })?;
            fields.set(key, value)?;
        }
        fields.finish()
    }

    /// Keys in the order Nix writes them; every line ends in `\n`.
    ///
    /// `FileHash` and `FileSize` are written only when known (Nix always has them), and
    /// `Compression` always, since a reader takes a missing one as bzip2.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(512 + 64 * self.references.len());
        let mut line = |key: &str, value: &dyn std::fmt::Display| {
            use std::fmt::Write as _;
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{key}: {value}");
        };
        line("StorePath", &self.store_path);
        line("URL", &self.url);
        line("Compression", &self.compression);
        if let Some(hash) = &self.file_hash {
            line("FileHash", hash);
        }
        if let Some(size) = &self.file_size {
            line("FileSize", size);
        }
        line("NarHash", &self.nar_hash);
        line("NarSize", &self.nar_size);
        // Empty references still make a line, `References: ` with its trailing space.
        let references: Vec<&str> = sorted_references(&self.references)
            .into_iter()
            .map(StorePath::basename)
            .collect();
        line("References", &references.join(" "));
        if let Some(deriver) = &self.deriver {
            line("Deriver", &deriver.basename());
        }
        for sig in &self.sigs {
            line("Sig", sig);
        }
        if let Some(ca) = &self.ca {
            line("CA", ca);
        }
        out
    }

    /// `1;<store path>;sha256:<nix32>;<nar size>;<sorted full reference paths, comma-joined>`
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }
}

/// The string a narinfo signature signs, for callers that hold the fields without a
/// [`NarInfo`] (e.g. from `nix path-info --json`). References may be in any order.
pub fn fingerprint(
    store_path: &StorePath,
    nar_hash: &Sha256Hash,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let references: Vec<String> = sorted_references(references)
        .iter()
        .map(|r| r.to_absolute())
        .collect();
    format!(
        "1;{store_path};{};{nar_size};{}",
        nar_hash.to_typed_nix32(),
        references.join(",")
    )
}

/// Sorted and deduplicated, as Nix keeps references in a set. One store dir, so the order of
/// basenames is the order of full paths.
fn sorted_references(references: &[StorePath]) -> Vec<&StorePath> {
    let mut sorted: Vec<&StorePath> = references.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

/// Fields seen so far, each at most once (except `Sig`).
#[derive(Default)]
struct Fields {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Sha256Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Sha256Hash>,
    nar_size: Option<u64>,
    references: Option<Vec<StorePath>>,
    deriver: Option<Option<StorePath>>,
    sigs: Vec<String>,
    ca: Option<Option<String>>,
}

impl Fields {
    fn set(&mut self, key: &str, value: &str) -> Result<(), NarInfoError> {
        let bad = |what: &dyn std::fmt::Display| NarInfoError(format!("{key}: {what}"));
        match key {
            "StorePath" => once(
                key,
                &mut self.store_path,
                StorePath::from_absolute(value).map_err(|e| bad(&e))?,
            ),
            "URL" => once(key, &mut self.url, value.to_owned()),
            "Compression" => once(key, &mut self.compression, value.to_owned()),
            "FileHash" => once(
                key,
                &mut self.file_hash,
                Sha256Hash::parse(value).map_err(|e| bad(&e))?,
            ),
            "FileSize" => once(key, &mut self.file_size, parse_size(key, value)?),
            "NarHash" => once(
                key,
                &mut self.nar_hash,
                Sha256Hash::parse(value).map_err(|e| bad(&e))?,
            ),
            "NarSize" => once(key, &mut self.nar_size, parse_size(key, value)?),
            "References" => {
                // Nix splits on runs of spaces, so stray double spaces are harmless.
                let mut references = value
                    .split(' ')
                    .filter(|r| !r.is_empty())
                    .map(StorePath::from_basename)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&e))?;
                references.sort_unstable();
                references.dedup();
                once(key, &mut self.references, references)
            }
            "Deriver" => {
                let deriver = match value {
                    UNKNOWN_DERIVER => None,
                    _ => Some(StorePath::from_basename(value).map_err(|e| bad(&e))?),
                };
                once(key, &mut self.deriver, deriver)
            }
            "Sig" => {
                self.sigs.push(value.to_owned());
                Ok(())
            }
            // Nix 2.8 reads an empty CA as none.
            "CA" => once(
                key,
                &mut self.ca,
                Some(value).filter(|v| !v.is_empty()).map(str::to_owned),
            ),
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        let missing = |key: &str| NarInfoError(format!("missing required key {key}"));
        let nar_size = self.nar_size.ok_or_else(|| missing("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError("NarSize: must be greater than 0".into()));
        }
        let url = self.url.ok_or_else(|| missing("URL"))?;
        if url.is_empty() {
            return Err(NarInfoError("URL: must not be empty".into()));
        }
        Ok(NarInfo {
            store_path: self.store_path.ok_or_else(|| missing("StorePath"))?,
            url,
            compression: self
                .compression
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "bzip2".to_owned()),
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size,
            references: self.references.unwrap_or_default(),
            deriver: self.deriver.flatten(),
            sigs: self.sigs,
            ca: self.ca.flatten(),
        })
    }
}

fn once<T>(key: &str, slot: &mut Option<T>, value: T) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError(format!("duplicate key {key}")));
    }
    *slot = Some(value);
    Ok(())
}

/// Decimal digits only: `u64::from_str` would also take a leading `+`.
fn parse_size(key: &str, value: &str) -> Result<u64, NarInfoError> {
    value
        .bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| value.parse().ok())
        .flatten()
        .ok_or_else(|| NarInfoError(format!("{key}: {value:?} is not a byte count")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SELF: &str = "aydqv8w8w8z0kdv2y7cs5mxhw8j7dh98-a+b?c=d";
    const DEP: &str = "0b5fk1ab0y4ahm5fqj7lp3cdq8lfpba5-glibc-2.37";
    const DRV: &str = "k1zwn4cv6m7m7kclhjjbwyhl7xmk1gj0-a+b?c=d.drv";
    const NAR_HASH: &str = "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h";
    const FILE_HASH: &str = "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw";

    fn full_text() -> String {
        format!(
            "StorePath: /nix/store/{SELF}\n\
             URL: nar/04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw.nar.xz\n\
             Compression: xz\n\
             FileHash: {FILE_HASH}\n\
             FileSize: 96\n\
             NarHash: {NAR_HASH}\n\
             NarSize: 120\n\
             References: {DEP} {SELF}\n\
             Deriver: {DRV}\n\
             Sig: cache.example.org-1:c2lnMQ==\n\
             Sig: other-1:c2lnMg==\n\
             CA: fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h\n"
        )
    }

    fn minimal(extra: &str) -> String {
        format!("StorePath: /nix/store/{SELF}\nURL: nar/x.nar\nNarHash: {NAR_HASH}\nNarSize: 120\n{extra}")
    }

    #[test]
    fn round_trip_keeps_everything_in_nix_order() {
        let text = full_text();
        let info = NarInfo::parse(&text).unwrap();
        assert_eq!(info.store_path.basename(), SELF);
        assert_eq!(info.compression, "xz");
        assert_eq!(info.file_hash, Some(Sha256Hash::parse(FILE_HASH).unwrap()));
        assert_eq!(info.file_size, Some(96));
        assert_eq!(info.nar_size, 120);
        // Self-reference kept, references sorted.
        let refs: Vec<&str> = info.references.iter().map(|r| r.basename()).collect();
        assert_eq!(refs, [DEP, SELF]);
        assert_eq!(info.deriver.as_ref().unwrap().basename(), DRV);
        assert_eq!(
            info.sigs,
            ["cache.example.org-1:c2lnMQ==", "other-1:c2lnMg=="]
        );
        assert_eq!(
            info.ca.as_deref(),
            Some("fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h")
        );
        assert_eq!(info.render(), text);
        assert_eq!(NarInfo::parse(&info.render()).unwrap(), info);
    }

    #[test]
    fn minimal_narinfo_defaults() {
        let info = NarInfo::parse(&minimal("")).unwrap();
        assert_eq!(info.compression, "bzip2");
        assert_eq!(info.file_hash, None);
        assert_eq!(info.file_size, None);
        assert!(info.references.is_empty());
        assert_eq!(info.deriver, None);
        assert!(info.sigs.is_empty());
        assert_eq!(info.ca, None);
        assert_eq!(
            info.render(),
            format!(
                "StorePath: /nix/store/{SELF}\nURL: nar/x.nar\nCompression: bzip2\n\
                 NarHash: {NAR_HASH}\nNarSize: 120\nReferences: \n"
            )
        );
    }

    #[test]
    fn empty_references_line_has_trailing_space() {
        let info = NarInfo::parse(&minimal("References: \n")).unwrap();
        assert!(info.references.is_empty());
        assert!(info.render().contains("\nReferences: \n"));
    }

    #[test]
    fn lenient_where_harmless() {
        // No final newline, unknown keys, unknown-deriver, values with ": " inside, SRI hash,
        // double spaces between references.
        let text = minimal(&format!(
            "System: x86_64-linux\nDeriver: unknown-deriver\nFuture: a: b\nReferences: {SELF}  {DEP}\nCA: text:sha256:x"
        ))
        .replace(NAR_HASH, &Sha256Hash::parse(NAR_HASH).unwrap().to_sri());
        let info = NarInfo::parse(&text).unwrap();
        assert_eq!(info.deriver, None);
        assert_eq!(info.nar_hash, Sha256Hash::parse(NAR_HASH).unwrap());
        assert_eq!(info.references.len(), 2);
        assert_eq!(info.references[0].basename(), DEP);
        assert_eq!(info.ca.as_deref(), Some("text:sha256:x"));
        assert!(!info.render().contains("System"));
        // A rendered narinfo always writes the NarHash in nix32.
        assert!(info.render().contains(&format!("NarHash: {NAR_HASH}\n")));
    }

    #[test]
    fn rejections() {
        let text = full_text();
        let cases: Vec<(String, &str)> = vec![
            (
                text.replace("StorePath: ", "StorePath:"),
                "not `Key: value`",
            ),
            (format!("{text}\n"), "not `Key: value`"),
            (
                text.replace("FileSize: 96\n", "FileSize: 96\nFileSize: 97\n"),
                "duplicate key FileSize",
            ),
            (format!("{text}URL: other\n"), "duplicate key URL"),
            (format!("{text}References: \n"), "duplicate key References"),
            (format!("{text}CA: text:sha256:x\n"), "duplicate key CA"),
            (
                format!("{text}Deriver: unknown-deriver\n"),
                "duplicate key Deriver",
            ),
            (
                text.replace(&format!("StorePath: /nix/store/{SELF}\n"), ""),
                "missing required key StorePath",
            ),
            (
                text.replace("URL: nar/", "Url: nar/"),
                "missing required key URL",
            ),
            (
                text.replace("NarHash: ", "NarHas: "),
                "missing required key NarHash",
            ),
            (text.replace("NarSize: 120", "NarSize: 0"), "greater than 0"),
            (
                text.replace("NarSize: 120", "NarSize: +120"),
                "not a byte count",
            ),
            (
                text.replace("NarSize: 120", "NarSize: -1"),
                "not a byte count",
            ),
            (
                text.replace("FileSize: 96", "FileSize: 9x"),
                "not a byte count",
            ),
            (
                text.replace(NAR_HASH, "sha1:0mdqa9w1p6cmli6976v4wi0sw9r4p5pr"),
                "NarHash",
            ),
            (
                text.replace(&format!("/nix/store/{SELF}"), SELF),
                "StorePath",
            ),
            (
                text.replace(&format!("{DEP} "), &format!("/nix/store/{DEP} ")),
                "References",
            ),
            (
                text.replace(&format!("Deriver: {DRV}"), "Deriver: "),
                "Deriver",
            ),
        ];
        for (text, expected) in cases {
            let err = NarInfo::parse(&text).unwrap_err();
            assert!(err.0.contains(expected), "expected {expected:?}, got {err}");
        }
    }

    #[test]
    fn fingerprint_format() {
        let info = NarInfo::parse(&full_text()).unwrap();
        assert_eq!(
            info.fingerprint(),
            format!("1;/nix/store/{SELF};{NAR_HASH};120;/nix/store/{DEP},/nix/store/{SELF}")
        );
        // URL, compression, file hash, deriver, sigs and CA are not signed.
        let mut other = info.clone();
        other.url = "nar/other.nar".into();
        other.compression = "none".into();
        other.file_hash = None;
        other.deriver = None;
        other.sigs.clear();
        other.ca = None;
        assert_eq!(other.fingerprint(), info.fingerprint());
        // Unsorted or duplicated references (a hand-built NarInfo) fingerprint the same.
        other.references.reverse();
        other.references.push(other.references[0].clone());
        assert_eq!(other.fingerprint(), info.fingerprint());
        let none = NarInfo::parse(&minimal("")).unwrap();
        assert_eq!(
            none.fingerprint(),
            format!("1;/nix/store/{SELF};{NAR_HASH};120;")
        );
    }
}
