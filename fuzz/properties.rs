//! The properties every fuzz target checks, in one place: the `cargo fuzz` targets in
//! `fuzz_targets/` and the deterministic mutation test `tests/fuzz_smoke.rs` both include this
//! file with `#[path]`, so a property added here is checked by both.
//!
//! Each function panics when a property fails and otherwise returns whether the input was
//! accepted, so a caller can tell that its mutations reach both outcomes.
//!
//! ```text
//!   bytes ──► nar_validate ──► accepted: size == len, hash == sha256(bytes), same as chunked reads
//!                              rejected: a Malformed error at an offset inside the input
//!   text  ──► narinfo_parse ──► parsed: parse(render(x)) == x, render is a fixed point,
//!                                       fingerprint is well-formed
//!   json  ──► path_info_json ──► parsed: re-rendered as Nix 2.8's array, parses to the same
//! ```

#![allow(dead_code)]

use std::io::Read;

use stowix::nix::nar::{self, NarError, NarSummary};
use stowix::nix::path_info::{parse_path_info_json, PathInfo, PathInfoOutput};
use stowix::nix::{NarInfo, Sha256Hash};

/// Reads its input in pieces whose sizes cycle through `sizes`, so tokens straddle refills
/// at places the fuzzer chooses.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.sizes[self.next % self.sizes.len()] as usize;
        self.next += 1;
        let n = size.max(1).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// `nix::nar::validate` on arbitrary bytes: never panics; when it accepts, the summary is the
/// input's own length and sha256; when it rejects, the error is `Malformed` at an offset within
/// the input; and reading the same bytes in small uneven pieces gives the same answer.
pub fn nar_validate(data: &[u8]) -> bool {
    let whole = nar::validate(data);
    let sizes: Vec<u8> = data
        .iter()
        .take(16)
        .map(|b| b % 23 + 1)
        .chain(std::iter::once(7))
        .collect();
    let pieces = nar::validate(Pieces {
        data,
        sizes: &sizes,
        next: 0,
    });
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => {
            let expected = NarSummary {
                nar_hash: Sha256Hash::digest(data),
                nar_size: data.len() as u64,
            };
            assert_eq!(
                *a, expected,
                "accepted NAR summary is not its own hash/size"
            );
            assert_eq!(*b, expected, "piecewise read gives another summary");
            true
        }
        (
            Err(NarError::Malformed { offset, reason }),
            Err(NarError::Malformed {
                offset: offset2,
                reason: reason2,
            }),
        ) => {
            assert!(
                *offset <= data.len() as u64,
                "error offset {offset} past the end of {} bytes ({reason})",
                data.len()
            );
            assert_eq!(
                (offset, reason),
                (offset2, reason2),
                "piecewise read fails differently"
            );
            assert!(!reason.is_empty());
            false
        }
        _ => panic!("whole read {whole:?} vs piecewise read {pieces:?}"),
    }
}

/// `NarInfo::parse` on arbitrary text: never panics; when it parses, rendering and parsing
/// again gives an equal value, the rendering is a fixed point, and the fingerprint is
/// `1;<path>;sha256:<nix32>;<size>;<refs>`.
pub fn narinfo_parse(text: &str) -> bool {
    let Ok(info) = NarInfo::parse(text) else {
        return false;
    };
    let rendered = info.render();
    assert!(
        rendered.ends_with('\n') && !rendered.contains("\n\n"),
        "rendering has an empty or unterminated line: {rendered:?}"
    );
    let reparsed = NarInfo::parse(&rendered)
        .unwrap_or_else(|e| panic!("rendering does not parse: {e}\n{rendered}"));
    assert_eq!(
        reparsed, info,
        "render -> parse changed the narinfo\n{rendered}"
    );
    assert_eq!(
        reparsed.render(),
        rendered,
        "rendering is not a fixed point"
    );
    check_fingerprint(
        &info.fingerprint(),
        &info.store_path.to_absolute(),
        &info.nar_hash,
        info.nar_size,
        info.references.len(),
    );
    true
}

fn check_fingerprint(fp: &str, path: &str, hash: &Sha256Hash, size: u64, refs: usize) {
    let fields: Vec<&str> = fp.splitn(5, ';').collect();
    assert_eq!(fields.len(), 5, "fingerprint {fp:?}");
    assert_eq!(fields[0], "1");
    assert_eq!(fields[1], path);
    assert_eq!(fields[2], hash.to_typed_nix32());
    assert_eq!(fields[3], size.to_string());
    let listed = if fields[4].is_empty() {
        0
    } else {
        fields[4].split(',').count()
    };
    assert!(
        listed <= refs && (refs == 0) == (listed == 0),
        "fingerprint {fp:?} lists {listed} of {refs} references"
    );
    assert!(!fp.contains('\n'), "fingerprint spans lines: {fp:?}");
}

/// `parse_path_info_json` on arbitrary bytes: never panics; when it parses, every entry's
/// fingerprint is well-formed, and the result rendered as Nix 2.8's array form parses back to
/// the same entries.
pub fn path_info_json(data: &[u8]) -> bool {
    let Ok(out) = parse_path_info_json(data) else {
        return false;
    };
    for info in &out.valid {
        check_fingerprint(
            &info.fingerprint(),
            &info.path.to_absolute(),
            &info.nar_hash,
            info.nar_size,
            info.references.len(),
        );
    }
    let rendered = render_array(&out);
    let again = parse_path_info_json(rendered.as_bytes())
        .unwrap_or_else(|e| panic!("re-rendered path-info does not parse: {e}\n{rendered}"));
    assert_eq!(
        again.valid, out.valid,
        "array form changed entries\n{rendered}"
    );
    assert_eq!(
        again.invalid, out.invalid,
        "array form changed invalid paths"
    );
    true
}

/// The `nix path-info --json` array that Nix 2.4 .. 2.18 print.
pub fn render_array(out: &PathInfoOutput) -> String {
    use serde_json::{json, Value};
    let entry = |info: &PathInfo| {
        let mut entry = json!({
            "path": info.path.to_absolute(),
            "narHash": info.nar_hash.to_sri(),
            "narSize": info.nar_size,
            "references": info.references.iter().map(|r| r.to_absolute()).collect::<Vec<_>>(),
            "signatures": info.signatures,
        });
        if let Some(deriver) = &info.deriver {
            entry["deriver"] = Value::String(deriver.to_absolute());
        }
        if let Some(ca) = &info.ca {
            entry["ca"] = Value::String(ca.clone());
        }
        entry
    };
    let mut items: Vec<Value> = out.valid.iter().map(entry).collect();
    items.extend(
        out.invalid
            .iter()
            .map(|path| json!({"path": path, "valid": false})),
    );
    Value::Array(items).to_string()
}
