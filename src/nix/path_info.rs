//! `nix path-info --recursive --json` output, in both of its forms: the array of Nix <= 2.18
//! and the object keyed by path of Nix 2.19+.
//!
//! | Nix | shape | paths | `ca` | `signatures` |
//! |---|---|---|---|---|
//! | 2.4 .. 2.18 | `[{"path": .., ..}]`, invalid: `{"path": .., "valid": false}` | absolute | string | strings |
//! | 2.19 .. | `{"/nix/store/..": {..} \| null}` (2.33+ adds `version`/`storeDir` per entry) | absolute | string | strings |
//! | 2.33+ `--json-format 2`/`3` | `{"version": N, "storeDir": .., "info": {"<basename>": {..} \| null}}` | basenames | `{"method", "hash"}` | strings / `{"keyName", "sig"}` |
//!
//! Every field but `narHash` and `narSize` may be missing or null. Paths are accepted as
//! basenames or absolute anywhere. A structured `ca` is turned back into the text form
//! narinfo carries (`{"method": "nar", "hash": "sha256-.."}` -> `fixed:r:sha256:<nix32>`;
//! `flat` -> `fixed:`, `text` -> `text:`, `git` -> `fixed:git:`), which is what Nix's own
//! `renderContentAddress` produces for it. Hashes may be SRI strings, `sha256:<nix32|hex>`, or
//! the `{"algorithm", "format", "hash"}` objects some Nix 2.33 pre-releases wrote.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::hash::decode_hex;
use super::store_path::STORE_DIR;
use super::{base32, Sha256Hash, StorePath};

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

impl PathInfo {
    /// The narinfo signature fingerprint of this path (see [`super::narinfo::fingerprint`]).
    pub fn fingerprint(&self) -> String {
        super::narinfo::fingerprint(&self.path, &self.nar_hash, self.nar_size, &self.references)
    }
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
    /// As absolute paths (the form a user passes on the command line).
    pub invalid: Vec<String>,
}

pub fn parse_path_info_json(json: &[u8]) -> Result<PathInfoOutput, PathInfoError> {
    let value: Value =
        serde_json::from_slice(json).map_err(|e| PathInfoError::Json(e.to_string()))?;
    let mut out = PathInfoOutput::default();
    match value {
        Value::Array(items) => {
            for item in items {
                let Value::Object(entry) = item else {
                    return Err(PathInfoError::Json(format!(
                        "expected an object in the array, found {item}"
                    )));
                };
                let path = match entry.get("path") {
                    Some(Value::String(path)) => path.as_str(),
                    _ => {
                        return Err(PathInfoError::Entry(format!(
                            "object without a \"path\": {}",
                            Value::Object(entry.clone())
                        )))
                    }
                };
                if entry.get("valid") == Some(&Value::Bool(false)) {
                    out.invalid.push(absolute(path));
                } else {
                    out.valid.push(parse_entry(path, &entry)?);
                }
            }
        }
        Value::Object(top) => {
            let entries = match (top.get("info"), top.get("version")) {
                (Some(Value::Object(info)), Some(_)) => {
                    check_store_dir(top.get("storeDir"), "the output")?;
                    info
                }
                _ => &top,
            };
            for (path, entry) in entries {
                match entry {
                    Value::Null => out.invalid.push(absolute(path)),
                    Value::Object(entry) => out.valid.push(parse_entry(path, entry)?),
                    other => {
                        return Err(PathInfoError::Entry(format!(
                            "{path}: expected an object or null, found {other}"
                        )))
                    }
                }
            }
        }
        other => {
            return Err(PathInfoError::Json(format!(
                "expected an array or an object, found {other}"
            )))
        }
    }
    Ok(out)
}

