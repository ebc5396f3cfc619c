//! What a node serves to its peers: the trait the transport calls for every
//! inbound tree, chunk and forwarded-write request (Raft goes to the
//! registered `SynodRaft` directly).

use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use libp2p::PeerId;
use synod_consensus::Request;
use synod_merkle::Hash;

use crate::messages::{ChunkData, ForwardResponse};

/// A local failure while serving a request; the text goes back to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(pub String);

/// The node's side of every non-Raft protocol.
///
/// Each call runs in its own task, never inside the swarm loop, so it may
/// take its time (disk, fsync, a Raft commit). Implementations see requests
/// only from allowed peers.
pub trait Services: Send + Sync + 'static {
    /// The leaf count and top node of the manifest tree whose root is
    /// `root`, or `None` if this node does not have it.
    fn tree_top(
        &self,
        peer: PeerId,
        root: Hash,
    ) -> BoxFuture<'_, Result<Option<(u64, Hash)>, ServiceError>>;

    /// Nodes `range` of `level` (0 = leaves) of the tree `root`, clipped to
    /// what exists; `None` if this node does not have the tree.
    fn tree_nodes(
        &self,
        peer: PeerId,
        root: Hash,
        level: usize,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<Option<Vec<Hash>>, ServiceError>>;

    /// The bytes of each chunk in `ids`, `None` for those not held. The
    /// transport does not trust them either: the fetcher verifies. (`Bytes`,
    /// so chunks held in memory are sent without a copy.)
    fn read_chunks(
        &self,
        peer: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Option<Bytes>>, ServiceError>>;

    /// Stores pushed chunks, already verified against their ids, durably
    /// (fsynced) before returning.
    fn store_chunks(
        &self,
        peer: PeerId,
        chunks: Vec<ChunkData>,
    ) -> BoxFuture<'_, Result<(), ServiceError>>;

    /// Decodes, checks and stores encoded file manifests durably before
    /// returning (all or none).
    fn store_manifests(
        &self,
        peer: PeerId,
        manifests: Vec<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), ServiceError>>;

    /// The chunks among `ids` this node holds neither staged nor in its folder.
    fn missing_chunks(
        &self,
        peer: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Hash>, ServiceError>>;

    /// Proposes a client write forwarded by a follower and answers once it
    /// is committed and applied (or why not).
    fn forward_write(&self, peer: PeerId, request: Request) -> BoxFuture<'_, ForwardResponse>;

    /// Confirms leadership with a quorum and answers
    /// [`ForwardResponse::ReadIndex`] (or `NotLeader` / `Failed`).
    fn read_index(&self, peer: PeerId) -> BoxFuture<'_, ForwardResponse>;
}
