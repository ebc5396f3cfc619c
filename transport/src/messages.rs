//! The wire messages of every protocol and their hard size limits.
//!
//! Hash lists travel as one byte blob of concatenated 32-byte hashes
//! ([`HashBlob`]): through serde a `Vec<[u8; 32]>` is a list of 32-tuples and
//! costs about 100× more (CRATE-NOTES §8).

use bytes::Bytes;
use std::fmt;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use synod_consensus::{NodeId, NodeInfo, Request, Response, TypeConfig};
use synod_merkle::Hash;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Largest snapshot part the Raft network sends in one request; the node's
/// `snapshot_max_chunk_size` must not exceed it.
pub const MAX_SNAPSHOT_CHUNK: usize = 4 * MIB;
/// Most chunk ids in one fetch request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 256;
/// Most chunk ids in one [`ChunkRequest::Missing`] query.
pub const MAX_MISSING_QUERY: usize = 64 * 1024;
/// Most queries in one [`ChunkRequest::MissingSince`], and most runs in one
/// [`ChunkRequest::Signatures`].
pub const MAX_DELTA_QUERIES: usize = 4096;
/// Most bytes of chunk data in one fetch answer or push request.
pub const MAX_CHUNK_BATCH_BYTES: usize = 8 * MIB;
/// Most Merkle nodes in one tree answer.
pub const MAX_TREE_NODES: u64 = 32 * 1024;

/// One versioned protocol: its name, its message types and their limits.
pub trait WireProtocol: Send + Sync + 'static {
    /// Protocol name on the wire, e.g. `/synod/raft/1`.
    const NAME: &'static str;
    /// Hard limit of a request frame body, in bytes.
    const REQUEST_LIMIT: usize;
    /// Hard limit of a response frame body, in bytes.
    const RESPONSE_LIMIT: usize;
    /// What the dialer sends.
    type Request: Serialize + DeserializeOwned + fmt::Debug + Send + 'static;
    /// What the listener answers.
    type Response: Serialize + DeserializeOwned + fmt::Debug + Send + 'static;
}

/// `/synod/raft/1`: openraft's RPCs.
#[derive(Debug, Clone, Copy)]
pub struct RaftProtocol;
/// Raft RPCs over kept streams: the frames of [`RaftProtocol`], one request
/// and then its answer at a time, on a stream that carries many.
pub const RAFT_STREAM_PROTOCOL: &str = "/synod/raft-stream/1";

impl WireProtocol for RaftProtocol {
    const NAME: &'static str = "/synod/raft/1";
    // AppendEntries is bounded by openraft's `max_payload_entries`; a snapshot
    // part by MAX_SNAPSHOT_CHUNK.
    const REQUEST_LIMIT: usize = 16 * MIB;
    const RESPONSE_LIMIT: usize = 64 * KIB;
    type Request = RaftRequest;
    type Response = RaftResponse;
}

/// `/synod/tree/1`: Merkle nodes of a manifest tree.
#[derive(Debug, Clone, Copy)]
pub struct TreeProtocol;
impl WireProtocol for TreeProtocol {
    const NAME: &'static str = "/synod/tree/1";
    const REQUEST_LIMIT: usize = KIB;
    const RESPONSE_LIMIT: usize = MAX_TREE_NODES as usize * 32 + 4 * KIB;
    type Request = TreeRequest;
    type Response = TreeResponse;
}

/// `/synod/chunks/1`: fetch and push of content chunks.
#[derive(Debug, Clone, Copy)]
pub struct ChunkProtocol;
impl WireProtocol for ChunkProtocol {
    const NAME: &'static str = "/synod/chunks/1";
    const REQUEST_LIMIT: usize = MAX_CHUNK_BATCH_BYTES + 64 * KIB;
    const RESPONSE_LIMIT: usize = MAX_CHUNK_BATCH_BYTES + 64 * KIB;
    type Request = ChunkRequest;
    type Response = ChunkResponse;
}

/// `/synod/forward/1`: a client write forwarded to the leader.
#[derive(Debug, Clone, Copy)]
pub struct ForwardProtocol;
impl WireProtocol for ForwardProtocol {
    const NAME: &'static str = "/synod/forward/1";
    const REQUEST_LIMIT: usize = 4 * MIB;
    const RESPONSE_LIMIT: usize = 4 * MIB;
    type Request = ForwardRequest;
    type Response = ForwardResponse;
}

/// A list of hashes as one blob of concatenated 32-byte values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HashBlob(#[serde(with = "serde_bytes")] Vec<u8>);

