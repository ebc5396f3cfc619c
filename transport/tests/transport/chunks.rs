use std::time::Duration;

use synod_merkle::Hash;
use synod_transport::{Bytes, ChunkData, ChunkDelta, HashBlob, RequestError};

use crate::common::*;

#[tokio::test]
async fn fetched_chunks_are_verified_and_a_lying_peer_is_reported() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let b = must_start_node(local_config()).await;
    must_mesh(&[&a, &b]).await;
    let ids: Vec<Hash> = (0..20u8)
        .map(|i| a.services.add_chunk(vec![i; 70_000]))
        .collect();
    let missing = Hash::of(b"nobody has this");

    tracing::info!("--- honest fetch");
    let mut ask = ids.clone();
    ask.push(missing);
    let got = b.handle.fetch_chunks(a.peer, &ask).await.unwrap();
    assert_eq!(got.len(), 21);
    for (i, c) in got[..20].iter().enumerate() {
        assert_eq!(c.as_deref(), Some(&vec![i as u8; 70_000][..]));
    }
    assert_eq!(got[20], None);

    tracing::info!("--- the peer starts lying");
    *a.services.corrupt.lock().unwrap() = true;
    let err = b.handle.fetch_chunks(a.peer, &ids).await.unwrap_err();
    assert!(
        matches!(err, RequestError::BadChunk { peer, id } if peer == a.peer && id == ids[0]),
        "{err}"
    );
    assert_eq!(b.handle.metrics().reports_of(&a.peer), 1);

    tracing::info!("--- honest again: the connection still serves");
    *a.services.corrupt.lock().unwrap() = false;
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        b.handle.fetch_chunks(a.peer, &ids[..3]),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(got.iter().all(Option::is_some));
}

#[tokio::test]
async fn pushed_chunks_with_wrong_bytes_are_refused() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let b = must_start_node(local_config()).await;
    must_mesh(&[&a, &b]).await;

    let good = ChunkData {
        id: Hash::of(b"good"),
        bytes: Bytes::from_static(b"good"),
    };
    let bad = ChunkData {
        id: Hash::of(b"claimed"),
        bytes: Bytes::from_static(b"actual"),
    };
    let err = b
        .handle
        .push_chunks(a.peer, vec![good.clone(), bad.clone()])
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Refused { .. }), "{err}");
    assert!(err.to_string().contains(&bad.id.to_string()), "{err}");
    assert_eq!(
        *a.services.stored.lock().unwrap(),
        0,
        "nothing of a bad batch is stored"
    );
    assert_eq!(a.handle.metrics().reports_of(&b.peer), 1);

    b.handle
        .push_chunks(a.peer, vec![good.clone()])
        .await
        .unwrap();
    assert_eq!(
        a.services.chunks.lock().unwrap().get(&good.id),
        Some(&good.bytes.to_vec())
    );
}

#[tokio::test]
async fn oversized_fetch_is_refused_locally() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let ids = vec![Hash::ZERO; synod_transport::messages::MAX_CHUNKS_PER_REQUEST + 1];
    let err = a.handle.fetch_chunks(a.peer, &ids).await.unwrap_err();
    assert!(matches!(err, RequestError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn a_peer_answers_which_chunks_it_lacks() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let b = must_start_node(local_config()).await;
    must_mesh(&[&a, &b]).await;
    let held = b.services.add_chunk(vec![1u8; 1000]);
    let absent = Hash::of(b"absent");
    let missing = a
        .handle
        .missing_chunks(b.handle.local_peer_id(), &[held, absent])
        .await
        .unwrap();
    assert_eq!(missing, vec![absent]);
    a.handle
        .push_manifests(
            b.handle.local_peer_id(),
            vec![b"manifest one".to_vec(), b"manifest two".to_vec()],
        )
        .await
        .unwrap();
    assert_eq!(
        *b.services.manifests.lock().unwrap(),
        vec![b"manifest one".to_vec(), b"manifest two".to_vec()]
    );
}

#[tokio::test]
async fn delta_requests_get_answers_a_node_without_manifests_can_give() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let b = must_start_node(local_config()).await;
    must_mesh(&[&a, &b]).await;
    let held = b.services.add_chunk(vec![2u8; 1000]);
    let to = b.handle.local_peer_id();
    // A node that keeps no manifests knows no base version: the writer
    // then asks about every chunk.
    let base = Hash::of(b"some manifest");
    let answers = a
        .handle
        .missing_since(to, &[(base, vec![held]), (base, vec![])])
        .await
        .unwrap();
    assert_eq!(answers, vec![None, None]);
    let sigs = a.handle.signatures(to, &[vec![held]]).await.unwrap();
    assert_eq!(sigs, vec![None]);
    let err = a.handle.push_deltas(to, vec![]).await.unwrap_err();
    assert!(err.to_string().contains("0 deltas"), "{err}");
    let delta = ChunkDelta {
        id: Hash::of(b"new"),
        base: HashBlob::from_hashes(&[held]),
        delta: b"not a delta".to_vec(),
    };
    let err = a.handle.push_deltas(to, vec![delta]).await.unwrap_err();
    assert!(err.to_string().contains("not served here"), "{err}");
    // And it goes on serving.
    let got = a.handle.fetch_chunks(to, &[held]).await.unwrap();
    assert_eq!(got, vec![Some(Bytes::from(vec![2u8; 1000]))]);
}

#[tokio::test]
async fn a_fetch_from_request_reaches_the_service_and_bad_ones_stay_local() {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let b = must_start_node(local_config()).await;
    must_mesh(&[&a, &b]).await;
    let ids = [Hash::of(b"one"), Hash::of(b"two")];

    let err = b.handle.fetch_from(a.peer, 7, &[]).await.unwrap_err();
    assert!(matches!(err, RequestError::Invalid(_)), "{err}");
    let many = vec![Hash::of(b"x"); synod_transport::messages::MAX_CHUNKS_PER_REQUEST + 1];
    let err = b.handle.fetch_from(a.peer, 7, &many).await.unwrap_err();
    assert!(matches!(err, RequestError::Invalid(_)), "{err}");

    // The test services do not copy from peers: the refusal names the
    // count and the node, and travels back as such.
    let err = b.handle.fetch_from(a.peer, 7, &ids).await.unwrap_err();
    assert!(
        matches!(&err, RequestError::Refused { reason, .. } if reason.contains("2 chunks") && reason.contains("node 7")),
        "{err}"
    );
}
