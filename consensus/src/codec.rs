//! bincode 2 encoding of everything this crate stores or sends.
//!
//! Decoding is always size-limited (an unlimited decoder aborts the process on a
//! tiny input claiming a huge length) and must consume the whole buffer
//! (bincode ignores trailing bytes otherwise).

use serde::{de::DeserializeOwned, Serialize};

/// Largest value we ever decode: a log entry carrying a big batch, or one RPC.
pub const MAX_DECODE: usize = 64 * 1024 * 1024;

type Limited = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DECODE>,
>;

fn config() -> Limited {
    bincode::config::standard().with_limit::<MAX_DECODE>()
}

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// bincode refused the bytes.
    #[error("invalid encoding of {what} ({len} bytes)")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// Input length.
        len: usize,
        /// bincode's reason.
        #[source]
        source: bincode::error::DecodeError,
    },
    /// The value ended before the buffer did.
    #[error("{extra} trailing bytes after {what} ({len} bytes)")]
    Trailing {
        /// What was being decoded.
        what: &'static str,
        /// Input length.
        len: usize,
        /// Bytes left over.
        extra: usize,
    },
}

/// Encodes a value. Our types are plain serde data, so this cannot fail short of
/// exceeding the size limit, which is a bug in the caller.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    try_encode(value).expect("synod types always encode within the size limit")
}

/// Encodes a value, reporting failure.
pub fn try_encode<T: Serialize + ?Sized>(
    value: &T,
) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, config())
}

/// Decodes a value that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let (v, used) =
        bincode::serde::decode_from_slice::<T, _>(bytes, config()).map_err(|source| {
            DecodeError::Invalid {
                what,
                len: bytes.len(),
                source,
            }
        })?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing {
            what,
            len: bytes.len(),
            extra: bytes.len() - used,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut b = encode(&42u64);
        b.push(7);
        assert!(matches!(
            decode::<u64>("n", &b),
            Err(DecodeError::Trailing { extra: 1, .. })
        ));
    }

    #[test]
    fn huge_length_claim_is_refused_not_allocated() {
        // varint 0xFF + u64::MAX-ish length prefix for a String
        let b = [0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F];
        assert!(decode::<String>("s", &b).is_err());
    }
}
