//! The namespace Merkle root without the namespace in memory.
//!
//! The trie and its root are exactly those of [`synod_merkle::NamespaceTree`]
//! (16-ary, each path placed by `namespace_key(path)`, a node with one path
//! is that path's leaf, a node with none is `Hash::ZERO`), but the leaves live
//! in sled (`k` + key → version, entry hash, path) and memory holds only the
//! top of the trie: the count and hash of each of the 16⁴ = 65,536 *buckets*
//! (the nodes four nibbles deep) and of the 4,369 nodes above them, ≈ 2.8 MiB
//! whatever the number of paths.
//!
//! Apply writes a path's leaf in the same sled batch as its entry and marks
//! its bucket dirty; [`NsTree::root`] rehashes the dirty buckets from sled
//! (one prefix scan each, ≈ N / 65,536 leaves) and the nodes above them.
//! Opening a store or installing a snapshot rehashes every bucket in one
//! streaming pass over the leaves in key order, holding one bucket at a time.

use synod_merkle::{namespace_key, Hash, NamespaceNode};

/// Key prefix of the leaf index in the state machine tree.
pub(crate) const P_LEAF: u8 = b'k';
/// Depth (in nibbles) of the buckets.
const BUCKET_DEPTH: usize = 4;
/// Number of buckets: 16^BUCKET_DEPTH.
const BUCKETS: usize = 1 << (4 * BUCKET_DEPTH);

/// Why the leaf index could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NsTreeError {
    /// sled failed.
    #[error("sled error reading the namespace leaf index")]
    Sled(#[from] sled::Error),
    /// A path changed during a snapshot build without saving its pre-image.
    #[error("path {path:?} changed during the snapshot build without a pre-image")]
    NoPreimage {
        /// The path.
        path: String,
    },
    /// A stored leaf is malformed.
    #[error("malformed namespace leaf {key}: {reason}")]
    Corrupt {
        /// The leaf key, hex.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One leaf as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leaf {
    /// `namespace_key(path)`.
    pub key: Hash,
    /// Version of the entry this leaf hashes.
    pub version: u64,
    /// `Entry::tree_hash` of that entry.
    pub entry: Hash,
    /// The path.
    pub path: String,
}

/// The sled key of the leaf of the path whose namespace key is `key`.
pub(crate) fn leaf_key(key: &Hash) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = P_LEAF;
    k[1..].copy_from_slice(key.as_bytes());
    k
}

/// The sled value of a leaf: BE version, entry hash, path bytes.
pub(crate) fn leaf_value(version: u64, entry: &Hash, path: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(40 + path.len());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(entry.as_bytes());
    v.extend_from_slice(path.as_bytes());
    v
}

fn parse_leaf(k: &[u8], v: &[u8]) -> Result<Leaf, NsTreeError> {
    let corrupt = |reason| NsTreeError::Corrupt {
        key: k.iter().map(|b| format!("{b:02x}")).collect(),
        reason,
    };
    let key = k
        .get(1..)
        .and_then(Hash::from_slice)
        .ok_or_else(|| corrupt("key is not 33 bytes"))?;
    if v.len() < 40 {
        return Err(corrupt("value shorter than 40 bytes"));
    }
    let mut ver = [0u8; 8];
    ver.copy_from_slice(&v[..8]);
    let entry = Hash::from_slice(&v[8..40]).ok_or_else(|| corrupt("entry hash"))?;
    let path = std::str::from_utf8(&v[40..])
        .map_err(|_| corrupt("path is not UTF-8"))?
        .to_owned();
    Ok(Leaf {
        key,
        version: u64::from_be_bytes(ver),
        entry,
        path,
    })
}

/// Every leaf in key order.
pub(crate) fn leaves(sm: &sled::Tree) -> impl Iterator<Item = Result<Leaf, NsTreeError>> {
    sm.scan_prefix([P_LEAF]).map(|kv| {
        let (k, v) = kv?;
        parse_leaf(&k, &v)
    })
}

/// The bucket of a namespace key: its first four nibbles.
pub(crate) fn bucket_of(key: &Hash) -> usize {
    let b = key.as_bytes();
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

/// The bucket of `path`.
pub(crate) fn bucket_of_path(path: &str) -> (Hash, usize) {
    let key = namespace_key(path);
    let b = bucket_of(&key);
    (key, b)
}

fn nibble(key: &Hash, depth: usize) -> usize {
    let byte = key.as_bytes()[depth / 2];
    usize::from(if depth.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    })
}

