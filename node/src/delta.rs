//! Chunks sent as deltas. A new version of a file shares most chunks with
//! the version a peer holds; the few it adds usually differ from the chunks
//! they replace by a few bytes (an insert, an overwrite). The writer no
//! longer has the old bytes, so the peer sends signatures of the chunks it
//! holds between the shared ones (a *run*), and the writer answers with
//! rsync-style deltas against them (fast_rsync's formats). The peer checks
//! every rebuilt chunk against its BLAKE3 id: fast_rsync's MD4 is only a
//! hint, and a delta that rebuilds wrong bytes is refused, never stored.

use std::collections::{HashMap, HashSet};

use fast_rsync::{Signature, SignatureOptions};
use synod_chunker::{ChunkRef, Manifest};
use synod_merkle::Hash;

/// Most bytes of old chunks one delta may be taken against: what a peer
/// reads and signs for a run.
pub(crate) const MAX_RUN_BYTES: u64 = 1 << 20;

/// Most bytes a delta may rebuild: a chunk is far smaller.
pub(crate) const MAX_REBUILT_BYTES: usize = 16 << 20;

/// Bytes of MD4 kept per block in a signature; BLAKE3 has the last word.
const SIGNATURE_HASH_BYTES: u32 = 8;

/// Chunks of a new version between two chunks it shares with the old one,
/// and the old chunks that stood there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run<T> {
    /// The old version's chunks of the stretch, in order (never empty).
    pub old: Vec<Hash>,
    /// The new version's chunks of the stretch, in order.
    pub new: Vec<T>,
}

/// The stretches where `new` (chunks with their ids) differs from `base`,
/// each with the old chunks it replaces. Stretches that replace nothing
/// (pure inserts) or more than [`MAX_RUN_BYTES`] are left out: their
/// chunks travel whole.
pub(crate) fn runs<T: Copy>(new: &[T], id: impl Fn(&T) -> Hash, base: &Manifest) -> Vec<Run<T>> {
    let old = base.chunks();
    let mut positions: HashMap<Hash, Vec<usize>> = HashMap::new();
    for (i, c) in old.iter().enumerate() {
        positions.entry(c.id).or_default().push(i);
    }
    let mut out = Vec::new();
    let mut cursor = 0usize;
    let mut pending: Vec<T> = Vec::new();
    let mut close = |pending: &mut Vec<T>, from: usize, to: usize| {
        if pending.is_empty() {
            return;
        }
        let stretch = &old[from..to];
        let bytes: u64 = stretch.iter().map(|c| u64::from(c.len)).sum();
        if !stretch.is_empty() && bytes <= MAX_RUN_BYTES {
            out.push(Run {
                old: stretch.iter().map(|c| c.id).collect(),
                new: std::mem::take(pending),
            });
        }
        pending.clear();
    };
    for c in new {
        let cid = id(c);
        // A shared chunk at or after the cursor anchors the alignment.
        let anchor = positions
            .get(&cid)
            .and_then(|at| at.iter().copied().find(|&j| j >= cursor));
        match anchor {
            Some(j) => {
                close(&mut pending, cursor, j);
                cursor = j + 1;
            }
            // Shared, but out of order: held already; not a change.
            None if positions.contains_key(&cid) => {}
            None => pending.push(*c),
        }
    }
    close(&mut pending, cursor, old.len());
    out
}

/// [`runs`] of a manifest.
pub(crate) fn manifest_runs(new: &Manifest, base: &Manifest) -> Vec<Run<ChunkRef>> {
    runs(new.chunks(), |c| c.id, base)
}

/// The signature a peer sends of the bytes of a run.
pub(crate) fn sign(bytes: &[u8]) -> Vec<u8> {
    Signature::calculate(
        bytes,
        SignatureOptions {
            block_size: block_size(bytes.len()),
            crypto_hash_size: SIGNATURE_HASH_BYTES,
        },
    )
    .into_serialized()
}

/// Blocks of about the square root of the run, as rsync picks them: small
/// enough that an edit spoils little, large enough that the signature
/// stays a small fraction of the run.
fn block_size(len: usize) -> u32 {
    let root = (len as f64).sqrt() as u32;
    root.clamp(128, 4096).next_power_of_two()
}

/// The delta of `data` against the bytes `signature` describes, if it is
/// worth sending: smaller than half of `data`. `None` for a signature
/// that does not parse.
pub(crate) fn diff(signature: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let sig = Signature::deserialize(signature.to_vec()).ok()?;
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), data, &mut out).ok()?;
    (out.len() < data.len() / 2).then_some(out)
}

/// Rebuilds chunk `id` from `base` and `delta`, and checks it.
pub(crate) fn rebuild(id: &Hash, base: &[u8], delta: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    fast_rsync::apply_limited(base, delta, &mut out, MAX_REBUILT_BYTES)
        .map_err(|e| format!("delta of chunk {id}: {e}"))?;
    if Hash::of(&out) != *id {
        return Err(format!(
            "chunk {id} rebuilt from its delta does not match its id"
        ));
    }
    Ok(out)
}

