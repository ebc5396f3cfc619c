//! `TransportHandle`: the cloneable front of a node's transport. Every call
//! becomes a command to the swarm-driver task (bounded queue) and its answer
//! comes back on a oneshot.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use synod_consensus::{Request, SynodRaft};
use synod_merkle::Hash;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::driver::{Driver, RaftSlot};
use crate::messages::{
    ChunkData, ChunkDelta, ChunkProtocol, ChunkRequest, ChunkResponse, DeltaWanted,
    ForwardProtocol, ForwardRequest, ForwardResponse, HashBlob, RaftProtocol, RaftRequest,
    RaftResponse, SinceQuery, TreeProtocol, TreeRequest, TreeResponse, WireProtocol,
    MAX_CHUNKS_PER_REQUEST, MAX_DELTA_QUERIES, MAX_MISSING_QUERY, MAX_TREE_NODES,
};
use crate::metrics::TransportMetrics;
use crate::raft_stream::{self, RaftStreams, RAFT_STREAM};
use crate::services::Services;
use crate::swarm::{build_swarm, SwarmError, TransportConfig};

/// Capacity of the command queue to the driver.
const COMMAND_QUEUE: usize = 1024;

/// Why a request to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("peer {peer} is unreachable for {protocol}: {cause}")]
    Unreachable {
        peer: PeerId,
        protocol: &'static str,
        cause: String,
    },
    #[error("{protocol} request to peer {peer} timed out")]
    Timeout {
        peer: PeerId,
        protocol: &'static str,
    },
    #[error("{protocol} request to peer {peer} failed: {cause}")]
    Failed {
        peer: PeerId,
        protocol: &'static str,
        cause: String,
    },
    #[error("peer {peer} refused the {protocol} request: {reason}")]
    Refused {
        peer: PeerId,
        protocol: &'static str,
        reason: String,
    },
    #[error("peer {peer} answered {protocol} wrongly: {what}")]
    BadAnswer {
        peer: PeerId,
        protocol: &'static str,
        what: String,
    },
    #[error("peer {peer} sent bytes that do not hash to chunk {id}")]
    BadChunk { peer: PeerId, id: Hash },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the transport is shut down")]
    Shutdown,
}

/// A pending outbound request and where its answer goes.
pub(crate) type Reply<P> = oneshot::Sender<Result<<P as WireProtocol>::Response, RequestError>>;

/// What the handle asks of the driver.
pub(crate) enum Command {
    Raft(PeerId, RaftRequest, Reply<RaftProtocol>),
    Tree(PeerId, TreeRequest, Reply<TreeProtocol>),
    Chunks(PeerId, ChunkRequest, Reply<ChunkProtocol>),
    Forward(PeerId, ForwardRequest, Reply<ForwardProtocol>),
    AddAddress(PeerId, Multiaddr),
    SetAllowed(HashSet<PeerId>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Shutdown,
}

/// The cloneable front of a running transport.
#[derive(Clone)]
pub struct TransportHandle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    listen_addrs: Arc<Vec<Multiaddr>>,
    metrics: Arc<TransportMetrics>,
    raft: RaftSlot,
    raft_streams: Arc<RaftStreams>,
    bulk: Arc<PeerSlots>,
    /// Forwarded writes and reads in flight per leader: below the
    /// receiver's inbound stream limit, beyond which libp2p drops the
    /// stream unanswered.
    forwards: Arc<PeerSlots>,
    /// Inodes of the QUIC sockets, to read their drop counts.
    udp_sockets: Arc<Vec<u64>>,
}

/// A per-peer budget of requests in flight. For chunk batches: they share
/// the connection's QUIC flow-control window with Raft, and keeping them
/// well below it means a heartbeat never waits for window credit behind
/// bulk data. For forwarded requests: see `forwards`.
#[derive(Debug)]
struct PeerSlots {
    per_peer: usize,
    slots: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
}

impl PeerSlots {
    async fn acquire(&self, peer: PeerId) -> Result<OwnedSemaphorePermit, RequestError> {
        let sem = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry(peer)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .map_err(|_| RequestError::Shutdown)
    }
}

impl fmt::Debug for TransportHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportHandle")
            .field("peer", &self.local_peer_id)
            .field("listen", &self.listen_addrs)
            .finish()
    }
}

