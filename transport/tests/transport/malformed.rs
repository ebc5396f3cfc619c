use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::StreamProtocol;
use synod_transport::messages::{
    ChunkProtocol, ForwardProtocol, RaftProtocol, TreeProtocol, WireProtocol,
};
use synod_transport::Bytes;

use crate::common::*;

/// Sends raw bytes as a request and reads whatever comes back.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<Vec<u8>> {
        Err(io::ErrorKind::Unsupported.into())
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.take(1 << 20).read_to_end(&mut buf).await?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(buf)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[derive(NetworkBehaviour)]
struct RawPeer {
    raft: request_response::Behaviour<RawCodec>,
    tree: request_response::Behaviour<RawCodec>,
    chunks: request_response::Behaviour<RawCodec>,
    forward: request_response::Behaviour<RawCodec>,
}

fn raw(name: &'static str) -> request_response::Behaviour<RawCodec> {
    request_response::Behaviour::new(
        [(StreamProtocol::new(name), ProtocolSupport::Outbound)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
    )
}

/// Node `a`, holding one chunk, and a member meshed with it.
async fn must_start_served_pair() -> (TestNode, TestNode, synod_merkle::Hash) {
    init_tracing();
    let a = must_start_node(local_config()).await;
    let member = must_start_node(local_config()).await;
    must_mesh(&[&a, &member]).await;
    let id = a.services.add_chunk(b"still here".to_vec());
    (a, member, id)
}

/// After the bad frames, `a` still serves its member.
async fn must_still_serve(a: &TestNode, member: &TestNode, id: synod_merkle::Hash) {
    tracing::info!("--- the node keeps serving its members");
    let got = member.handle.fetch_chunks(a.peer, &[id]).await.unwrap();
    assert_eq!(got, vec![Some(Bytes::from_static(b"still here"))]);
}

/// A bare libp2p-stream peer, allowed by `a` as a member (one with a bug,
/// not a stranger) and connected to it; its swarm runs until the returned
/// task is aborted.
async fn must_connect_stream_peer(
    a: &TestNode,
    member: &TestNode,
) -> (
    libp2p::PeerId,
    libp2p_stream::Control,
    tokio::task::JoinHandle<()>,
) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    let peer = *swarm.local_peer_id();
    a.handle
        .set_allowed_peers([member.peer, peer])
        .await
        .unwrap();
    let control = swarm.behaviour().new_control();
    swarm
        .dial(
            a.addr
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(a.peer)),
        )
        .unwrap();
    let drive = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (peer, control, drive)
}

#[tokio::test]
async fn malformed_and_oversized_frames_end_the_request_and_are_counted() {
    let (a, member, id) = must_start_served_pair().await;

    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| RawPeer {
            raft: raw(RaftProtocol::NAME),
            tree: raw(TreeProtocol::NAME),
            chunks: raw(ChunkProtocol::NAME),
            forward: raw(ForwardProtocol::NAME),
        })
        .unwrap()
        .build();
    // A member with a bug, not a stranger: it is allowed.
    a.handle
        .set_allowed_peers([member.peer, *swarm.local_peer_id()])
        .await
        .unwrap();

    let garbage = vec![0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff];
    let oversized = vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5];
    // Honest header, body claiming a 2^60-byte chunk list.
    let mut claim = vec![0, 0, 0, 10, 0x01, 0xfd];
    claim.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let before = a.handle.metrics().codec.snapshot();
    let mut ids = Vec::new();
    let addrs = vec![a.addr.clone()];
    let b = swarm.behaviour_mut();
    for frame in [&garbage, &oversized] {
        ids.push(
            b.raft
                .send_request_with_addresses(&a.peer, frame.clone(), addrs.clone()),
        );
        ids.push(
            b.tree
                .send_request_with_addresses(&a.peer, frame.clone(), addrs.clone()),
        );
        ids.push(
            b.chunks
                .send_request_with_addresses(&a.peer, frame.clone(), addrs.clone()),
        );
        ids.push(
            b.forward
                .send_request_with_addresses(&a.peer, frame.clone(), addrs.clone()),
        );
    }
    ids.push(
        b.chunks
            .send_request_with_addresses(&a.peer, claim, addrs.clone()),
    );

    let mut failed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while failed < ids.len() {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .expect("every raw request ends");
        let outcome = match ev {
            SwarmEvent::Behaviour(RawPeerEvent::Raft(e))
            | SwarmEvent::Behaviour(RawPeerEvent::Tree(e))
            | SwarmEvent::Behaviour(RawPeerEvent::Chunks(e))
            | SwarmEvent::Behaviour(RawPeerEvent::Forward(e)) => e,
            _ => continue,
        };
        match outcome {
            request_response::Event::OutboundFailure { error, .. } => {
                tracing::info!(cause = %error, "raw request ended with an error");
                failed += 1;
            }
            request_response::Event::Message { message, .. } => {
                panic!("a malformed request got an answer: {message:?}")
            }
            _ => {}
        }
    }

    let after = a.handle.metrics().codec.snapshot();
    assert_eq!(after.oversized - before.oversized, 4, "{after:?}");
    assert_eq!(after.malformed - before.malformed, 5, "{after:?}");

    must_still_serve(&a, &member, id).await;
}

