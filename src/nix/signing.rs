//! ed25519 keys in Nix's text formats (`name:base64`) and narinfo signatures.
//!
//! A secret key is `name:base64(32-byte seed || 32-byte public key)` (libsodium's layout, as
//! `nix key generate-secret` writes it), a public key `name:base64(32 bytes)`, a signature
//! `name:base64(64 bytes)` over a narinfo [fingerprint](super::narinfo::NarInfo::fingerprint).
//! Ed25519 is deterministic, so signing the same fingerprint twice gives the same text.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} key: {reason}")]
pub struct KeyError {
    pub kind: &'static str,
    pub reason: String,
}

pub struct SecretKey {
    name: String,
    key: SigningKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

/// Checks a key name: non-empty and without `:` (the separator of the text forms), the same
/// rule Nix applies.
pub fn check_key_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("key name is empty".into());
    }
    if name.contains(':') {
        return Err(format!("key name {name:?} contains ':'"));
    }
    Ok(())
}

impl SecretKey {
    /// A new random key.
    ///
    /// # Panics
    /// If `name` fails [`check_key_name`]; callers taking a name from a user check it first.
    pub fn generate(name: &str) -> Self {
        if let Err(reason) = check_key_name(name) {
            panic!("SecretKey::generate: {reason}");
        }
        Self {
            name: name.to_owned(),
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// `name:base64(seed || public key)`, as `nix key generate-secret` writes it.
    ///
    /// Surrounding whitespace (a trailing newline in a key file) is ignored.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let err = |reason: String| KeyError {
            kind: "secret",
            reason,
        };
        // The key material is secret: errors name the key, never echo the text.
        let (name, bytes) = split_key(text).map_err(err)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| {
            err(format!(
                "key {name:?} has {} bytes, expected 64 (seed and public key)",
                b.len()
            ))
        })?;
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| {
            err(format!(
                "key {name:?}: its public half does not match its seed"
            ))
        })?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    pub fn to_text(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// `name:base64(signature)`, the value of a narinfo `Sig:` line.
    pub fn sign(&self, fingerprint: &str) -> String {
        let signature = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(signature.to_bytes()))
    }
}

