use std::sync::Arc;

use synod_merkle::{diff_trees, CountingSource, Hash, MerkleTree};
use synod_transport::diff_remote_tree;

use crate::common::*;

fn leaves(n: u64, salt: u8) -> Vec<Hash> {
    (0..n)
        .map(|i| Hash::of(&[&i.to_le_bytes()[..], &[salt]].concat()))
        .collect()
}

#[tokio::test]
async fn remote_tree_nodes_drive_diff_trees() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let b = must_start_node(local_config()).await;
    must_mesh(&[&a, &b]).await;

    // Remote: 5000 leaves; local: the same with a few changed and a shorter tail.
    let remote_leaves = leaves(5000, 0);
    let remote = MerkleTree::from_leaves(remote_leaves.clone());
    let root = a.services.add_tree(remote.clone());
    let mut local_leaves = remote_leaves[..4900].to_vec();
    for i in [3usize, 1000, 1001, 4321] {
        local_leaves[i] = Hash::of(b"changed");
    }
    let local = Arc::new(MerkleTree::from_leaves(local_leaves));

    let (over_net, requests) = diff_remote_tree(&b.handle, a.peer, local.clone(), root)
        .await
        .unwrap();
    let mut mem = CountingSource::new(&remote);
    let expected = diff_trees(&local, &root, &mut mem).unwrap();
    assert_eq!(over_net, expected);
    assert_eq!(requests, mem.requests);
    assert_eq!(
        over_net.ranges,
        vec![3..4, 1000..1002, 4321..4322, 4900..5000]
    );

    // A tree wider than one answer: level 0 comes in several requests.
    let wide = MerkleTree::from_leaves(leaves(40_000, 1));
    let wide_root = a.services.add_tree(wide.clone());
    let empty = Arc::new(MerkleTree::from_leaves(Vec::new()));
    let (d, _) = diff_remote_tree(&b.handle, a.peer, empty, wide_root)
        .await
        .unwrap();
    assert_eq!(d.ranges, vec![0..40_000]);
    assert_eq!(d.remote_leaves.len(), 40_000);
    assert_eq!(d.remote_leaves[39_999].1, wide.leaves()[39_999]);

    // A tree the peer does not have is an error, not a hang.
    let err = diff_remote_tree(&b.handle, a.peer, local, Hash::of(b"unknown"))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("fetching remote tree nodes failed"),
        "{err}"
    );
}
