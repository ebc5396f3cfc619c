//! Property tests of the Merkle trees, proofs and diffs.

use std::collections::BTreeMap;

use proptest::prelude::*;
use synod_merkle::{
    diff_namespaces, diff_trees, level_lengths, CountingNamespaceSource, CountingSource, Hash,
    MerkleTree, NamespaceDifference, NamespaceTree, ProofError, FANOUT,
};

fn leaf(i: u64, salt: u32) -> Hash {
    Hash::of(&[i.to_le_bytes().as_slice(), &salt.to_le_bytes()].concat())
}

/// A remote leaf list derived from a local one by a few edits.
#[derive(Debug, Clone)]
enum Edit {
    Change(usize),
    Truncate(usize),
    Append(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        prop_oneof![
            6 => any::<usize>().prop_map(Edit::Change),
            1 => (0usize..40).prop_map(Edit::Truncate),
            1 => (0usize..40).prop_map(Edit::Append),
        ],
        0..12,
    )
}

fn apply(local: &[Hash], edits: &[Edit]) -> Vec<Hash> {
    let mut remote = local.to_vec();
    for (k, e) in edits.iter().enumerate() {
        match *e {
            Edit::Change(i) if !remote.is_empty() => {
                let i = i % remote.len();
                remote[i] = leaf(i as u64, 1000 + k as u32);
            }
            Edit::Truncate(n) => remote.truncate(remote.len().saturating_sub(n)),
            Edit::Append(n) => {
                let start = remote.len() as u64;
                remote.extend((0..n as u64).map(|i| leaf(start + i, 2000 + k as u32)));
            }
            _ => {}
        }
    }
    remote
}

