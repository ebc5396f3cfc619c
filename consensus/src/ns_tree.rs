//! The namespace Merkle root, kept up to date as entries are applied.
//!
//! The trie and its root are exactly those of [`synod_merkle::NamespaceTree`]
//! (16-ary, each path placed by `namespace_key(path)`, a node with one path
//! is that path's leaf, a node with none is `Hash::ZERO`). Memory holds, for
//! each path, its namespace key and its leaf hash (64 bytes), grouped by
//! *bucket* (the nodes four nibbles deep, 16⁴ = 65,536 of them), plus the
//! count and hash of every bucket and of the 4,369 nodes above them.
//!
//! Nothing of the trie is stored: it is derived from the entries (`e` keys)
//! when a store opens or a snapshot is installed, in one pass. A second
//! sled key per path cost apply more than the entry itself (every new key
//! is a B-tree insert with its node copies and splits), and sled keeps
//! ≈ 50 bytes of memory per key anyway, about what a path costs here.
//! Apply records each written path ([`NsTree::set`]) and marks its bucket
//! dirty; [`NsTree::root`] rehashes the dirty buckets and the nodes above.

use synod_merkle::{namespace_key, Hash, NamespaceNode};

/// Depth (in nibbles) of the buckets.
const BUCKET_DEPTH: usize = 4;
/// Number of buckets: 16^BUCKET_DEPTH.
const BUCKETS: usize = 1 << (4 * BUCKET_DEPTH);

