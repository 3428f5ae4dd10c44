//! nixbase32: Nix's own base-32 alphabet and bit order.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid nixbase32 character {0:?}")]
    InvalidChar(char),
    #[error("nixbase32 string of length {0} does not encode a whole number of bytes")]
    InvalidLength(usize),
}

/// Length of the nixbase32 text for `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    todo!("{len}")
}

pub fn encode(bytes: &[u8]) -> String {
    todo!("{bytes:?}")
}

/// Decodes text that must encode exactly `expected_len` bytes.
pub fn decode(text: &str, expected_len: usize) -> Result<Vec<u8>, Base32Error> {
    todo!("{text}{expected_len}")
}

/// True when `c` is in the nixbase32 alphabet.
pub fn is_base32_char(c: u8) -> bool {
    todo!("{c}")
}
