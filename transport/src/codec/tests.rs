use proptest::prelude::*;

use super::*;
use crate::messages::{
    ChunkData, ChunkProtocol, ChunkRequest, ChunkResponse, ForwardProtocol, ForwardRequest,
    HashBlob, MaybeChunk, RaftProtocol, RaftRequest, TreeProtocol, TreeRequest, TreeResponse,
};
use bytes::Bytes;
use synod_merkle::Hash;

fn must_frame<P: WireProtocol>(req: &P::Request) -> Vec<u8> {
    encode_frame(req, P::NAME, Direction::Request, P::REQUEST_LIMIT).unwrap()
}

fn decode_req<P: WireProtocol>(frame: &[u8]) -> Result<P::Request, CodecError> {
    decode_frame::<P::Request>(frame, P::NAME, Direction::Request, P::REQUEST_LIMIT)
}

#[test]
fn round_trip_of_each_protocol() {
    let ids: Vec<Hash> = (0..10u8).map(|i| Hash::of(&[i])).collect();
    let fetch = ChunkRequest::Fetch(HashBlob::from_hashes(&ids));
    let back = decode_req::<ChunkProtocol>(&must_frame::<ChunkProtocol>(&fetch)).unwrap();
    assert_eq!(back, fetch);
    let ChunkRequest::Fetch(blob) = back else {
        unreachable!()
    };
    assert_eq!(blob.to_hashes().unwrap(), ids);

    let push = ChunkRequest::Push(vec![ChunkData {
        id: Hash::of(b"x"),
        bytes: b"x".to_vec().into(),
    }]);
    assert_eq!(
        decode_req::<ChunkProtocol>(&must_frame::<ChunkProtocol>(&push)).unwrap(),
        push
    );

    let tree = TreeRequest::Nodes {
        root: Hash::of(b"r"),
        level: 2,
        start: 16,
        end: 48,
    };
    assert_eq!(
        decode_req::<TreeProtocol>(&must_frame::<TreeProtocol>(&tree)).unwrap(),
        tree
    );

    let fwd = ForwardRequest::Write(synod_consensus::Request::default());
    assert_eq!(
        decode_req::<ForwardProtocol>(&must_frame::<ForwardProtocol>(&fwd)).unwrap(),
        fwd
    );

    let resp = ChunkResponse::Fetched(vec![
        MaybeChunk(Some(vec![7; 1000].into())),
        MaybeChunk(None),
    ]);
    let frame = encode_frame(
        &resp,
        "p",
        Direction::Response,
        ChunkProtocol::RESPONSE_LIMIT,
    )
    .unwrap();
    let back: ChunkResponse = decode_frame(
        &frame,
        "p",
        Direction::Response,
        ChunkProtocol::RESPONSE_LIMIT,
    )
    .unwrap();
    assert_eq!(back, resp);
}

#[test]
fn hash_lists_are_one_blob_on_the_wire() {
    let ids: Vec<Hash> = (0..100u32).map(|i| Hash::of(&i.to_le_bytes())).collect();
    let frame = must_frame::<ChunkProtocol>(&ChunkRequest::Fetch(HashBlob::from_hashes(&ids)));
    // header + variant + varint length + the raw bytes: no per-element overhead.
    assert!(
        frame.len() <= HEADER_LEN + 1 + 3 + 32 * 100,
        "{}",
        frame.len()
    );
}

#[test]
fn oversized_prefix_is_refused_before_reading_the_body() {
    // 9 bytes that claim 2^60 inside the body, behind an honest header:
    // bincode's limit refuses the claim instead of allocating it.
    let mut body = vec![0x01u8]; // ChunkRequest::Push
    body.push(0xfd); // varint u64 follows
    body.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let err = decode_req::<ChunkProtocol>(&frame).unwrap_err();
    assert!(matches!(err, CodecError::Malformed { .. }), "{err}");

    // A header claiming more than the limit is refused by the prefix check.
    let frame = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0];
    let err = decode_req::<TreeProtocol>(&frame).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::TooLarge {
                len: 0xffff_ffff,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("/synod/tree/1 request"), "{err}");
    assert!(err.to_string().contains("limit of 1024 bytes"), "{err}");
}