fn parse_entry(path: &str, entry: &Map<String, Value>) -> Result<PathInfo, PathInfoError> {
    let bad = |what: String| PathInfoError::Entry(format!("{path}: {what}"));
    let field = |key: &str| entry.get(key).filter(|v| !v.is_null());
    check_store_dir(entry.get("storeDir"), path)?;

    let own_path = store_path(path).map_err(|e| bad(e.to_string()))?;
    let nar_hash = match field("narHash") {
        Some(value) => match parse_hash(value).map_err(|e| bad(format!("narHash: {e}")))? {
            (SHA256, bytes) => Sha256Hash(bytes.try_into().expect("length checked by parse_hash")),
            (algorithm, _) => return Err(bad(format!("narHash is {algorithm}, not sha256"))),
        },
        None => return Err(bad("no narHash".into())),
    };
    let nar_size = field("narSize")
        .ok_or_else(|| bad("no narSize".into()))?
        .as_u64()
        .ok_or_else(|| bad(format!("narSize {} is not a byte count", entry["narSize"])))?;
    let mut references = strings(field("references"), "references")
        .map_err(bad)?
        .iter()
        .map(|r| store_path(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("references: {e}")))?;
    references.sort_unstable();
    references.dedup();
    let deriver = match field("deriver") {
        Some(Value::String(d)) => Some(store_path(d).map_err(|e| bad(format!("deriver: {e}")))?),
        Some(other) => return Err(bad(format!("deriver {other} is not a string"))),
        None => None,
    };
    let ca = match field("ca") {
        Some(Value::String(ca)) => Some(ca.clone()),
        Some(Value::Object(ca)) => Some(render_ca(ca).map_err(|e| bad(format!("ca: {e}")))?),
        Some(other) => return Err(bad(format!("ca {other} is neither a string nor an object"))),
        None => None,
    };
    let signatures = match field("signatures") {
        Some(Value::Array(sigs)) => sigs
            .iter()
            .map(signature)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("signatures: {e}")))?,
        Some(other) => return Err(bad(format!("signatures {other} is not an array"))),
        None => Vec::new(),
    };
    Ok(PathInfo {
        path: own_path,
        nar_hash,
        nar_size,
        references,
        deriver,
        ca,
        signatures,
    })
}

/// A store path given as a basename (`--json-format 2`) or absolute.
fn store_path(text: &str) -> Result<StorePath, super::store_path::StorePathError> {
    if text.starts_with('/') {
        StorePath::from_absolute(text)
    } else {
        StorePath::from_basename(text)
    }
}

fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{STORE_DIR}/{path}")
    }
}

fn check_store_dir(value: Option<&Value>, whose: &str) -> Result<(), PathInfoError> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(dir)) if dir == STORE_DIR => Ok(()),
        Some(other) => Err(PathInfoError::Entry(format!(
            "{whose}: store directory {other} is not {STORE_DIR}"
        ))),
    }
}

fn strings<'a>(value: Option<&'a Value>, what: &str) -> Result<Vec<&'a str>, String> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| format!("{what}: {item} is not a string"))
            })
            .collect(),
        Some(other) => Err(format!("{what}: {other} is not an array")),
    }
}

/// `"name:base64"`, or `{"keyName": .., "sig": ..}` (`--json-format 3`).
fn signature(value: &Value) -> Result<String, String> {
    match value {
        Value::String(sig) => Ok(sig.clone()),
        Value::Object(sig) => match (sig.get("keyName"), sig.get("sig")) {
            (Some(Value::String(name)), Some(Value::String(sig))) => Ok(format!("{name}:{sig}")),
            _ => Err(format!("{value} has no string keyName and sig")),
        },
        other => Err(format!("{other} is neither a string nor an object")),
    }
}

const SHA256: &str = "sha256";

/// The algorithms Nix knows: canonical name and digest size.
fn algorithm(name: &str) -> Option<(&'static str, usize)> {
    match name {
        "md5" => Some(("md5", 16)),
        "sha1" => Some(("sha1", 20)),
        "sha256" => Some((SHA256, 32)),
        "sha512" => Some(("sha512", 64)),
        "blake3" => Some(("blake3", 32)),
        _ => None,
    }
}

