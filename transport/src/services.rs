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

    /// For each `(base, added)`: the chunks lacking here among those of the
    /// manifest `base` and `added`, or `None` if this node does not hold
    /// the manifest `base`. Nodes that keep no manifests answer `None`.
    fn missing_since(
        &self,
        _peer: PeerId,
        queries: Vec<(Hash, Vec<Hash>)>,
    ) -> BoxFuture<'_, Result<Vec<Option<Vec<Hash>>>, ServiceError>> {
        Box::pin(async move { Ok(vec![None; queries.len()]) })
    }

    /// For each run of chunk ids: a signature of their concatenated bytes
    /// (fast_rsync's format), or `None` if one is not held here.
    fn signatures(
        &self,
        _peer: PeerId,
        runs: Vec<Vec<Hash>>,
    ) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>, ServiceError>> {
        Box::pin(async move { Ok(vec![None; runs.len()]) })
    }

    /// Rebuilds each `(id, base run, delta)` from the run's bytes, checks
    /// it against `id`, and stores them all durably before returning (all
    /// or none).
    fn store_deltas(
        &self,
        _peer: PeerId,
        deltas: Vec<(Hash, Vec<Hash>, Vec<u8>)>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        let n = deltas.len();
        Box::pin(async move { Err(ServiceError(format!("{n} chunk deltas: not served here"))) })
    }

    /// For each `(signature, ids)`: per id, a delta of the chunk against
    /// the bytes the signature describes, or `None` if it is not held here
    /// or a delta is not worth it.
    fn deltas(
        &self,
        _peer: PeerId,
        wanted: Vec<(Vec<u8>, Vec<Hash>)>,
    ) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>, ServiceError>> {
        let n = wanted.iter().map(|(_, ids)| ids.len()).sum();
        Box::pin(async move { Ok(vec![None; n]) })
    }

    /// Fetches `ids` from member `from`, checks them and stores them all
    /// durably before returning.
    fn fetch_from(
        &self,
        _peer: PeerId,
        from: u64,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        let n = ids.len();
        Box::pin(async move {
            Err(ServiceError(format!(
                "{n} chunks to fetch from node {from}: not served here"
            )))
        })
    }

    /// Proposes a client write forwarded by a follower and answers once it
    /// is committed and applied (or why not).
    fn forward_write(&self, peer: PeerId, request: Request) -> BoxFuture<'_, ForwardResponse>;

    /// Confirms leadership with a quorum and answers
    /// [`ForwardResponse::ReadIndex`] (or `NotLeader` / `Failed`).
    fn read_index(&self, peer: PeerId) -> BoxFuture<'_, ForwardResponse>;
}
