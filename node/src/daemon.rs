//! The daemon: wires storage, Raft, the transport, the sync engine and the
//! HTTP API of one node, and shuts them down in order.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use futures::FutureExt;
use synod_chunker::ChunkParams;
use synod_consensus::{
    open_stores, ClusterSettings, NodeId, NodeInfo, Proposer, ProposerConfig, Reader, Request,
    SynodRaft,
};
use synod_merkle::{Hash, MerkleTree};
use synod_transport::{
    start_transport, Bytes, ChunkData, ChunkDelta, ForwardResponse, HashBlob, Multiaddr,
    P2pRaftNetwork, PeerId, RequestError, ServiceError, Services, TransportConfig, TransportHandle,
};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use crate::api::{self, ApiState};
use crate::config::{ClusterConfig, NodeConfig};
use crate::engine::SyncNode;
use crate::fsutil;
use crate::local::LocalState;
use crate::materializer;
use crate::metrics::Metrics;
use crate::peers::{ChunkAsDelta, ForwardOutcome, PeerError, PeerNet, WireStats};
use crate::staging::Staging;

/// Creates the data dir and identity of a node if needed; returns its peer id.
pub fn init_identity(data_dir: &Path) -> Result<PeerId> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let key = synod_transport::load_or_create_identity(data_dir)?;
    Ok(key.public().to_peer_id())
}

pub fn quic_addr(addr: SocketAddr) -> Multiaddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => format!("/ip4/{ip}"),
        std::net::IpAddr::V6(ip) => format!("/ip6/{ip}"),
    };
    format!("{ip}/udp/{}/quic-v1", addr.port())
        .parse()
        .expect("an ip and a port form a valid multiaddr")
}

/// A node's peer id: from the configuration, else from its data dir (nodes
/// on this machine).
fn peer_id_of(n: &NodeConfig) -> Result<PeerId> {
    if let Some(p) = &n.peer_id {
        return p
            .parse()
            .with_context(|| format!("node {}: invalid peer_id {p:?}", n.id));
    }
    let key_path = n.data_dir.join(synod_transport::identity::KEY_FILE);
    let key = synod_transport::identity::load_identity(&key_path).with_context(|| {
        format!(
            "node {} has no peer_id in the configuration and no identity at {}; \
             run `synod init --node {}` there and put the printed peer id in the configuration",
            n.id,
            key_path.display(),
            n.id
        )
    })?;
    Ok(key.public().to_peer_id())
}

/// The members of the configuration as Raft node infos.
pub fn configured_members(cfg: &ClusterConfig) -> Result<BTreeMap<NodeId, NodeInfo>> {
    cfg.nodes
        .values()
        .map(|n| {
            Ok((
                n.id,
                NodeInfo {
                    addr: quic_addr(n.address).to_string(),
                    peer_id: peer_id_of(n)?.to_string(),
                },
            ))
        })
        .collect()
}

/// The network as the sync engine sees it, over the transport.
#[allow(missing_debug_implementations)]
pub struct TransportNet {
    handle: TransportHandle,
    raft: SynodRaft,
    configured: BTreeMap<NodeId, NodeInfo>,
    metrics: Arc<Metrics>,
}

impl TransportNet {
    fn peer(&self, node: NodeId) -> Result<PeerId, PeerError> {
        // Always false unless built with `lab-hooks` (the lab's loopback
        // partitions): every exchange below starts here.
        if crate::lab_hooks::dropped(node) {
            return Err(PeerError::new(node, "cut off by the lab's drop_peers hook"));
        }
        let m = self.raft.metrics().borrow().clone();
        let info = m
            .membership_config
            .membership()
            .get_node(&node)
            .cloned()
            .or_else(|| self.configured.get(&node).cloned())
            .ok_or_else(|| PeerError::new(node, "not a member"))?;
        let (peer, _) = synod_transport::peer_of(&info).map_err(|e| PeerError::new(node, e))?;
        Ok(peer)
    }

    /// The node id of `peer`, if it is a member or configured.
    fn node_of(&self, peer: &PeerId) -> Option<NodeId> {
        let text = peer.to_string();
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let found = m
            .membership_config
            .membership()
            .nodes()
            .chain(self.configured.iter())
            .find(|(_, info)| info.peer_id == text)
            .map(|(id, _)| *id);
        found
    }
}