/// The hash of the node `depth` nibbles deep that holds exactly `leaves`
/// (sorted by key, all sharing their first `depth` nibbles), as
/// `NamespaceTree` computes it.
fn node_hash(leaves: &[Leaf], depth: usize) -> Hash {
    match leaves {
        [] => Hash::ZERO,
        [one] => NamespaceNode::Leaf {
            path: one.path.clone(),
            entry: one.entry,
        }
        .hash(),
        // Distinct keys differ before depth 64; sled keys are distinct.
        _ if depth >= 64 => Hash::ZERO,
        _ => {
            let mut children = [Hash::ZERO; 16];
            let mut rest = leaves;
            while let Some(first) = rest.first() {
                let nib = nibble(&first.key, depth);
                let n = rest
                    .iter()
                    .take_while(|l| nibble(&l.key, depth) == nib)
                    .count();
                children[nib] = node_hash(&rest[..n], depth + 1);
                rest = &rest[n..];
            }
            NamespaceNode::Inner {
                children: Box::new(children),
            }
            .hash()
        }
    }
}

/// Count and hash of every node from the root down to the buckets.
#[derive(Debug, Clone)]
struct Levels {
    /// `nodes[d][i]`: node `i` at depth `d` (16^d nodes), `(paths, hash)`.
    nodes: Vec<Vec<(u64, Hash)>>,
    /// Nodes above the buckets whose hash is out of date.
    stale: Vec<Vec<bool>>,
}

impl Levels {
    fn new() -> Levels {
        let nodes = (0..=BUCKET_DEPTH)
            .map(|d| vec![(0, Hash::ZERO); 1 << (4 * d)])
            .collect();
        let stale = (0..BUCKET_DEPTH)
            .map(|d| vec![false; 1 << (4 * d)])
            .collect();
        Levels { nodes, stale }
    }

    fn set_bucket(&mut self, b: usize, count: u64, hash: Hash) {
        self.nodes[BUCKET_DEPTH][b] = (count, hash);
        for d in 0..BUCKET_DEPTH {
            self.stale[d][b >> (4 * (BUCKET_DEPTH - d))] = true;
        }
    }

    fn root(&mut self) -> (u64, Hash) {
        for d in (0..BUCKET_DEPTH).rev() {
            for i in 0..self.stale[d].len() {
                if !std::mem::take(&mut self.stale[d][i]) {
                    continue;
                }
                let children = &self.nodes[d + 1][i * 16..i * 16 + 16];
                let count: u64 = children.iter().map(|c| c.0).sum();
                let hash = match count {
                    0 => Hash::ZERO,
                    // One path below: this node is that path's leaf, as is
                    // the one child that holds it.
                    1 => children
                        .iter()
                        .find(|c| c.0 == 1)
                        .map_or(Hash::ZERO, |c| c.1),
                    _ => {
                        let mut h = [Hash::ZERO; 16];
                        for (slot, c) in h.iter_mut().zip(children) {
                            *slot = c.1;
                        }
                        NamespaceNode::Inner {
                            children: Box::new(h),
                        }
                        .hash()
                    }
                };
                self.nodes[d][i] = (count, hash);
            }
        }
        self.nodes[0][0]
    }
}

/// Feeds `leaves` (in key order) bucket by bucket into fresh levels.
fn levels_from(
    leaves: impl Iterator<Item = Result<Leaf, NsTreeError>>,
) -> Result<Levels, NsTreeError> {
    let mut levels = Levels::new();
    let mut cur: Vec<Leaf> = Vec::new();
    let flush = |cur: &mut Vec<Leaf>, levels: &mut Levels| {
        if let Some(first) = cur.first() {
            let b = bucket_of(&first.key);
            levels.set_bucket(b, cur.len() as u64, node_hash(cur, BUCKET_DEPTH));
            cur.clear();
        }
    };
    for leaf in leaves {
        let leaf = leaf?;
        if cur
            .first()
            .is_some_and(|f| bucket_of(&f.key) != bucket_of(&leaf.key))
        {
            flush(&mut cur, &mut levels);
        }
        cur.push(leaf);
    }
    flush(&mut cur, &mut levels);
    Ok(levels)
}

/// The root over `leaves` given in key order (a snapshot build feeds the
/// leaves as of its capture point).
pub(crate) fn root_of(
    leaves: impl Iterator<Item = Result<Leaf, NsTreeError>>,
) -> Result<Hash, NsTreeError> {
    Ok(levels_from(leaves)?.root().1)
}

/// The live namespace root of a state machine: bucket hashes in memory,
/// leaves in sled. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct NsTree {
    levels: Levels,
    /// One bit per bucket whose leaves changed since it was last hashed.
    dirty: Vec<u64>,
    any_dirty: bool,
    /// Number of paths (tombstones included).
    len: u64,
}

