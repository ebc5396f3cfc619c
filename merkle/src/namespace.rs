//! The namespace tree: a Merkle trie over `(path, entry hash)` pairs, so two
//! namespaces can be compared at a cost that grows with their differences.
//!
//! A positional tree over the sorted paths would shift every leaf after an
//! inserted path and make the diff O(n). Here each path is placed by the
//! BLAKE3 of its name (its *key*): the node for a key prefix hashes the set of
//! entries whose keys start with it, so the shape depends only on the set of
//! paths, never on the order of edits, and an insert changes one root-to-leaf
//! path. Sorting the entries by key makes every node a contiguous key range.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;

use crate::Hash;

/// Children per trie node: one per hex digit (nibble) of the key.
pub const NAMESPACE_FANOUT: usize = 16;

const NS_KEY: u8 = 0x10;
const NS_LEAF: u8 = 0x11;
const NS_INNER: u8 = 0x12;

/// Where a path sits in the trie.
pub fn namespace_key(path: &str) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[NS_KEY]);
    hasher.update(path.as_bytes());
    hasher.finalize().into()
}

fn leaf_hash(path: &str, entry: &Hash) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[NS_LEAF]);
    hasher.update(&(path.len() as u64).to_le_bytes());
    hasher.update(path.as_bytes());
    hasher.update(entry.as_bytes());
    hasher.finalize().into()
}

fn inner_hash(children: &[Hash; NAMESPACE_FANOUT]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[NS_INNER]);
    for child in children {
        hasher.update(child.as_bytes());
    }
    hasher.finalize().into()
}

/// A node address: the first `depth` nibbles of a key.
#[derive(
    Clone, Copy, PartialEq, Eq, std::hash::Hash, Debug, serde::Serialize, serde::Deserialize,
)]
pub struct Prefix {
    depth: u8,
    bits: Hash,
}

impl Prefix {
    /// The whole trie.
    pub const ROOT: Prefix = Prefix {
        depth: 0,
        bits: Hash::ZERO,
    };
    /// Keys have 64 nibbles.
    pub const MAX_DEPTH: u8 = 64;

    /// The prefix of `key` of `depth` nibbles (clamped to 64).
    pub fn of_key(key: &Hash, depth: u8) -> Prefix {
        let depth = depth.min(Self::MAX_DEPTH);
        let mut bits = *key.as_bytes();
        let full = depth as usize / 2;
        if full < 32 {
            if depth % 2 == 1 {
                bits[full] &= 0xf0;
                bits[full + 1..].fill(0);
            } else {
                bits[full..].fill(0);
            }
        }
        Prefix {
            depth,
            bits: Hash::from_bytes(bits),
        }
    }

    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// The `nibble`-th child (`None` at full depth or for a nibble ≥ 16).
    pub fn child(&self, nibble: u8) -> Option<Prefix> {
        if self.depth >= Self::MAX_DEPTH || nibble >= 16 {
            return None;
        }
        let mut bits = *self.bits.as_bytes();
        let byte = self.depth as usize / 2;
        bits[byte] |= if self.depth.is_multiple_of(2) {
            nibble << 4
        } else {
            nibble
        };
        Some(Prefix {
            depth: self.depth + 1,
            bits: Hash::from_bytes(bits),
        })
    }

    /// Whether this prefix is well formed (no bits set past its depth).
    pub fn is_canonical(&self) -> bool {
        self.depth <= Self::MAX_DEPTH && Prefix::of_key(&self.bits, self.depth) == *self
    }

    /// The keys under this prefix.
    fn key_range(&self) -> RangeInclusive<Hash> {
        let mut hi = *self.bits.as_bytes();
        let full = self.depth as usize / 2;
        if full < 32 {
            if self.depth % 2 == 1 {
                hi[full] |= 0x0f;
                hi[full + 1..].fill(0xff);
            } else {
                hi[full..].fill(0xff);
            }
        }
        self.bits..=Hash::from_bytes(hi)
    }
}