impl PeerNet for TransportNet {
    async fn fetch_chunks(
        &self,
        peer: NodeId,
        ids: Vec<Hash>,
    ) -> Result<Vec<Option<Bytes>>, PeerError> {
        let p = self.peer(peer)?;
        let got = self.handle.fetch_chunks(p, &ids).await.map_err(|e| {
            if matches!(e, RequestError::BadChunk { .. }) {
                Metrics::add(&self.metrics.chunks_rejected, 1);
            }
            PeerError::new(peer, e)
        })?;
        let bytes: usize = got.iter().flatten().map(Bytes::len).sum();
        self.metrics.peer_traffic.received(peer, bytes as u64);
        Ok(got)
    }

    async fn missing_chunks(&self, peer: NodeId, ids: Vec<Hash>) -> Result<Vec<Hash>, PeerError> {
        let p = self.peer(peer)?;
        self.handle
            .missing_chunks(p, &ids)
            .await
            .map_err(|e| PeerError::new(peer, e))
    }

    async fn missing_since(
        &self,
        peer: NodeId,
        queries: Vec<(Hash, Vec<Hash>)>,
    ) -> Result<Vec<Option<Vec<Hash>>>, PeerError> {
        let p = self.peer(peer)?;
        self.handle
            .missing_since(p, &queries)
            .await
            .map_err(|e| PeerError::new(peer, e))
    }

    async fn signatures(
        &self,
        peer: NodeId,
        runs: Vec<Vec<Hash>>,
    ) -> Result<Vec<Option<Vec<u8>>>, PeerError> {
        let p = self.peer(peer)?;
        self.handle
            .signatures(p, &runs)
            .await
            .map_err(|e| PeerError::new(peer, e))
    }

    async fn push_deltas(&self, peer: NodeId, deltas: Vec<ChunkAsDelta>) -> Result<(), PeerError> {
        let p = self.peer(peer)?;
        let bytes: usize = deltas.iter().map(|(_, _, d)| d.len()).sum();
        let deltas = deltas
            .into_iter()
            .map(|(id, base, delta)| ChunkDelta {
                id,
                base: HashBlob::from_hashes(&base),
                delta,
            })
            .collect();
        self.handle
            .push_deltas(p, deltas)
            .await
            .map_err(|e| PeerError::new(peer, e))?;
        self.metrics.peer_traffic.sent(peer, bytes as u64);
        Ok(())
    }

    async fn fetch_from(
        &self,
        peer: NodeId,
        from: NodeId,
        ids: Vec<Hash>,
    ) -> Result<(), PeerError> {
        let p = self.peer(peer)?;
        self.handle
            .fetch_from(p, from, &ids)
            .await
            .map_err(|e| PeerError::new(peer, e))
    }

    async fn fetch_deltas(
        &self,
        peer: NodeId,
        wanted: Vec<(Vec<u8>, Vec<Hash>)>,
    ) -> Result<Vec<Option<Vec<u8>>>, PeerError> {
        let p = self.peer(peer)?;
        let got = self
            .handle
            .fetch_deltas(p, &wanted)
            .await
            .map_err(|e| PeerError::new(peer, e))?;
        let bytes: usize = got.iter().flatten().map(Vec::len).sum();
        self.metrics.peer_traffic.received(peer, bytes as u64);
        Ok(got)
    }

    async fn push_chunks(&self, peer: NodeId, chunks: Vec<(Hash, Bytes)>) -> Result<(), PeerError> {
        let p = self.peer(peer)?;
        let bytes: usize = chunks.iter().map(|(_, b)| b.len()).sum();
        let chunks = chunks
            .into_iter()
            .map(|(id, bytes)| ChunkData { id, bytes })
            .collect();
        self.handle
            .push_chunks(p, chunks)
            .await
            .map_err(|e| PeerError::new(peer, e))?;
        self.metrics.peer_traffic.sent(peer, bytes as u64);
        Ok(())
    }

    async fn push_manifests(&self, peer: NodeId, manifests: Vec<Vec<u8>>) -> Result<(), PeerError> {
        let p = self.peer(peer)?;
        self.handle
            .push_manifests(p, manifests)
            .await
            .map_err(|e| PeerError::new(peer, e))
    }

