//! Test support (feature `testing`): an in-memory network that can drop, delay
//! and partition messages, and helpers to run a cluster of in-process nodes.
//!
//! Layout:
//! - [`network`]: `Router`, the fault-injecting in-memory `RaftNetworkFactory`.
//! - [`cluster`]: `TestCluster`, nodes on real sled directories.

pub mod cluster;
pub mod network;

pub use cluster::{node_info, TestCluster, TestNode};
pub use network::Router;
