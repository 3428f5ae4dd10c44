//! nixbase32: Nix's own base-32 alphabet and bit order.
//!
//! The alphabet omits `e`, `o`, `t` and `u` (to avoid accidental words), and the text is
//! written "backwards": character `k` from the left is 5-bit group `len - 1 - k` of the input
//! read as a little-endian bit string. This is not RFC 4648 base32 and the two must never be
//! mixed up. The first character carries the leftover high bits when `8 * len` is not a
//! multiple of 5 (a sha256 has 256 = 51 * 5 + 1 bits, so its first character is `0` or `1`).

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Maps an ASCII byte to its 5-bit value, or `INVALID`.
const DECODE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};
const INVALID: u8 = 0xff;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid nixbase32 character {0:?}")]
    InvalidChar(char),
    #[error("nixbase32 string of length {0} does not encode a whole number of bytes")]
    InvalidLength(usize),
    /// The first character sets bits beyond the end of the data; Nix rejects such text so that
    /// every byte string has exactly one encoding.
    #[error("nixbase32 character {0:?} sets bits beyond the end of the data")]
    NonZeroPadding(char),
}

/// Length of the nixbase32 text for `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for group in (0..len).rev() {
        let bit = group * 5;
        let (i, j) = (bit / 8, bit % 8);
        // The group may straddle two bytes: low bits from byte i, high bits from byte i + 1.
        let low = bytes[i] >> j;
        let high = match bytes.get(i + 1) {
            Some(&next) if j > 3 => next << (8 - j),
            _ => 0,
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes text that must encode exactly `expected_len` bytes.
pub fn decode(text: &str, expected_len: usize) -> Result<Vec<u8>, Base32Error> {
    let chars = text.as_bytes();
    if chars.len() != encoded_len(expected_len) {
        return Err(Base32Error::InvalidLength(chars.len()));
    }
    // Checked up front so the error names the leftmost bad character, as the user reads it.
    if let Some(bad) = text
        .chars()
        .find(|&c| !c.is_ascii() || !is_base32_char(c as u8))
    {
        return Err(Base32Error::InvalidChar(bad));
    }
    let mut out = vec![0u8; expected_len];
    for (group, &c) in chars.iter().rev().enumerate() {
        let digit = DECODE[c as usize];
        let bit = group * 5;
        let (i, j) = (bit / 8, bit % 8);
        out[i] |= digit << j;
        // Bits of this group that spill into the next byte (none when j <= 3).
        let carry = (u16::from(digit) >> (8 - j)) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return Err(Base32Error::NonZeroPadding(c as char)),
            None => {}
        }
    }
    Ok(out)
}

/// True when `c` is in the nixbase32 alphabet.
pub fn is_base32_char(c: u8) -> bool {
    DECODE[c as usize] != INVALID
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
    }

    #[test]
    fn reference_vectors() {
        let empty = Sha256::digest(b"");
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        let abc = Sha256::digest(b"abc");
        assert_eq!(
            encode(&abc),
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
        assert_eq!(
            decode("1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s", 32).unwrap(),
            abc.to_vec()
        );
    }

    #[test]
    fn small_values_and_bit_order() {
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0]), "00");
        assert_eq!(encode(&[1]), "01");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(encode(&[0x20]), "10");
        assert_eq!(encode(&[0xff]), "7z");
        assert_eq!(decode("7z", 1).unwrap(), vec![0xff]);
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..70 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8 ^ 0xa5).collect();
            let text = encode(&bytes);
            assert_eq!(text.len(), encoded_len(len));
            assert_eq!(decode(&text, len).unwrap(), bytes, "len {len}");
            let ones = vec![0xffu8; len];
            assert_eq!(decode(&encode(&ones), len).unwrap(), ones);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let good = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert_eq!(decode(&good[1..], 32), Err(Base32Error::InvalidLength(51)));
        assert_eq!(
            decode(&format!("{good}0"), 32),
            Err(Base32Error::InvalidLength(53))
        );
        for bad in ['e', 'o', 't', 'u', 'A', '-', ' '] {
            let text = format!("0{bad}{}", &good[2..]);
            assert_eq!(decode(&text, 32), Err(Base32Error::InvalidChar(bad)));
        }
        let text = format!("0é{}", &good[3..]);
        assert_eq!(text.len(), 52);
        assert_eq!(decode(&text, 32), Err(Base32Error::InvalidChar('é')));
    }

    #[test]
    fn rejects_non_zero_high_bits() {
        // 256 bits leave one bit in the first character: only `0` and `1` are canonical.
        let rest = "mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert!(decode(&format!("1{rest}"), 32).is_ok());
        assert_eq!(
            decode(&format!("2{rest}"), 32),
            Err(Base32Error::NonZeroPadding('2'))
        );
        assert_eq!(decode("80", 1), Err(Base32Error::NonZeroPadding('8')));
        // 160 bits are exactly 32 groups, so every first character is allowed.
        assert!(decode("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", 20).is_ok());
    }

    #[test]
    fn alphabet_membership() {
        let members: Vec<u8> = (0..=255u8).filter(|&c| is_base32_char(c)).collect();
        assert_eq!(members, ALPHABET.to_vec());
    }
}