impl HashBlob {
    /// Packs `hashes`.
    pub fn from_hashes<'a>(hashes: impl IntoIterator<Item = &'a Hash>) -> HashBlob {
        let mut bytes = Vec::new();
        for h in hashes {
            bytes.extend_from_slice(h.as_bytes());
        }
        HashBlob(bytes)
    }

    /// Unpacks the hashes; `None` if the blob is not a whole number of hashes.
    pub fn to_hashes(&self) -> Option<Vec<Hash>> {
        if !self.0.len().is_multiple_of(Hash::LEN) {
            return None;
        }
        Some(
            self.0
                .chunks_exact(Hash::LEN)
                .filter_map(Hash::from_slice)
                .collect(),
        )
    }

    /// Number of whole hashes in the blob.
    pub fn count(&self) -> usize {
        self.0.len() / Hash::LEN
    }
}

impl fmt::Debug for HashBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HashBlob({} hashes)", self.count())
    }
}

/// A Raft RPC.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    Vote(VoteRequest<NodeId>),
    Append(AppendEntriesRequest<TypeConfig>),
    Snapshot(SnapshotPart),
}

/// One part of a snapshot: openraft's `InstallSnapshotRequest` with the data
/// as a byte blob (a plain `Vec<u8>` goes through serde byte by byte).
#[derive(Serialize, Deserialize)]
pub struct SnapshotPart {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta<NodeId, NodeInfo>,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub done: bool,
}

impl fmt::Debug for SnapshotPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotPart")
            .field("vote", &self.vote)
            .field("snapshot_id", &self.meta.snapshot_id)
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .field("done", &self.done)
            .finish()
    }
}

impl From<InstallSnapshotRequest<TypeConfig>> for SnapshotPart {
    fn from(r: InstallSnapshotRequest<TypeConfig>) -> Self {
        SnapshotPart {
            vote: r.vote,
            meta: r.meta,
            offset: r.offset,
            data: r.data,
            done: r.done,
        }
    }
}

impl From<SnapshotPart> for InstallSnapshotRequest<TypeConfig> {
    fn from(p: SnapshotPart) -> Self {
        InstallSnapshotRequest {
            vote: p.vote,
            meta: p.meta,
            offset: p.offset,
            data: p.data,
            done: p.done,
        }
    }
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// This node runs no Raft (yet); the caller treats it as unreachable.
    NoRaft,
}

/// A request for nodes of the manifest tree whose root is `root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TreeRequest {
    /// The leaf count and top node.
    Top { root: Hash },
    /// Nodes `start..end` of `level` (0 = leaves), at most [`MAX_TREE_NODES`].
    Nodes {
        root: Hash,
        level: u32,
        start: u64,
        end: u64,
    },
}

/// The answer to a [`TreeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TreeResponse {
    Top {
        leaf_count: u64,
        top: Hash,
    },
    Nodes(HashBlob),
    /// The peer does not have that tree.
    NotFound,
    /// The request was invalid or the peer failed; the text says why.
    Refused(String),
}

/// Fetch or push a batch of chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkRequest {
    /// Send me these chunks (at most [`MAX_CHUNKS_PER_REQUEST`]).
    Fetch(HashBlob),
    /// Store these chunks durably before answering.
    Push(Vec<ChunkData>),
    /// Store this file manifest (its encoding, as `synod-chunker` writes
    /// it) durably: holders of a write's chunks must also hold their order.
    /// (Sent by earlier versions; [`ChunkRequest::PushManifests`] now.)
    PushManifest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Which of these chunks (at most [`MAX_MISSING_QUERY`]) do you lack?
    /// Lets a writer push only what a peer does not hold.
    Missing(HashBlob),
    /// Store these file manifests durably, with one sync for the lot.
    PushManifests(Vec<serde_bytes::ByteBuf>),
    /// Which chunks of these new versions do you lack? Each query names a
    /// version you hold (its manifest root) and only the chunk ids the new
    /// version adds to it, so the ids both share never travel; the answer
    /// covers both. (At most [`MAX_DELTA_QUERIES`] queries and
    /// [`MAX_MISSING_QUERY`] added ids in all.)
    MissingSince(Vec<SinceQuery>),
    /// Signatures (fast_rsync's format) of the bytes of these runs of
    /// chunks, each run the concatenation of the chunks it lists: what a
    /// writer diffs a new chunk against. (At most [`MAX_DELTA_QUERIES`].)
    Signatures(Vec<HashBlob>),
    /// Rebuild each chunk from a delta against a run of chunks you hold,
    /// check it against its id, and store them all durably before answering.
    PushDeltas(Vec<ChunkDelta>),
    /// Send me these chunks as deltas against the bytes each signature
    /// describes (bytes I hold), where a delta is much smaller than the
    /// chunk. (At most [`MAX_DELTA_QUERIES`] signatures and
    /// [`MAX_CHUNKS_PER_REQUEST`] ids in all.)
    FetchDeltas(Vec<DeltaWanted>),
    /// Fetch these chunks (at most [`MAX_CHUNKS_PER_REQUEST`]) from member
    /// `from` (its Raft node id), check them and store them durably before
    /// answering: a writer sends each chunk of a large file over its own
    /// link once and has the nodes that must hold it copy from each other.
    /// (Variants are only ever appended: each keeps its wire tag.)
    FetchFrom { from: u64, ids: HashBlob },
}

