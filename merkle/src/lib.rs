//! BLAKE3 hashes and Merkle trees for synod: the [`Hash`] type, Merkle trees
//! over a file's ordered chunk ids with inclusion proofs, a diff that finds
//! where a local and a remote tree differ while fetching only the remote
//! nodes under differing subtrees, and the namespace trie over
//! `(path, entry hash)` pairs. Pure and synchronous: no I/O, no async.
//!
//! Every node kind hashes with its own one-byte domain prefix, so a leaf can
//! never pass for an inner node or a root.
//!
//! Layout:
//! - `hash`: [`Hash`] (BLAKE3-256) with hex display, parsing and serde.
//! - `tree`: [`MerkleTree`], fan-out [`FANOUT`], (level, index) addressing,
//!   [`InclusionProof`].
//! - `diff`: [`diff_trees`] against a [`TreeSource`].
//! - `namespace`: [`NamespaceTree`], the hash trie over paths, and
//!   [`diff_namespaces`] against a [`NamespaceSource`].

mod diff;
mod hash;
mod namespace;
mod tree;

pub use diff::{diff_trees, CountingSource, DiffError, TreeDiff, TreeSource};
pub use hash::{Hash, ParseHashError};
pub use namespace::{
    diff_namespaces, namespace_key, CountingNamespaceSource, NamespaceDiffError,
    NamespaceDifference, NamespaceNode, NamespaceSource, NamespaceTree, Prefix, NAMESPACE_FANOUT,
};
pub use tree::{level_lengths, merkle_root, InclusionProof, MerkleTree, ProofError, FANOUT};
