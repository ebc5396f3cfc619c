//! synod-node: the `synod` daemon and its parts. It wires the content layer
//! (`synod-chunker`), the replicated namespace (`synod-consensus`) and the
//! transport (`synod-transport`) into a node that keeps a folder in sync,
//! and exposes it through an HTTP API and a CLI.
//!
//! Layout:
//! - `config`: `cluster.toml`, validated into [`config::ClusterConfig`].
//! - `daemon`: starting and stopping one node; the transport-backed network.
//! - `engine`: [`engine::SyncNode`], the write path and reads.
//! - `materializer`: the materialize path, following the change feed.
//! - `peers`: the network as the engine needs it ([`peers::PeerNet`]).
//! - `local`, `staging`, `fsutil`: what a node keeps on its own disk.
//! - `api`, `status`, `metrics`: the HTTP API, status page and counters.
//! - `client`, `up`, `logging`: the CLI's side.
//! - `conflict`: names of conflict copies.

pub mod api;
pub mod client;
pub mod config;
pub mod conflict;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fsutil;
pub mod local;
pub mod logging;
pub mod materializer;
pub mod metrics;
pub mod peers;
pub mod staging;
pub mod status;
pub mod up;