    async fn tree_top(&self, peer: NodeId, root: Hash) -> Result<Option<(u64, Hash)>, PeerError> {
        let p = self.peer(peer)?;
        match self.handle.tree_top(p, root).await {
            Ok(top) => Ok(Some(top)),
            Err(synod_transport::RequestError::Refused { .. }) => Ok(None),
            Err(e) => Err(PeerError::new(peer, e)),
        }
    }

    async fn tree_nodes(
        &self,
        peer: NodeId,
        root: Hash,
        level: u32,
        range: Range<u64>,
    ) -> Result<Vec<Hash>, PeerError> {
        let p = self.peer(peer)?;
        self.handle
            .tree_nodes(p, root, level as usize, range)
            .await
            .map_err(|e| PeerError::new(peer, e))
    }

    async fn forward(&self, peer: NodeId, request: Request) -> Result<ForwardOutcome, PeerError> {
        let p = self.peer(peer)?;
        let _ = &self.metrics;
        crate::lab_hooks::delay_message().await;
        match self.handle.forward_write(p, request).await {
            Ok(ForwardResponse::Done(r)) => Ok(ForwardOutcome::Done(r)),
            Ok(ForwardResponse::NotLeader { leader }) => Ok(ForwardOutcome::NotLeader(leader)),
            Ok(ForwardResponse::Failed(m)) => Ok(ForwardOutcome::Failed(m)),
            Ok(ForwardResponse::ReadIndex(_)) => Ok(ForwardOutcome::Failed(
                "read index answered to a write".into(),
            )),
            Err(e) => Err(PeerError::new(peer, e)),
        }
    }

    async fn read_index(&self, peer: NodeId) -> Result<ForwardOutcome, PeerError> {
        let p = self.peer(peer)?;
        crate::lab_hooks::delay_message().await;
        match self.handle.read_index(p).await {
            Ok(ForwardResponse::ReadIndex(i)) => Ok(ForwardOutcome::ReadIndex(i)),
            Ok(ForwardResponse::NotLeader { leader }) => Ok(ForwardOutcome::NotLeader(leader)),
            Ok(ForwardResponse::Failed(m)) => Ok(ForwardOutcome::Failed(m)),
            Ok(ForwardResponse::Done(_)) => Ok(ForwardOutcome::Failed(
                "write answer to a read index".into(),
            )),
            Err(e) => Err(PeerError::new(peer, e)),
        }
    }

    fn wire_stats(&self) -> WireStats {
        let c = self.handle.metrics().codec.snapshot();
        WireStats {
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            frames_rejected: c.rejected(),
            udp_drops: self.handle.udp_drops(),
        }
    }
}

/// What this node serves to peers, once the engine exists.
/// Counts bytes `peer` pushed to this node.
fn received(node: &SyncNode<TransportNet>, peer: &PeerId, bytes: usize) {
    if let Some(from) = node.net.node_of(peer) {
        node.metrics.peer_traffic.received(from, bytes as u64);
    }
}

/// Counts bytes this node served to `peer`.
fn served(node: &SyncNode<TransportNet>, peer: &PeerId, bytes: usize) {
    Metrics::add(&node.metrics.bytes_served, bytes as u64);
    if let Some(to) = node.net.node_of(peer) {
        node.metrics.peer_traffic.sent(to, bytes as u64);
    }
}

struct NodeServices {
    node: OnceLock<Arc<SyncNode<TransportNet>>>,
    trees: Mutex<HashMap<Hash, Arc<MerkleTree>>>,
}

/// Manifest trees kept built for serving.
const TREE_CACHE: usize = 32;

impl NodeServices {
    fn node(&self) -> Result<&Arc<SyncNode<TransportNet>>, ServiceError> {
        self.node
            .get()
            .ok_or_else(|| ServiceError("node is starting".into()))
    }

