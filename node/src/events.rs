//! Recent notable events of one node, for the status page and
//! `GET /v1/events`: a bounded in-memory ring (the last [`CAPACITY`]),
//! lost on restart. The log is the durable record; this is the glance.

use std::collections::VecDeque;
use std::fmt::Display;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use synod_consensus::{NodeId, NodeInfo, SynodRaft};
use tokio::sync::broadcast;

/// Events kept; older ones are dropped first.
pub const CAPACITY: usize = 100;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A committed file was written into the folder.
    Materialized,
    /// A file was removed from the folder (delete or rename source).
    Removed,
    /// A local edit lost a race and was committed as a conflict copy.
    ConflictCopy,
    /// An edit of a file deleted elsewhere was kept.
    EditKept,
    /// A local change could not be committed (e.g. the file vanished while
    /// it was read); the next scan looks again.
    NotCommitted,
    /// This node's Raft role changed.
    Role,
    /// The cluster has a new leader, or none.
    Leader,
    /// Voters or learners changed.
    Membership,
    /// Something committed was not written into the folder (e.g. a link
    /// pointing outside it).
    Refused,
    /// A committed file could not be written into the folder yet: no
    /// member could serve its content. It is tried again now and then.
    Parked,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1 in this process; clients poll with `after`.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: EventKind,
    /// The path, member or role it is about.
    pub subject: String,
}

#[derive(Debug, Default)]
struct Ring {
    last_seq: u64,
    events: VecDeque<Event>,
}

/// The ring of recent events; cheap to record into from any thread.
#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<Ring>,
}

impl Events {
    pub fn record(&self, kind: EventKind, subject: impl Display) {
        let at_ms = crate::lab_hooks::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let subject = subject.to_string();
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.last_seq += 1;
        let seq = ring.last_seq;
        if ring.events.len() == CAPACITY {
            ring.events.pop_front();
        }
        ring.events.push_back(Event {
            seq,
            at_ms,
            kind,
            subject,
        });
    }

    /// The kept events with `seq > after`, oldest first.
    pub fn since(&self, after: u64) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.events
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect()
    }
}

/// Records role, leader and membership changes of `raft` into the events of
/// `metrics` until `shutdown`.
pub async fn follow_raft(
    raft: SynodRaft,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let mut watch = raft.metrics();
    let mut last: Option<RaftGlance> = None;
    loop {
        let now = RaftGlance::of(&watch.borrow());
        match &last {
            Some(before) => {
                for (kind, subject) in before.changes_to(&now) {
                    metrics.events.record(kind, subject);
                }
            }
            None => metrics.events.record(
                EventKind::Role,
                format!("started as {} (term {})", now.role, now.term),
            ),
        }
        last = Some(now);
        tokio::select! {
            changed = watch.changed() => if changed.is_err() { return },
            _ = shutdown.recv() => return,
        }
    }
}

/// What of the Raft metrics makes an event when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RaftGlance {
    role: String,
    term: u64,
    leader: Option<u64>,
    voters: Vec<u64>,
    learners: Vec<u64>,
}

impl RaftGlance {
    fn of(m: &openraft::RaftMetrics<NodeId, NodeInfo>) -> RaftGlance {
        let membership = m.membership_config.membership();
        RaftGlance {
            role: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            leader: m.current_leader,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    fn changes_to(&self, now: &RaftGlance) -> Vec<(EventKind, String)> {
        let mut out = Vec::new();
        if self.role != now.role {
            out.push((
                EventKind::Role,
                format!("{} → {} (term {})", self.role, now.role, now.term),
            ));
        }
        if self.leader != now.leader {
            let subject = match now.leader {
                Some(l) => format!("node {l} leads (term {})", now.term),
                None => format!("no leader (term {})", now.term),
            };
            out.push((EventKind::Leader, subject));
        }
        if self.voters != now.voters || self.learners != now.learners {
            out.push((
                EventKind::Membership,
                format!("voters {:?}, learners {:?}", now.voters, now.learners),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_capacity_events_in_order() {
        let events = Events::default();
        for i in 0..(CAPACITY + 7) {
            events.record(EventKind::Materialized, format!("f{i}"));
        }
        let all = events.since(0);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].seq, 8);
        assert_eq!(all[0].subject, "f7");
        assert_eq!(all.last().map(|e| e.seq), Some((CAPACITY + 7) as u64));
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let tail = events.since((CAPACITY + 5) as u64);
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0].subject, format!("f{}", CAPACITY + 5));
    }

    #[test]
    fn glance_changes_name_role_leader_and_membership() {
        let before = RaftGlance {
            role: "follower".into(),
            term: 1,
            leader: Some(2),
            voters: vec![1, 2, 3],
            learners: vec![],
        };
        assert!(before.changes_to(&before.clone()).is_empty());
        let after = RaftGlance {
            role: "leader".into(),
            term: 2,
            leader: Some(1),
            voters: vec![1, 2, 3],
            learners: vec![4],
        };
        let kinds: Vec<EventKind> = before.changes_to(&after).into_iter().map(|c| c.0).collect();
        assert_eq!(
            kinds,
            vec![EventKind::Role, EventKind::Leader, EventKind::Membership]
        );
    }
}
