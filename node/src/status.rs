//! What `/v1/status`, `/v1/cluster` and `/metrics` report.

use serde::{Deserialize, Serialize};

use crate::engine::SyncNode;
use crate::metrics::MetricsSnapshot;
use crate::peers::{PeerNet, WireStats};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: u64,
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    /// Last log index applied to the namespace.
    pub applied: u64,
    /// Every commit up to this index is on this node's disk.
    pub watermark: u64,
    pub namespace_root: String,
    pub entries: usize,
    pub folder: String,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub metrics: MetricsSnapshot,
    pub wire: WireStats,
    /// Bytes of pushed chunks waiting in the staging area.
    pub staging_bytes: u64,
    /// Local edits waiting for a quorum.
    pub pending_count: usize,
    /// The oldest of them (at most 100).
    pub pending: Vec<PendingReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingReport {
    pub path: String,
    pub kind: String,
    pub base: Option<u64>,
    pub since_ms: u64,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReport {
    pub id: u64,
    pub voter: bool,
    pub addr: String,
    pub peer_id: String,
    /// Last log index this member acknowledged (leader's view only).
    pub matched: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterReport {
    pub leader: Option<u64>,
    pub term: u64,
    pub members: Vec<MemberReport>,
}

pub fn status<N: PeerNet>(node: &SyncNode<N>) -> StatusReport {
    let m = node.raft.metrics().borrow().clone();
    let (voters, learners, leader) = node.members();
    let view = node.reader.view();
    let pending = node.local.pending().unwrap_or_default();
    StatusReport {
        node: node.id,
        role: format!("{:?}", m.state).to_lowercase(),
        leader,
        term: m.current_term,
        applied: view.applied_index(),
        watermark: *node.watermark.borrow(),
        namespace_root: view.namespace_root().to_string(),
        entries: view.len(),
        folder: node.folder.display().to_string(),
        voters: voters.into_iter().collect(),
        learners: learners.into_iter().collect(),
        metrics: node.metrics.snapshot(),
        wire: node.net.wire_stats(),
        staging_bytes: node.staging.used(),
        pending_count: pending.len(),
        pending: pending
            .into_iter()
            .take(100)
            .map(|(path, e)| PendingReport {
                path,
                kind: e.kind,
                base: e.base,
                since_ms: e.since_ms,
                error: e.error,
            })
            .collect(),
    }
}

pub fn cluster<N: PeerNet>(node: &SyncNode<N>) -> ClusterReport {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let matched = m.replication.clone().unwrap_or_default();
    let members = membership
        .nodes()
        .map(|(id, info)| MemberReport {
            id: *id,
            voter: membership.voter_ids().any(|v| v == *id),
            addr: info.addr.clone(),
            peer_id: info.peer_id.clone(),
            matched: matched.get(id).and_then(|l| l.map(|l| l.index)),
        })
        .collect();
    ClusterReport {
        leader: m.current_leader,
        term: m.current_term,
        members,
    }
}

pub fn prometheus<N: PeerNet>(node: &SyncNode<N>) -> String {
    let s = status(node);
    let mut out = node.metrics.prometheus(node.id);
    let id = node.id;
    let is_leader = u8::from(s.leader == Some(id));
    out.push_str(&format!(
        "# TYPE synod_raft_term gauge\nsynod_raft_term{{node=\"{id}\"}} {}\n\
         # TYPE synod_raft_is_leader gauge\nsynod_raft_is_leader{{node=\"{id}\"}} {is_leader}\n\
         # TYPE synod_applied_index gauge\nsynod_applied_index{{node=\"{id}\"}} {}\n\
         # TYPE synod_watermark gauge\nsynod_watermark{{node=\"{id}\"}} {}\n\
         # TYPE synod_namespace_entries gauge\nsynod_namespace_entries{{node=\"{id}\"}} {}\n\
         # TYPE synod_wire_bytes_received counter\nsynod_wire_bytes_received{{node=\"{id}\"}} {}\n\
         # TYPE synod_wire_bytes_sent counter\nsynod_wire_bytes_sent{{node=\"{id}\"}} {}\n\
         # TYPE synod_wire_frames_rejected counter\nsynod_wire_frames_rejected{{node=\"{id}\"}} {}\n\
         # TYPE synod_pending_edits gauge\nsynod_pending_edits{{node=\"{id}\"}} {}\n\
         # TYPE synod_staging_bytes gauge\nsynod_staging_bytes{{node=\"{id}\"}} {}\n",
        s.term, s.applied, s.watermark, s.entries, s.wire.bytes_in, s.wire.bytes_out, s.wire.frames_rejected,
        s.pending_count, s.staging_bytes
    ));
    out
}