/// A hash in any JSON form Nix has written: SRI `algo-base64`, `algo:<nix32|hex|base64>`, or
/// `{"algorithm", "format", "hash"}`. Returns the algorithm name and digest bytes.
fn parse_hash(value: &Value) -> Result<(&'static str, Vec<u8>), String> {
    let (name, format, text) = match value {
        Value::String(s) => match (s.split_once('-'), s.split_once(':')) {
            (Some((a, t)), _) if algorithm(a).is_some() => (a, "base64", t),
            (_, Some((a, t))) => (a, "", t),
            _ => return Err(format!("{s:?} has no algorithm prefix")),
        },
        Value::Object(h) => match (h.get("algorithm"), h.get("format"), h.get("hash")) {
            (Some(Value::String(a)), Some(Value::String(f)), Some(Value::String(t))) => {
                let f = if f == "sri" { "base64" } else { f.as_str() };
                (a.as_str(), f, t.as_str())
            }
            _ => {
                return Err(format!(
                    "{value} is not an {{algorithm, format, hash}} object"
                ))
            }
        },
        other => return Err(format!("{other} is not a hash")),
    };
    let (algorithm, len) =
        algorithm(name).ok_or_else(|| format!("unknown hash algorithm {name:?}"))?;
    // With no explicit format, tell the encoding apart by length, as Nix does.
    let format = match format {
        "" if text.len() == base32::encoded_len(len) => "nix32",
        "" if text.len() == 2 * len => "base16",
        "" => "base64",
        f => f,
    };
    let bytes = match format {
        "nix32" | "base32" => base32::decode(text, len).map_err(|e| e.to_string())?,
        "base16" => decode_hex(text).ok_or_else(|| format!("{text:?} is not hexadecimal"))?,
        "base64" => BASE64.decode(text).map_err(|e| format!("{text:?}: {e}"))?,
        other => return Err(format!("unknown hash format {other:?}")),
    };
    if bytes.len() != len {
        return Err(format!("{text:?} is not a {algorithm} digest"));
    }
    Ok((algorithm, bytes))
}