#[test]
fn trailing_bytes_are_refused() {
    let tree = TreeRequest::Top {
        root: Hash::of(b"r"),
    };
    let mut frame = must_frame::<TreeProtocol>(&tree);
    frame.push(0);
    let len = (frame.len() - HEADER_LEN) as u32;
    frame[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    let err = decode_req::<TreeProtocol>(&frame).unwrap_err();
    assert!(
        matches!(err, CodecError::Trailing { extra: 1, .. }),
        "{err}"
    );
}

#[test]
fn our_own_oversized_message_is_not_sent() {
    let push = ChunkRequest::Push(vec![ChunkData {
        id: Hash::ZERO,
        bytes: vec![0; ChunkProtocol::REQUEST_LIMIT + 1].into(),
    }]);
    let err = encode_frame(
        &push,
        ChunkProtocol::NAME,
        Direction::Request,
        ChunkProtocol::REQUEST_LIMIT,
    )
    .unwrap_err();
    assert!(matches!(err, CodecError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn stream_reader_counts_rejections_and_never_allocates_the_claim() {
    let metrics = CodecMetrics::default();
    // 2^32-1 claimed, a few bytes sent.
    let mut io = futures::io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5]);
    let err = read_frame::<RaftRequest, _>(
        &mut io,
        RaftProtocol::NAME,
        Direction::Request,
        RaftProtocol::REQUEST_LIMIT,
        &metrics,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert_eq!(metrics.snapshot().oversized, 1);

    // Within the limit but the stream ends early.
    let mut io = futures::io::Cursor::new(vec![0, 0, 1, 0, 1, 2]);
    read_frame::<TreeRequest, _>(
        &mut io,
        TreeProtocol::NAME,
        Direction::Request,
        TreeProtocol::REQUEST_LIMIT,
        &metrics,
    )
    .await
    .unwrap_err();
    assert_eq!(metrics.snapshot().truncated, 1);

    // Garbage body.
    let mut io = futures::io::Cursor::new(vec![0, 0, 0, 3, 9, 9, 9]);
    read_frame::<TreeRequest, _>(
        &mut io,
        TreeProtocol::NAME,
        Direction::Request,
        TreeProtocol::REQUEST_LIMIT,
        &metrics,
    )
    .await
    .unwrap_err();
    assert_eq!(metrics.snapshot().malformed, 1);
    assert_eq!(metrics.snapshot().rejected(), 3);

    // A good frame through the same path.
    let tree = TreeResponse::Top {
        leaf_count: 3,
        top: Hash::of(b"t"),
    };
    let mut out = Vec::new();
    write_frame(
        &mut out,
        &tree,
        TreeProtocol::NAME,
        Direction::Response,
        TreeProtocol::RESPONSE_LIMIT,
        &metrics,
    )
    .await
    .unwrap();
    let mut io = futures::io::Cursor::new(out);
    let back: TreeResponse = read_frame(
        &mut io,
        TreeProtocol::NAME,
        Direction::Response,
        TreeProtocol::RESPONSE_LIMIT,
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(back, tree);
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_req::<RaftProtocol>(&bytes);
        let _ = decode_req::<TreeProtocol>(&bytes);
        let _ = decode_req::<ChunkProtocol>(&bytes);
        let _ = decode_req::<ForwardProtocol>(&bytes);
        // The same bytes behind an honest header reach the decoder itself.
        let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        let _ = decode_req::<RaftProtocol>(&framed);
        let _ = decode_req::<ChunkProtocol>(&framed);
        let _ = decode_req::<ForwardProtocol>(&framed);
        let _ = decode_frame::<ChunkResponse>(&framed, "p", Direction::Response, ChunkProtocol::RESPONSE_LIMIT);
    }

    #[test]
    fn every_truncation_of_a_valid_frame_is_an_error(cut in 0usize..200) {
        let ids: Vec<Hash> = (0..5u8).map(|i| Hash::of(&[i])).collect();
        let frame = must_frame::<ChunkProtocol>(&ChunkRequest::Fetch(HashBlob::from_hashes(&ids)));
        let cut = cut.min(frame.len() - 1);
        prop_assert!(decode_req::<ChunkProtocol>(&frame[..cut]).is_err());
    }
}

/// The wire types as they were before chunk bytes became shared blobs.
mod before {
    use serde::Serialize;
    use synod_merkle::Hash;

    #[derive(Serialize)]
    pub struct ChunkData {
        pub id: Hash,
        #[serde(with = "serde_bytes")]
        pub bytes: Vec<u8>,
    }

    #[derive(Serialize)]
    pub struct MaybeChunk(#[serde(with = "serde_bytes")] pub Option<Vec<u8>>);

    #[derive(Serialize)]
    #[allow(dead_code)]
    pub enum ChunkRequest {
        Fetch(crate::messages::HashBlob),
        Push(Vec<ChunkData>),
    }

    #[derive(Serialize)]
    pub enum ChunkResponse {
        Fetched(Vec<MaybeChunk>),
    }
}

fn sizes() -> impl Strategy<Value = Vec<Option<usize>>> {
    proptest::collection::vec(
        prop_oneof![Just(None), (0usize..3000).prop_map(Some), Just(Some(65536))],
        0..12,
    )
}

fn blob_of(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 131 + j * 7) as u8).collect()
}

proptest! {
    /// Gathered frames (blobs written as pieces of their own) are the bytes
    /// plain bincode writes, and those are the bytes of the earlier wire types.
    #[test]
    fn gathered_frames_are_the_plain_wire_format(sizes in sizes()) {
        let fetched = ChunkResponse::Fetched(
            sizes.iter().enumerate()
                .map(|(i, s)| MaybeChunk(s.map(|n| Bytes::from(blob_of(i, n)))))
                .collect(),
        );
        let old = before::ChunkResponse::Fetched(
            sizes.iter().enumerate()
                .map(|(i, s)| before::MaybeChunk(s.map(|n| blob_of(i, n))))
                .collect(),
        );
        let limit = ChunkProtocol::RESPONSE_LIMIT;
        let gathered = encode_gathered(&fetched, "p", Direction::Response, limit).unwrap();
        let plain = bincode::serde::encode_to_vec(&fetched, bincode::config::standard()).unwrap();
        let earlier = bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap();
        prop_assert_eq!(&plain, &earlier);
        let frame = gathered.to_vec();
        prop_assert_eq!(&frame[HEADER_LEN..], &plain[..]);
        prop_assert_eq!(
            decode_frame::<ChunkResponse>(&frame, "p", Direction::Response, limit).unwrap(),
            fetched
        );

        let push = ChunkRequest::Push(
            sizes.iter().enumerate().map(|(i, s)| ChunkData {
                id: Hash::of(&[i as u8]),
                bytes: Bytes::from(blob_of(i, s.unwrap_or(0))),
            }).collect(),
        );
        let old = before::ChunkRequest::Push(
            sizes.iter().enumerate().map(|(i, s)| before::ChunkData {
                id: Hash::of(&[i as u8]),
                bytes: blob_of(i, s.unwrap_or(0)),
            }).collect(),
        );
        let frame = must_frame::<ChunkProtocol>(&push);
        let earlier = bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap();
        prop_assert_eq!(&frame[HEADER_LEN..], &earlier[..]);
        prop_assert_eq!(decode_req::<ChunkProtocol>(&frame).unwrap(), push);
    }
}

#[test]
fn received_chunks_are_views_of_the_frame_not_copies() {
    let resp = ChunkResponse::Fetched(vec![
        MaybeChunk(Some(Bytes::from(blob_of(1, 70_000)))),
        MaybeChunk(None),
        MaybeChunk(Some(Bytes::from(blob_of(2, 10)))),
    ]);
    let limit = ChunkProtocol::RESPONSE_LIMIT;
    let frame = encode_frame(&resp, "p", Direction::Response, limit).unwrap();
    let body = Bytes::copy_from_slice(&frame[HEADER_LEN..]);
    let back: ChunkResponse = decode_shared(&body, "p", Direction::Response, limit).unwrap();
    assert_eq!(back, resp);
    let ChunkResponse::Fetched(chunks) = back else {
        unreachable!()
    };
    let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
    for c in chunks.iter().filter_map(|c| c.0.as_ref()) {
        assert!(range.contains(&(c.as_ptr() as usize)), "chunk was copied");
    }
}