/// The chunk ids of `new` that `base` lacks, each once, in order.
pub(crate) fn added(new: &Manifest, base: &Manifest) -> Vec<Hash> {
    let old: HashSet<Hash> = base.chunk_ids().collect();
    let mut seen = HashSet::new();
    new.chunk_ids()
        .filter(|id| !old.contains(id) && seen.insert(*id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use synod_chunker::{chunk_slice_scaled, ChunkParams};

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn manifest(bytes: &[u8]) -> Manifest {
        chunk_slice_scaled(bytes, ChunkParams::DEFAULT)
    }

    /// The bytes of `ids`, concatenated, looked up in `m` over `bytes`.
    fn bytes_of(m: &Manifest, bytes: &[u8], ids: &[Hash]) -> Vec<u8> {
        ids.iter()
            .flat_map(|id| {
                let c = m.chunks().iter().find(|c| c.id == *id).unwrap();
                bytes[c.offset as usize..c.end() as usize].to_vec()
            })
            .collect()
    }

    #[test]
    fn an_insert_at_the_start_is_one_run_against_the_first_chunk() {
        let old = data(4 << 20, 1);
        let mut new = vec![7u8; 100];
        new.extend_from_slice(&old);
        let (a, b) = (manifest(&old), manifest(&new));
        let runs = manifest_runs(&b, &a);
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(runs[0].old, vec![a.chunks()[0].id]);
        assert_eq!(runs[0].new, vec![b.chunks()[0]]);
    }

    #[test]
    fn edits_in_the_middle_and_an_append_give_runs_in_order() {
        let old = data(4 << 20, 2);
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 100].fill(0xAB);
        new[3 << 20..(3 << 20) + 100].fill(0xCD);
        new.extend_from_slice(&data(10_000, 3));
        let (a, b) = (manifest(&old), manifest(&new));
        let runs = manifest_runs(&b, &a);
        assert_eq!(runs.len(), 3, "{runs:?}");
        let added: HashSet<Hash> = added(&b, &a).into_iter().collect();
        for r in &runs {
            assert!(r.new.iter().all(|c| added.contains(&c.id)));
            // Each old stretch sits at the offsets of the new one.
            let old_start = a.chunks().iter().find(|c| c.id == r.old[0]).unwrap().offset;
            assert!(old_start.abs_diff(r.new[0].offset) < 1 << 20);
        }
        // The last run replaces the old last chunk.
        assert_eq!(runs[2].old.last(), Some(&a.chunks().last().unwrap().id));
    }

    #[test]
    fn an_insert_at_a_cut_is_one_run_holding_the_old_chunks_around_it() {
        let old = data(4 << 20, 4);
        let a = manifest(&old);
        let cut = a.chunks()[10].offset as usize;
        let mut new = old[..cut].to_vec();
        new.extend_from_slice(&data(300_000, 5));
        new.extend_from_slice(&old[cut..]);
        let b = manifest(&new);
        // The inserted bytes are cut together with the old chunks around
        // them until the next cut the two versions share: one run, whose
        // new chunks hold its old ones plus the insert.
        let runs = manifest_runs(&b, &a);
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert!(runs[0].old.contains(&a.chunks()[10].id), "{runs:?}");
        let len = |id: &Hash| a.chunks().iter().find(|c| c.id == *id).unwrap().len;
        let old_bytes: u64 = runs[0].old.iter().map(|id| u64::from(len(id))).sum();
        let new_bytes: u64 = runs[0].new.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(new_bytes, old_bytes + 300_000);
    }

    #[test]
    fn deltas_rebuild_the_chunk_and_are_small() {
        let old = data(1 << 20, 6);
        let mut new = vec![9u8; 100];
        new.extend_from_slice(&old);
        new[500_000..500_100].fill(0xEE);
        let (a, b) = (manifest(&old), manifest(&new));
        let mut sent = 0;
        let mut whole = 0;
        for r in manifest_runs(&b, &a) {
            let base = bytes_of(&a, &old, &r.old);
            let sig = sign(&base);
            assert!(
                sig.len() < base.len() / 10,
                "signature {} of {}",
                sig.len(),
                base.len()
            );
            for c in &r.new {
                let chunk = &new[c.offset as usize..c.end() as usize];
                let d = diff(&sig, chunk).expect("an edit of 100 bytes is worth a delta");
                assert_eq!(rebuild(&c.id, &base, &d).unwrap(), chunk);
                sent += d.len();
                whole += chunk.len();
            }
        }
        assert!(whole > 0);
        assert!(sent < 2048, "deltas of {sent} bytes for chunks of {whole}");
    }

    #[test]
    fn a_wrong_base_or_a_garbage_delta_is_refused() {
        let old = data(64 << 10, 7);
        let mut new = old.clone();
        new[100..200].fill(1);
        let id = Hash::of(&new);
        let d = diff(&sign(&old), &new).unwrap();
        let other = data(64 << 10, 8);
        let err = rebuild(&id, &other, &d).unwrap_err();
        assert!(err.contains("does not match its id"), "{err}");
        let err = rebuild(&id, &old, b"garbage").unwrap_err();
        assert!(err.contains(&id.to_string()), "{err}");
        assert!(diff(b"not a signature", &new).is_none());
        // Unrelated bytes: no delta worth sending.
        assert!(diff(&sign(&other), &new).is_none());
    }
}