/// One signature of [`ChunkRequest::FetchDeltas`] and the chunks wanted
/// as deltas against it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaWanted {
    /// fast_rsync's signature format.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    pub ids: HashBlob,
}

impl fmt::Debug for DeltaWanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeltaWanted({} signature bytes, {} chunks)",
            self.signature.len(),
            self.ids.count()
        )
    }
}

/// One query of [`ChunkRequest::MissingSince`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinceQuery {
    /// Root of the manifest of the version the asker believes you hold.
    pub base: Hash,
    /// Chunk ids of the new version that `base` lacks.
    pub added: HashBlob,
}

/// One chunk of [`ChunkRequest::PushDeltas`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDelta {
    /// The chunk the delta rebuilds.
    pub id: Hash,
    /// The run of chunks it is a delta against, in order.
    pub base: HashBlob,
    /// fast_rsync's delta format.
    #[serde(with = "serde_bytes")]
    pub delta: Vec<u8>,
}

impl fmt::Debug for ChunkDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChunkDelta({}, against {} chunks, {} delta bytes)",
            self.id.fmt_short(),
            self.base.count(),
            self.delta.len()
        )
    }
}

/// One chunk on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkData {
    pub id: Hash,
    #[serde(with = "crate::codec::blob")]
    pub bytes: Bytes,
}

impl fmt::Debug for ChunkData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChunkData({}, {} bytes)",
            self.id.fmt_short(),
            self.bytes.len()
        )
    }
}

/// A fetched chunk, or `None` if the peer does not have it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaybeChunk(#[serde(with = "crate::codec::blob::option")] pub Option<Bytes>);

impl fmt::Debug for MaybeChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(b) => write!(f, "Some({} bytes)", b.len()),
            None => f.write_str("None"),
        }
    }
}

/// The answer to a [`ChunkRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkResponse {
    /// One entry per requested id, in request order.
    Fetched(Vec<MaybeChunk>),
    /// All pushed chunks are stored durably.
    Stored,
    /// The queried chunks this peer lacks, in query order.
    Missing(HashBlob),
    /// The request was invalid or the peer failed; the text says why.
    Refused(String),
    /// Per query of a [`ChunkRequest::MissingSince`], in order: the chunks
    /// lacking among the base's and the added ones, or `None` if the base
    /// version is unknown here.
    MissingSince(Vec<Option<HashBlob>>),
    /// Per run of a [`ChunkRequest::Signatures`], in order: its signature,
    /// or `None` if a chunk of it is not held here.
    Signatures(Vec<Option<serde_bytes::ByteBuf>>),
    /// Per id of a [`ChunkRequest::FetchDeltas`], in order: its delta, or
    /// `None` if not held here or not worth it (then fetch it whole).
    Deltas(Vec<Option<serde_bytes::ByteBuf>>),
}

/// What a follower asks of the leader on a client's behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// A client write.
    Write(Request),
    /// The leader's read index: once a follower has applied up to it, a
    /// local read there is linearizable.
    ReadIndex,
}

/// The leader's answer to a forwarded write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardResponse {
    /// Committed and applied; one answer per command.
    Done(Response),
    /// The receiver is not the leader; retry at `leader` if known.
    NotLeader { leader: Option<NodeId> },
    /// The write failed; the text says why.
    Failed(String),
    /// The answer to [`ForwardRequest::ReadIndex`]: leadership confirmed by a
    /// quorum, and every commit a client could have seen is at or below it.
    ReadIndex(u64),
}
