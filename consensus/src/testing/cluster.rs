//! `TestCluster`: in-process nodes on real sled directories over a [`Router`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use openraft::{Config, ServerState};

use super::network::Router;
use crate::log_store::LogStore;
use crate::node::open_stores;
use crate::reads::{Reader, StateView};
use crate::types::{NodeId, NodeInfo, SynodRaft};

/// The node info test nodes advertise.
pub fn node_info(id: NodeId) -> NodeInfo {
    NodeInfo {
        addr: format!("mem://node-{id}"),
        peer_id: format!("peer-{id}"),
    }
}

/// One running in-process node.
#[derive(Clone)]
pub struct TestNode {
    /// Its id.
    pub id: NodeId,
    /// Its Raft handle.
    pub raft: SynodRaft,
    /// Its log store (for inspection).
    pub log: LogStore,
    /// Its applied namespace.
    pub view: StateView,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TestNode {
    /// Bytes on disk of this node's sled directory and snapshot directory.
    pub fn log_storage_usage(&self) -> (u64, u64) {
        self.log.storage().disk_usage()
    }

    /// A reader of this node.
    pub fn reader(&self) -> Reader {
        Reader::new(self.raft.clone(), self.view.clone())
    }
}

/// A cluster of in-process nodes, each with its own sled directory under `base`.
#[derive(Debug)]
pub struct TestCluster {
    /// The network.
    pub router: Router,
    base: PathBuf,
    config: Arc<Config>,
    cluster_id: String,
    nodes: BTreeMap<NodeId, TestNode>,
}

impl TestCluster {
    /// An empty cluster storing its nodes under `base`.
    pub fn new(base: &Path, config: Config) -> anyhow::Result<TestCluster> {
        let config = Arc::new(config.validate().context("raft config")?);
        Ok(TestCluster {
            router: Router::default(),
            base: base.to_owned(),
            config,
            cluster_id: "test-cluster".into(),
            nodes: BTreeMap::new(),
        })
    }

    /// A config suited to in-process tests: fast timers.
    pub fn fast_config() -> Config {
        Config {
            cluster_name: "test".into(),
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            install_snapshot_timeout: 2000,
            max_payload_entries: 64,
            ..Default::default()
        }
    }

    /// The directory of node `id`.
    pub fn dir_of(&self, id: NodeId) -> PathBuf {
        self.base.join(format!("node-{id}"))
    }

    /// Starts (or restarts) node `id` from its directory.
    pub async fn start_node(&mut self, id: NodeId) -> anyhow::Result<()> {
        let (log, sm) = open_stores(&self.dir_of(id), &self.cluster_id)
            .with_context(|| format!("open stores of node {id}"))?;
        let view = sm.view();
        let raft = SynodRaft::new(
            id,
            self.config.clone(),
            self.router.network_for(id),
            log.clone(),
            sm,
        )
        .await
        .with_context(|| format!("start raft of node {id}"))?;
        self.router.register(id, raft.clone());
        self.nodes.insert(
            id,
            TestNode {
                id,
                raft,
                log,
                view,
            },
        );
        Ok(())
    }

    /// Starts nodes `ids` and initialises them as the voters of a new cluster.
    pub async fn start(&mut self, ids: &[NodeId]) -> anyhow::Result<NodeId> {
        for id in ids {
            self.start_node(*id).await?;
        }
        let members: BTreeMap<NodeId, NodeInfo> =
            ids.iter().map(|id| (*id, node_info(*id))).collect();
        self.node(ids[0])?
            .raft
            .initialize(members)
            .await
            .context("initialize")?;
        self.wait_leader(Duration::from_secs(10)).await
    }

    /// Stops node `id` (as a crash: unreachable, then shut down) and releases its directory.
    pub async fn stop_node(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.router.unregister(id);
        let node = self
            .nodes
            .remove(&id)
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        node.raft
            .shutdown()
            .await
            .map_err(|e| anyhow!("shutdown of node {id}: {e}"))?;
        drop(node);
        // Replication tasks of other nodes may still hold nothing of ours; our own
        // tasks are gone after shutdown, so the sled lock is free once this returns.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }

    /// Node `id`.
    pub fn node(&self, id: NodeId) -> anyhow::Result<&TestNode> {
        self.nodes
            .get(&id)
            .ok_or_else(|| anyhow!("node {id} is not running"))
    }

    /// Running node ids.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Waits until one running, reachable node is leader and every node that
    /// can reach it agrees; returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<NodeId> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for n in self.nodes.values() {
                let m = n.raft.metrics().borrow().clone();
                if m.state == ServerState::Leader && m.current_leader == Some(n.id) {
                    return Ok(n.id);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a leader other than `not` is elected among `among`.
    pub async fn wait_new_leader(
        &self,
        not: NodeId,
        among: &[NodeId],
        timeout: Duration,
    ) -> anyhow::Result<NodeId> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for id in among {
                let n = self.node(*id)?;
                let m = n.raft.metrics().borrow().clone();
                if *id != not && m.state == ServerState::Leader {
                    return Ok(*id);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no new leader among {among:?} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every node in `ids` has applied at least `index`.
    pub async fn wait_applied(
        &self,
        ids: &[NodeId],
        index: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        for id in ids {
            let n = self.node(*id)?;
            tokio::time::timeout(timeout, n.view.wait_applied(index))
                .await
                .map_err(|_| {
                    anyhow!(
                        "node {id} did not apply {index} within {timeout:?} (at {})",
                        n.view.applied_index()
                    )
                })?;
        }
        Ok(())
    }

    /// The current voter ids as seen by node `id`.
    pub fn voters(&self, id: NodeId) -> anyhow::Result<BTreeSet<NodeId>> {
        let m = self.node(id)?.raft.metrics().borrow().clone();
        Ok(m.membership_config.membership().voter_ids().collect())
    }
}
