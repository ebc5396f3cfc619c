//! `Router`: an in-memory Raft network between in-process nodes.
//!
//! Every RPC and its reply go through bincode, so encoding is exercised as it
//! would be on the wire. Faults: isolate a node, split the cluster into
//! groups, delay messages, drop a fraction of them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rand::Rng;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec;
use crate::types::{NodeId, NodeInfo, SynodRaft, TypeConfig};

#[derive(Default)]
struct Faults {
    /// Node → group; nodes in different groups cannot talk. Empty = no partition.
    groups: HashMap<NodeId, usize>,
    isolated: HashSet<NodeId>,
    delay: Option<(Duration, Duration)>,
    drop_rate: f64,
}

#[derive(Default)]
struct State {
    nodes: HashMap<NodeId, SynodRaft>,
    faults: Faults,
    /// AppendEntries sent to each node with no entries (heartbeats and
    /// commit-only updates).
    entry_less_appends: HashMap<NodeId, u64>,
}

/// The in-memory network shared by all nodes of a test cluster.
#[derive(Clone, Default)]
pub struct Router {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fault(String);

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `raft` reachable as `id`.
    pub fn register(&self, id: NodeId, raft: SynodRaft) {
        self.lock().nodes.insert(id, raft);
    }

    /// Makes `id` unreachable (as if it crashed).
    pub fn unregister(&self, id: NodeId) {
        self.lock().nodes.remove(&id);
    }

    /// Cuts every message to and from `id`.
    pub fn isolate(&self, id: NodeId) {
        self.lock().faults.isolated.insert(id);
    }

    /// Splits the cluster: nodes in different groups cannot talk; nodes in no
    /// group can talk to everyone not isolated.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        let mut s = self.lock();
        s.faults.groups.clear();
        for (g, ids) in groups.iter().enumerate() {
            for id in ids.iter() {
                s.faults.groups.insert(*id, g);
            }
        }
    }

    /// Removes isolation and partitions (delay and drop rate stay).
    pub fn heal(&self) {
        let mut s = self.lock();
        s.faults.groups.clear();
        s.faults.isolated.clear();
    }

    /// Delays every message by a uniform random time in `min..=max`.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.lock().faults.delay = (max > Duration::ZERO).then_some((min, max.max(min)));
    }

    /// AppendEntries sent so far to `target` with no entries in them.
    pub fn entry_less_appends(&self, target: NodeId) -> u64 {
        self.lock()
            .entry_less_appends
            .get(&target)
            .copied()
            .unwrap_or(0)
    }

    /// Drops this fraction of messages (0.0–1.0).
    pub fn set_drop_rate(&self, rate: f64) {
        self.lock().faults.drop_rate = rate.clamp(0.0, 1.0);
    }

    fn blocked(&self, a: NodeId, b: NodeId) -> bool {
        let s = self.lock();
        let f = &s.faults;
        if f.isolated.contains(&a) || f.isolated.contains(&b) {
            return true;
        }
        match (f.groups.get(&a), f.groups.get(&b)) {
            (Some(x), Some(y)) => x != y,
            _ => false,
        }
    }

    /// The network factory for node `source`.
    pub fn network_for(&self, source: NodeId) -> NodeNetwork {
        NodeNetwork {
            router: self.clone(),
            source,
        }
    }

    /// Delivers one RPC from `source` to `target` through bincode.
    async fn deliver<Req, Resp, E, Fut>(
        &self,
        source: NodeId,
        target: NodeId,
        req: Req,
        call: impl FnOnce(SynodRaft, Req) -> Fut,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
        E: std::error::Error + Serialize + DeserializeOwned,
        Fut: std::future::Future<Output = Result<Resp, RaftError<NodeId, E>>>,
    {
        let unreachable = |why: &str| {
            RPCError::Unreachable(Unreachable::new(&Fault(format!(
                "{source}->{target}: {why}"
            ))))
        };
        if self.blocked(source, target) {
            return Err(unreachable("partitioned"));
        }
        let (delay, drop_rate) = {
            let s = self.lock();
            (s.faults.delay, s.faults.drop_rate)
        };
        if let Some((min, max)) = delay {
            let d = if max > min {
                rand::thread_rng().gen_range(min..=max)
            } else {
                min
            };
            tokio::time::sleep(d).await;
        }
        if drop_rate > 0.0 && rand::thread_rng().gen_bool(drop_rate) {
            return Err(RPCError::Network(NetworkError::new(&Fault(format!(
                "{source}->{target}: dropped"
            )))));
        }
        let wire = |e: codec::DecodeError| RPCError::Network(NetworkError::new(&e));
        let req: Req = codec::decode("rpc request", &codec::encode(&req)).map_err(wire)?;
        let Some(raft) = self.lock().nodes.get(&target).cloned() else {
            return Err(unreachable("node down"));
        };
        let res = call(raft, req).await;
        if self.blocked(source, target) {
            return Err(unreachable("partitioned before the reply"));
        }
        let res: Result<Resp, RaftError<NodeId, E>> =
            codec::decode("rpc reply", &codec::encode(&res)).map_err(wire)?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }
}

/// One node's view of the [`Router`].
#[derive(Debug, Clone)]
pub struct NodeNetwork {
    router: Router,
    source: NodeId,
}

/// A connection from one node to another.
#[derive(Debug)]
pub struct Connection {
    router: Router,
    source: NodeId,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for NodeNetwork {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Connection {
        Connection {
            router: self.router.clone(),
            source: self.source,
            target,
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        if rpc.entries.is_empty() {
            *self
                .router
                .lock()
                .entry_less_appends
                .entry(self.target)
                .or_default() += 1;
        }
        self.router
            .deliver(self.source, self.target, rpc, |r, q| async move {
                r.append_entries(q).await
            })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.router
            .deliver(self.source, self.target, rpc, |r, q| async move {
                r.install_snapshot(q).await
            })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.router
            .deliver(self.source, self.target, rpc, |r, q| async move {
                r.vote(q).await
            })
            .await
    }
}
