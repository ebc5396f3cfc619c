//! Multi-node tests over real QUIC sockets on 127.0.0.1, one process.

mod common;

mod chunks;
mod malformed;
mod raft_cluster;
mod stranger;
mod tree;