/// The differing positions computed naively.
fn naive_diff(a: &[Hash], b: &[Hash]) -> Vec<u64> {
    (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .map(|i| i as u64)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The diff returns exactly the differing positions and asks for
    /// O(d · log n) nodes: at most FANOUT · (d + 1) per level, plus the top.
    #[test]
    fn tree_diff_is_exact_and_cheap(n in 0usize..3000, edits in edits()) {
        let local: Vec<Hash> = (0..n as u64).map(|i| leaf(i, 0)).collect();
        let remote = apply(&local, &edits);
        let (a, b) = (MerkleTree::from_leaves(local.clone()), MerkleTree::from_leaves(remote.clone()));
        let mut src = CountingSource::new(&b);
        let diff = diff_trees(&a, &b.root(), &mut src).unwrap();

        let positions: Vec<u64> = diff.ranges.iter().flat_map(|r| r.clone()).collect();
        let expected = naive_diff(&local, &remote);
        prop_assert_eq!(&positions, &expected);
        for w in diff.ranges.windows(2) {
            prop_assert!(w[0].end < w[1].start, "ranges coalesced and sorted");
        }
        let remote_expected: Vec<(u64, Hash)> = expected
            .iter()
            .filter(|&&i| (i as usize) < remote.len())
            .map(|&i| (i, remote[i as usize]))
            .collect();
        prop_assert_eq!(diff.remote_leaves, remote_expected);

        let d = expected.len() as u64;
        let levels = level_lengths(remote.len() as u64).len() as u64;
        let bound = 1 + FANOUT as u64 * (d + 1) * levels;
        prop_assert!(src.nodes_requested <= bound,
            "asked {} nodes, bound {} (d={}, levels={})", src.nodes_requested, bound, d, levels);
        if d == 0 { prop_assert!(src.requests <= 1); }
    }

    #[test]
    fn proofs_verify_and_reject_tampering(
        n in 1usize..2000, pick in any::<usize>(), tamper in any::<(usize, usize, u8)>()
    ) {
        let leaves: Vec<Hash> = (0..n as u64).map(|i| leaf(i, 7)).collect();
        let t = MerkleTree::from_leaves(leaves.clone());
        let i = pick % n;
        let proof = t.prove(i as u64).unwrap();
        prop_assert!(proof.verify(&t.root(), &leaves[i]).is_ok());

        // A wrong leaf fails.
        prop_assert!(proof.verify(&t.root(), &leaf(i as u64, 8)).is_err());
        // A leaf proven at another index fails.
        if n > 1 {
            let mut moved = proof.clone();
            moved.leaf_index = ((i + 1) % n) as u64;
            prop_assert!(moved.verify(&t.root(), &leaves[i]).is_err());
        }
        // A flipped bit anywhere on the path fails.
        let mut bad = proof.clone();
        let nonempty: Vec<usize> = (0..bad.siblings.len()).filter(|&l| !bad.siblings[l].is_empty()).collect();
        if !nonempty.is_empty() {
            let level = nonempty[tamper.0 % nonempty.len()];
            let k = tamper.1 % bad.siblings[level].len();
            let mut bytes = *bad.siblings[level][k].as_bytes();
            bytes[tamper.2 as usize % 32] ^= 1;
            bad.siblings[level][k] = Hash::from_bytes(bytes);
            let tampered = matches!(bad.verify(&t.root(), &leaves[i]), Err(ProofError::RootMismatch { .. }));
            prop_assert!(tampered, "tampered proof must fail with a root mismatch");
        }
        // A proof claiming another leaf count fails.
        let mut recount = proof;
        recount.leaf_count += 1;
        prop_assert!(recount.verify(&t.root(), &leaves[i]).is_err());
    }

    #[test]
    fn namespace_diff_is_exact_and_grows_with_differences(
        n in 0usize..3000,
        changes in prop::collection::vec((any::<usize>(), 0u8..3), 0..20),
    ) {
        let base: BTreeMap<String, Hash> =
            (0..n).map(|i| (format!("dir{}/file{i}.txt", i % 7), leaf(i as u64, 0))).collect();
        let mut remote_map = base.clone();
        for (k, &(pick, op)) in changes.iter().enumerate() {
            let existing: Vec<String> = remote_map.keys().cloned().collect();
            match op {
                0 if !existing.is_empty() => {
                    let p = existing[pick % existing.len()].clone();
                    remote_map.insert(p, leaf(pick as u64, 99 + k as u32));
                }
                1 if !existing.is_empty() => { remote_map.remove(&existing[pick % existing.len()]); }
                _ => { remote_map.insert(format!("new/{k}/{pick}"), leaf(k as u64, 5)); }
            }
        }
        let mut local = NamespaceTree::new();
        for (p, e) in &base { local.insert(p, *e); }
        let mut remote = NamespaceTree::new();
        for (p, e) in &remote_map { remote.insert(p, *e); }

        let expected: Vec<NamespaceDifference> = base.keys().chain(remote_map.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|p| base.get(*p) != remote_map.get(*p))
            .map(|p| NamespaceDifference { path: p.clone(), local: base.get(p).copied(), remote: remote_map.get(p).copied() })
            .collect();

        let root = remote.root();
        let mut src = CountingNamespaceSource::new(&mut remote);
        let got = diff_namespaces(&mut local, &root, &mut src).unwrap();
        prop_assert_eq!(&got, &expected);
        let d = expected.len() as u64;
        // One batched request per trie level; at most d nodes on each level.
        prop_assert!(src.nodes_requested <= d * src.requests,
            "asked {} nodes in {} requests for {} differences", src.nodes_requested, src.requests, d);
        prop_assert!(src.requests <= 12, "trie of {} paths walked {} levels", n, src.requests);
        if d == 0 { prop_assert_eq!(src.requests, 0); }
    }

    /// The incrementally maintained root equals the root of a trie built
    /// from scratch over the same entries, whatever the order of edits.
    #[test]
    fn namespace_root_is_incremental_and_order_free(
        ops in prop::collection::vec((0u16..200, any::<bool>(), any::<u8>()), 0..300),
    ) {
        let mut t = NamespaceTree::new();
        let mut model = BTreeMap::new();
        for (k, (path, insert, v)) in ops.into_iter().enumerate() {
            let p = format!("d/{path}");
            if insert {
                t.insert(&p, Hash::of(&[v]));
                model.insert(p, Hash::of(&[v]));
            } else {
                t.remove(&p);
                model.remove(&p);
            }
            if k % 17 == 0 { t.root(); }
        }
        let mut fresh = NamespaceTree::new();
        for (p, e) in model.iter().rev() { fresh.insert(p, *e); }
        prop_assert_eq!(t.len(), model.len());
        prop_assert_eq!(t.root(), fresh.root());
    }
}
