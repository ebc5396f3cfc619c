//! synod-consensus owns the replicated namespace: every change to file
//! metadata is a command committed through Raft (openraft 0.9) and applied to
//! a state machine stored in sled, with a namespace Merkle root kept up to
//! date, exactly-once answers, group commit, file-backed snapshots, reads of
//! chosen consistency and a change feed for the sync engine.
//!
//! Layout:
//! - [`types`]: openraft type configuration, node info, `Entry`, request ids, settings.
//! - [`path`]: `NsPath`, a path that cannot hold an invalid value.
//! - [`command`]: commands, preconditions, answers (the Raft `AppData`).
//! - `apply`: executing one command against the namespace (pure logic).
//! - `ns_tree`: the namespace Merkle root, leaves in sled, top levels in memory.
//! - [`codec`]: size-limited bincode encoding.
//! - [`storage`]: `NodeStorage`, the node's sled database and directory.
//! - [`log_store`]: `LogStore`, openraft's `RaftLogStorage`.
//! - [`state_machine`]: `StateMachineStore`, openraft's `RaftStateMachine`.
//! - [`snapshot`]: snapshot file format, build, verify, install.
//! - [`proposer`]: `Proposer`, group commit.
//! - [`reads`]: `Reader` / `StateView`: reads and the change feed.
//! - [`node`]: opening a node's stores and the default Raft config.
//! - `testing` (feature `testing`): in-memory network with faults, cluster helpers.

// openraft's `StorageError` (224 bytes) is the error type its storage traits
// require; our storage helpers return it unchanged rather than box and unbox it.
#![allow(clippy::result_large_err)]

mod apply;
pub mod codec;
pub mod command;
pub mod log_store;
pub mod node;
mod ns_tree;
pub mod path;
pub mod proposer;
pub mod reads;
pub mod snapshot;
pub mod state_machine;
pub mod storage;
pub mod types;

#[cfg(feature = "testing")]
pub mod testing;

pub use apply::expect_holds;
pub use command::{Answer, Command, Expect, Request, Response, MAX_INLINE};
pub use log_store::LogStore;
pub use node::{open_stores, open_stores_with, raft_config};
pub use ns_tree::NsTreeError;
pub use path::{NsPath, PathError};
pub use proposer::{ProposeError, Proposer, ProposerConfig};
pub use reads::{Change, Consistency, ReadError, Reader, StateView};
pub use state_machine::StateMachineStore;
pub use storage::{NodeStorage, OpenError, StorageOptions};
pub use types::{
    ClusterSettings, Entry, EntryKind, NodeId, NodeInfo, RequestId, SynodRaft, TypeConfig,
};
