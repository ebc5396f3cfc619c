//! The `Hash` type: BLAKE3-256, used for chunk ids, tree nodes and roots.

use std::fmt;
use std::str::FromStr;

/// A BLAKE3-256 digest.
///
/// Ordered bytewise, so sorting hashes sorts the nodes of a namespace trie.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, std::hash::Hash, Default)]
pub struct Hash([u8; 32]);

impl Hash {
    /// Thirty-two zero bytes. Also the root of every empty tree: no BLAKE3
    /// output is known to equal it, so it cannot collide with a real node.
    pub const ZERO: Hash = Hash([0; 32]);

    /// Length of a hash in bytes.
    pub const LEN: usize = 32;

    pub const fn from_bytes(bytes: [u8; 32]) -> Hash {
        Hash(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Reads a hash from the first 32 bytes of `bytes`, if there are that many.
    pub fn from_slice(bytes: &[u8]) -> Option<Hash> {
        let arr: [u8; 32] = bytes.get(..32)?.try_into().ok()?;
        Some(Hash(arr))
    }

    /// The first 8 hex digits, for logs.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

impl From<[u8; 32]> for Hash {
    fn from(bytes: [u8; 32]) -> Self {
        Hash(bytes)
    }
}

impl AsRef<[u8]> for Hash {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.fmt_short())
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hash {input:?}: expected 64 hex digits")]
pub struct ParseHashError {
    input: String,
}

impl FromStr for Hash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseHashError {
            input: s.chars().take(80).collect(),
        })?;
        Ok(Hash(out))
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            // Bytes, not a 32-tuple: an order of magnitude cheaper through bincode.
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Hash;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a BLAKE3 hash as 32 bytes or 64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Hash, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Hash, E> {
                let arr: [u8; 32] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &"32 bytes"))?;
                Ok(Hash(arr))
            }
        }
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(Visitor)
        } else {
            deserializer.deserialize_bytes(Visitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let h = Hash::of(b"synod");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, blake3::hash(b"synod").to_hex().as_str());
        assert_eq!(s.parse::<Hash>().unwrap(), h);
        assert_eq!(h.fmt_short(), &s[..8]);
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert!("abc".parse::<Hash>().is_err());
        let err = "zz".repeat(32).parse::<Hash>().unwrap_err();
        assert!(err.to_string().contains("64 hex digits"));
    }

    #[test]
    fn serde_is_bytes_in_bincode_and_hex_in_json() {
        let h = Hash::of(b"x");
        let cfg = bincode::config::standard();
        let enc = bincode::serde::encode_to_vec(h, cfg).unwrap();
        assert_eq!(enc.len(), 33, "length prefix + 32 raw bytes");
        let (dec, used): (Hash, usize) = bincode::serde::decode_from_slice(&enc, cfg).unwrap();
        assert_eq!((dec, used), (h, enc.len()));
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<Hash>(&json).unwrap(), h);
    }

    #[test]
    fn bincode_rejects_wrong_length() {
        let cfg = bincode::config::standard();
        let enc = bincode::serde::encode_to_vec(serde_bytes_vec(&[1u8; 31]), cfg).unwrap();
        assert!(bincode::serde::decode_from_slice::<Hash, _>(&enc, cfg).is_err());
    }

    fn serde_bytes_vec(b: &[u8]) -> impl serde::Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl serde::Serialize for B<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }
}