impl Default for NsTree {
    fn default() -> Self {
        NsTree {
            levels: Levels::new(),
            dirty: vec![0; BUCKETS / 64],
            any_dirty: false,
            len: 0,
        }
    }
}

impl NsTree {
    /// Hashes every leaf of `sm` in one streaming pass.
    pub fn rebuild(sm: &sled::Tree) -> Result<NsTree, NsTreeError> {
        let mut levels = levels_from(leaves(sm))?;
        let (len, _) = levels.root();
        Ok(NsTree {
            levels,
            len,
            ..NsTree::default()
        })
    }

    /// Number of paths.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Records that the leaf of a path in bucket `b` was written; `new_path`
    /// if the path had no entry before.
    pub fn mark(&mut self, b: usize, new_path: bool) {
        self.dirty[b / 64] |= 1 << (b % 64);
        self.any_dirty = true;
        if new_path {
            self.len += 1;
        }
    }

    /// The root, after rehashing the dirty buckets from `sm`.
    pub fn root(&mut self, sm: &sled::Tree) -> Result<Hash, NsTreeError> {
        if self.any_dirty {
            let mut bucket = Vec::new();
            for w in 0..self.dirty.len() {
                while self.dirty[w] != 0 {
                    let bit = self.dirty[w].trailing_zeros() as usize;
                    let b = w * 64 + bit;
                    bucket.clear();
                    let [hi, lo] = (b as u16).to_be_bytes();
                    for kv in sm.scan_prefix([P_LEAF, hi, lo]) {
                        let (k, v) = kv?;
                        bucket.push(parse_leaf(&k, &v)?);
                    }
                    self.levels.set_bucket(
                        b,
                        bucket.len() as u64,
                        node_hash(&bucket, BUCKET_DEPTH),
                    );
                    self.dirty[w] &= !(1 << bit);
                }
            }
            self.any_dirty = false;
        }
        Ok(self.levels.root().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_merkle::NamespaceTree;

    fn leaf(path: &str, n: u64) -> Leaf {
        Leaf {
            key: namespace_key(path),
            version: n,
            entry: Hash::of(&n.to_le_bytes()),
            path: path.to_owned(),
        }
    }

    /// A sled tree in a temporary directory (kept alive by the returned guard).
    fn must_temp_tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .temporary(true)
            .open()
            .expect("sled");
        let sm = db.open_tree("sm").expect("tree");
        (dir, sm)
    }

    fn sorted(mut v: Vec<Leaf>) -> Vec<Leaf> {
        v.sort_by_key(|l| l.key);
        v
    }

    #[test]
    fn same_root_as_the_in_memory_tree() {
        // Sizes around the interesting cases: empty, one path (a leaf at
        // the root), paths sharing buckets, and many buckets.
        for n in [0u64, 1, 2, 3, 17, 300, 5000, 70_000] {
            let mut mem = NamespaceTree::new();
            let mut v = Vec::new();
            for i in 0..n {
                let l = leaf(&format!("d{}/f{i}", i % 7), i);
                mem.insert(&l.path, l.entry);
                v.push(l);
            }
            let got = root_of(sorted(v).into_iter().map(Ok)).expect("root");
            assert_eq!(got, mem.root(), "{n} paths");
        }
    }

    #[test]
    fn incremental_root_follows_writes() {
        let (_dir, sm) = must_temp_tree();
        let mut mem = NamespaceTree::new();
        let mut live = NsTree::default();
        for round in 0..4u64 {
            for i in 0..500u64 {
                // Rewrites earlier paths too: `i % 300` repeats.
                let l = leaf(&format!("r/{}", (i * 7 + round * 3) % 300 + round * 100), i);
                let new_path = mem.insert(&l.path, l.entry).is_none();
                sm.insert(leaf_key(&l.key), leaf_value(l.version, &l.entry, &l.path))
                    .expect("insert");
                live.mark(bucket_of(&l.key), new_path);
            }
            assert_eq!(live.root(&sm).expect("root"), mem.root(), "round {round}");
            assert_eq!(live.len(), mem.len() as u64);
            let mut rebuilt = NsTree::rebuild(&sm).expect("rebuild");
            assert_eq!(rebuilt.root(&sm).expect("root"), mem.root());
            assert_eq!(rebuilt.len(), mem.len() as u64);
        }
    }

    #[test]
    fn corrupt_leaf_is_an_error() {
        let (_dir, sm) = must_temp_tree();
        sm.insert(leaf_key(&namespace_key("a")), &b"short"[..])
            .expect("insert");
        assert!(matches!(
            NsTree::rebuild(&sm),
            Err(NsTreeError::Corrupt { .. })
        ));
    }
}