/// Gives the QUIC sockets behind `addrs` larger receive buffers, and says
/// where the kernel would not. Returns their inodes.
fn enlarge_udp_buffers(addrs: &[Multiaddr]) -> Vec<u64> {
    use crate::udp_buffers::{enlarge, RECV_BUFFER};
    use libp2p::multiaddr::Protocol;
    let ports: Vec<u16> = addrs
        .iter()
        .flat_map(|a| a.iter())
        .filter_map(|p| match p {
            Protocol::Udp(port) => Some(port),
            _ => None,
        })
        .collect();
    match enlarge(&ports, RECV_BUFFER) {
        Ok(done) => {
            for s in &done {
                // The kernel reports twice what it set.
                if s.granted < 2 * RECV_BUFFER {
                    tracing::warn!(
                        port = s.port,
                        granted = s.granted / 2,
                        asked = RECV_BUFFER,
                        "UDP receive buffer is smaller than asked; bulk transfers may drop datagrams (raise the sysctl net.core.rmem_max)"
                    );
                } else {
                    tracing::debug!(
                        port = s.port,
                        bytes = s.granted / 2,
                        "UDP receive buffer set"
                    );
                }
            }
            done.iter().map(|s| s.inode).collect()
        }
        Err(e) => {
            tracing::warn!(cause = %e, "could not set the UDP receive buffers");
            Vec::new()
        }
    }
}

/// Builds the swarm, starts listening, and spawns the driver task.
///
/// Returns once at least one listen address is up (so port 0 is resolved).
pub async fn start_transport(
    key: Keypair,
    config: TransportConfig,
    services: Arc<dyn Services>,
) -> Result<(TransportHandle, JoinHandle<()>), SwarmError> {
    let local_peer_id = key.public().to_peer_id();
    let metrics = Arc::new(TransportMetrics::default());
    let mut swarm = build_swarm(key, &config, &metrics.codec)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|source| SwarmError::Listen {
                addr: addr.clone(),
                source,
            })?;
    }
    let mut listen_addrs = Vec::new();
    let wait = Duration::from_secs(5);
    while listen_addrs.len() < config.listen.len() {
        use futures::StreamExt;
        match tokio::time::timeout(wait, swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => listen_addrs.push(address),
            Ok(_) => {}
            Err(_) if !listen_addrs.is_empty() => break,
            Err(_) => return Err(SwarmError::NoListenAddr(wait)),
        }
    }
    for (peer, addr) in &config.bootstrap {
        swarm.add_peer_address(*peer, addr.clone());
    }
    tracing::info!(peer = %local_peer_id, listen = ?listen_addrs, "transport started");
    let udp_sockets = Arc::new(enlarge_udp_buffers(&listen_addrs));
    let raft: RaftSlot = Arc::new(RwLock::new(None));
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let bulk = Arc::new(PeerSlots {
        per_peer: config.chunk_requests_per_peer.max(1),
        slots: Mutex::new(HashMap::new()),
    });
    let forwards = Arc::new(PeerSlots {
        per_peer: (config.max_concurrent_streams / 2).max(1),
        slots: Mutex::new(HashMap::new()),
    });
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(RAFT_STREAM)
        .map_err(|e| SwarmError::Build(format!("raft streams: {e}")))?;
    raft_stream::serve(incoming, raft.clone(), metrics.clone());
    let raft_streams = Arc::new(RaftStreams::new(control));
    let driver = Driver::new(
        swarm,
        rx,
        services,
        raft.clone(),
        raft_streams.clone(),
        metrics.clone(),
        &config,
    );
    let task = tokio::spawn(driver.run());
    let handle = TransportHandle {
        commands: tx,
        local_peer_id,
        listen_addrs: Arc::new(listen_addrs),
        metrics,
        raft,
        raft_streams,
        bulk,
        forwards,
        udp_sockets,
    };
    Ok((handle, task))
}

impl TransportHandle {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The addresses this node listens on (port 0 resolved).
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// Counters of rejected frames and misbehaving peers.
    pub fn metrics(&self) -> &Arc<TransportMetrics> {
        &self.metrics
    }

