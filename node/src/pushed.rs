//! The form of a manifest pushed to a peer before a commit: whole, or as a
//! patch of a version the peer already holds. An edit of a large file
//! changes a few of its thousands of chunk ids, so the patch carries those
//! and says how many of the old version's ids stay at each end.

use serde::{Deserialize, Serialize};
use synod_chunker::{ChunkParams, Manifest};
use synod_merkle::Hash;

/// Manifests with fewer chunks than this always travel whole.
const PATCH_MIN_CHUNKS: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum PushedManifest {
    Whole(Manifest),
    Patch(ManifestPatch),
}

/// `base`'s first `head` and last `tail` chunks around new ones.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ManifestPatch {
    base: Hash,
    params: ChunkParams,
    size: u64,
    head: u32,
    tail: u32,
    #[serde(with = "serde_bytes")]
    ids: Vec<u8>,
    lens: Vec<u32>,
    /// The root the result must have.
    root: Hash,
}

impl PushedManifest {
    /// `m` as a patch of `base` when that is much smaller, else whole.
    pub(crate) fn of(m: &Manifest, base: Option<&Manifest>) -> PushedManifest {
        let Some(base) =
            base.filter(|b| m.chunk_count() >= PATCH_MIN_CHUNKS && b.root() != m.root())
        else {
            return PushedManifest::Whole(m.clone());
        };
        let (new, old) = (m.chunks(), base.chunks());
        let same = |a: &synod_chunker::ChunkRef, b: &synod_chunker::ChunkRef| {
            a.id == b.id && a.len == b.len
        };
        let head = new.iter().zip(old).take_while(|(a, b)| same(a, b)).count();
        let tail = new[head..]
            .iter()
            .rev()
            .zip(old[head..].iter().rev())
            .take_while(|(a, b)| same(a, b))
            .count();
        let middle = &new[head..new.len() - tail];
        // Worth it only when most ids are kept.
        if middle.len() * 2 > new.len() {
            return PushedManifest::Whole(m.clone());
        }
        let mut ids = Vec::with_capacity(middle.len() * Hash::LEN);
        for c in middle {
            ids.extend_from_slice(c.id.as_bytes());
        }
        PushedManifest::Patch(ManifestPatch {
            base: base.root(),
            params: m.params(),
            size: m.size(),
            head: head as u32,
            tail: tail as u32,
            ids,
            lens: middle.iter().map(|c| c.len).collect(),
            root: m.root(),
        })
    }

    pub(crate) fn is_patch(&self) -> bool {
        matches!(self, PushedManifest::Patch(_))
    }

    /// The manifest, a patch applied to the base `lookup` finds.
    pub(crate) fn resolve(
        self,
        lookup: impl FnOnce(&Hash) -> Result<Option<Manifest>, String>,
    ) -> Result<Manifest, String> {
        let p = match self {
            PushedManifest::Whole(m) => return Ok(m),
            PushedManifest::Patch(p) => p,
        };
        let base = lookup(&p.base)?
            .ok_or_else(|| format!("patch of manifest {}, which this node lacks", p.base))?;
        let old = base.chunks();
        let (head, tail) = (p.head as usize, p.tail as usize);
        if head + tail > old.len() {
            return Err(format!(
                "patch keeps {head} + {tail} chunks of manifest {}, which has {}",
                p.base,
                old.len()
            ));
        }
        let kept_head = &old[..head];
        let kept_tail = &old[old.len() - tail..];
        let mut ids = Vec::with_capacity((head + tail) * Hash::LEN + p.ids.len());
        let mut lens = Vec::with_capacity(head + tail + p.lens.len());
        for c in kept_head {
            ids.extend_from_slice(c.id.as_bytes());
            lens.push(c.len);
        }
        ids.extend_from_slice(&p.ids);
        lens.extend_from_slice(&p.lens);
        for c in kept_tail {
            ids.extend_from_slice(c.id.as_bytes());
            lens.push(c.len);
        }
        let m = Manifest::from_parts(p.params, p.size, &ids, &lens)
            .map_err(|e| format!("patch of manifest {}: {e}", p.base))?;
        if m.root() != p.root {
            return Err(format!(
                "patch of manifest {} gives root {}, not {}",
                p.base,
                m.root(),
                p.root
            ));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_chunker::chunk_slice;

    fn data(n: usize, seed: u8) -> Vec<u8> {
        let mut v = vec![0u8; n];
        blake3::Hasher::new_derive_key("synod pushed manifest test")
            .update(&[seed])
            .finalize_xof()
            .fill(&mut v);
        v
    }

    fn params() -> ChunkParams {
        ChunkParams::new(64, 256, 1024).expect("valid")
    }

    fn roundtrip(p: PushedManifest, base: &Manifest) -> Result<Manifest, String> {
        let bytes = crate::local::encode(&p);
        let back: PushedManifest = crate::local::decode("pushed manifest", &bytes).expect("decode");
        back.resolve(|root| Ok((root == &base.root()).then(|| base.clone())))
    }

    #[test]
    fn an_edit_travels_as_a_small_patch() {
        let old = data(256 << 10, 1);
        let base = chunk_slice(&old, params());
        for edit in [0, old.len() / 2, old.len() - 50] {
            let mut new = old.clone();
            new.splice(edit..edit, [7u8; 100]);
            let m = chunk_slice(&new, params());
            let p = PushedManifest::of(&m, Some(&base));
            assert!(p.is_patch(), "edit at {edit}");
            let size = crate::local::encode(&p).len();
            let whole = crate::local::encode(&PushedManifest::Whole(m.clone())).len();
            assert!(size * 20 < whole, "patch {size} B vs whole {whole} B");
            assert_eq!(roundtrip(p, &base), Ok(m));
        }
    }

    #[test]
    fn unrelated_or_small_manifests_travel_whole() {
        let base = chunk_slice(&data(256 << 10, 1), params());
        let other = chunk_slice(&data(256 << 10, 2), params());
        assert!(!PushedManifest::of(&other, Some(&base)).is_patch());
        assert!(!PushedManifest::of(&other, None).is_patch());
        let small = chunk_slice(&data(4 << 10, 3), params());
        assert!(!PushedManifest::of(&small, Some(&base)).is_patch());
    }

    #[test]
    fn a_patch_of_an_unknown_or_different_base_is_refused() {
        let old = data(256 << 10, 1);
        let base = chunk_slice(&old, params());
        let mut new = old.clone();
        new[1000] ^= 1;
        let m = chunk_slice(&new, params());
        let p = PushedManifest::of(&m, Some(&base));
        let err = p.resolve(|_| Ok(None)).expect_err("no base");
        assert!(err.contains("lacks"), "{err}");
        // A base with the same root lookup but other chunks: root mismatch.
        let p = PushedManifest::of(&m, Some(&base));
        let wrong = chunk_slice(&data(256 << 10, 4), params());
        assert!(p.resolve(|_| Ok(Some(wrong.clone()))).is_err());
    }
}
