//! Diff of a local Merkle tree against a remote one, fetching only the
//! remote nodes under subtrees that differ.

use std::ops::Range;

use crate::tree::{hash_group, hash_root, level_lengths, MerkleTree, FANOUT};
use crate::Hash;

/// Read access to a remote tree's nodes (the transport implements it over
/// the network; tests use an in-memory tree).
pub trait TreeSource {
    type Error;

    /// The remote tree's leaf count and top node.
    fn top(&mut self) -> Result<(u64, Hash), Self::Error>;

    /// Nodes `range` of `level` (level 0: the leaves themselves).
    fn nodes(&mut self, level: usize, range: Range<u64>) -> Result<Vec<Hash>, Self::Error>;
}

/// What a diff found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeDiff {
    /// Sorted, disjoint, non-adjacent leaf ranges where the trees differ
    /// (a position one tree lacks counts as different).
    pub ranges: Vec<Range<u64>>,
    /// The remote leaves at the differing positions it has, in order.
    pub remote_leaves: Vec<(u64, Hash)>,
    /// The remote tree's leaf count.
    pub remote_leaf_count: u64,
}

/// Why a diff failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiffError<E> {
    #[error("fetching remote tree nodes failed")]
    Source(#[source] E),
    #[error("remote top node and leaf count {leaf_count} do not match root {expected}")]
    RootMismatch { expected: Hash, leaf_count: u64 },
    #[error("remote nodes under level {level} index {index} do not hash to their parent")]
    NodeMismatch { level: usize, index: u64 },
    #[error("remote sent {got} nodes for level {level} range {range:?}")]
    WrongNodeCount {
        level: usize,
        range: Range<u64>,
        got: usize,
    },
}

/// Compares `local` with the remote tree whose root is `remote_root`.
///
/// Descends from the remote top, one batched request per run of contiguous
/// nodes per level, and only below nodes whose hash differs from the local
/// node at the same (level, index). Every fetched group is checked against
/// its parent, so a peer cannot lie about the tree. With `d` differing
/// positions it asks for at most `FANOUT · (d + 1)` nodes per level.
pub fn diff_trees<S: TreeSource>(
    local: &MerkleTree,
    remote_root: &Hash,
    source: &mut S,
) -> Result<TreeDiff, DiffError<S::Error>> {
    let local_count = local.leaf_count();
    let mut diff = TreeDiff::default();
    let remote_count = if *remote_root == Hash::ZERO {
        0
    } else {
        let (count, top) = source.top().map_err(DiffError::Source)?;
        if count == 0 || hash_root(count, &top) != *remote_root {
            return Err(DiffError::RootMismatch {
                expected: *remote_root,
                leaf_count: count,
            });
        }
        let lens = level_lengths(count);
        // (index, remote hash) of the nodes still to compare, one level at a time.
        let mut frontier = vec![(0u64, top)];
        for level in (1..lens.len()).rev() {
            let below = lens[level - 1];
            let differing: Vec<(u64, Hash)> = frontier
                .into_iter()
                .filter(|&(i, h)| local.node(level, i) != Some(h))
                .collect();
            frontier = Vec::new();
            for run in runs(&differing) {
                let range = run[0].0 * FANOUT as u64
                    ..((run[run.len() - 1].0 + 1) * FANOUT as u64).min(below);
                let children = source
                    .nodes(level - 1, range.clone())
                    .map_err(DiffError::Source)?;
                if children.len() as u64 != range.end - range.start {
                    return Err(DiffError::WrongNodeCount {
                        level: level - 1,
                        range,
                        got: children.len(),
                    });
                }
                for (k, &(parent, expected)) in run.iter().enumerate() {
                    let group = &children[k * FANOUT..((k + 1) * FANOUT).min(children.len())];
                    if hash_group(level, group) != expected {
                        return Err(DiffError::NodeMismatch {
                            level,
                            index: parent,
                        });
                    }
                    let first = parent * FANOUT as u64;
                    frontier.extend(
                        group
                            .iter()
                            .enumerate()
                            .map(|(j, h)| (first + j as u64, *h)),
                    );
                }
            }
        }
        for (i, leaf) in frontier {
            if local.node(0, i) != Some(leaf) {
                diff.remote_leaves.push((i, leaf));
                push_position(&mut diff.ranges, i);
            }
        }
        count
    };
    if local_count > remote_count {
        push_range(&mut diff.ranges, remote_count..local_count);
    }
    diff.remote_leaf_count = remote_count;
    Ok(diff)
}