#[tokio::test]
async fn a_malformed_frame_on_a_raft_stream_ends_it_and_reports_the_peer() {
    use synod_transport::messages::RAFT_STREAM_PROTOCOL;
    let (a, member, id) = must_start_served_pair().await;

    let (raw_peer, mut control, drive) = must_connect_stream_peer(&a, &member).await;
    let before = a.handle.metrics().codec.snapshot();
    let garbage = [0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff];
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(a.peer, StreamProtocol::new(RAFT_STREAM_PROTOCOL)),
    )
    .await
    .expect("stream opened in time")
    .expect("stream opened");
    stream.write_all(&garbage).await.unwrap();
    stream.flush().await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the node ends the stream");
    assert!(
        answer.is_empty(),
        "a malformed frame got an answer: {answer:?} ({read:?})"
    );
    let after = a.handle.metrics().codec.snapshot();
    assert_eq!(after.malformed - before.malformed, 1, "{after:?}");
    assert_eq!(a.handle.metrics().reports_of(&raw_peer), 1);

    must_still_serve(&a, &member, id).await;
    drive.abort();
}

#[tokio::test]
async fn a_raft_stream_closed_without_an_answer_is_not_a_malformed_answer() {
    use synod_transport::messages::{RaftRequest, RAFT_STREAM_PROTOCOL};
    use synod_transport::RequestError;
    let (a, member, _) = must_start_served_pair().await;

    // A member whose Raft streams close before they answer (a connection
    // being replaced does this): the RPC falls back to request_response.
    let (raw_peer, mut control, drive) = must_connect_stream_peer(&a, &member).await;
    let mut incoming = control
        .accept(StreamProtocol::new(RAFT_STREAM_PROTOCOL))
        .unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    let closer = tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let mut header = [0u8; 4];
            let read = stream.read_exact(&mut header).await;
            let _ = got_tx.send(read.is_ok());
            let _ = stream.close().await;
        }
    });
    let vote = || {
        RaftRequest::Vote(openraft::raft::VoteRequest::new(
            openraft::Vote::new(1, 1),
            None,
        ))
    };
    // Until the node has seen the connection, the RPC goes by
    // request_response alone; ask until a stream carried one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let answer = a.handle.raft_request(raw_peer, vote()).await;
        if let Ok(true) = got_rx.try_recv() {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no raft stream was opened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !matches!(answer, Err(RequestError::BadAnswer { .. })),
        "a stream closed before its answer was taken for a malformed answer: {answer:?}"
    );
    assert!(
        answer.is_err(),
        "the peer speaks no request_response: {answer:?}"
    );
    assert_eq!(a.handle.metrics().reports_of(&raw_peer), 0);
    drive.abort();
    closer.abort();
}