    /// Runs `f` on the node off the runtime: disk reads, hashing, fsyncs.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<SyncNode<TransportNet>>) -> Result<T, String> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, ServiceError>> {
        self.staging(Vec::new(), f)
    }

    /// [`Self::blocking`] for `f` staging the chunks `ids` received from a
    /// peer: marked as arriving until it is done, so that the materializer
    /// waits for them rather than fetching them again.
    fn staging<T: Send + 'static>(
        &self,
        ids: Vec<Hash>,
        f: impl FnOnce(Arc<SyncNode<TransportNet>>) -> Result<T, String> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, ServiceError>> {
        async move {
            let node = self.node()?.clone();
            let arriving = (!ids.is_empty()).then(|| node.staging.arriving(ids));
            let result = tokio::task::spawn_blocking(move || f(node)).await;
            drop(arriving);
            result
                .map_err(|e| ServiceError(e.to_string()))?
                .map_err(ServiceError)
        }
        .boxed()
    }

    fn tree(&self, root: &Hash) -> Result<Option<Arc<MerkleTree>>, ServiceError> {
        if let Some(t) = self.trees.lock().expect("tree cache poisoned").get(root) {
            return Ok(Some(t.clone()));
        }
        let node = self.node()?;
        let Some(manifest) = node
            .local
            .manifest(root)
            .map_err(|e| ServiceError(e.to_string()))?
        else {
            return Ok(None);
        };
        let tree = Arc::new(MerkleTree::from_leaves(manifest.chunk_ids().collect()));
        let mut cache = self.trees.lock().expect("tree cache poisoned");
        if cache.len() >= TREE_CACHE {
            cache.clear();
        }
        cache.insert(*root, tree.clone());
        Ok(Some(tree))
    }
}

impl Services for NodeServices {
    fn tree_top(
        &self,
        _peer: PeerId,
        root: Hash,
    ) -> BoxFuture<'_, Result<Option<(u64, Hash)>, ServiceError>> {
        async move {
            Ok(self
                .tree(&root)?
                .and_then(|t| t.top().map(|top| (t.leaf_count(), top))))
        }
        .boxed()
    }

    fn tree_nodes(
        &self,
        _peer: PeerId,
        root: Hash,
        level: usize,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<Option<Vec<Hash>>, ServiceError>> {
        async move { Ok(self.tree(&root)?.map(|t| t.nodes(level, range).to_vec())) }.boxed()
    }

    fn read_chunks(
        &self,
        peer: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Option<Bytes>>, ServiceError>> {
        self.blocking(move |node| {
            let out: Vec<Option<Bytes>> = ids
                .iter()
                .map(|id| node.serve_chunk(id).map(Bytes::from))
                .collect();
            served(&node, &peer, out.iter().flatten().map(Bytes::len).sum());
            Ok(out)
        })
    }

    fn store_chunks(
        &self,
        peer: PeerId,
        chunks: Vec<ChunkData>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        let ids = chunks.iter().map(|c| c.id).collect();
        self.staging(ids, move |node| {
            let pairs: Vec<(Hash, Bytes)> = chunks.into_iter().map(|c| (c.id, c.bytes)).collect();
            node.store_pushed(&pairs)?;
            received(&node, &peer, pairs.iter().map(|(_, b)| b.len()).sum());
            Ok(())
        })
    }

    fn store_manifests(
        &self,
        _peer: PeerId,
        manifests: Vec<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        async move {
            let node = self.node()?.clone();
            node.store_pushed_manifests(&manifests)
                .await
                .map_err(ServiceError)
        }
        .boxed()
    }

    fn missing_chunks(
        &self,
        _peer: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Hash>, ServiceError>> {
        self.blocking(move |node| Ok(node.lacking(&ids)))
    }

    fn missing_since(
        &self,
        _peer: PeerId,
        queries: Vec<(Hash, Vec<Hash>)>,
    ) -> BoxFuture<'_, Result<Vec<Option<Vec<Hash>>>, ServiceError>> {
        self.blocking(move |node| Ok(node.lacking_since(&queries)))
    }

    fn signatures(
        &self,
        _peer: PeerId,
        runs: Vec<Vec<Hash>>,
    ) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>, ServiceError>> {
        self.blocking(move |node| Ok(node.sign_runs(&runs)))
    }

    fn deltas(
        &self,
        peer: PeerId,
        wanted: Vec<(Vec<u8>, Vec<Hash>)>,
    ) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>, ServiceError>> {
        self.blocking(move |node| {
            let out = node.diff_chunks(&wanted);
            served(&node, &peer, out.iter().flatten().map(Vec::len).sum());
            Ok(out)
        })
    }

    fn store_deltas(
        &self,
        peer: PeerId,
        deltas: Vec<ChunkAsDelta>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        let ids = deltas.iter().map(|(id, _, _)| *id).collect();
        self.staging(ids, move |node| {
            node.store_deltas(&deltas)?;
            received(&node, &peer, deltas.iter().map(|(_, _, d)| d.len()).sum());
            Ok(())
        })
    }

    fn fetch_from(
        &self,
        _peer: PeerId,
        from: u64,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        async move {
            let node = self.node()?.clone();
            node.pull_from(from, ids).await.map_err(ServiceError)
        }
        .boxed()
    }

    fn forward_write(&self, _peer: PeerId, request: Request) -> BoxFuture<'_, ForwardResponse> {
        async move {
            let node = match self.node() {
                Ok(n) => n.clone(),
                Err(e) => return ForwardResponse::Failed(e.0),
            };
            to_wire(node.serve_forward(request).await)
        }
        .boxed()
    }

    fn read_index(&self, _peer: PeerId) -> BoxFuture<'_, ForwardResponse> {
        async move {
            match self.node() {
                Ok(n) => to_wire(n.serve_read_index().await),
                Err(e) => ForwardResponse::Failed(e.0),
            }
        }
        .boxed()
    }
}

