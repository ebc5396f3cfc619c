use std::time::Duration;

use synod_merkle::{Hash, MerkleTree};
use synod_transport::{Bytes, RequestError};

use crate::common::*;

#[tokio::test]
async fn a_stranger_is_refused_and_members_keep_being_served() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let member = must_start_node(local_config()).await;
    let stranger = must_start_node(local_config()).await;
    must_mesh(&[&a, &member]).await;
    let id = a.services.add_chunk(b"secret".to_vec());
    let root = a.services.add_tree(MerkleTree::from_leaves(vec![id]));

    // The stranger has a valid identity and knows a's address; it allows a.
    stranger.handle.set_allowed_peers([a.peer]).await.unwrap();
    stranger
        .handle
        .add_peer_address(a.peer, a.addr.clone())
        .await
        .unwrap();

    tracing::info!("--- stranger asks for a chunk, a tree, and forwards a write");
    let err = stranger
        .handle
        .fetch_chunks(a.peer, &[id])
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Unreachable { .. }), "{err}");
    let err = stranger.handle.tree_top(a.peer, root).await.unwrap_err();
    assert!(matches!(err, RequestError::Unreachable { .. }), "{err}");
    let err = stranger
        .handle
        .forward_write(a.peer, synod_consensus::Request::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Unreachable { .. }), "{err}");
    let err = stranger
        .handle
        .push_chunks(
            a.peer,
            vec![synod_transport::ChunkData {
                id: Hash::of(b"x"),
                bytes: Bytes::from_static(b"x"),
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Unreachable { .. }), "{err}");
    assert!(!a
        .services
        .chunks
        .lock()
        .unwrap()
        .contains_key(&Hash::of(b"x")));
    assert!(!a
        .handle
        .connected_peers()
        .await
        .unwrap()
        .contains(&stranger.peer));

    tracing::info!("--- the member is served");
    let got = member.handle.fetch_chunks(a.peer, &[id]).await.unwrap();
    assert_eq!(got, vec![Some(Bytes::from_static(b"secret"))]);
    assert_eq!(member.handle.tree_top(a.peer, root).await.unwrap().0, 1);

    tracing::info!("--- removing the member from the allow-list cuts it off");
    a.handle.set_allowed_peers([]).await.unwrap();
    must_eventually("member disconnected", Duration::from_secs(5), || async {
        !a.handle
            .connected_peers()
            .await
            .unwrap()
            .contains(&member.peer)
    })
    .await;
    let err = member.handle.fetch_chunks(a.peer, &[id]).await.unwrap_err();
    assert!(matches!(err, RequestError::Unreachable { .. }), "{err}");
}
