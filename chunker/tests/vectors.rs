//! Test vectors pinning the chunking format: 1 MiB from BLAKE3's XOF with
//! the derive-key context "synod chunker test vector v1".
//!
//! Cut points, chunk ids and manifest roots are part of synod's on-disk and
//! wire format: peers that cut differently share no chunks, and committed
//! roots would stop matching. If one of these assertions fails, the format
//! changed (fastcdc version, normalization, masks, params or the Merkle
//! root); that needs a format version bump, not a new expected value.

use fastcdc::v2020::FastCDC;
use synod_chunker::{
    chunk_file, chunk_file_scaled, chunk_reader, chunk_slice, chunk_slice_parallel,
    chunk_slice_scaled, ChunkParams, Manifest,
};

/// 1 MiB of deterministic pseudo-random bytes.
fn vector_input() -> Vec<u8> {
    let mut data = vec![0; 1 << 20];
    blake3::Hasher::new_derive_key("synod chunker test vector v1")
        .finalize_xof()
        .fill(&mut data);
    data
}

fn offsets(m: &Manifest) -> Vec<u64> {
    m.chunks().iter().map(|c| c.offset).collect()
}

/// All ways of chunking the vector agree.
fn must_chunk_everywhere(data: &[u8], p: ChunkParams) -> Manifest {
    let m = chunk_slice(data, p);
    let reference: Vec<u64> =
        FastCDC::new(data, p.min() as usize, p.avg() as usize, p.max() as usize)
            .map(|c| c.offset as u64)
            .collect();
    assert_eq!(
        offsets(&m),
        reference,
        "cuts differ from fastcdc's own iterator"
    );
    assert_eq!(chunk_reader(data, p).expect("in-memory read"), m);
    assert_eq!(chunk_slice_parallel(data, p, 2), m);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vector");
    std::fs::write(&path, data).expect("write vector");
    assert_eq!(chunk_file(&path, p).expect("chunk vector file"), m);
    m
}

fn hex(m: &Manifest, index: usize) -> String {
    m.chunks()[index].id.to_string()
}

#[test]
fn default_params_vector() {
    let data = vector_input();
    let p = ChunkParams::default();
    let m = must_chunk_everywhere(&data, p);
    assert_eq!(
        offsets(&m),
        [
            0, 262144, 300619, 395859, 442476, 459145, 519318, 552469, 629828, 704280, 833863,
            898958, 985863, 1022037
        ]
    );
    assert_eq!(
        hex(&m, 0),
        "d423a8366ef207a5ed193be5de7a2c09c842f376fdeb2d8ebf3989a0aff7bfc3"
    );
    assert_eq!(
        hex(&m, m.chunk_count() - 1),
        "7ff07bdc97ee356cf03cd2d22521e57c8d972e8b599abaadf3bf755593817caf"
    );
    assert_eq!(
        m.root().to_string(),
        "f25466783c5ed56ae77025dbef0af7e3a3fd3e00587d21cd41b76b72b5ce62b9"
    );
}

#[test]
fn small_params_vector() {
    let data = vector_input();
    let p = ChunkParams::new(64, 256, 1024).expect("valid params");
    let m = must_chunk_everywhere(&data, p);
    assert_eq!(m.chunk_count(), 3420);
    assert_eq!(
        offsets(&m)[..20],
        [
            0, 484, 845, 1268, 1425, 1687, 1760, 1840, 2107, 2388, 2837, 3182, 3421, 3804, 4082,
            4170, 4616, 4884, 5298, 5599
        ]
    );
    assert_eq!(m.chunks()[m.chunk_count() - 1].offset, 1048562);
    assert_eq!(
        hex(&m, 0),
        "533ff7751835ee1954138a36775c3465829ee2a0fbb9307137adaecb2198d505"
    );
    assert_eq!(
        hex(&m, m.chunk_count() - 1),
        "93a5f5e76791e94d2653b386911b301fe4affb21714c9f2e45a54bc76881d304"
    );
    assert_eq!(
        m.root().to_string(),
        "81aa79438c4807e748a2d7b33481a373c9cb9f37631b9e2d8d14f091d5860320"
    );
}

/// Scaled parameters are part of the format too: a 100 KiB prefix of the
/// vector is cut with 8/32/128 KiB, the same in memory and from a file, and
/// a 100-byte edit in its middle changes only the chunk around it.
#[test]
fn scaled_params_vector() {
    let data = &vector_input()[..100 << 10];
    let base = ChunkParams::default();
    let p = base.for_size(data.len() as u64);
    assert_eq!((p.min(), p.avg(), p.max()), (8192, 32768, 131072));
    let m = must_chunk_everywhere(data, p);
    assert_eq!(chunk_slice_scaled(data, base), m);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("scaled");
    std::fs::write(&path, data).expect("write vector");
    assert_eq!(chunk_file_scaled(&path, base).expect("chunk file"), m);
    assert_eq!(m.params(), p);
    assert_eq!(offsets(&m), [0, 49428]);
    assert_eq!(
        m.root().to_string(),
        "a87b3dd387247bd8b21838361e720de77c1765f7cfbe29cafa37cce679b42201"
    );

    let mut edited = data.to_vec();
    let mid = edited.len() / 2;
    edited[mid..mid + 100].fill(0xa5);
    let e = chunk_slice_scaled(&edited, base);
    let old: std::collections::HashSet<_> = m.chunk_ids().collect();
    let new_bytes: u64 = e
        .chunks()
        .iter()
        .filter(|c| !old.contains(&c.id))
        .map(|c| u64::from(c.len))
        .sum();
    // The edit is in the second chunk; the first is kept.
    assert_eq!(e.chunks()[0].id, m.chunks()[0].id);
    assert_eq!(new_bytes, data.len() as u64 - 49428);
}