    /// Datagrams the kernel dropped on arrival at this node's QUIC sockets
    /// for want of buffer room (each one a loss QUIC must repair).
    pub fn udp_drops(&self) -> u64 {
        crate::udp_buffers::drops(&self.udp_sockets).unwrap_or(0)
    }

    /// Inbound Raft RPCs go to `raft` from now on.
    pub fn register_raft(&self, raft: SynodRaft) {
        let mut slot = self.raft.write().unwrap_or_else(|e| e.into_inner());
        *slot = Some(raft);
    }

    /// Replaces the allow-list: only these peers may hold a connection
    /// (typically the committed membership plus the bootstrap list).
    /// Connections of peers that are no longer allowed are closed at once.
    pub async fn set_allowed_peers(
        &self,
        peers: impl IntoIterator<Item = PeerId>,
    ) -> Result<(), RequestError> {
        self.send(Command::SetAllowed(peers.into_iter().collect()))
            .await
    }

    /// Remembers an address of `peer` for dialling.
    pub async fn add_peer_address(
        &self,
        peer: PeerId,
        addr: Multiaddr,
    ) -> Result<(), RequestError> {
        self.send(Command::AddAddress(peer, addr)).await
    }

    /// Peers with an established connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::ConnectedPeers(tx)).await?;
        rx.await.map_err(|_| RequestError::Shutdown)
    }

    /// Stops the driver: the swarm and all its connections are dropped and
    /// every pending request fails with [`RequestError::Shutdown`].
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }

    async fn send(&self, cmd: Command) -> Result<(), RequestError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| RequestError::Shutdown)
    }

    async fn call<P: WireProtocol>(
        &self,
        make: impl FnOnce(Reply<P>) -> Command,
    ) -> Result<P::Response, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| RequestError::Shutdown)?
    }

    /// Sends one Raft RPC to `peer`: over a kept stream when connected
    /// (see `raft_stream`), else by request_response.
    pub async fn raft_request(
        &self,
        peer: PeerId,
        request: RaftRequest,
    ) -> Result<RaftResponse, RequestError> {
        if let Some(answer) = self
            .raft_streams
            .request(peer, &request, &self.metrics)
            .await
        {
            return answer;
        }
        self.call::<RaftProtocol>(|tx| Command::Raft(peer, request, tx))
            .await
    }

    /// Asks `leader` for its read index.
    pub async fn read_index(&self, leader: PeerId) -> Result<ForwardResponse, RequestError> {
        let _slot = self.forwards.acquire(leader).await?;
        self.call::<ForwardProtocol>(|tx| Command::Forward(leader, ForwardRequest::ReadIndex, tx))
            .await
    }

    /// Forwards a client write to `leader` and returns its answer.
    pub async fn forward_write(
        &self,
        leader: PeerId,
        request: Request,
    ) -> Result<ForwardResponse, RequestError> {
        let _slot = self.forwards.acquire(leader).await?;
        self.call::<ForwardProtocol>(|tx| {
            Command::Forward(leader, ForwardRequest::Write(request), tx)
        })
        .await
    }

    /// The leaf count and top node of `peer`'s tree `root`.
    pub async fn tree_top(&self, peer: PeerId, root: Hash) -> Result<(u64, Hash), RequestError> {
        let resp = self
            .call::<TreeProtocol>(|tx| Command::Tree(peer, TreeRequest::Top { root }, tx))
            .await?;
        match resp {
            TreeResponse::Top { leaf_count, top } => Ok((leaf_count, top)),
            other => Err(tree_refusal(peer, root, other)),
        }
    }

    /// Nodes `range` of `level` of `peer`'s tree `root`, in requests of at
    /// most [`MAX_TREE_NODES`] nodes.
    pub async fn tree_nodes(
        &self,
        peer: PeerId,
        root: Hash,
        level: usize,
        range: Range<u64>,
    ) -> Result<Vec<Hash>, RequestError> {
        let level32 = u32::try_from(level)
            .map_err(|_| RequestError::Invalid(format!("tree level {level}")))?;
        let mut out = Vec::with_capacity(
            (range.end.saturating_sub(range.start)).min(MAX_TREE_NODES) as usize,
        );
        let mut start = range.start;
        while start < range.end {
            let end = range.end.min(start + MAX_TREE_NODES);
            let req = TreeRequest::Nodes {
                root,
                level: level32,
                start,
                end,
            };
            let resp = self
                .call::<TreeProtocol>(|tx| Command::Tree(peer, req, tx))
                .await?;
            let TreeResponse::Nodes(blob) = resp else {
                return Err(tree_refusal(peer, root, resp));
            };
            let nodes = blob.to_hashes().ok_or_else(|| RequestError::BadAnswer {
                peer,
                protocol: TreeProtocol::NAME,
                what: "node list is not a whole number of hashes".into(),
            })?;
            let got = nodes.len() as u64;
            out.extend(nodes);
            if got < end - start {
                break; // the tree ends here; diff_trees checks the count
            }
            start = end;
        }
        Ok(out)
    }

    /// Fetches a batch of chunks from `peer`; `None` for those it lacks.
    ///
    /// Every chunk is checked against its BLAKE3 id: one wrong chunk
    /// discards the whole answer and reports the peer. The chunks are views
    /// of the received frame (no copy), which they keep alive.
    pub async fn fetch_chunks(
        &self,
        peer: PeerId,
        ids: &[Hash],
    ) -> Result<Vec<Option<Bytes>>, RequestError> {
        if ids.len() > MAX_CHUNKS_PER_REQUEST {
            return Err(RequestError::Invalid(format!(
                "{} chunk ids in one fetch, at most {MAX_CHUNKS_PER_REQUEST}",
                ids.len()
            )));
        }
        let req = ChunkRequest::Fetch(HashBlob::from_hashes(ids));
        let _slot = self.bulk.acquire(peer).await?;
        let resp = self
            .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
            .await?;
        let chunks = match resp {
            ChunkResponse::Fetched(chunks) => chunks,
            ChunkResponse::Refused(reason) => return Err(chunk_refusal(peer, reason)),
            _ => return Err(self.bad_answer(peer, "answered a fetch with no chunks".into())),
        };
        if chunks.len() != ids.len() {
            let what = format!("{} chunks for {} ids", chunks.len(), ids.len());
            return Err(self.bad_answer(peer, what));
        }
        let mut out = Vec::with_capacity(ids.len());
        for (id, chunk) in ids.iter().zip(chunks) {
            if let Some(bytes) = &chunk.0 {
                if Hash::of(bytes) != *id {
                    self.metrics
                        .report_peer(peer, "chunk bytes do not match id");
                    tracing::warn!(%peer, chunk = %id.fmt_short(), "peer sent a corrupt chunk; answer discarded");
                    return Err(RequestError::BadChunk { peer, id: *id });
                }
            }
            out.push(chunk.0);
        }
        Ok(out)
    }

    /// Pushes encoded file manifests to `peer`, which answers once they are
    /// durable there.
    pub async fn push_manifests(
        &self,
        peer: PeerId,
        manifests: Vec<Vec<u8>>,
    ) -> Result<(), RequestError> {
        let req = ChunkRequest::PushManifests(
            manifests
                .into_iter()
                .map(serde_bytes::ByteBuf::from)
                .collect(),
        );
        let resp = self
            .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
            .await?;
        self.expect_stored(peer, resp)
    }

    /// `Ok` for a `Stored` answer to a push; the refusal or a bad answer otherwise.
    fn expect_stored(&self, peer: PeerId, resp: ChunkResponse) -> Result<(), RequestError> {
        match resp {
            ChunkResponse::Stored => Ok(()),
            ChunkResponse::Refused(reason) => Err(chunk_refusal(peer, reason)),
            _ => Err(self.bad_answer(peer, "answered a push with something else".into())),
        }
    }

    /// Which of `ids` `peer` lacks, asked in queries of at most
    /// [`MAX_MISSING_QUERY`] ids.
    pub async fn missing_chunks(
        &self,
        peer: PeerId,
        ids: &[Hash],
    ) -> Result<Vec<Hash>, RequestError> {
        let mut out = Vec::new();
        for part in ids.chunks(MAX_MISSING_QUERY) {
            let req = ChunkRequest::Missing(HashBlob::from_hashes(part));
            match self
                .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
                .await?
            {
                ChunkResponse::Missing(blob) => {
                    let missing = blob.to_hashes().ok_or_else(|| {
                        self.bad_answer(peer, "missing list is not a whole number of hashes".into())
                    })?;
                    let asked: std::collections::HashSet<&Hash> = part.iter().collect();
                    if missing.iter().any(|m| !asked.contains(m)) {
                        return Err(
                            self.bad_answer(peer, "named a chunk that was not asked".into())
                        );
                    }
                    out.extend(missing);
                }
                ChunkResponse::Refused(reason) => return Err(chunk_refusal(peer, reason)),
                _ => {
                    return Err(self.bad_answer(peer, "answered a query with something else".into()))
                }
            }
        }
        Ok(out)
    }

    /// For each `(base, added)`: which chunks of the manifest `base` and of
    /// `added` `peer` lacks, or `None` if it does not know `base`. Asked in
    /// requests within the protocol's limits.
    pub async fn missing_since(
        &self,
        peer: PeerId,
        queries: &[(Hash, Vec<Hash>)],
    ) -> Result<Vec<Option<Vec<Hash>>>, RequestError> {
        let mut out = Vec::with_capacity(queries.len());
        let mut start = 0;
        while start < queries.len() {
            let mut end = start;
            let mut ids = 0;
            while end < queries.len()
                && end - start < MAX_DELTA_QUERIES
                && (end == start || ids + queries[end].1.len() <= MAX_MISSING_QUERY)
            {
                ids += queries[end].1.len();
                end += 1;
            }
            if ids > MAX_MISSING_QUERY {
                return Err(RequestError::Invalid(format!(
                    "{ids} added chunk ids in one version, at most {MAX_MISSING_QUERY}"
                )));
            }
            let req = ChunkRequest::MissingSince(
                queries[start..end]
                    .iter()
                    .map(|(base, added)| SinceQuery {
                        base: *base,
                        added: HashBlob::from_hashes(added),
                    })
                    .collect(),
            );
            match self
                .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
                .await?
            {
                ChunkResponse::MissingSince(answers) if answers.len() == end - start => {
                    for a in answers {
                        out.push(match a {
                            None => None,
                            Some(blob) => Some(blob.to_hashes().ok_or_else(|| {
                                self.bad_answer(
                                    peer,
                                    "missing list is not a whole number of hashes".into(),
                                )
                            })?),
                        });
                    }
                }
                ChunkResponse::Refused(reason) => return Err(chunk_refusal(peer, reason)),
                _ => {
                    return Err(self.bad_answer(peer, "answered a query with something else".into()))
                }
            }
            start = end;
        }
        Ok(out)
    }

    /// Signatures of the bytes `peer` holds for each run of chunks (their
    /// concatenation), `None` for a run it cannot sign.
    pub async fn signatures(
        &self,
        peer: PeerId,
        runs: &[Vec<Hash>],
    ) -> Result<Vec<Option<Vec<u8>>>, RequestError> {
        let mut out = Vec::with_capacity(runs.len());
        for part in runs.chunks(MAX_DELTA_QUERIES) {
            let req = ChunkRequest::Signatures(part.iter().map(HashBlob::from_hashes).collect());
            match self
                .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
                .await?
            {
                ChunkResponse::Signatures(sigs) if sigs.len() == part.len() => {
                    out.extend(
                        sigs.into_iter()
                            .map(|s| s.map(serde_bytes::ByteBuf::into_vec)),
                    );
                }
                ChunkResponse::Refused(reason) => return Err(chunk_refusal(peer, reason)),
                _ => {
                    return Err(self.bad_answer(
                        peer,
                        "answered a signature request with something else".into(),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Fetches chunks from `peer` as deltas: for each `(signature, ids)`,
    /// per id, a delta against the bytes the signature describes, or
    /// `None` (fetch that one whole). Deltas are not trusted: the caller
    /// rebuilds each and checks it against its id.
    pub async fn fetch_deltas(
        &self,
        peer: PeerId,
        wanted: &[(Vec<u8>, Vec<Hash>)],
    ) -> Result<Vec<Option<Vec<u8>>>, RequestError> {
        let n: usize = wanted.iter().map(|(_, ids)| ids.len()).sum();
        if n > MAX_CHUNKS_PER_REQUEST || wanted.len() > MAX_DELTA_QUERIES {
            return Err(RequestError::Invalid(format!(
                "{n} chunks against {} signatures in one delta fetch, at most \
                 {MAX_CHUNKS_PER_REQUEST} against {MAX_DELTA_QUERIES}",
                wanted.len()
            )));
        }
        let req = ChunkRequest::FetchDeltas(
            wanted
                .iter()
                .map(|(signature, ids)| DeltaWanted {
                    signature: signature.clone(),
                    ids: HashBlob::from_hashes(ids),
                })
                .collect(),
        );
        let _slot = self.bulk.acquire(peer).await?;
        match self
            .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
            .await?
        {
            ChunkResponse::Deltas(d) if d.len() == n => Ok(d
                .into_iter()
                .map(|d| d.map(serde_bytes::ByteBuf::into_vec))
                .collect()),
            ChunkResponse::Refused(reason) => Err(chunk_refusal(peer, reason)),
            _ => Err(self.bad_answer(peer, "answered a delta fetch with something else".into())),
        }
    }

    /// Pushes chunks as deltas against runs of chunks `peer` holds; it
    /// rebuilds and checks each, and answers once all are durable there.
    pub async fn push_deltas(
        &self,
        peer: PeerId,
        deltas: Vec<ChunkDelta>,
    ) -> Result<(), RequestError> {
        if deltas.is_empty() || deltas.len() > MAX_CHUNKS_PER_REQUEST {
            return Err(RequestError::Invalid(format!(
                "{} deltas in one push, need 1 to {MAX_CHUNKS_PER_REQUEST}",
                deltas.len()
            )));
        }
        let req = ChunkRequest::PushDeltas(deltas);
        let _slot = self.bulk.acquire(peer).await?;
        let resp = self
            .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
            .await?;
        self.expect_stored(peer, resp)
    }

    /// Asks `peer` to fetch `ids` from member `from` (a Raft node id) and
    /// store them; `Ok` once they are durable there. Takes no bulk slot:
    /// the chunks travel on `from`'s link to `peer`, not on ours.
    pub async fn fetch_from(
        &self,
        peer: PeerId,
        from: u64,
        ids: &[Hash],
    ) -> Result<(), RequestError> {
        if ids.is_empty() || ids.len() > MAX_CHUNKS_PER_REQUEST {
            return Err(RequestError::Invalid(format!(
                "{} chunk ids to fetch from node {from}, need 1 to {MAX_CHUNKS_PER_REQUEST}",
                ids.len()
            )));
        }
        let req = ChunkRequest::FetchFrom {
            from,
            ids: HashBlob::from_hashes(ids),
        };
        let resp = self
            .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
            .await?;
        self.expect_stored(peer, resp)
    }

    /// Pushes chunks to `peer`, which answers once they are durable there.
    pub async fn push_chunks(
        &self,
        peer: PeerId,
        chunks: Vec<ChunkData>,
    ) -> Result<(), RequestError> {
        let req = ChunkRequest::Push(chunks);
        let _slot = self.bulk.acquire(peer).await?;
        let resp = self
            .call::<ChunkProtocol>(|tx| Command::Chunks(peer, req, tx))
            .await?;
        self.expect_stored(peer, resp)
    }

    fn bad_answer(&self, peer: PeerId, what: String) -> RequestError {
        self.metrics.report_peer(peer, "bad chunk answer");
        RequestError::BadAnswer {
            peer,
            protocol: ChunkProtocol::NAME,
            what,
        }
    }
}

fn chunk_refusal(peer: PeerId, reason: String) -> RequestError {
    RequestError::Refused {
        peer,
        protocol: ChunkProtocol::NAME,
        reason,
    }
}

fn tree_refusal(peer: PeerId, root: Hash, resp: TreeResponse) -> RequestError {
    let reason = match resp {
        TreeResponse::NotFound => format!("tree {} not found", root.fmt_short()),
        TreeResponse::Refused(reason) => reason,
        other => {
            return RequestError::BadAnswer {
                peer,
                protocol: TreeProtocol::NAME,
                what: format!("unexpected answer {other:?}"),
            }
        }
    };
    RequestError::Refused {
        peer,
        protocol: TreeProtocol::NAME,
        reason,
    }
}