/// One trie node as a peer serves it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NamespaceNode {
    /// No path under this prefix.
    Empty,
    /// Exactly one path under this prefix.
    Leaf { path: String, entry: Hash },
    /// Two or more paths: the hashes of the 16 children.
    Inner {
        children: Box<[Hash; NAMESPACE_FANOUT]>,
    },
}

impl NamespaceNode {
    pub fn hash(&self) -> Hash {
        match self {
            NamespaceNode::Empty => Hash::ZERO,
            NamespaceNode::Leaf { path, entry } => leaf_hash(path, entry),
            NamespaceNode::Inner { children } => inner_hash(children),
        }
    }
}

/// The namespace Merkle trie, in memory and updated incrementally: an insert
/// or remove forgets the cached hashes on one root-to-leaf path, and
/// [`NamespaceTree::root`] rehashes only those.
#[derive(Debug, Clone, Default)]
pub struct NamespaceTree {
    entries: BTreeMap<Hash, (String, Hash)>,
    inner_cache: HashMap<Prefix, Hash>,
}

impl NamespaceTree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets the entry hash of `path`, returning the previous one.
    pub fn insert(&mut self, path: &str, entry: Hash) -> Option<Hash> {
        let key = namespace_key(path);
        let old = self.entries.insert(key, (path.to_owned(), entry));
        if old.as_ref().map(|(_, e)| *e) != Some(entry) {
            self.forget_path(&key);
        }
        old.map(|(_, e)| e)
    }

    pub fn remove(&mut self, path: &str) -> Option<Hash> {
        let key = namespace_key(path);
        let old = self.entries.remove(&key)?;
        self.forget_path(&key);
        Some(old.1)
    }

    pub fn get(&self, path: &str) -> Option<Hash> {
        self.entries.get(&namespace_key(path)).map(|(_, e)| *e)
    }

    /// Entries in key order (not path order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, Hash)> {
        self.entries.values().map(|(p, e)| (p.as_str(), *e))
    }

    pub fn root(&mut self) -> Hash {
        self.node_hash(Prefix::ROOT)
    }

    /// The node at `prefix`, as served to a peer running a diff.
    pub fn node(&mut self, prefix: Prefix) -> NamespaceNode {
        let mut range = self.entries.range(prefix.key_range());
        match (range.next(), range.next()) {
            (None, _) => NamespaceNode::Empty,
            (Some((_, (path, entry))), None) => NamespaceNode::Leaf {
                path: path.clone(),
                entry: *entry,
            },
            _ => NamespaceNode::Inner {
                children: Box::new(self.children(prefix)),
            },
        }
    }

    fn forget_path(&mut self, key: &Hash) {
        for depth in 0..=Prefix::MAX_DEPTH {
            self.inner_cache.remove(&Prefix::of_key(key, depth));
        }
    }

    fn node_hash(&mut self, prefix: Prefix) -> Hash {
        let mut range = self.entries.range(prefix.key_range());
        match (range.next(), range.next()) {
            (None, _) => Hash::ZERO,
            (Some((_, (path, entry))), None) => leaf_hash(path, entry),
            _ => {
                if let Some(h) = self.inner_cache.get(&prefix) {
                    return *h;
                }
                let h = inner_hash(&self.children(prefix));
                self.inner_cache.insert(prefix, h);
                h
            }
        }
    }

    fn children(&mut self, prefix: Prefix) -> [Hash; NAMESPACE_FANOUT] {
        let mut children = [Hash::ZERO; NAMESPACE_FANOUT];
        for (nibble, slot) in children.iter_mut().enumerate() {
            if let Some(child) = prefix.child(nibble as u8) {
                *slot = self.node_hash(child);
            }
        }
        children
    }

    fn entries_under(&self, prefix: Prefix) -> impl Iterator<Item = (&str, Hash)> {
        self.entries
            .range(prefix.key_range())
            .map(|(_, (p, e))| (p.as_str(), *e))
    }
}

/// Read access to a remote namespace trie.
pub trait NamespaceSource {
    type Error;

