//! Merkle trees over an ordered sequence of leaf hashes (a file's chunk ids),
//! with (level, index) node addressing and inclusion proofs.

use std::ops::Range;

use crate::Hash;

/// Children per inner node.
///
/// Sixteen keeps trees shallow: a diff walks one batched request per level,
/// so a 16 M-chunk (1 TiB) file needs 6 round trips instead of binary's 24,
/// while each differing node costs 16 × 32 = 512 bytes of child hashes: about
/// 3 KiB per changed chunk in a 1 TiB file, nothing next to a 64 KiB chunk.
/// An inclusion proof holds 15 hashes per level (6 levels for 1 TiB).
pub const FANOUT: usize = 16;

// Domain-separation prefixes: a group of raw leaves, a group of nodes and the
// root (which also commits to the leaf count) can never hash alike.
const LEAF_GROUP: u8 = 0x01;
const NODE_GROUP: u8 = 0x02;
const ROOT: u8 = 0x03;

/// Hash of one node at `level` (≥ 1) given its children at `level - 1`.
pub(crate) fn hash_group(level: usize, children: &[Hash]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[if level == 1 { LEAF_GROUP } else { NODE_GROUP }]);
    for child in children {
        hasher.update(child.as_bytes());
    }
    hasher.finalize().into()
}

pub(crate) fn hash_root(leaf_count: u64, top: &Hash) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[ROOT]);
    hasher.update(&leaf_count.to_le_bytes());
    hasher.update(top.as_bytes());
    hasher.finalize().into()
}

/// Number of nodes on each level of a tree with `leaf_count` leaves, from the
/// leaves (level 0) to the single top node. Empty for an empty tree.
pub fn level_lengths(leaf_count: u64) -> Vec<u64> {
    if leaf_count == 0 {
        return Vec::new();
    }
    let mut lens = vec![leaf_count];
    loop {
        let next = lens[lens.len() - 1].div_ceil(FANOUT as u64);
        lens.push(next);
        if next == 1 {
            return lens;
        }
    }
}

/// The root of the tree over `leaves`, without keeping the tree.
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    MerkleTree::from_leaves(leaves.to_vec()).root()
}

/// A Merkle tree kept whole in memory.
///
/// Level 0 holds the leaves themselves; level `l ≥ 1` holds the hashes of
/// groups of up to [`FANOUT`] nodes of level `l - 1`. The top level has one
/// node; the root hashes that node together with the leaf count. The root of
/// an empty tree is [`Hash::ZERO`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    pub fn from_leaves(leaves: Vec<Hash>) -> MerkleTree {
        if leaves.is_empty() {
            return MerkleTree { levels: Vec::new() };
        }
        let mut levels = vec![leaves];
        loop {
            let below = &levels[levels.len() - 1];
            let level = levels.len();
            let next: Vec<Hash> = below
                .chunks(FANOUT)
                .map(|group| hash_group(level, group))
                .collect();
            let done = next.len() == 1;
            levels.push(next);
            if done {
                return MerkleTree { levels };
            }
        }
    }

    pub fn leaf_count(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub fn leaves(&self) -> &[Hash] {
        self.levels.first().map_or(&[], |l| l.as_slice())
    }

    /// Number of levels, leaves included (0 for an empty tree, else ≥ 2).
    pub fn level_count(&self) -> usize {
        self.levels.len()
    }

    /// The single node of the top level (`None` for an empty tree).
    pub fn top(&self) -> Option<Hash> {
        self.levels.last().map(|l| l[0])
    }

    pub fn root(&self) -> Hash {
        match self.top() {
            Some(top) => hash_root(self.leaf_count(), &top),
            None => Hash::ZERO,
        }
    }

    /// The node at `(level, index)`; level 0 are the leaves.
    pub fn node(&self, level: usize, index: u64) -> Option<Hash> {
        let index = usize::try_from(index).ok()?;
        self.levels.get(level)?.get(index).copied()
    }

    /// The nodes of `level` in `range`, clipped to what exists.
    pub fn nodes(&self, level: usize, range: Range<u64>) -> &[Hash] {
        let Some(nodes) = self.levels.get(level) else {
            return &[];
        };
        let len = nodes.len() as u64;
        let start = range.start.min(len) as usize;
        let end = range.end.clamp(range.start.min(len), len) as usize;
        &nodes[start..end]
    }

    /// Proof that leaf `index` belongs to this tree.
    pub fn prove(&self, index: u64) -> Option<InclusionProof> {
        if index >= self.leaf_count() {
            return None;
        }
        let mut siblings = Vec::with_capacity(self.levels.len() - 1);
        let mut idx = index as usize;
        for level in &self.levels[..self.levels.len() - 1] {
            let start = idx - idx % FANOUT;
            let end = (start + FANOUT).min(level.len());
            let group: Vec<Hash> = (start..end)
                .filter(|&i| i != idx)
                .map(|i| level[i])
                .collect();
            siblings.push(group);
            idx /= FANOUT;
        }
        Some(InclusionProof {
            leaf_index: index,
            leaf_count: self.leaf_count(),
            siblings,
        })
    }
}