/// Splits sorted node indexes into runs of consecutive indexes.
fn runs(nodes: &[(u64, Hash)]) -> Vec<&[(u64, Hash)]> {
    let mut out = Vec::new();
    let mut start = 0;
    for k in 1..=nodes.len() {
        if k == nodes.len() || nodes[k].0 != nodes[k - 1].0 + 1 {
            if k > start {
                out.push(&nodes[start..k]);
            }
            start = k;
        }
    }
    out
}

fn push_position(ranges: &mut Vec<Range<u64>>, i: u64) {
    push_range(ranges, i..i + 1);
}

fn push_range(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    match ranges.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => ranges.push(r),
    }
}

/// A [`TreeSource`] over a tree in memory that counts what it is asked for.
#[derive(Debug)]
pub struct CountingSource<'a> {
    tree: &'a MerkleTree,
    /// Node hashes requested so far (the top counts as one).
    pub nodes_requested: u64,
    /// Requests made so far.
    pub requests: u64,
}

impl<'a> CountingSource<'a> {
    pub fn new(tree: &'a MerkleTree) -> Self {
        CountingSource {
            tree,
            nodes_requested: 0,
            requests: 0,
        }
    }
}

impl TreeSource for CountingSource<'_> {
    type Error = std::convert::Infallible;

    fn top(&mut self) -> Result<(u64, Hash), Self::Error> {
        self.requests += 1;
        self.nodes_requested += 1;
        Ok((
            self.tree.leaf_count(),
            self.tree.top().unwrap_or(Hash::ZERO),
        ))
    }

    fn nodes(&mut self, level: usize, range: Range<u64>) -> Result<Vec<Hash>, Self::Error> {
        self.requests += 1;
        self.nodes_requested += range.end - range.start;
        Ok(self.tree.nodes(level, range).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: u64, salt: u8) -> Vec<Hash> {
        (0..n)
            .map(|i| Hash::of(&[&i.to_le_bytes()[..], &[salt]].concat()))
            .collect()
    }

    #[test]
    fn identical_trees_cost_one_request() {
        let a = MerkleTree::from_leaves(leaves(5000, 0));
        let mut src = CountingSource::new(&a);
        let d = diff_trees(&a, &a.root(), &mut src).unwrap();
        assert!(d.ranges.is_empty());
        assert_eq!(src.requests, 1);
    }

    #[test]
    fn one_changed_leaf_is_found_with_few_nodes() {
        let local = leaves(4096, 0);
        let mut remote = local.clone();
        remote[1234] = Hash::of(b"new");
        let (a, b) = (
            MerkleTree::from_leaves(local),
            MerkleTree::from_leaves(remote),
        );
        let mut src = CountingSource::new(&b);
        let d = diff_trees(&a, &b.root(), &mut src).unwrap();
        assert_eq!(d.ranges, vec![1234..1235]);
        assert_eq!(d.remote_leaves, vec![(1234, Hash::of(b"new"))]);
        // top + 16 nodes on each of the 3 levels below it.
        assert_eq!(src.nodes_requested, 1 + 3 * 16);
    }

    #[test]
    fn lying_source_is_caught() {
        let a = MerkleTree::from_leaves(leaves(100, 0));
        let b = MerkleTree::from_leaves(leaves(100, 1));
        let mut src = CountingSource::new(&a);
        assert!(matches!(
            diff_trees(&a, &b.root(), &mut src),
            Err(DiffError::RootMismatch { .. })
        ));
    }

    #[test]
    fn empty_sides() {
        let a = MerkleTree::from_leaves(leaves(20, 0));
        let empty = MerkleTree::from_leaves(Vec::new());
        let mut src = CountingSource::new(&empty);
        let d = diff_trees(&a, &Hash::ZERO, &mut src).unwrap();
        assert_eq!(d.ranges, vec![0..20]);
        assert_eq!(src.requests, 0);
        let mut src = CountingSource::new(&a);
        let d = diff_trees(&empty, &a.root(), &mut src).unwrap();
        assert_eq!(d.ranges, vec![0..20]);
        assert_eq!(d.remote_leaves.len(), 20);
    }
}