/// `{"method": .., "hash": ..}` back to the text form narinfo's `CA:` uses.
fn render_ca(ca: &Map<String, Value>) -> Result<String, String> {
    let prefix = match ca.get("method").and_then(Value::as_str) {
        Some("nar") => "fixed:r:",
        Some("flat") => "fixed:",
        Some("text") => "text:",
        Some("git") => "fixed:git:",
        _ => return Err(format!("unknown method in {}", Value::Object(ca.clone()))),
    };
    let hash = ca
        .get("hash")
        .ok_or_else(|| format!("no hash in {}", Value::Object(ca.clone())))?;
    let (algorithm, bytes) = parse_hash(hash)?;
    Ok(format!("{prefix}{algorithm}:{}", base32::encode(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "aydqv8w8w8z0kdv2y7cs5mxhw8j7dh98-a+b?c=d";
    const DEP: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar";
    const DRV: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv";
    const SRI: &str = "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=";
    const NIX32: &str = "1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h";
    const SIG: &str = "test-1:abW3+qxQxfS+gBOhFph8YEwriASlO1R83KbpG0HkVYVZubYZdFbRawQJhyZrK9A4+bzT5692YrdYNqXcWuVuDQ==";

    fn parse(json: &str) -> PathInfoOutput {
        parse_path_info_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{json}"))
    }

    fn expected() -> PathInfo {
        PathInfo {
            path: StorePath::from_basename(P).unwrap(),
            nar_hash: Sha256Hash::parse(SRI).unwrap(),
            nar_size: 120,
            references: vec![
                StorePath::from_basename(P).unwrap(),
                StorePath::from_basename(DEP).unwrap(),
            ],
            deriver: Some(StorePath::from_basename(DRV).unwrap()),
            ca: Some(format!("fixed:r:sha256:{NIX32}")),
            signatures: vec![SIG.to_owned()],
        }
    }

    #[test]
    fn array_form_of_nix_2_8() {
        // As printed by Nix 2.8 `nix path-info --json --sigs`, plus an invalid path.
        let out = parse(&format!(
            r#"[{{"path":"/nix/store/00000000000000000000000000000000-x","valid":false}},
               {{"path":"/nix/store/{P}","narHash":"{SRI}","narSize":120,
                 "references":["/nix/store/{P}","/nix/store/{DEP}"],
                 "ca":"fixed:r:sha256:{NIX32}","deriver":"/nix/store/{DRV}",
                 "registrationTime":1795694456,"ultimate":true,"signatures":["{SIG}"]}}]"#
        ));
        assert_eq!(
            out.invalid,
            ["/nix/store/00000000000000000000000000000000-x"]
        );
        assert_eq!(out.valid, [expected()]);
        assert_eq!(
            out.valid[0].fingerprint(),
            format!("1;/nix/store/{P};sha256:{NIX32};120;/nix/store/{P},/nix/store/{DEP}")
        );
    }

    #[test]
    fn array_form_minimal_entry() {
        let out = parse(&format!(
            r#"[{{"path":"/nix/store/{P}","narHash":"sha256:{NIX32}","narSize":120,"references":[]}}]"#
        ));
        let info = &out.valid[0];
        assert!(info.references.is_empty() && info.signatures.is_empty());
        assert_eq!((info.deriver.as_ref(), info.ca.as_ref()), (None, None));
        assert_eq!(info.nar_hash, Sha256Hash::parse(SRI).unwrap());
    }

    #[test]
    fn object_form_of_nix_2_19_and_later() {
        // 2.23+ writes every field, with nulls; 2.33+ adds storeDir and version per entry.
        let out = parse(&format!(
            r#"{{"/nix/store/{P}":{{"ca":"fixed:r:sha256:{NIX32}","deriver":"/nix/store/{DRV}",
                 "narHash":"{SRI}","narSize":120,"references":["/nix/store/{DEP}","/nix/store/{P}"],
                 "registrationTime":23423,"signatures":["{SIG}"],"storeDir":"/nix/store",
                 "ultimate":true,"version":1,"closureSize":4096}},
               "/nix/store/{DEP}":{{"ca":null,"deriver":null,"narHash":"{SRI}","narSize":96,
                 "references":[],"registrationTime":null,"signatures":[],"ultimate":false}},
               "/nix/store/00000000000000000000000000000000-x":null}}"#
        ));
        assert_eq!(
            out.invalid,
            ["/nix/store/00000000000000000000000000000000-x"]
        );
        assert_eq!(out.valid.len(), 2);
        let info = out.valid.iter().find(|i| i.path.basename() == P).unwrap();
        assert_eq!(info, &expected());
        let dep = out.valid.iter().find(|i| i.path.basename() == DEP).unwrap();
        assert_eq!(
            (dep.nar_size, dep.deriver.as_ref(), dep.ca.as_ref()),
            (96, None, None)
        );
    }

    #[test]
    fn versioned_form_with_basenames_and_structured_ca() {
        // `--json-format 2` (Nix 2.33+), and 3 with structured signatures.
        for (version, sig) in [
            (2, format!("\"{SIG}\"")),
            (
                3,
                format!(
                    r#"{{"keyName":"test-1","sig":"{}"}}"#,
                    SIG.split_once(':').unwrap().1
                ),
            ),
        ] {
            let out = parse(&format!(
                r#"{{"version":{version},"storeDir":"/nix/store","info":{{
                    "{P}":{{"ca":{{"method":"nar","hash":"{SRI}"}},"deriver":"{DRV}",
                      "narHash":"{SRI}","narSize":120,"references":["{DEP}","{P}"],
                      "signatures":[{sig}],"storeDir":"/nix/store","version":{version}}},
                    "00000000000000000000000000000000-x":null}}}}"#
            ));
            assert_eq!(out.valid, [expected()], "version {version}");
            assert_eq!(
                out.invalid,
                ["/nix/store/00000000000000000000000000000000-x"]
            );
        }
    }

    #[test]
    fn structured_ca_methods_and_hash_forms() {
        let sha1_hex = "a9993e364706816aba3e25717850c26c9cd0d89d"; // sha1("abc")
        let sha1_nix32 = base32::encode(&decode_hex(sha1_hex).unwrap());
        let cases = [
            (
                format!(r#"{{"method":"nar","hash":"{SRI}"}}"#),
                format!("fixed:r:sha256:{NIX32}"),
            ),
            (
                format!(r#"{{"method":"flat","hash":"{SRI}"}}"#),
                format!("fixed:sha256:{NIX32}"),
            ),
            (
                format!(r#"{{"method":"text","hash":"{SRI}"}}"#),
                format!("text:sha256:{NIX32}"),
            ),
            (
                format!(r#"{{"method":"git","hash":"{SRI}"}}"#),
                format!("fixed:git:sha256:{NIX32}"),
            ),
            (
                format!(
                    r#"{{"method":"flat","hash":{{"algorithm":"sha1","format":"base16","hash":"{sha1_hex}"}}}}"#
                ),
                format!("fixed:sha1:{sha1_nix32}"),
            ),
            (
                format!(r#"{{"method":"nar","hash":"sha1:{sha1_hex}"}}"#),
                format!("fixed:r:sha1:{sha1_nix32}"),
            ),
        ];
        for (ca, rendered) in cases {
            let json =
                format!(r#"[{{"path":"/nix/store/{P}","narHash":"{SRI}","narSize":1,"ca":{ca}}}]"#);
            assert_eq!(
                parse(&json).valid[0].ca.as_deref(),
                Some(rendered.as_str()),
                "{ca}"
            );
        }
    }

    #[test]
    fn structured_nar_hash() {
        let hex = Sha256Hash::parse(SRI).unwrap().to_hex();
        let json = format!(
            r#"{{"/nix/store/{P}":{{"narHash":{{"algorithm":"sha256","format":"base16","hash":"{hex}"}},"narSize":1}}}}"#
        );
        assert_eq!(
            parse(&json).valid[0].nar_hash,
            Sha256Hash::parse(SRI).unwrap()
        );
    }

    #[test]
    fn empty_outputs() {
        assert!(parse("[]").valid.is_empty());
        assert!(parse("{}").valid.is_empty());
        assert!(parse(r#"{"version":2,"storeDir":"/nix/store","info":{}}"#)
            .valid
            .is_empty());
    }

    #[test]
    fn rejections() {
        let entry = |fields: &str| format!(r#"[{{"path":"/nix/store/{P}",{fields}}}]"#);
        let cases = [
            ("not json".to_string(), "cannot parse"),
            ("42".to_string(), "expected an array or an object"),
            ("[42]".to_string(), "expected an object"),
            (r#"[{"narSize":1}]"#.to_string(), "without a \"path\""),
            (entry(r#""narSize":1"#), "no narHash"),
            (entry(&format!(r#""narHash":"{SRI}""#)), "no narSize"),
            (
                entry(&format!(r#""narHash":"{SRI}","narSize":-1"#)),
                "not a byte count",
            ),
            (
                entry(r#""narHash":"sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0=","narSize":1"#),
                "not sha256",
            ),
            (entry(r#""narHash":"sha256-AAAA","narSize":1"#), "narHash"),
            (
                entry(&format!(
                    r#""narHash":"{SRI}","narSize":1,"references":["/usr/bin"]"#
                )),
                "references",
            ),
            (
                entry(&format!(r#""narHash":"{SRI}","narSize":1,"deriver":5"#)),
                "deriver",
            ),
            (
                entry(&format!(
                    r#""narHash":"{SRI}","narSize":1,"ca":{{"method":"zip","hash":"{SRI}"}}"#
                )),
                "unknown method",
            ),
            (
                format!(r#"{{"/gnu/store/{P}":{{"narHash":"{SRI}","narSize":1}}}}"#),
                "not in /nix/store",
            ),
            (
                r#"{"version":2,"storeDir":"/gnu/store","info":{}}"#.to_string(),
                "store directory",
            ),
            (
                format!(r#"{{"/nix/store/{P}":true}}"#),
                "expected an object or null",
            ),
        ];
        for (json, expected) in cases {
            let err = parse_path_info_json(json.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expected), "{json}: {err}");
        }
    }
}