/// Why the trie could not be derived from the stored entries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NsTreeError {
    /// sled failed.
    #[error("sled error reading the namespace entries")]
    Sled(#[from] sled::Error),
    /// A stored entry's key is not a path.
    #[error("malformed namespace entry key {key}: {reason}")]
    Corrupt {
        /// The key, hex.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The leaf hash of `path` holding the entry whose encoding hashes to `entry`.
pub(crate) fn leaf_hash(path: &str, entry: Hash) -> Hash {
    NamespaceNode::Leaf {
        path: path.to_owned(),
        entry,
    }
    .hash()
}

/// The bucket of a namespace key: its first four nibbles.
fn bucket_of(key: &Hash) -> usize {
    let b = key.as_bytes();
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn nibble(key: &Hash, depth: usize) -> usize {
    let byte = key.as_bytes()[depth / 2];
    usize::from(if depth.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    })
}

/// One path in a bucket: its namespace key and its leaf hash.
pub(crate) type Slot = (Hash, Hash);

/// The slot of `path` holding the entry whose encoding hashes to `entry`.
pub(crate) fn slot(path: &str, entry: Hash) -> Slot {
    (namespace_key(path), leaf_hash(path, entry))
}

/// The hash of the node `depth` nibbles deep that holds exactly `leaves`
/// (sorted by key, all sharing their first `depth` nibbles), as
/// `NamespaceTree` computes it.
fn node_hash(leaves: &[Slot], depth: usize) -> Hash {
    match leaves {
        [] => Hash::ZERO,
        [one] => one.1,
        // Distinct keys differ before depth 64.
        _ if depth >= 64 => Hash::ZERO,
        _ => {
            let mut children = [Hash::ZERO; 16];
            let mut rest = leaves;
            while let Some(first) = rest.first() {
                let nib = nibble(&first.0, depth);
                let n = rest
                    .iter()
                    .take_while(|l| nibble(&l.0, depth) == nib)
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

/// The live namespace trie of a state machine. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct NsTree {
    levels: Levels,
    /// The paths of each bucket, sorted by namespace key.
    buckets: Vec<Vec<Slot>>,
    /// One bit per bucket whose paths changed since it was last hashed.
    dirty: Vec<u64>,
    any_dirty: bool,
    /// Number of paths (tombstones included).
    len: u64,
}

impl Default for NsTree {
    fn default() -> Self {
        NsTree {
            levels: Levels::new(),
            buckets: vec![Vec::new(); BUCKETS],
            dirty: vec![0; BUCKETS / 64],
            any_dirty: false,
            len: 0,
        }
    }
}

impl NsTree {
    /// Derives the trie from the entries of `sm` (`prefix` + path → the
    /// entry's encoding, which is what its leaf hashes), in one pass.
    pub fn rebuild(sm: &sled::Tree, prefix: u8) -> Result<NsTree, NsTreeError> {
        let mut t = NsTree::default();
        for kv in sm.scan_prefix([prefix]) {
            let (k, v) = kv?;
            let path = std::str::from_utf8(&k[1..]).map_err(|_| NsTreeError::Corrupt {
                key: k.iter().map(|b| format!("{b:02x}")).collect(),
                reason: "path is not UTF-8",
            })?;
            let s = slot(path, Hash::of(&v));
            t.buckets[bucket_of(&s.0)].push(s);
        }
        for b in 0..BUCKETS {
            let bucket = &mut t.buckets[b];
            if bucket.is_empty() {
                continue;
            }
            bucket.sort_unstable_by_key(|s| s.0);
            bucket.shrink_to_fit();
            t.len += bucket.len() as u64;
            t.dirty[b / 64] |= 1 << (b % 64);
            t.any_dirty = true;
        }
        Ok(t)
    }

    /// Number of paths.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether a path whose namespace key is `key` has an entry.
    pub fn contains(&self, key: &Hash) -> bool {
        self.buckets[bucket_of(key)]
            .binary_search_by_key(key, |s| s.0)
            .is_ok()
    }

    /// Records a path's new [`slot`].
    pub fn set(&mut self, slot: Slot) {
        let key = slot.0;
        let b = bucket_of(&key);
        let bucket = &mut self.buckets[b];
        match bucket.binary_search_by_key(&key, |s| s.0) {
            Ok(i) => bucket[i] = slot,
            Err(i) => {
                bucket.insert(i, slot);
                self.len += 1;
            }
        }
        self.dirty[b / 64] |= 1 << (b % 64);
        self.any_dirty = true;
    }

    /// The root, after rehashing the dirty buckets.
    pub fn root(&mut self) -> Hash {
        if self.any_dirty {
            for w in 0..self.dirty.len() {
                while self.dirty[w] != 0 {
                    let bit = self.dirty[w].trailing_zeros() as usize;
                    let b = w * 64 + bit;
                    let bucket = &self.buckets[b];
                    self.levels
                        .set_bucket(b, bucket.len() as u64, node_hash(bucket, BUCKET_DEPTH));
                    self.dirty[w] &= !(1 << bit);
                }
            }
            self.any_dirty = false;
        }
        self.levels.root().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_merkle::NamespaceTree;

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

    fn key(path: &str) -> Vec<u8> {
        let mut k = vec![b'e'];
        k.extend_from_slice(path.as_bytes());
        k
    }

    #[test]
    fn same_root_as_the_in_memory_tree() {
        // Sizes around the interesting cases: empty, one path (a leaf at
        // the root), paths sharing buckets, and many buckets.
        for n in [0u64, 1, 2, 3, 17, 300, 5000, 70_000] {
            let mut mem = NamespaceTree::new();
            let mut live = NsTree::default();
            for i in 0..n {
                let path = format!("d{}/f{i}", i % 7);
                let entry = Hash::of(&i.to_le_bytes());
                mem.insert(&path, entry);
                live.set(slot(&path, entry));
            }
            assert_eq!(live.root(), mem.root(), "{n} paths");
            assert_eq!(live.len(), n);
        }
    }

    #[test]
    fn incremental_root_follows_writes_and_a_rebuild_agrees() {
        let (_dir, sm) = must_temp_tree();
        let mut mem = NamespaceTree::new();
        let mut live = NsTree::default();
        for round in 0..4u64 {
            for i in 0..500u64 {
                // Rewrites earlier paths too: `i % 300` repeats.
                let path = format!("r/{}", (i * 7 + round * 3) % 300 + round * 100);
                let value = (round * 1000 + i).to_le_bytes();
                mem.insert(&path, Hash::of(&value));
                sm.insert(key(&path), &value[..]).expect("insert");
                live.set(slot(&path, Hash::of(&value)));
            }
            assert_eq!(live.root(), mem.root(), "round {round}");
            assert_eq!(live.len(), mem.len() as u64);
            let mut rebuilt = NsTree::rebuild(&sm, b'e').expect("rebuild");
            assert_eq!(rebuilt.root(), mem.root());
            assert_eq!(rebuilt.len(), mem.len() as u64);
        }
    }

    #[test]
    fn an_entry_key_that_is_not_a_path_is_an_error() {
        let (_dir, sm) = must_temp_tree();
        sm.insert([b'e', 0xff, 0xfe], &b"x"[..]).expect("insert");
        assert!(matches!(
            NsTree::rebuild(&sm, b'e'),
            Err(NsTreeError::Corrupt { .. })
        ));
    }
}
