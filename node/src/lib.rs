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
//! - `scanner`: local edits in the folder become commits.
//! - `verify`: rehash local files against their committed roots and repair.
//! - `peers`: the network as the engine needs it ([`peers::PeerNet`]).
//! - `local`, `staging`, `fsutil`: what a node keeps on its own disk.
//! - `api`, `status`, `metrics`: the HTTP API, status page and counters.
//! - `events`, `contact`: recent events and each peer's last Raft answer,
//!   for the status page.
//! - `client`, `up`, `bench`, `logging`: the CLI's side.
//! - `progress`: scan counters the daemon publishes, and the progress bars
//!   the CLI draws on a terminal.
//! - `conflict`: names of conflict copies.
//! - `lab_hooks`: test-only fault hooks for synod-lab (feature `lab-hooks`;
//!   inert stubs without it).

pub mod api;
pub mod bench;
pub mod client;
pub mod config;
pub mod conflict;
pub mod contact;
pub mod daemon;
mod delta;
pub mod engine;
pub mod error;
pub mod events;
pub mod fsutil;
pub mod lab_hooks;
pub mod local;
pub mod logging;
pub mod materializer;
pub mod metrics;
pub mod peers;
pub mod progress;
mod pushed;
pub mod scanner;
pub mod staging;
pub mod status;
pub mod up;
pub mod verify;
