//! SHA-256 digests as Nix writes them: `sha256:<nix32>` in narinfo, SRI `sha256-<base64>` in
//! `nix path-info --json`, and `sha256:<hex>` accepted on input.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::base32;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid sha256 hash {text:?}: {reason}")]
pub struct HashParseError {
    pub text: String,
    pub reason: &'static str,
}

const NIX32_LEN: usize = 52;
const HEX_LEN: usize = 64;
const BASE64_LEN: usize = 44;

impl Sha256Hash {
    pub fn digest(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Accepts `sha256:<nix32>`, `sha256:<hex>`, `sha256-<base64>` (SRI).
    ///
    /// Like Nix, `sha256:<base64>` is accepted too (the encoding is told apart by length).
    pub fn parse(text: &str) -> Result<Self, HashParseError> {
        let err = |reason| HashParseError {
            text: text.to_owned(),
            reason,
        };
        if let Some(b64) = text.strip_prefix("sha256-") {
            return Self::from_base64(b64)
                .ok_or_else(|| err("SRI hash is not 44 characters of base64"));
        }
        let Some(body) = text.strip_prefix("sha256:") else {
            return Err(err("expected a `sha256:` or `sha256-` prefix"));
        };
        match body.len() {
            NIX32_LEN => Self::from_nix32(body).map_err(|e| HashParseError {
                text: text.to_owned(),
                reason: match e {
                    base32::Base32Error::NonZeroPadding(_) => "nixbase32 sets bits beyond 256",
                    _ => "invalid nixbase32",
                },
            }),
            HEX_LEN => Self::from_hex(body).ok_or_else(|| err("invalid hexadecimal")),
            BASE64_LEN => Self::from_base64(body).ok_or_else(|| err("invalid base64")),
            _ => Err(err(
                "expected 52 nixbase32, 64 hexadecimal or 44 base64 characters",
            )),
        }
    }

    /// The 52 nixbase32 characters without a prefix, as in a NAR URL `nar/<nix32>.nar`.
    pub fn from_nix32(text: &str) -> Result<Self, base32::Base32Error> {
        let bytes = base32::decode(text, 32)?;
        Ok(Self(bytes.try_into().expect("decode returns 32 bytes")))
    }

    /// 64 hexadecimal digits, either case, without a prefix.
    pub fn from_hex(text: &str) -> Option<Self> {
        Some(Self(decode_hex(text)?.try_into().ok()?))
    }

    fn from_base64(text: &str) -> Option<Self> {
        if text.len() != BASE64_LEN {
            return None;
        }
        let bytes = BASE64.decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// The 52 nixbase32 characters without prefix.
    pub fn to_nix32(&self) -> String {
        base32::encode(&self.0)
    }

    /// `sha256:<nix32>`, the form narinfo and fingerprints use.
    pub fn to_typed_nix32(&self) -> String {
        format!("sha256:{}", self.to_nix32())
    }

    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(self.0))
    }