impl std::fmt::Debug for SecretKey {
    /// Shows the name only, so a key cannot leak into logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    /// `name:base64(32 bytes)`, as in `trusted-public-keys`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let err = |reason: String| KeyError {
            kind: "public",
            reason,
        };
        let (name, bytes) = split_key(text).map_err(err)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            err(format!("key {name:?} has {} bytes, expected 32", b.len()))
        })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| err(format!("key {name:?} is not an ed25519 point")))?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` (`name:base64`) is this key's name and a valid signature of `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Some(bytes) = BASE64
            .decode(b64)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        // Strict verification refuses small-order points and non-canonical encodings, as
        // libsodium (which Nix uses) does.
        self.key
            .verify_strict(fingerprint.as_bytes(), &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    /// The text form, `name:base64`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// Splits `name:base64` and decodes the key bytes.
fn split_key(text: &str) -> Result<(&str, Vec<u8>), String> {
    let text = text.trim();
    let (name, b64) = text
        .split_once(':')
        .ok_or_else(|| "expected `name:base64`".to_owned())?;
    check_key_name(name)?;
    let bytes = BASE64
        .decode(b64)
        .map_err(|e| format!("key {name:?} is not valid base64: {e}"))?;
    Ok((name, bytes))
}

/// The first of `keys` that made a valid signature of `fingerprint` among `signatures`: the
/// signature is checked, not just its key name.
pub fn signed_by<'k>(
    keys: &'k [PublicKey],
    fingerprint: &str,
    signatures: &[String],
) -> Option<&'k PublicKey> {
    keys.iter()
        .find(|key| signatures.iter().any(|sig| key.verify(fingerprint, sig)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix key generate-secret --key-name test-1` (Nix 2.8) and
    // `nix key convert-secret-to-public`.
    const NIX_SECRET: &str = "test-1:djWq8t1thX2n9MhN8/EW7E6Wi/YQZEnZl34yFMc8WFLtzbnDomtCkZHD305/NfiRJK+5h2Yt21i0LkJhC9lvaw==";
    const NIX_PUBLIC: &str = "test-1:7c25w6JrQpGRw99OfzX4kSSvuYdmLdtYtC5CYQvZb2s=";

    #[test]
    fn parses_keys_made_by_nix() {
        let secret = SecretKey::parse(NIX_SECRET).unwrap();
        assert_eq!(secret.name(), "test-1");
        assert_eq!(secret.to_text(), NIX_SECRET);
        let public = PublicKey::parse(NIX_PUBLIC).unwrap();
        assert_eq!(public.name(), "test-1");
        assert_eq!(public.to_text(), NIX_PUBLIC);
        assert_eq!(public.to_string(), NIX_PUBLIC);
        assert_eq!(secret.public_key(), public);
        // A key file written with a trailing newline.
        assert_eq!(
            PublicKey::parse(&format!("{NIX_PUBLIC}\n")).unwrap(),
            public
        );
        assert!(SecretKey::parse(&format!("{NIX_SECRET}\n")).is_ok());
    }

    #[test]
    fn sign_and_verify() {
        let secret = SecretKey::generate("cache.example.org-1");
        let public = secret.public_key();
        let fp = "1;/nix/store/aydqv8w8w8z0kdv2y7cs5mxhw8j7dh98-a+b?c=d;sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h;120;";
        let sig = secret.sign(fp);
        assert!(sig.starts_with("cache.example.org-1:"));
        assert_eq!(sig.len(), "cache.example.org-1:".len() + 88);
        assert_eq!(secret.sign(fp), sig, "ed25519 is deterministic");
        assert!(public.verify(fp, &sig));
        assert!(!public.verify(&format!("{fp}x"), &sig));
        let renamed = sig.replacen("cache.example.org-1", "other-1", 1);
        assert!(!public.verify(fp, &renamed));
        assert!(!public.verify(fp, "cache.example.org-1:AAAA"));
        assert!(!public.verify(fp, "cache.example.org-1:not base64!"));
        assert!(!public.verify(fp, "no colon"));
        let other = SecretKey::generate("cache.example.org-1");
        assert!(!other.public_key().verify(fp, &sig));
        // Round trip through text.
        let reparsed = SecretKey::parse(&secret.to_text()).unwrap();
        assert_eq!(reparsed.sign(fp), sig);
        assert_eq!(PublicKey::parse(&public.to_text()).unwrap(), public);
    }

    #[test]
    fn matches_a_signature_made_by_nix() {
        // `nix store sign --key-file` with NIX_SECRET on the path that `nix-store --add` makes
        // of a file containing "hi\n" named `a+b?c=d`, as `nix path-info --json --sigs` shows.
        let fp = "1;/nix/store/aydqv8w8w8z0kdv2y7cs5mxhw8j7dh98-a+b?c=d;\
                  sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h;120;";
        let nix_sig = "test-1:abW3+qxQxfS+gBOhFph8YEwriASlO1R83KbpG0HkVYVZubYZdFbRawQJhyZrK9A4+bzT5692YrdYNqXcWuVuDQ==";
        assert_eq!(SecretKey::parse(NIX_SECRET).unwrap().sign(fp), nix_sig);
        assert!(PublicKey::parse(NIX_PUBLIC).unwrap().verify(fp, nix_sig));
    }

    #[test]
    fn rejects_bad_keys() {
        let (_, secret_b64) = NIX_SECRET.split_once(':').unwrap();
        let (_, public_b64) = NIX_PUBLIC.split_once(':').unwrap();
        for (text, expected) in [
            (format!(":{secret_b64}"), "empty"),
            (secret_b64.to_string(), "name:base64"),
            (format!("a:b:{secret_b64}"), "base64"),
            ("test-1:".to_string(), "0 bytes"),
            (format!("test-1:{public_b64}"), "32 bytes, expected 64"),
            (format!("test-1:{}", &secret_b64[1..]), "base64"),
        ] {
            let err = SecretKey::parse(&text).unwrap_err();
            assert_eq!(err.kind, "secret");
            assert!(err.reason.contains(expected), "{text}: {err}");
            assert!(
                !err.to_string().contains(&secret_b64[..20]),
                "leaks the key: {err}"
            );
        }
        // Seed and public half that do not belong together.
        let mut bytes = BASE64.decode(secret_b64).unwrap();
        bytes[63] ^= 1;
        let err = SecretKey::parse(&format!("test-1:{}", BASE64.encode(&bytes))).unwrap_err();
        assert!(err.reason.contains("does not match"), "{err}");

        for (text, expected) in [
            (format!("test-1:{secret_b64}"), "64 bytes, expected 32"),
            (format!(":{public_b64}"), "empty"),
            ("test-1".to_string(), "name:base64"),
        ] {
            let err = PublicKey::parse(&text).unwrap_err();
            assert_eq!(err.kind, "public");
            assert!(err.reason.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    #[should_panic(expected = "contains ':'")]
    fn generate_refuses_bad_names() {
        let _ = SecretKey::generate("a:b");
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let secret = SecretKey::parse(NIX_SECRET).unwrap();
        let shown = format!("{secret:?}");
        assert!(shown.contains("test-1"));
        assert!(!shown.contains("djWq"));
    }
}
