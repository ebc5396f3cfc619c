//! synod-transport owns how synod nodes talk to each other: the node's
//! Ed25519 identity on disk, one libp2p swarm over QUIC per node with an
//! allow-list of cluster members, the versioned wire protocols (Raft RPCs,
//! Merkle-tree nodes, chunk fetch and push, writes forwarded to the leader),
//! the size-limited codec every message goes through, and openraft's
//! `RaftNetworkFactory` on top. It never decides what to sync.
//!
//! Layout:
//! - [`identity`]: load or create the node key (`node.key`, mode 0600).
//! - [`messages`]: wire messages of each protocol and their hard limits.
//! - [`buffers`]: byte buffers kept for reuse (frames, chunks read to push).
//! - [`codec`]: framing, limits, decoding; the request_response codec.
//! - [`metrics`]: counters of rejected frames and reported peers.
//! - [`swarm`]: `TransportConfig`, the behaviour and the QUIC swarm.
//! - `driver`: the task that owns the swarm.
//! - [`handle`]: `TransportHandle`, `start_transport`, `RequestError`.
//! - [`services`]: the `Services` trait a node implements to serve peers.
//! - [`raft_network`]: openraft's network over the handle.
//! - `raft_stream`: Raft RPCs over kept streams of a connection.
//! - [`udp_buffers`]: larger kernel receive buffers for the QUIC sockets.
//! - [`remote_tree`]: a peer's Merkle tree as a `TreeSource`, remote diff.

pub mod buffers;
pub mod codec;
mod driver;
pub mod handle;
pub mod identity;
pub mod messages;
pub mod metrics;
pub mod raft_network;
mod raft_stream;
pub mod remote_tree;
pub mod services;
pub mod swarm;
pub mod udp_buffers;

pub use bytes::Bytes;
pub use codec::{CodecCounts, CodecError, CodecMetrics};
pub use handle::{start_transport, RequestError, TransportHandle};
pub use identity::{load_or_create_identity, IdentityError};
pub use libp2p::{identity::Keypair, Multiaddr, PeerId};
pub use messages::{
    ChunkData, ChunkDelta, ForwardResponse, HashBlob, MAX_CHUNKS_PER_REQUEST, MAX_CHUNK_BATCH_BYTES,
};
pub use metrics::TransportMetrics;
pub use raft_network::{peer_of, NodeAddrError, P2pRaftNetwork, PeerConnection};
pub use remote_tree::{diff_remote_tree, RemoteTree};
pub use services::{ServiceError, Services};
pub use swarm::{SwarmError, TransportConfig};