    /// 64 lowercase hexadecimal digits without prefix (what `sha256sum` prints).
    pub fn to_hex(&self) -> String {
        use std::fmt::Write as _;
        self.0
            .iter()
            .fold(String::with_capacity(HEX_LEN), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    }
}

/// Hexadecimal digits, either case, to bytes; `None` for an odd length or a non-digit.
pub(super) fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes().chunks_exact(2);
    if !digits.remainder().is_empty() {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    digits
        .map(|pair| Some((digit(pair[0])? << 4) | digit(pair[1])?))
        .collect()
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

impl std::str::FromStr for Sha256Hash {
    type Err = HashParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// An `io::Write` that hashes and counts what passes through it to an inner writer.
pub struct HashingWriter<W> {
    pub inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Bytes written so far and their sha256; consumes the writer and returns the inner one.
    pub fn finish(self) -> (W, Sha256Hash, u64) {
        (
            self.inner,
            Sha256Hash(self.hasher.finalize().into()),
            self.written,
        )
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Hash only what the inner writer accepted, so a short write is not counted twice.
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // Forwarded so an inner writer with a cheaper write_all (e.g. one that takes whole
        // chunks) is used as such. After an error the count and hash are meaningless anyway:
        // the inner writer may hold part of `buf`.
        self.inner.write_all(buf)?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const ABC_NIX32: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    const ABC_HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const ABC_B64: &str = "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";

    #[test]
    fn all_forms_of_one_hash() {
        let h = Sha256Hash::digest(b"abc");
        assert_eq!(h.to_nix32(), ABC_NIX32);
        assert_eq!(h.to_typed_nix32(), format!("sha256:{ABC_NIX32}"));
        assert_eq!(h.to_string(), format!("sha256:{ABC_NIX32}"));
        assert_eq!(h.to_sri(), format!("sha256-{ABC_B64}"));
        assert_eq!(h.to_hex(), ABC_HEX);
        assert_eq!(format!("{h:?}"), format!("Sha256Hash(sha256:{ABC_NIX32})"));
        for text in [
            format!("sha256:{ABC_NIX32}"),
            format!("sha256:{ABC_HEX}"),
            format!("sha256:{}", ABC_HEX.to_uppercase()),
            format!("sha256-{ABC_B64}"),
            format!("sha256:{ABC_B64}"),
        ] {
            assert_eq!(Sha256Hash::parse(&text), Ok(h), "{text}");
        }
        assert_eq!(Sha256Hash::from_nix32(ABC_NIX32), Ok(h));
        assert_eq!(ABC_NIX32.len(), 52);
    }

    #[test]
    fn reference_nar_hash_vectors_parse() {
        // narHash of the NAR of a file containing "hello\n" (from the reference doc).
        let h = Sha256Hash::parse("sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
            .unwrap();
        assert_eq!(Sha256Hash::parse(&h.to_sri()), Ok(h));
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ABC_NIX32.to_string(),                   // no prefix
            format!("sha512:{ABC_NIX32}"),           // other algorithm
            format!("SHA256:{ABC_NIX32}"),           // prefix is case-sensitive
            format!("sha256:{}", &ABC_NIX32[1..]),   // short
            format!("sha256:{ABC_NIX32}0"),          // long
            format!("sha256:{}e", &ABC_NIX32[..51]), // 'e' is not nixbase32
            format!("sha256:z{}", &ABC_NIX32[1..]),  // bits beyond 256
            format!("sha256:{}g", &ABC_HEX[..63]),   // bad hex digit
            format!("sha256-{}", &ABC_B64[..43]),    // SRI without padding
            format!("sha256-{}!", &ABC_B64[..43]),   // bad base64
            format!("sha256-{ABC_NIX32}"),           // SRI must be base64
            "sha256:".to_string(),
            String::new(),
        ];
        for text in cases {
            let err = Sha256Hash::parse(&text).unwrap_err();
            assert_eq!(err.text, text);
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }

    #[test]
    fn hashing_writer_counts_and_hashes() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"a").unwrap();
        assert_eq!(w.write(b"bc").unwrap(), 2);
        assert_eq!(w.bytes_written(), 3);
        w.flush().unwrap();
        let (inner, hash, size) = w.finish();
        assert_eq!(inner, b"abc");
        assert_eq!(size, 3);
        assert_eq!(hash, Sha256Hash::digest(b"abc"));
    }

    #[test]
    fn hashing_writer_hashes_only_accepted_bytes() {
        /// Accepts at most 2 bytes a call.
        struct Trickle(Vec<u8>);
        impl Write for Trickle {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = buf.len().min(2);
                self.0.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = HashingWriter::new(Trickle(Vec::new()));
        assert_eq!(w.write(b"abcdef").unwrap(), 2);
        w.write_all(b"cdef").unwrap();
        let (inner, hash, size) = w.finish();
        assert_eq!(inner.0, b"abcdef");
        assert_eq!((hash, size), (Sha256Hash::digest(b"abcdef"), 6));
    }
}
