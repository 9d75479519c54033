//! Lowercase hex encoding/decoding, plus serde adapters for hashes and bytea.

use crate::Hash;

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decode hex (either case). Errors name what is wrong, not the input.
pub fn decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err(format!("hex string has odd length {}", b.len()));
    }
    b.chunks_exact(2)
        .map(|p| match (nibble(p[0]), nibble(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err("invalid hex digit".to_string()),
        })
        .collect()
}

/// Decode exactly 32 bytes of hex.
pub fn decode_hash(s: &str) -> Result<Hash, String> {
    let v = decode(s)?;
    v.as_slice()
        .try_into()
        .map_err(|_| format!("expected a 32-byte hash (64 hex digits), got {} bytes", v.len()))
}

/// serde adapter: `Hash` as a 64-digit hex string.
pub mod hash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &crate::Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::encode(h))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<crate::Hash, D::Error> {
        let s = <std::borrow::Cow<str>>::deserialize(d)?;
        super::decode_hash(&s).map_err(serde::de::Error::custom)
    }
}

/// serde adapter: `Option<Vec<u8>>` as a hex string or null.
pub mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&super::encode(b)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<std::borrow::Cow<str>>::deserialize(d)? {
            Some(s) => super::decode(&s).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        assert_eq!(encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(decode("00ABff").unwrap(), vec![0x00, 0xab, 0xff]);
        assert!(decode("abc").is_err());
        assert!(decode("zz").is_err());
        assert!(decode_hash("00").is_err());
    }
}