    /// The nodes at `prefixes`, in the same order (one request per trie level).
    fn nodes(&mut self, prefixes: &[Prefix]) -> Result<Vec<NamespaceNode>, Self::Error>;
}

/// One path whose entry differs between the local and the remote namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceDifference {
    pub path: String,
    pub local: Option<Hash>,
    pub remote: Option<Hash>,
}

/// Why a namespace diff failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NamespaceDiffError<E> {
    #[error("fetching remote namespace nodes failed")]
    Source(#[source] E),
    #[error("remote sent {got} nodes for {asked} prefixes")]
    WrongNodeCount { asked: usize, got: usize },
    #[error("remote node at depth {depth} does not match its parent's hash {expected}")]
    NodeMismatch { depth: u8, expected: Hash },
}

/// Compares `local` with the remote namespace whose root is `remote_root`,
/// asking only for nodes whose hash differs from the local node at the same
/// prefix. Every node is checked against the hash its parent gave, so a peer
/// cannot lie. With `d` differing paths it fetches at most `d` nodes per
/// trie level. Returns the differences sorted by path.
pub fn diff_namespaces<S: NamespaceSource>(
    local: &mut NamespaceTree,
    remote_root: &Hash,
    source: &mut S,
) -> Result<Vec<NamespaceDifference>, NamespaceDiffError<S::Error>> {
    let mut out: BTreeMap<String, NamespaceDifference> = BTreeMap::new();
    let mut frontier = vec![(Prefix::ROOT, *remote_root)];
    while !frontier.is_empty() {
        let mut to_fetch = Vec::new();
        for (prefix, remote) in frontier.drain(..) {
            if local.node_hash(prefix) == remote {
                continue;
            }
            if remote == Hash::ZERO {
                for (path, entry) in local.entries_under(prefix) {
                    record(&mut out, path, Some(entry), None);
                }
            } else {
                to_fetch.push((prefix, remote));
            }
        }
        if to_fetch.is_empty() {
            break;
        }
        let prefixes: Vec<Prefix> = to_fetch.iter().map(|(p, _)| *p).collect();
        let nodes = source
            .nodes(&prefixes)
            .map_err(NamespaceDiffError::Source)?;
        if nodes.len() != prefixes.len() {
            return Err(NamespaceDiffError::WrongNodeCount {
                asked: prefixes.len(),
                got: nodes.len(),
            });
        }
        for ((prefix, expected), node) in to_fetch.into_iter().zip(nodes) {
            if node.hash() != expected {
                return Err(NamespaceDiffError::NodeMismatch {
                    depth: prefix.depth(),
                    expected,
                });
            }
            match node {
                NamespaceNode::Empty => {}
                NamespaceNode::Leaf { path, entry } => {
                    let mut seen = false;
                    for (lpath, lentry) in local.entries_under(prefix) {
                        if lpath == path {
                            seen = true;
                            if lentry != entry {
                                record(&mut out, lpath, Some(lentry), Some(entry));
                            }
                        } else {
                            record(&mut out, lpath, Some(lentry), None);
                        }
                    }
                    if !seen && prefix.key_range().contains(&namespace_key(&path)) {
                        record(&mut out, &path, None, Some(entry));
                    }
                }
                NamespaceNode::Inner { children } => {
                    for (nibble, child_hash) in children.iter().enumerate() {
                        if let Some(child) = prefix.child(nibble as u8) {
                            frontier.push((child, *child_hash));
                        }
                    }
                }
            }
        }
    }
    Ok(out.into_values().collect())
}

fn record(
    out: &mut BTreeMap<String, NamespaceDifference>,
    path: &str,
    local: Option<Hash>,
    remote: Option<Hash>,
) {
    out.insert(
        path.to_owned(),
        NamespaceDifference {
            path: path.to_owned(),
            local,
            remote,
        },
    );
}

