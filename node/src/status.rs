//! What `/v1/status`, `/v1/cluster` and `/metrics` report.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use synod_consensus::{Change, StateView};

use crate::contact::ContactReport;
use crate::engine::SyncNode;
use crate::metrics::{MetricsSnapshot, PeerBytes};
use crate::peers::{PeerNet, WireStats};
use crate::progress::ScanProgressReport;

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
    /// Committed files not on this node's disk because no member could
    /// serve their content; tried again every few seconds.
    #[serde(default)]
    pub parked_count: usize,
    /// The first of them in path order (at most 100).
    #[serde(default)]
    pub parked: Vec<ParkedReport>,
    /// What is under way on this node.
    #[serde(default)]
    pub in_flight: InFlightReport,
    /// Conflict copies in the namespace.
    #[serde(default)]
    pub conflicts: ConflictsReport,
    /// On the leader: milliseconds since a quorum last acknowledged it.
    #[serde(default)]
    pub millis_since_quorum_ack: Option<u64>,
    /// The scan under way; `first_done` once the initial scan finished.
    #[serde(default)]
    pub scan: ScanProgressReport,
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
pub struct ParkedReport {
    pub path: String,
    pub version: u64,
    pub since_ms: u64,
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightReport {
    /// Commits applied but not yet on this node's disk (applied − watermark).
    pub materialize_queue: u64,
    /// Uploads through the API being received or committed.
    pub uploads: u64,
    /// Committed uploads whose temp file the materializer has yet to take.
    pub uploads_to_place: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictsReport {
    /// Live conflict copies in the namespace.
    pub count: usize,
    /// The first of them in path order (at most 100).
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReport {
    pub id: u64,
    pub voter: bool,
    /// `leader`, `follower` or `learner`, as this node sees the cluster.
    #[serde(default)]
    pub role: String,
    pub addr: String,
    pub peer_id: String,
    /// Last log index this member acknowledged (leader's view only).
    pub matched: Option<u64>,
    /// When it last answered this node's Raft RPCs (leader's view only:
    /// followers send none while a leader is up).
    #[serde(default)]
    pub contact: Option<ContactReport>,
    /// Applied index, for this node only.
    #[serde(default)]
    pub applied: Option<u64>,
    /// Materialized watermark, for this node only: a node learns no other
    /// node's watermark.
    #[serde(default)]
    pub watermark: Option<u64>,
    /// Chunk bytes exchanged with this node.
    #[serde(default)]
    pub traffic: PeerBytes,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterReport {
    pub leader: Option<u64>,
    pub term: u64,
    pub members: Vec<MemberReport>,
    /// The node answering.
    #[serde(default)]
    pub node: u64,
}

pub fn status<N: PeerNet>(node: &SyncNode<N>) -> StatusReport {
    let m = node.raft.metrics().borrow().clone();
    let (voters, learners, leader) = node.members();
    let view = node.reader.view();
    let pending = node.local.pending().unwrap_or_default();
    let parked = node.local.parked().unwrap_or_default();
    let applied = view.applied_index();
    let watermark = *node.watermark.borrow();
    StatusReport {
        node: node.id,
        role: format!("{:?}", m.state).to_lowercase(),
        leader,
        term: m.current_term,
        applied,
        watermark,
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
        parked_count: parked.len(),
        parked: parked
            .into_iter()
            .take(100)
            .map(|(path, p)| ParkedReport {
                path,
                version: p.version,
                since_ms: p.since_ms,
                error: p.error,
            })
            .collect(),
        in_flight: InFlightReport {
            materialize_queue: applied.saturating_sub(watermark),
            uploads: node.metrics.uploads_in_progress.load(Ordering::Relaxed),
            uploads_to_place: node.uploads.lock().map_or(0, |u| u.len()),
        },
        conflicts: ConflictsReport::default(),
        millis_since_quorum_ack: m.millis_since_quorum_ack,
        scan: node.metrics.scan_progress.report(),
    }
}

/// [`status`] with the conflict copies filled in from `conflicts`.
pub fn status_with_conflicts<N: PeerNet>(
    node: &SyncNode<N>,
    conflicts: &ConflictTracker,
) -> StatusReport {
    let mut s = status(node);
    s.conflicts = conflicts.report(node.reader.view());
    s
}

pub fn cluster<N: PeerNet>(node: &SyncNode<N>) -> ClusterReport {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let matched = m.replication.clone().unwrap_or_default();
    let leading = m.current_leader == Some(node.id);
    let traffic = node.metrics.peer_traffic.snapshot();
    let view = node.reader.view();
    let members = membership
        .nodes()
        .map(|(id, info)| {
            let voter = membership.voter_ids().any(|v| v == *id);
            let this = *id == node.id;
            MemberReport {
                id: *id,
                voter,
                role: if m.current_leader == Some(*id) {
                    "leader"
                } else if voter {
                    "follower"
                } else {
                    "learner"
                }
                .into(),
                addr: info.addr.clone(),
                peer_id: info.peer_id.clone(),
                matched: matched.get(id).and_then(|l| l.map(|l| l.index)),
                contact: (leading && !this)
                    .then(|| node.metrics.contacts.of(*id))
                    .flatten(),
                applied: this.then(|| view.applied_index()),
                watermark: this.then(|| *node.watermark.borrow()),
                traffic: traffic.get(id).copied().unwrap_or_default(),
            }
        })
        .collect();
    ClusterReport {
        leader: m.current_leader,
        term: m.current_term,
        members,
        node: node.id,
    }
}

pub fn prometheus<N: PeerNet>(node: &SyncNode<N>, conflicts: &ConflictTracker) -> String {
    let s = status_with_conflicts(node, conflicts);
    let c = cluster(node);
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
         # TYPE synod_udp_receive_drops counter\nsynod_udp_receive_drops{{node=\"{id}\"}} {}\n\
         # TYPE synod_pending_edits gauge\nsynod_pending_edits{{node=\"{id}\"}} {}\n\
         # TYPE synod_staging_bytes gauge\nsynod_staging_bytes{{node=\"{id}\"}} {}\n",
        s.term, s.applied, s.watermark, s.entries, s.wire.bytes_in, s.wire.bytes_out, s.wire.frames_rejected, s.wire.udp_drops,
        s.pending_count, s.staging_bytes
    ));
    // `write!` into a String cannot fail.
    let _ = write!(
        out,
        "# TYPE synod_raft_leader gauge\nsynod_raft_leader{{node=\"{id}\"}} {}\n\
         # TYPE synod_materialize_queue_depth gauge\nsynod_materialize_queue_depth{{node=\"{id}\"}} {}\n\
         # TYPE synod_uploads_in_progress gauge\nsynod_uploads_in_progress{{node=\"{id}\"}} {}\n\
         # TYPE synod_conflict_copies_present gauge\nsynod_conflict_copies_present{{node=\"{id}\"}} {}\n\
         # TYPE synod_parked_files gauge\nsynod_parked_files{{node=\"{id}\"}} {}\n\
         # TYPE synod_raft_role gauge\n",
        s.leader.unwrap_or(0),
        s.in_flight.materialize_queue,
        s.in_flight.uploads,
        s.conflicts.count,
        s.parked_count,
    );
    for role in ["leader", "follower", "candidate", "learner", "shutdown"] {
        let on = u8::from(s.role == role);
        let _ = writeln!(out, "synod_raft_role{{node=\"{id}\",role=\"{role}\"}} {on}");
    }
    let _ = writeln!(out, "# TYPE synod_peer_last_answer_seconds gauge");
    for m in &c.members {
        if let Some(ms) = m.contact.and_then(|c| c.millis_since_answer) {
            let _ = writeln!(
                out,
                "synod_peer_last_answer_seconds{{node=\"{id}\",peer=\"{}\"}} {}",
                m.id,
                ms as f64 / 1000.0
            );
        }
    }
    out
}

/// Most changes one status request reads from the change feed; a large
/// backlog is caught up over several requests.
const CHANGES_PER_REPORT: usize = 20_000;

/// The live conflict copies of the namespace, kept up to date from the
/// change feed so a status request reads only what changed since the last.
#[derive(Debug, Default)]
pub struct ConflictTracker {
    state: Mutex<TrackerState>,
}

#[derive(Debug, Default)]
struct TrackerState {
    /// Every change up to this log index is reflected in `paths`.
    seen_through: u64,
    paths: BTreeSet<String>,
}

impl ConflictTracker {
    pub fn report(&self, view: &StateView) -> ConflictsReport {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let applied = view.applied_index();
        if applied > st.seen_through {
            // One log entry can hold more changes than a read: widen the
            // read until it reaches past the first version.
            let mut limit = CHANGES_PER_REPORT;
            let changes = loop {
                match view.changes_since(st.seen_through, limit) {
                    Ok(c) if c.len() == limit && c[0].version == c[limit - 1].version => limit *= 2,
                    Ok(c) => break Some(c),
                    Err(_) => break None,
                }
            };
            if let Some(changes) = changes {
                st.absorb(changes, limit, applied);
            }
        }
        ConflictsReport {
            count: st.paths.len(),
            paths: st.paths.iter().take(100).cloned().collect(),
        }
    }
}

impl TrackerState {
    /// Takes in `changes`, read with `limit` when `applied` was the applied
    /// index. A full read may end inside a version: that version is left
    /// whole to the next read, or the rest of it would be passed over.
    fn absorb(&mut self, mut changes: Vec<Change>, limit: usize, applied: u64) {
        let complete = changes.len() < limit;
        if let (false, Some(first), Some(cut)) = (
            complete,
            changes.first().map(|c| c.version),
            changes.last().map(|c| c.version),
        ) {
            if first != cut {
                changes.retain(|c| c.version != cut);
            }
        }
        let mut last = self.seen_through;
        for ch in changes {
            last = last.max(ch.version);
            let p = ch.path.as_str();
            if crate::conflict::is_conflict_copy(p) {
                if ch.entry.is_live() {
                    self.paths.insert(p.to_string());
                } else {
                    self.paths.remove(p);
                }
            }
        }
        self.seen_through = if complete { last.max(applied) } else { last };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_consensus::{Entry, EntryKind, NsPath};

    fn change(version: u64, path: &str) -> Change {
        Change {
            version,
            path: NsPath::parse(path).unwrap(),
            entry: Entry {
                kind: EntryKind::File,
                size: 0,
                root: synod_merkle::Hash::ZERO,
                mode: 0o644,
                mtime_ns: 0,
                version,
                origin: 1,
                holders: vec![1],
                tombstone: false,
            },
        }
    }

    #[test]
    fn a_full_read_of_the_feed_leaves_its_last_version_whole_to_the_next() {
        let a = "a.sync-conflict-20261207-120000-2.txt";
        let b = "b.sync-conflict-20261207-120000-2.txt";
        let c = "c.sync-conflict-20261207-120000-2.txt";
        let mut st = TrackerState::default();
        // A read of 3 that ends inside version 6, which also holds `c`.
        st.absorb(vec![change(5, a), change(6, b), change(6, c)], 3, 9);
        assert_eq!(st.seen_through, 5, "version 6 is read again, whole");
        assert_eq!(st.paths, BTreeSet::from([a.to_string()]));
        st.absorb(vec![change(6, b), change(6, c), change(7, "x.txt")], 4, 9);
        assert_eq!(st.seen_through, 9, "a short read reaches the applied index");
        let all: BTreeSet<String> = [a, b, c].iter().map(|p| p.to_string()).collect();
        assert_eq!(st.paths, all);
    }
}