fn to_wire(o: ForwardOutcome) -> ForwardResponse {
    match o {
        ForwardOutcome::Done(r) => ForwardResponse::Done(r),
        ForwardOutcome::NotLeader(leader) => ForwardResponse::NotLeader { leader },
        ForwardOutcome::Failed(m) => ForwardResponse::Failed(m),
        ForwardOutcome::ReadIndex(i) => ForwardResponse::ReadIndex(i),
    }
}

/// A running node.
pub struct Daemon {
    pub node: Arc<SyncNode<TransportNet>>,
    pub api_addr: SocketAddr,
    transport: TransportHandle,
    shutdown: broadcast::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("node", &self.node.id)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    pub async fn start(cfg: ClusterConfig, id: NodeId) -> Result<Daemon> {
        let ncfg = cfg
            .node(id)
            .with_context(|| format!("node {id} is not in {}", cfg.source.display()))?
            .clone();
        let span = tracing::info_span!("node", id);
        Self::start_inner(cfg, ncfg).instrument(span).await
    }

    async fn start_inner(cfg: ClusterConfig, mut ncfg: NodeConfig) -> Result<Daemon> {
        let id = ncfg.id;
        std::fs::create_dir_all(&ncfg.folder)
            .with_context(|| format!("creating folder {}", ncfg.folder.display()))?;
        // The watcher reports absolute paths: the folder must be absolute too
        // for it to tell our own temp files and placements from the user's.
        ncfg.folder = std::path::absolute(&ncfg.folder)
            .with_context(|| format!("resolving folder {}", ncfg.folder.display()))?;
        let key = synod_transport::load_or_create_identity(&ncfg.data_dir)?;
        let swept = fsutil::sweep_tmp(&ncfg.folder).context("sweeping leftover temp files")?;
        if swept > 0 {
            info!(swept, "removed temp files of an interrupted run");
        }
        let (log_store, sm) = open_stores(&ncfg.data_dir.join("raft"), &cfg.cluster)
            .with_context(|| format!("opening the Raft state in {}", ncfg.data_dir.display()))?;
        let view = sm.view();
        let local = LocalState::open(&ncfg.data_dir.join("local"))?;
        let staging = Staging::open(&ncfg.data_dir.join("staging"), cfg.max_staging_bytes)
            .and_then(|s| s.placing_into(&ncfg.folder))
            .with_context(|| format!("opening staging in {}", ncfg.data_dir.display()))?;
        staging.sweep(STAGING_MAX_AGE, Duration::ZERO)?;
        tokio::spawn(sweep_staging(staging.clone()));

        let members = configured_members(&cfg)?;
        let services = Arc::new(NodeServices {
            node: OnceLock::new(),
            trees: Mutex::new(HashMap::new()),
        });
        let bootstrap = members
            .iter()
            .filter(|(m, _)| **m != id)
            .map(|(_, info)| synod_transport::peer_of(info).map_err(anyhow::Error::from))
            .collect::<Result<Vec<_>>>()?;
        let tcfg = TransportConfig {
            listen: vec![quic_addr(ncfg.address)],
            bootstrap,
            ..TransportConfig::default()
        };
        let (transport, transport_task) = start_transport(key, tcfg, services.clone())
            .await
            .with_context(|| format!("starting the transport on {}", ncfg.address))?;

        let mut rcfg = synod_consensus::raft_config(&cfg.cluster)?;
        rcfg.heartbeat_interval = cfg.timeouts.heartbeat.as_millis() as u64;
        rcfg.election_timeout_min = cfg.timeouts.election_min.as_millis() as u64;
        rcfg.election_timeout_max = cfg.timeouts.election_max.as_millis() as u64;
        rcfg.snapshot_max_chunk_size = synod_transport::raft_network::max_snapshot_chunk_size();
        let rcfg = Arc::new(rcfg.validate()?);
        // The identity without the `lab-hooks` feature.
        let metrics = Arc::new(Metrics::default());
        let network = crate::contact::ContactNetwork::new(
            P2pRaftNetwork::new(transport.clone(), id),
            metrics.clone(),
        );
        let network = crate::lab_hooks::raft_network(network);
        let raft = SynodRaft::new(id, rcfg, network, log_store, sm)
            .await
            .context("starting Raft")?;
        transport.register_raft(raft.clone());

        let params = match view.settings().ok().flatten() {
            Some(s) => ChunkParams::new(s.chunk_min, s.chunk_avg, s.chunk_max)?,
            None => ChunkParams::new(cfg.chunking.min, cfg.chunking.avg, cfg.chunking.max)?,
        };
        let net = Arc::new(TransportNet {
            handle: transport.clone(),
            raft: raft.clone(),
            configured: members.clone(),
            metrics: metrics.clone(),
        });
        let client_id: u64 = rand::random();
        let watermark = local.on_disk_through()?;
        let node = Arc::new(SyncNode {
            id,
            folder: ncfg.folder.clone(),
            params,
            replication: cfg.replication,
            write_timeout: cfg.timeouts.write,
            raft: raft.clone(),
            reader: Reader::new(raft.clone(), view),
            proposer: Proposer::spawn(raft.clone(), client_id, ProposerConfig::default()),
            local,
            staging,
            net,
            metrics,
            uploads: Arc::new(Mutex::new(HashMap::new())),
            watermark: watch::Sender::new(watermark),
            folder_lock: tokio::sync::Mutex::new(()),
            placed: Default::default(),
        });
        if services.node.set(node.clone()).is_err() {
            bail!("services initialized twice");
        }

        let (shutdown, _) = broadcast::channel(4);
        let mut tasks = vec![transport_task];
        tasks.push(run_in_background(
            "materializer",
            materializer::run(node.clone(), shutdown.subscribe()).in_current_span(),
        )?);
        tasks.push(tokio::spawn(
            crate::scanner::run(node.clone(), cfg.timeouts.rescan, shutdown.subscribe())
                .in_current_span(),
        ));
        tasks.push(tokio::spawn(
            crate::events::follow_raft(raft.clone(), node.metrics.clone(), shutdown.subscribe())
                .in_current_span(),
        ));
        tasks.push(tokio::spawn(
            follow_membership(
                raft.clone(),
                transport.clone(),
                members.clone(),
                shutdown.subscribe(),
            )
            .in_current_span(),
        ));

        let listener = tokio::net::TcpListener::bind(ncfg.api)
            .await
            .with_context(|| format!("binding the API to {}", ncfg.api))?;
        let api_addr = listener.local_addr()?;
        let state = Arc::new(ApiState {
            node: node.clone(),
            max_upload_bytes: cfg.max_upload_bytes,
            initial_members: members,
            settings: ClusterSettings {
                chunk_min: cfg.chunking.min,
                chunk_avg: cfg.chunking.avg,
                chunk_max: cfg.chunking.max,
                replication: cfg.replication,
            },
            verify: Default::default(),
            conflicts: Default::default(),
        });
        let mut stop = shutdown.subscribe();
        tasks.push(tokio::spawn(
            async move {
                let app = api::router(state);
                // Answers are small and each waits for its request: Nagle
                // would only hold a response's tail back for an ACK.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        debug!(cause = %e, "TCP_NODELAY on an API connection");
                    }
                });
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.recv().await;
                    })
                    .await;
                if let Err(e) = served {
                    warn!(cause = %e, "API server stopped");
                }
            }
            .in_current_span(),
        ));
        info!(api = %api_addr, quic = %ncfg.address, peer = %transport.local_peer_id(), "node started");
        Ok(Daemon {
            node,
            api_addr,
            transport,
            shutdown,
            tasks,
        })
    }

    /// Stops the API, the engine, Raft and the transport, in that order.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(());
        if let Err(e) = self.node.raft.shutdown().await {
            warn!(cause = %e, "raft shutdown");
        }
        self.transport.shutdown().await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.node.local.flush().await?;
        info!("node stopped");
        Ok(())
    }
}