/// A [`NamespaceSource`] over a trie in memory that counts what it is asked.
#[derive(Debug)]
pub struct CountingNamespaceSource<'a> {
    tree: &'a mut NamespaceTree,
    pub nodes_requested: u64,
    pub requests: u64,
}

impl<'a> CountingNamespaceSource<'a> {
    pub fn new(tree: &'a mut NamespaceTree) -> Self {
        CountingNamespaceSource {
            tree,
            nodes_requested: 0,
            requests: 0,
        }
    }
}

impl NamespaceSource for CountingNamespaceSource<'_> {
    type Error = std::convert::Infallible;

    fn nodes(&mut self, prefixes: &[Prefix]) -> Result<Vec<NamespaceNode>, Self::Error> {
        self.requests += 1;
        self.nodes_requested += prefixes.len() as u64;
        Ok(prefixes.iter().map(|p| self.tree.node(*p)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(paths: impl IntoIterator<Item = (String, u8)>) -> NamespaceTree {
        let mut t = NamespaceTree::new();
        for (p, v) in paths {
            t.insert(&p, Hash::of(&[v]));
        }
        t
    }

    fn from_scratch(t: &NamespaceTree) -> Hash {
        let mut fresh = NamespaceTree::new();
        for (p, e) in t.iter() {
            fresh.insert(p, e);
        }
        fresh.root()
    }

    #[test]
    fn root_is_history_independent() {
        let mut a = tree((0..500).map(|i| (format!("dir/{i}"), 1)));
        let mut b = tree((0..500).rev().map(|i| (format!("dir/{i}"), 1)));
        assert_eq!(a.root(), b.root());
        b.insert("extra", Hash::of(b"x"));
        assert_ne!(a.root(), b.root());
        b.remove("extra");
        assert_eq!(a.root(), b.root());
        assert_eq!(NamespaceTree::new().root(), Hash::ZERO);
    }

    #[test]
    fn incremental_root_matches_rebuild() {
        let mut t = tree((0..300).map(|i| (format!("f{i}"), 0)));
        t.root();
        for i in (0..300).step_by(7) {
            t.insert(&format!("f{i}"), Hash::of(b"changed"));
            t.remove(&format!("f{}", i + 1));
            assert_eq!(t.root(), from_scratch(&t));
        }
    }

    #[test]
    fn prefix_children_and_ranges() {
        let key = namespace_key("a/b");
        let p = Prefix::of_key(&key, 3);
        assert!(p.is_canonical());
        let nib = key.as_bytes()[1] & 0x0f; // nibble 3 = low half of byte 1
        assert_eq!(p.child(nib), Some(Prefix::of_key(&key, 4)));
        assert!(p.key_range().contains(&key));
        assert_eq!(Prefix::of_key(&key, 64).child(0), None);
        assert!(Prefix::of_key(&key, 64).key_range().contains(&key));
    }

    #[test]
    fn one_insert_in_many_costs_one_path() {
        let mut remote = tree((0..4096).map(|i| (format!("p/{i}"), 0)));
        let mut local = remote.clone();
        remote.insert("p/new", Hash::of(b"n"));
        let root = remote.root();
        let mut src = CountingNamespaceSource::new(&mut remote);
        let d = diff_namespaces(&mut local, &root, &mut src).unwrap();
        assert_eq!(
            d,
            vec![NamespaceDifference {
                path: "p/new".into(),
                local: None,
                remote: Some(Hash::of(b"n")),
            }]
        );
        assert_eq!(src.nodes_requested, src.requests, "one node per level");
        assert!(src.requests <= 12);
    }

    #[test]
    fn lying_remote_is_caught() {
        let mut remote = tree((0..50).map(|i| (format!("x{i}"), 0)));
        let mut local = tree((0..50).map(|i| (format!("x{i}"), 1)));
        let wrong_root = Hash::of(b"not the root");
        let mut src = CountingNamespaceSource::new(&mut remote);
        assert!(matches!(
            diff_namespaces(&mut local, &wrong_root, &mut src),
            Err(NamespaceDiffError::NodeMismatch { .. })
        ));
    }
}
