//! The openraft type configuration and the replicated data types of one path.

use std::fmt;

use serde::{Deserialize, Serialize};
use synod_merkle::Hash;

use crate::command::{Request, Response};

/// A node's id inside the cluster.
pub type NodeId = u64;

/// What the cluster knows about a member: where to reach it and who it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Transport address (a multiaddr in text form, or a test name).
    pub addr: String,
    /// libp2p peer id as text.
    pub peer_id: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.peer_id, self.addr)
    }
}

openraft::declare_raft_types!(
    /// synod's openraft configuration: batched commands, file-backed snapshots.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a synod node.
pub type SynodRaft = openraft::Raft<TypeConfig>;
/// Log id with our node id type.
pub type LogId = openraft::LogId<NodeId>;
/// Stored membership with our node types.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
/// Snapshot metadata with our node types.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
/// Storage error with our node id type.
pub type StorageError = openraft::StorageError<NodeId>;

/// Identifies one command of one client, so a retry is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId {
    /// The proposing client (a random id chosen per proposer).
    pub client: u64,
    /// Increasing per client.
    pub serial: u64,
}

/// Cluster-wide settings chosen once at `synod init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// FastCDC minimum chunk size in bytes.
    pub chunk_min: u32,
    /// FastCDC average chunk size in bytes.
    pub chunk_avg: u32,
    /// FastCDC maximum chunk size in bytes.
    pub chunk_max: u32,
    /// How many voters must hold content durably before a write is acknowledged.
    pub replication: u32,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            chunk_min: 16 * 1024,
            chunk_avg: 64 * 1024,
            chunk_max: 256 * 1024,
            replication: 2,
        }
    }
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (its target is the content).
    Symlink,
}

/// The replicated metadata of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Content size in bytes.
    pub size: u64,
    /// Merkle root of the content manifest.
    pub root: Hash,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Log index of the commit that produced this entry; set by the state machine.
    pub version: u64,
    /// Node whose change this is.
    pub origin: NodeId,
    /// Nodes that held the content durably at commit.
    pub holders: Vec<NodeId>,
    /// A delete: kept so a deleted file never comes back.
    pub tombstone: bool,
}

impl Entry {
    /// A live file entry; `version` is filled in at apply.
    pub fn file(size: u64, root: Hash, origin: NodeId) -> Entry {
        Entry {
            kind: EntryKind::File,
            size,
            root,
            mode: 0o644,
            mtime_ns: 0,
            version: 0,
            origin,
            holders: vec![origin],
            tombstone: false,
        }
    }

    /// True unless this is a tombstone.
    pub fn is_live(&self) -> bool {
        !self.tombstone
    }

    /// The hash fed to the namespace Merkle tree: BLAKE3 of the bincode
    /// (standard config) encoding of the entry.
    pub fn tree_hash(&self) -> Hash {
        Hash::of(&crate::codec::encode(self))
    }
}
