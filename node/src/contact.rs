//! When each peer last answered this node's Raft RPCs: the "last contact"
//! of the status page. openraft 0.9 reports only when a quorum last
//! acknowledged the leader (`millis_since_quorum_ack`), not each member, so
//! the Raft network is wrapped to note every answer. On the leader that is
//! every heartbeat; a follower sends RPCs only while it campaigns.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::error::{InstallSnapshotError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use synod_consensus::{NodeId, NodeInfo, TypeConfig};

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, Default)]
struct Contact {
    last_answer: Option<Instant>,
    failures_since: u64,
}

/// Per peer: when it last answered a Raft RPC and how many failed since.
#[derive(Debug, Default)]
pub struct Contacts {
    peers: Mutex<BTreeMap<NodeId, Contact>>,
}

/// One peer's contact, as `/v1/cluster` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactReport {
    /// Milliseconds since the peer last answered; `None`: never.
    pub millis_since_answer: Option<u64>,
    /// RPCs to it that failed (unreachable, timed out) since then.
    pub failures_since: u64,
}

impl Contacts {
    fn note(&self, peer: NodeId, answered: bool) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let c = peers.entry(peer).or_default();
        if answered {
            c.last_answer = Some(Instant::now());
            c.failures_since = 0;
        } else {
            c.failures_since += 1;
        }
    }

    /// What is known of `peer`; `None` if this node never sent it an RPC.
    pub fn of(&self, peer: NodeId) -> Option<ContactReport> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.get(&peer).map(|c| ContactReport {
            millis_since_answer: c.last_answer.map(|t| t.elapsed().as_millis() as u64),
            failures_since: c.failures_since,
        })
    }
}

/// A Raft network that notes every answer in [`Metrics::contacts`].
#[derive(Debug, Clone)]
pub struct ContactNetwork<F> {
    inner: F,
    metrics: Arc<Metrics>,
}

impl<F> ContactNetwork<F> {
    pub fn new(inner: F, metrics: Arc<Metrics>) -> ContactNetwork<F> {
        ContactNetwork { inner, metrics }
    }
}

impl<F: RaftNetworkFactory<TypeConfig>> RaftNetworkFactory<TypeConfig> for ContactNetwork<F> {
    type Network = ContactConnection<F::Network>;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        ContactConnection {
            inner: self.inner.new_client(target, node).await,
            target,
            metrics: self.metrics.clone(),
        }
    }
}

/// One target's RPCs, their outcomes noted.
#[derive(Debug)]
pub struct ContactConnection<C> {
    inner: C,
    target: NodeId,
    metrics: Arc<Metrics>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

impl<C> ContactConnection<C> {
    /// A remote error is an answer too: the peer is there.
    fn note<T, E>(&self, result: &Result<T, RpcErr<E>>)
    where
        E: std::error::Error,
    {
        let answered = matches!(result, Ok(_) | Err(RPCError::RemoteError(_)));
        self.metrics.contacts.note(self.target, answered);
    }
}

impl<C: RaftNetwork<TypeConfig>> RaftNetwork<TypeConfig> for ContactConnection<C> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let result = self.inner.append_entries(rpc, option).await;
        self.note(&result);
        result
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let result = self.inner.install_snapshot(rpc, option).await;
        self.note(&result);
        result
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let result = self.inner.vote(rpc, option).await;
        self.note(&result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_resets_failures_and_unknown_peers_are_none() {
        let c = Contacts::default();
        assert_eq!(c.of(2), None);
        c.note(2, false);
        c.note(2, false);
        let r = c.of(2).expect("noted");
        assert_eq!(r.millis_since_answer, None);
        assert_eq!(r.failures_since, 2);
        c.note(2, true);
        let r = c.of(2).expect("noted");
        assert!(r.millis_since_answer.is_some());
        assert_eq!(r.failures_since, 0);
        c.note(2, false);
        assert_eq!(c.of(2).map(|r| r.failures_since), Some(1));
        assert!(c.of(2).and_then(|r| r.millis_since_answer).is_some());
    }
}
