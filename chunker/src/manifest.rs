//! The manifest of one file version: its ordered chunks, size and root.

use serde::{Deserialize, Serialize, Serializer};
use synod_merkle::{merkle_root, Hash};

use crate::params::ChunkParams;

/// One chunk of a file: its id (BLAKE3 of its bytes) and where it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's bytes.
    pub id: Hash,
    /// Offset of the chunk's first byte in the file.
    pub offset: u64,
    /// Length in bytes (at most `params.max()`, which fits in a u32).
    pub len: u32,
}

impl ChunkRef {
    pub(crate) fn new(id: Hash, offset: u64, len: usize) -> Self {
        // Chunks never exceed params.max(), which is at most 16 MiB.
        let len = u32::try_from(len).expect("a chunk is at most 16 MiB");
        ChunkRef { id, offset, len }
    }

    /// Offset one past the chunk's last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The chunks of one file version, in order, with its size and the Merkle
/// root over the chunk ids (`synod_merkle::merkle_root`).
///
/// Serialized as `{ params, size, ids, lens }`: `ids` is one byte blob of
/// concatenated 32-byte ids (serde bytes, so bincode copies it in one go) and
/// `lens` the chunk lengths. Offsets and the root are recomputed on
/// deserialization, which rejects any inconsistent manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ManifestWire")]
pub struct Manifest {
    params: ChunkParams,
    size: u64,
    chunks: Vec<ChunkRef>,
    root: Hash,
}

impl Manifest {
    /// Builds a manifest from a contiguous chain of chunks starting at 0.
    pub(crate) fn from_chunks(params: ChunkParams, chunks: Vec<ChunkRef>) -> Self {
        debug_assert!(chunks.windows(2).all(|w| w[0].end() == w[1].offset));
        let size = chunks.last().map_or(0, ChunkRef::end);
        let ids: Vec<Hash> = chunks.iter().map(|c| c.id).collect();
        Manifest {
            params,
            size,
            root: merkle_root(&ids),
            chunks,
        }
    }

    /// The parameters the file was cut with.
    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// File size in bytes (the sum of the chunk lengths).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunks in file order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// The chunk ids in file order (the leaves of the root).
    pub fn chunk_ids(&self) -> impl ExactSizeIterator<Item = Hash> + '_ {
        self.chunks.iter().map(|c| c.id)
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Merkle root over the chunk ids; `Hash::ZERO` for an empty file.
    pub fn root(&self) -> Hash {
        self.root
    }

    /// The ids as one blob of concatenated 32-byte ids (the wire form).
    pub fn ids_blob(&self) -> Vec<u8> {
        let mut blob = Vec::with_capacity(self.chunks.len() * Hash::LEN);
        for c in &self.chunks {
            blob.extend_from_slice(c.id.as_bytes());
        }
        blob
    }

    /// Rebuilds a manifest from its wire parts, checking that they fit
    /// together (used by deserialization).
    pub fn from_parts(
        params: ChunkParams,
        size: u64,
        ids: &[u8],
        lens: &[u32],
    ) -> Result<Self, ManifestError> {
        if !ids.len().is_multiple_of(Hash::LEN) {
            return Err(ManifestError::IdsNotWhole { len: ids.len() });
        }
        let count = ids.len() / Hash::LEN;
        if count != lens.len() {
            return Err(ManifestError::CountMismatch {
                ids: count,
                lens: lens.len(),
            });
        }
        let mut chunks = Vec::with_capacity(count);
        let mut offset = 0u64;
        for (index, (id, &len)) in ids.chunks_exact(Hash::LEN).zip(lens).enumerate() {
            let is_last = index + 1 == count;
            if len == 0 || len > params.max() || (!is_last && len < params.min()) {
                return Err(ManifestError::BadChunkLen { index, len, params });
            }
            let id = Hash::from_slice(id).expect("chunks_exact yields 32 bytes");
            chunks.push(ChunkRef { id, offset, len });
            offset += u64::from(len);
        }
        if offset != size {
            return Err(ManifestError::SizeMismatch { sum: offset, size });
        }
        Ok(Manifest::from_chunks(params, chunks))
    }
}

/// Why an encoded manifest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The id blob does not hold a whole number of 32-byte ids.
    #[error("manifest id blob of {len} bytes is not a multiple of 32")]
    IdsNotWhole { len: usize },
    /// Ids and lengths disagree on the number of chunks.
    #[error("manifest has {ids} chunk ids but {lens} chunk lengths")]
    CountMismatch { ids: usize, lens: usize },
    /// A chunk length that FastCDC with these params cannot produce.
    #[error(
        "manifest chunk {index} has length {len}, impossible with min {} / max {} \
         (only the last chunk may be shorter than min)",
        params.min(), params.max()
    )]
    BadChunkLen {
        index: usize,
        len: u32,
        params: ChunkParams,
    },
    /// The chunk lengths do not add up to the stated size.
    #[error("manifest chunk lengths add up to {sum} bytes but its size is {size}")]
    SizeMismatch { sum: u64, size: u64 },
}