/// Why an inclusion proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    #[error("leaf index {index} is outside a tree of {count} leaves")]
    IndexOutOfRange { index: u64, count: u64 },
    #[error("proof has {got} levels, a tree of {count} leaves has {expected}")]
    WrongDepth {
        got: usize,
        expected: usize,
        count: u64,
    },
    #[error("proof level {level} has {got} siblings, expected {expected}")]
    WrongGroupSize {
        level: usize,
        got: usize,
        expected: usize,
    },
    #[error("proof leads to root {computed}, expected {expected}")]
    RootMismatch { computed: Hash, expected: Hash },
}

/// The sibling hashes on the path from one leaf to the root.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub leaf_count: u64,
    /// Per level from the leaves up: the other members of the path node's group.
    pub siblings: Vec<Vec<Hash>>,
}

impl InclusionProof {
    /// Checks that `leaf` sits at `leaf_index` of the tree whose root is `root`.
    pub fn verify(&self, root: &Hash, leaf: &Hash) -> Result<(), ProofError> {
        if self.leaf_index >= self.leaf_count {
            return Err(ProofError::IndexOutOfRange {
                index: self.leaf_index,
                count: self.leaf_count,
            });
        }
        let lens = level_lengths(self.leaf_count);
        if self.siblings.len() != lens.len() - 1 {
            return Err(ProofError::WrongDepth {
                got: self.siblings.len(),
                expected: lens.len() - 1,
                count: self.leaf_count,
            });
        }
        let mut node = *leaf;
        let mut idx = self.leaf_index;
        for (level, (siblings, &len)) in self.siblings.iter().zip(&lens).enumerate() {
            let start = idx - idx % FANOUT as u64;
            let group_len = (start + FANOUT as u64).min(len) - start;
            if siblings.len() as u64 != group_len - 1 {
                return Err(ProofError::WrongGroupSize {
                    level,
                    got: siblings.len(),
                    expected: group_len as usize - 1,
                });
            }
            let pos = (idx - start) as usize;
            let mut group = Vec::with_capacity(FANOUT);
            group.extend_from_slice(&siblings[..pos]);
            group.push(node);
            group.extend_from_slice(&siblings[pos..]);
            node = hash_group(level + 1, &group);
            idx /= FANOUT as u64;
        }
        let computed = hash_root(self.leaf_count, &node);
        if computed != *root {
            return Err(ProofError::RootMismatch {
                computed,
                expected: *root,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n as u64).map(|i| Hash::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn empty_tree_root_is_zero() {
        let t = MerkleTree::from_leaves(Vec::new());
        assert_eq!(t.root(), Hash::ZERO);
        assert_eq!(merkle_root(&[]), Hash::ZERO);
        assert!(t.prove(0).is_none());
    }

    #[test]
    fn shape_follows_fanout() {
        assert_eq!(level_lengths(1), vec![1, 1]);
        assert_eq!(level_lengths(16), vec![16, 1]);
        assert_eq!(level_lengths(17), vec![17, 2, 1]);
        assert_eq!(level_lengths(257), vec![257, 17, 2, 1]);
        let t = MerkleTree::from_leaves(leaves(257));
        assert_eq!(t.level_count(), 4);
        assert_eq!(t.node(1, 16), Some(hash_group(1, &leaves(257)[256..])));
        assert_eq!(t.node(1, 17), None);
    }

    #[test]
    fn root_commits_to_leaf_order_and_count() {
        let a = leaves(40);
        let mut b = a.clone();
        b.swap(3, 4);
        assert_ne!(merkle_root(&a), merkle_root(&b));
        assert_ne!(merkle_root(&a), merkle_root(&a[..39]));
        // A single leaf's root is not the leaf itself.
        assert_ne!(merkle_root(&a[..1]), a[0]);
    }

    #[test]
    fn every_leaf_proves() {
        for n in [1, 2, 15, 16, 17, 255, 256, 257, 1000] {
            let t = MerkleTree::from_leaves(leaves(n));
            for i in 0..n as u64 {
                let p = t.prove(i).unwrap();
                p.verify(&t.root(), &leaves(n)[i as usize]).unwrap();
            }
        }
    }

    #[test]
    fn proof_rejects_truncation() {
        let t = MerkleTree::from_leaves(leaves(300));
        let mut p = t.prove(5).unwrap();
        p.siblings.pop();
        assert!(matches!(
            p.verify(&t.root(), &leaves(300)[5]),
            Err(ProofError::WrongDepth { .. })
        ));
    }
}
