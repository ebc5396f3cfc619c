//! Test nodes: a transport on 127.0.0.1 with in-memory services.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use synod_consensus::{Request, SynodRaft};
use synod_merkle::{Hash, MerkleTree};
use synod_transport::messages::ForwardResponse;
use synod_transport::Bytes;
use synod_transport::{
    start_transport, ChunkData, Keypair, Multiaddr, PeerId, ServiceError, Services,
    TransportConfig, TransportHandle,
};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,synod_transport=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// In-memory chunks and trees; forwards writes to a Raft once one is set.
#[derive(Default)]
pub struct MemServices {
    pub chunks: Mutex<HashMap<Hash, Vec<u8>>>,
    pub trees: Mutex<HashMap<Hash, Arc<MerkleTree>>>,
    pub raft: OnceLock<SynodRaft>,
    /// Pushes stored (only after verification by the transport).
    pub stored: Mutex<u64>,
    /// Serve these bytes instead of the real ones (a lying peer).
    pub corrupt: Mutex<bool>,
    /// Manifests pushed to this node, as received.
    pub manifests: Mutex<Vec<Vec<u8>>>,
}

impl MemServices {
    pub fn add_chunk(&self, bytes: Vec<u8>) -> Hash {
        let id = Hash::of(&bytes);
        self.chunks.lock().unwrap().insert(id, bytes);
        id
    }

    pub fn add_tree(&self, tree: MerkleTree) -> Hash {
        let root = tree.root();
        self.trees.lock().unwrap().insert(root, Arc::new(tree));
        root
    }
}

impl Services for MemServices {
    fn tree_top(
        &self,
        _: PeerId,
        root: Hash,
    ) -> BoxFuture<'_, Result<Option<(u64, Hash)>, ServiceError>> {
        let t = self.trees.lock().unwrap().get(&root).cloned();
        Box::pin(async move { Ok(t.and_then(|t| Some((t.leaf_count(), t.top()?)))) })
    }

    fn tree_nodes(
        &self,
        _: PeerId,
        root: Hash,
        level: usize,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<Option<Vec<Hash>>, ServiceError>> {
        let t = self.trees.lock().unwrap().get(&root).cloned();
        Box::pin(async move { Ok(t.map(|t| t.nodes(level, range).to_vec())) })
    }

    fn read_chunks(
        &self,
        _: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Option<Bytes>>, ServiceError>> {
        let corrupt = *self.corrupt.lock().unwrap();
        let chunks = self.chunks.lock().unwrap();
        let out = ids
            .iter()
            .map(|id| {
                chunks.get(id).map(|b| {
                    let mut b = b.clone();
                    if corrupt {
                        b[0] ^= 1;
                    }
                    Bytes::from(b)
                })
            })
            .collect();
        Box::pin(async move { Ok(out) })
    }

    fn store_chunks(
        &self,
        _: PeerId,
        chunks: Vec<ChunkData>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        let mut map = self.chunks.lock().unwrap();
        *self.stored.lock().unwrap() += chunks.len() as u64;
        for c in chunks {
            map.insert(c.id, c.bytes.to_vec());
        }
        Box::pin(async { Ok(()) })
    }

    fn store_manifests(
        &self,
        _: PeerId,
        manifests: Vec<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        self.manifests.lock().unwrap().extend(manifests);
        Box::pin(async { Ok(()) })
    }

    fn missing_chunks(
        &self,
        _: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Hash>, ServiceError>> {
        let map = self.chunks.lock().unwrap();
        let missing = ids.into_iter().filter(|id| !map.contains_key(id)).collect();
        Box::pin(async move { Ok(missing) })
    }

    fn read_index(&self, _: PeerId) -> BoxFuture<'_, ForwardResponse> {
        Box::pin(async move {
            let Some(raft) = self.raft.get() else {
                return ForwardResponse::Failed("no raft".into());
            };
            match raft.ensure_linearizable().await {
                Ok(read_log_id) => ForwardResponse::ReadIndex(read_log_id.map_or(0, |l| l.index)),
                Err(e) => ForwardResponse::Failed(e.to_string()),
            }
        })
    }

    fn forward_write(&self, _: PeerId, request: Request) -> BoxFuture<'_, ForwardResponse> {
        Box::pin(async move {
            let Some(raft) = self.raft.get() else {
                return ForwardResponse::Failed("no raft".into());
            };
            match raft.client_write(request).await {
                Ok(r) => ForwardResponse::Done(r.data),
                Err(e) => match e.forward_to_leader() {
                    Some(f) => ForwardResponse::NotLeader {
                        leader: f.leader_id,
                    },
                    None => ForwardResponse::Failed(e.to_string()),
                },
            }
        })
    }
}

pub struct TestNode {
    pub handle: TransportHandle,
    pub services: Arc<MemServices>,
    pub peer: PeerId,
    pub addr: Multiaddr,
    pub _task: tokio::task::JoinHandle<()>,
}

pub fn local_config() -> TransportConfig {
    TransportConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        ..TransportConfig::default()
    }
}

pub async fn must_start_node(config: TransportConfig) -> TestNode {
    let services = Arc::new(MemServices::default());
    let key = Keypair::generate_ed25519();
    let (handle, task) = start_transport(key, config, services.clone())
        .await
        .unwrap();
    TestNode {
        peer: handle.local_peer_id(),
        addr: handle.listen_addrs()[0].clone(),
        handle,
        services,
        _task: task,
    }
}

/// Makes every node allow and know every other node.
pub async fn must_mesh(nodes: &[&TestNode]) {
    for n in nodes {
        let others: Vec<_> = nodes.iter().filter(|o| o.peer != n.peer).collect();
        n.handle
            .set_allowed_peers(others.iter().map(|o| o.peer))
            .await
            .unwrap();
        for o in others {
            n.handle
                .add_peer_address(o.peer, o.addr.clone())
                .await
                .unwrap();
        }
    }
}

pub async fn must_eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[allow(dead_code)]
pub fn members(nodes: &[(u64, &TestNode)]) -> BTreeMap<u64, synod_consensus::NodeInfo> {
    nodes
        .iter()
        .map(|(id, n)| {
            (
                *id,
                synod_consensus::NodeInfo {
                    addr: n.addr.to_string(),
                    peer_id: n.peer.to_string(),
                },
            )
        })
        .collect()
}