/// Keeps the transport's allow-list equal to the committed membership plus
/// the configured bootstrap nodes.
/// Staged chunks of writes that never committed go after a day.
const STAGING_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Sweeps the staging area hourly, so a long-running node's orphans go too.
async fn sweep_staging(staging: Staging) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    every.tick().await;
    loop {
        every.tick().await;
        let s = staging.clone();
        match tokio::task::spawn_blocking(move || {
            s.sweep(STAGING_MAX_AGE, Duration::from_secs(3600))
        })
        .await
        {
            Ok(Ok(n)) if n > 0 => info!(removed = n, "swept stale staged chunks"),
            Ok(Err(e)) => warn!(error = %e, "sweeping the staging area failed"),
            _ => {}
        }
    }
}

async fn follow_membership(
    raft: SynodRaft,
    transport: TransportHandle,
    bootstrap: BTreeMap<NodeId, NodeInfo>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let mut metrics = raft.metrics();
    let mut last = None;
    loop {
        let membership = metrics.borrow().membership_config.clone();
        if last.as_ref() != Some(&membership) {
            let peers: Vec<PeerId> = membership
                .membership()
                .nodes()
                .map(|(_, info)| info)
                .chain(bootstrap.values())
                .filter_map(|info| synod_transport::peer_of(info).ok().map(|(p, _)| p))
                .collect();
            if transport.set_allowed_peers(peers).await.is_err() {
                return;
            }
            last = Some(membership);
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = shutdown.recv() => return,
        }
    }
}