/// The serialized shape of a [`Manifest`] (field order is the format).
#[derive(Deserialize)]
struct ManifestWire {
    params: ChunkParams,
    size: u64,
    #[serde(with = "serde_bytes")]
    ids: Vec<u8>,
    lens: Vec<u32>,
}

impl TryFrom<ManifestWire> for Manifest {
    type Error = ManifestError;

    fn try_from(w: ManifestWire) -> Result<Self, Self::Error> {
        Manifest::from_parts(w.params, w.size, &w.ids, &w.lens)
    }
}

/// Borrowing twin of [`ManifestWire`] for serialization.
#[derive(Serialize)]
struct ManifestWireRef<'a> {
    params: &'a ChunkParams,
    size: u64,
    ids: &'a serde_bytes::Bytes,
    lens: Lens<'a>,
}

/// Serializes the lengths straight from the chunk list.
struct Lens<'a>(&'a [ChunkRef]);

impl Serialize for Lens<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|c| c.len))
    }
}

impl Serialize for Manifest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ids = self.ids_blob();
        ManifestWireRef {
            params: &self.params,
            size: self.size,
            ids: serde_bytes::Bytes::new(&ids),
            lens: Lens(&self.chunks),
        }
        .serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::tests::{pseudo_random, small_params};
    use crate::chunking::{chunk_reader, chunk_slice};
    use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
    use proptest::prelude::*;

    type Config = Configuration<LittleEndian, Varint, Limit<{ 64 << 20 }>>;

    fn cfg() -> Config {
        config::standard().with_limit::<{ 64 << 20 }>()
    }

    fn must_encode(m: &Manifest) -> Vec<u8> {
        bincode::serde::encode_to_vec(m, cfg()).expect("encode manifest")
    }

    fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        match bincode::serde::decode_from_slice::<Manifest, _>(bytes, cfg()) {
            Ok((m, used)) if used == bytes.len() => Ok(m),
            Ok((_, used)) => Err(format!("trailing bytes after {used}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Encodes the wire struct directly, so tests can write inconsistent ones.
    fn encode_parts(params: ChunkParams, size: u64, ids: &[u8], lens: &[u32]) -> Vec<u8> {
        #[derive(Serialize)]
        struct Raw<'a> {
            params: (u32, u32, u32),
            size: u64,
            ids: &'a serde_bytes::Bytes,
            lens: &'a [u32],
        }
        let raw = Raw {
            params: (params.min(), params.avg(), params.max()),
            size,
            ids: serde_bytes::Bytes::new(ids),
            lens,
        };
        bincode::serde::encode_to_vec(raw, cfg()).expect("encode raw")
    }

    #[test]
    fn empty_manifest_has_zero_root() {
        let m = chunk_slice(&[], ChunkParams::default());
        assert_eq!(m.size(), 0);
        assert!(m.is_empty());
        assert_eq!(m.root(), Hash::ZERO);
        assert_eq!(decode(&must_encode(&m)), Ok(m));
    }

    #[test]
    fn wire_form_is_the_blob_layout() {
        let p = small_params();
        let m = chunk_slice(&pseudo_random(1, 10_000), p);
        let lens: Vec<u32> = m.chunks().iter().map(|c| c.len).collect();
        assert_eq!(
            must_encode(&m),
            encode_parts(p, m.size(), &m.ids_blob(), &lens)
        );
    }

    #[test]
    fn rejects_tampered_encodings() {
        let p = small_params();
        let m = chunk_slice(&pseudo_random(2, 20_000), p);
        let ids = m.ids_blob();
        let lens: Vec<u32> = m.chunks().iter().map(|c| c.len).collect();
        let size = m.size();
        let check = |bytes: Vec<u8>, needle: &str| {
            let err = decode(&bytes).expect_err("tampered manifest must be rejected");
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };

        check(
            encode_parts(p, size, &ids[..ids.len() - 1], &lens),
            "not a multiple of 32",
        );
        check(
            encode_parts(p, size, &ids[..ids.len() - 32], &lens),
            "chunk ids but",
        );
        check(encode_parts(p, size + 1, &ids, &lens), "add up to");
        let mut long = lens.clone();
        long[0] = p.max() + 2;
        check(
            encode_parts(
                p,
                size + 2 + u64::from(p.max()) - u64::from(lens[0]),
                &ids,
                &long,
            ),
            "chunk 0 has length",
        );
        let mut short = lens.clone();
        let moved = short[1] - 2;
        short[1] = 2;
        short[2] += moved;
        check(encode_parts(p, size, &ids, &short), "chunk 1 has length");
        let mut zero = lens.clone();
        *zero.last_mut().expect("chunks") = 0;
        check(
            encode_parts(
                p,
                size - u64::from(*lens.last().expect("chunks")),
                &ids,
                &zero,
            ),
            "has length 0",
        );

        // Invalid params are rejected by ChunkParams itself.
        let mut bad = must_encode(&m);
        bad[0] = 65; // min is the first varint: 64 -> 65 (odd)
        check(bad, "odd");

        // Truncation and trailing garbage.
        let good = must_encode(&m);
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());

        // A huge claimed blob length hits the limit instead of allocating.
        let mut huge = encode_parts(p, 0, &[], &[]);
        huge.truncate(huge.len() - 2);
        huge.push(253); // varint marker of a u64
        huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode(&huge).is_err());
    }

    #[test]
    fn a_flipped_id_changes_the_root() {
        let p = small_params();
        let m = chunk_slice(&pseudo_random(3, 5_000), p);
        let mut bytes = must_encode(&m);
        // The id blob follows params (7 bytes as varints), size (3 bytes)
        // and the blob length (3 bytes); flip a bit inside it.
        bytes[20] ^= 1;
        let tampered = decode(&bytes).expect("still consistent");
        assert_ne!(tampered.root(), m.root());
    }

    proptest! {
        #[test]
        fn serde_round_trip(data in prop::collection::vec(any::<u8>(), 0..20_000)) {
            let m = chunk_slice(&data, small_params());
            prop_assert_eq!(decode(&must_encode(&m)), Ok(m.clone()));
            prop_assert_eq!(fixed_int_round_trip(&m), m);
        }

        #[test]
        fn identical_content_identical_root(data in prop::collection::vec(any::<u8>(), 1..8_000), flip in any::<prop::sample::Index>()) {
            let p = small_params();
            let a = chunk_reader(&data[..], p).expect("in-memory read");
            let b = chunk_slice(&data.clone(), p);
            prop_assert_eq!(a.root(), b.root());
            let mut other = data.clone();
            let i = flip.index(other.len());
            other[i] ^= 0x5a;
            prop_assert_ne!(chunk_slice(&other, p).root(), a.root());
        }
    }

    /// A second serde format (bincode with fixed ints) to make sure the
    /// derive does not depend on bincode's varints.
    fn fixed_int_round_trip(m: &Manifest) -> Manifest {
        let c = config::standard()
            .with_fixed_int_encoding()
            .with_limit::<{ 64 << 20 }>();
        let bytes = bincode::serde::encode_to_vec(m, c).expect("encode");
        bincode::serde::decode_from_slice(&bytes, c)
            .expect("decode")
            .0
    }
}
