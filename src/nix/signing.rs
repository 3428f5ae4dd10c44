//! ed25519 keys in Nix's text formats (`name:base64`) and narinfo signatures.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} key: {reason}")]
pub struct KeyError {
    pub kind: &'static str,
    pub reason: String,
}

pub struct SecretKey {
    // private: name + ed25519_dalek::SigningKey
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    // private: name + ed25519_dalek::VerifyingKey
}

impl SecretKey {
    pub fn generate(name: &str) -> Self {
        todo!("{name}")
    }
    /// `name:base64(seed || public key)`, as `nix key generate-secret` writes it.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        todo!("{text}")
    }
    pub fn to_text(&self) -> String {
        todo!()
    }
    pub fn name(&self) -> &str {
        todo!()
    }
    pub fn public_key(&self) -> PublicKey {
        todo!()
    }
    /// `name:base64(signature)`, the value of a narinfo `Sig:` line.
    pub fn sign(&self, fingerprint: &str) -> String {
        todo!("{fingerprint}")
    }
}

impl PublicKey {
    /// `name:base64(32 bytes)`, as in `trusted-public-keys`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        todo!("{text}")
    }
    pub fn to_text(&self) -> String {
        todo!()
    }
    pub fn name(&self) -> &str {
        todo!()
    }
    /// True when `sig` (`name:base64`) is this key's name and a valid signature of `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        todo!("{fingerprint}{sig}")
    }
}