/// Runs node `id` until SIGINT or SIGTERM.
pub async fn run_until_signal(cfg: ClusterConfig, id: NodeId) -> Result<()> {
    Daemon::start(cfg, id).await?.run_until_signal().await
}

impl Daemon {
    /// Serves until SIGINT or SIGTERM, then shuts down.
    pub async fn run_until_signal(self) -> Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("stopping");
        self.shutdown().await
    }
}

/// Runs `task` on its own threads at a lower CPU priority than the rest of
/// the node: on a busy machine commits and the network go first, and the
/// background work catches up when they leave it CPU time.
fn run_in_background(
    name: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
        .with_context(|| format!("starting the {name} runtime"))?;
    let handle = rt.spawn(task);
    Ok(tokio::spawn(async move {
        let _ = handle.await;
        // Lets its blocking work (a write being placed) finish.
        let _ = tokio::task::spawn_blocking(move || rt.shutdown_timeout(SHUTDOWN_WAIT)).await;
    }))
}

/// Longest a stopping background runtime waits for its blocking work.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Nice value of background threads (see [`run_in_background`]).
const BACKGROUND_NICE: i32 = 19;

fn lower_priority() {
    // Linux keeps a nice value per thread: this one and those it starts.
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), BACKGROUND_NICE) {
        warn!(cause = %e, "could not lower a background thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    #[tokio::test]
    async fn background_work_runs_at_a_lower_priority_and_the_rest_does_not() {
        let ours = own_nice();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (blocking_tx, blocking_rx) = tokio::sync::oneshot::channel();
        run_in_background("test-background", async move {
            let _ = tx.send(own_nice());
            let n = tokio::task::spawn_blocking(own_nice).await.unwrap();
            let _ = blocking_tx.send(n);
        })
        .unwrap()
        .await
        .unwrap();
        let expected = BACKGROUND_NICE.max(ours);
        assert_eq!(rx.await.unwrap(), expected, "the background task's thread");
        assert_eq!(blocking_rx.await.unwrap(), expected, "its blocking thread");
        assert_eq!(own_nice(), ours, "the caller's thread keeps its priority");
    }
}
