//! What the sync engine needs from the network, as a trait: the daemon
//! implements it over the transport; unit tests over in-memory peers.

use std::future::Future;
use std::ops::Range;

use bytes::Bytes;
use synod_consensus::{NodeId, Request, Response};
use synod_merkle::Hash;

/// A failed exchange with one peer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer {peer}: {message}")]
pub struct PeerError {
    pub peer: NodeId,
    pub message: String,
}

impl PeerError {
    pub fn new(peer: NodeId, message: impl std::fmt::Display) -> PeerError {
        PeerError {
            peer,
            message: message.to_string(),
        }
    }
}

/// A chunk sent as a delta: its id, the run of chunks (held by the peer)
/// the delta is taken against, and the delta.
pub type ChunkAsDelta = (Hash, Vec<Hash>, Vec<u8>);

pub trait PeerNet: Send + Sync + 'static {
    /// The chunks `ids` from `peer`, `None` for each it lacks. Every chunk
    /// returned has been checked against its id: a peer that sent wrong
    /// bytes is an error (and counted in `chunks_rejected`).
    fn fetch_chunks(
        &self,
        peer: NodeId,
        ids: Vec<Hash>,
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>, PeerError>> + Send;

    /// Which of `ids` `peer` does not hold.
    fn missing_chunks(
        &self,
        peer: NodeId,
        ids: Vec<Hash>,
    ) -> impl Future<Output = Result<Vec<Hash>, PeerError>> + Send;

    /// For each `(base, added)`: the chunks `peer` lacks among those of the
    /// manifest `base` and `added`, or `None` if it does not know `base`.
    fn missing_since(
        &self,
        peer: NodeId,
        queries: Vec<(Hash, Vec<Hash>)>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<Hash>>>, PeerError>> + Send;

    /// Signatures of the bytes `peer` holds for each run of chunks.
    fn signatures(
        &self,
        peer: NodeId,
        runs: Vec<Vec<Hash>>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, PeerError>> + Send;

    /// Stores chunks on `peer` as `(id, base run, delta)`: it rebuilds and
    /// checks each, fsynced before it answers.
    fn push_deltas(
        &self,
        peer: NodeId,
        deltas: Vec<ChunkAsDelta>,
    ) -> impl Future<Output = Result<(), PeerError>> + Send;

    /// Has `peer` fetch `ids` from member `from` and store them, fsynced
    /// before it answers.
    fn fetch_from(
        &self,
        peer: NodeId,
        from: NodeId,
        ids: Vec<Hash>,
    ) -> impl Future<Output = Result<(), PeerError>> + Send;

    /// Chunks from `peer` as deltas: for each `(signature, ids)`, per id, a
    /// delta against the bytes the signature describes, or `None`. Not
    /// checked: the caller rebuilds each chunk and checks it.
    fn fetch_deltas(
        &self,
        peer: NodeId,
        wanted: Vec<(Vec<u8>, Vec<Hash>)>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, PeerError>> + Send;

    /// Stores the chunks on `peer`, fsynced before it answers.
    fn push_chunks(
        &self,
        peer: NodeId,
        chunks: Vec<(Hash, Bytes)>,
    ) -> impl Future<Output = Result<(), PeerError>> + Send;

    /// Stores encoded manifests on `peer`, durable before it answers.
    fn push_manifests(
        &self,
        peer: NodeId,
        manifests: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<(), PeerError>> + Send;

    /// Leaf count and top node of the manifest tree `root` on `peer`.
    fn tree_top(
        &self,
        peer: NodeId,
        root: Hash,
    ) -> impl Future<Output = Result<Option<(u64, Hash)>, PeerError>> + Send;

    /// Nodes of that tree (level 0: the chunk ids).
    fn tree_nodes(
        &self,
        peer: NodeId,
        root: Hash,
        level: u32,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Vec<Hash>, PeerError>> + Send;

    /// The read index of the leader `peer` (see `ForwardOutcome::ReadIndex`).
    fn read_index(
        &self,
        peer: NodeId,
    ) -> impl Future<Output = Result<ForwardOutcome, PeerError>> + Send;

    /// Hands a write to the leader `peer`.
    fn forward(
        &self,
        peer: NodeId,
        request: Request,
    ) -> impl Future<Output = Result<ForwardOutcome, PeerError>> + Send;

    /// Bytes framed on the wire so far, every protocol and peer together.
    fn wire_stats(&self) -> WireStats {
        WireStats::default()
    }
}

/// Traffic of the peer protocols, counted at the framing layer (QUIC and
/// TLS overhead not included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireStats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Frames from peers rejected as oversized, truncated or malformed.
    pub frames_rejected: u64,
    /// Datagrams the kernel dropped on arrival at this node's QUIC sockets
    /// for want of receive-buffer room (see `net.core.rmem_max`).
    #[serde(default)]
    pub udp_drops: u64,
}

/// What a forwarded write came back with.
#[derive(Debug, Clone)]
pub enum ForwardOutcome {
    Done(Response),
    NotLeader(Option<NodeId>),
    Failed(String),
    /// Leadership confirmed; applying up to this index makes a local read
    /// linearizable.
    ReadIndex(u64),
}
