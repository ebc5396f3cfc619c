//! Counters a node exports: rejected frames, peers that misbehaved, Raft
//! RPCs sent over kept streams.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;

use crate::codec::CodecMetrics;

/// The transport's counters (a simple in-process registry; the node exposes
/// them on `/metrics`).
#[derive(Debug, Default)]
pub struct TransportMetrics {
    /// Frames rejected by the codec.
    pub codec: Arc<CodecMetrics>,
    /// Raft RPCs this node sent and got answered over a kept stream.
    pub raft_stream_rpcs: AtomicU64,
    reports: Mutex<HashMap<PeerId, u64>>,
}

impl TransportMetrics {
    /// Records that `peer` sent something wrong (a corrupt chunk, an answer
    /// that does not fit its request).
    pub fn report_peer(&self, peer: PeerId, why: &'static str) {
        tracing::warn!(%peer, why, "peer reported");
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        *reports.entry(peer).or_default() += 1;
    }

    /// How many times `peer` was reported.
    pub fn reports_of(&self, peer: &PeerId) -> u64 {
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        reports.get(peer).copied().unwrap_or(0)
    }
}
