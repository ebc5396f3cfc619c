//! The swarm-driver task: the only owner of the `Swarm`. It turns handle
//! commands into requests, routes answers back to their oneshots, and hands
//! inbound requests to spawned tasks: it never awaits service work itself.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use synod_consensus::SynodRaft;
use synod_merkle::Hash;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::handle::{Command, Reply, RequestError};
use crate::messages::{
    ChunkProtocol, ChunkRequest, ChunkResponse, DeltaWanted, ForwardProtocol, ForwardRequest,
    ForwardResponse, HashBlob, MaybeChunk, RaftProtocol, RaftRequest, RaftResponse, SinceQuery,
    TreeProtocol, TreeRequest, TreeResponse, WireProtocol, MAX_CHUNKS_PER_REQUEST,
    MAX_CHUNK_BATCH_BYTES, MAX_DELTA_QUERIES, MAX_MISSING_QUERY, MAX_TREE_NODES,
};
use crate::metrics::TransportMetrics;
use crate::raft_stream::RaftStreams;
use crate::services::Services;
use crate::swarm::{Behaviour, BehaviourEvent, TransportConfig};

/// Where inbound Raft RPCs go; empty until the node registers its Raft.
pub(crate) type RaftSlot = Arc<RwLock<Option<SynodRaft>>>;

/// `raft`'s answer to an inbound Raft RPC.
pub(crate) async fn answer_raft(raft: Option<SynodRaft>, req: RaftRequest) -> RaftResponse {
    match raft {
        None => RaftResponse::NoRaft,
        Some(raft) => match req {
            RaftRequest::Vote(v) => RaftResponse::Vote(raft.vote(v).await),
            RaftRequest::Append(a) => RaftResponse::Append(raft.append_entries(a).await),
            RaftRequest::Snapshot(s) => {
                RaftResponse::Snapshot(raft.install_snapshot(s.into()).await)
            }
        },
    }
}

/// Capacity of the queue of answers coming back from service tasks.
const ANSWER_QUEUE: usize = 1024;

/// An answer computed by a service task, to be sent by the driver.
enum Answer {
    Raft(ResponseChannel<RaftResponse>, RaftResponse),
    Tree(ResponseChannel<TreeResponse>, TreeResponse),
    Chunks(ResponseChannel<ChunkResponse>, ChunkResponse),
    Forward(ResponseChannel<ForwardResponse>, ForwardResponse),
}

type Pending<P> = HashMap<OutboundRequestId, (PeerId, Reply<P>)>;

pub(crate) struct Driver {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    answers_tx: mpsc::Sender<Answer>,
    answers_rx: mpsc::Receiver<Answer>,
    services: Arc<dyn Services>,
    raft: RaftSlot,
    raft_streams: Arc<RaftStreams>,
    metrics: Arc<TransportMetrics>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    raft_pending: Pending<RaftProtocol>,
    tree_pending: Pending<TreeProtocol>,
    chunks_pending: Pending<ChunkProtocol>,
    forward_pending: Pending<ForwardProtocol>,
}

impl Driver {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        services: Arc<dyn Services>,
        raft: RaftSlot,
        raft_streams: Arc<RaftStreams>,
        metrics: Arc<TransportMetrics>,
        config: &TransportConfig,
    ) -> Driver {
        let (answers_tx, answers_rx) = mpsc::channel(ANSWER_QUEUE);
        let mut addresses: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in &config.bootstrap {
            addresses.entry(*peer).or_default().push(addr.clone());
        }
        Driver {
            swarm,
            commands,
            answers_tx,
            answers_rx,
            services,
            raft,
            raft_streams,
            metrics,
            addresses,
            raft_pending: HashMap::new(),
            tree_pending: HashMap::new(),
            chunks_pending: HashMap::new(),
            forward_pending: HashMap::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        let span = tracing::info_span!("transport", peer = %self.swarm.local_peer_id());
        async move {
            loop {
                tokio::select! {
                    cmd = self.commands.recv() => match cmd {
                        Some(Command::Shutdown) | None => break,
                        Some(cmd) => self.on_command(cmd),
                    },
                    Some(answer) = self.answers_rx.recv() => self.on_answer(answer),
                    event = self.swarm.select_next_some() => self.on_swarm_event(event),
                }
            }
            tracing::info!("transport stopped");
        }
        .instrument(span)
        .await
    }

    fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.addresses.get(peer).cloned().unwrap_or_default()
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Raft(peer, req, reply) => {
                let addrs = self.addrs(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .raft
                    .send_request_with_addresses(&peer, req, addrs);
                self.raft_pending.insert(id, (peer, reply));
            }
            Command::Tree(peer, req, reply) => {
                let addrs = self.addrs(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .tree
                    .send_request_with_addresses(&peer, req, addrs);
                self.tree_pending.insert(id, (peer, reply));
            }
            Command::Chunks(peer, req, reply) => {
                let addrs = self.addrs(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .chunks
                    .send_request_with_addresses(&peer, req, addrs);
                self.chunks_pending.insert(id, (peer, reply));
            }
            Command::Forward(peer, req, reply) => {
                let addrs = self.addrs(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .forward
                    .send_request_with_addresses(&peer, req, addrs);
                self.forward_pending.insert(id, (peer, reply));
            }
            Command::AddAddress(peer, addr) => {
                let known = self.addresses.entry(peer).or_default();
                if !known.contains(&addr) {
                    known.push(addr.clone());
                }
                self.swarm.add_peer_address(peer, addr);
            }
            Command::SetAllowed(peers) => self.set_allowed(peers),
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Shutdown => {}
        }
    }

    fn set_allowed(&mut self, peers: HashSet<PeerId>) {
        let allow = &mut self.swarm.behaviour_mut().allow;
        let old: Vec<PeerId> = allow.allowed_peers().iter().copied().collect();
        for peer in old.into_iter().filter(|p| !peers.contains(p)) {
            // Also closes that peer's connections.
            allow.disallow_peer(peer);
            tracing::info!(%peer, "peer no longer allowed");
        }
        for peer in peers {
            if allow.allow_peer(peer) {
                tracing::debug!(%peer, "peer allowed");
            }
        }
    }

    fn on_answer(&mut self, answer: Answer) {
        // A failed send means the channel closed (timeout or connection
        // gone); request_response reports it as an InboundFailure.
        let b = self.swarm.behaviour_mut();
        let sent = match answer {
            Answer::Raft(ch, r) => b.raft.send_response(ch, r).is_ok(),
            Answer::Tree(ch, r) => b.tree.send_response(ch, r).is_ok(),
            Answer::Chunks(ch, r) => b.chunks.send_response(ch, r).is_ok(),
            Answer::Forward(ch, r) => b.forward.send_response(ch, r).is_ok(),
        };
        if !sent {
            tracing::debug!("answer dropped: its stream is gone");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Raft(e)) => {
                if let Some((peer, req, ch)) =
                    outbound_done::<RaftProtocol>(&mut self.raft_pending, e)
                {
                    self.serve_raft(peer, req, ch);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Tree(e)) => {
                if let Some((peer, req, ch)) =
                    outbound_done::<TreeProtocol>(&mut self.tree_pending, e)
                {
                    self.serve_tree(peer, req, ch);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Chunks(e)) => {
                if let Some((peer, req, ch)) =
                    outbound_done::<ChunkProtocol>(&mut self.chunks_pending, e)
                {
                    self.serve_chunks(peer, req, ch);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Forward(e)) => {
                if let Some((peer, req, ch)) =
                    outbound_done::<ForwardProtocol>(&mut self.forward_pending, e)
                {
                    self.serve_forward(peer, req, ch);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => {
                tracing::trace!(event = ?e, "identify");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.raft_streams.set_connected(peer_id, true);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                cause,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if num_established == 0 {
                    self.raft_streams.set_connected(peer_id, false);
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                tracing::debug!(from = %send_back_addr, cause = %error, "incoming connection refused");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, cause = %error, "dial failed");
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
            }
            _ => {}
        }
    }

    fn spawn_answer(
        &self,
        peer: PeerId,
        protocol: &'static str,
        work: impl std::future::Future<Output = Answer> + Send + 'static,
    ) {
        let answers = self.answers_tx.clone();
        let span = tracing::debug_span!("serve", %peer, protocol);
        tokio::spawn(
            async move {
                let answer = work.await;
                let _ = answers.send(answer).await;
            }
            .instrument(span),
        );
    }

    fn serve_raft(&self, peer: PeerId, req: RaftRequest, ch: ResponseChannel<RaftResponse>) {
        let raft = self.raft.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.spawn_answer(peer, RaftProtocol::NAME, async move {
            Answer::Raft(ch, answer_raft(raft, req).await)
        });
    }

    fn serve_tree(&self, peer: PeerId, req: TreeRequest, ch: ResponseChannel<TreeResponse>) {
        let services = self.services.clone();
        self.spawn_answer(peer, TreeProtocol::NAME, async move {
            let resp = match req {
                TreeRequest::Top { root } => match services.tree_top(peer, root).await {
                    Ok(Some((leaf_count, top))) => TreeResponse::Top { leaf_count, top },
                    Ok(None) => TreeResponse::NotFound,
                    Err(e) => TreeResponse::Refused(e.0),
                },
                TreeRequest::Nodes { root, level, start, end } => {
                    if start > end || end - start > MAX_TREE_NODES {
                        TreeResponse::Refused(format!(
                            "node range {start}..{end} is empty-reversed or over {MAX_TREE_NODES} nodes"
                        ))
                    } else {
                        match services.tree_nodes(peer, root, level as usize, start..end).await {
                            Ok(Some(nodes)) => {
                                let n = nodes.len().min((end - start) as usize);
                                TreeResponse::Nodes(HashBlob::from_hashes(&nodes[..n]))
                            }
                            Ok(None) => TreeResponse::NotFound,
                            Err(e) => TreeResponse::Refused(e.0),
                        }
                    }
                }
            };
            Answer::Tree(ch, resp)
        });
    }

    fn serve_chunks(&self, peer: PeerId, req: ChunkRequest, ch: ResponseChannel<ChunkResponse>) {
        let services = self.services.clone();
        let metrics = self.metrics.clone();
        self.spawn_answer(peer, ChunkProtocol::NAME, async move {
            let resp = match req {
                ChunkRequest::Fetch(blob) => serve_fetch(&*services, peer, blob).await,
                ChunkRequest::PushManifest(bytes) => {
                    match services.store_manifests(peer, vec![bytes]).await {
                        Ok(()) => ChunkResponse::Stored,
                        Err(e) => ChunkResponse::Refused(e.0),
                    }
                }
                ChunkRequest::PushManifests(list) => {
                    let list = list
                        .into_iter()
                        .map(serde_bytes::ByteBuf::into_vec)
                        .collect();
                    match services.store_manifests(peer, list).await {
                        Ok(()) => ChunkResponse::Stored,
                        Err(e) => ChunkResponse::Refused(e.0),
                    }
                }
                ChunkRequest::Missing(blob) => match blob.to_hashes() {
                    None => ChunkResponse::Refused(
                        "chunk id list is not a whole number of hashes".into(),
                    ),
                    Some(ids) if ids.len() > MAX_MISSING_QUERY => ChunkResponse::Refused(format!(
                        "{} chunk ids in one query, at most {MAX_MISSING_QUERY}",
                        ids.len()
                    )),
                    Some(ids) => match services.missing_chunks(peer, ids).await {
                        Ok(missing) => ChunkResponse::Missing(HashBlob::from_hashes(&missing)),
                        Err(e) => ChunkResponse::Refused(e.0),
                    },
                },
                ChunkRequest::MissingSince(queries) => {
                    serve_missing_since(&*services, peer, queries).await
                }
                ChunkRequest::Signatures(runs) => serve_signatures(&*services, peer, runs).await,
                ChunkRequest::FetchDeltas(wanted) => serve_deltas(&*services, peer, wanted).await,
                ChunkRequest::FetchFrom { from, ids } => match ids.to_hashes() {
                    None => ChunkResponse::Refused(
                        "chunk id list is not a whole number of hashes".into(),
                    ),
                    Some(ids) if ids.is_empty() || ids.len() > MAX_CHUNKS_PER_REQUEST => {
                        ChunkResponse::Refused(format!(
                            "{} chunk ids to fetch from node {from}: need 1 to \
                             {MAX_CHUNKS_PER_REQUEST}",
                            ids.len()
                        ))
                    }
                    Some(ids) => match services.fetch_from(peer, from, ids).await {
                        Ok(()) => ChunkResponse::Stored,
                        Err(e) => ChunkResponse::Refused(e.0),
                    },
                },
                ChunkRequest::PushDeltas(deltas) => {
                    let mut list = Vec::with_capacity(deltas.len());
                    for d in deltas {
                        match d.base.to_hashes() {
                            Some(base) => list.push((d.id, base, d.delta)),
                            None => {
                                list.clear();
                                break;
                            }
                        }
                    }
                    if list.is_empty() || list.len() > MAX_CHUNKS_PER_REQUEST {
                        ChunkResponse::Refused(format!(
                            "{} usable deltas in one push: need 1 to {MAX_CHUNKS_PER_REQUEST}, \
                             each base a whole number of hashes",
                            list.len()
                        ))
                    } else {
                        match services.store_deltas(peer, list).await {
                            Ok(()) => ChunkResponse::Stored,
                            Err(e) => ChunkResponse::Refused(e.0),
                        }
                    }
                }
                ChunkRequest::Push(chunks) => {
                    match chunks.iter().find(|c| Hash::of(&c.bytes) != c.id) {
                        Some(bad) => {
                            metrics.report_peer(peer, "pushed chunk bytes do not match id");
                            ChunkResponse::Refused(format!(
                                "chunk {} does not match its bytes",
                                bad.id
                            ))
                        }
                        None => match services.store_chunks(peer, chunks).await {
                            Ok(()) => ChunkResponse::Stored,
                            Err(e) => ChunkResponse::Refused(e.0),
                        },
                    }
                }
            };
            Answer::Chunks(ch, resp)
        });
    }

    fn serve_forward(
        &self,
        peer: PeerId,
        req: ForwardRequest,
        ch: ResponseChannel<ForwardResponse>,
    ) {
        let services = self.services.clone();
        self.spawn_answer(peer, ForwardProtocol::NAME, async move {
            let resp = match req {
                ForwardRequest::Write(request) => services.forward_write(peer, request).await,
                ForwardRequest::ReadIndex => services.read_index(peer).await,
            };
            Answer::Forward(ch, resp)
        });
    }
}

async fn serve_missing_since(
    services: &dyn Services,
    peer: PeerId,
    queries: Vec<SinceQuery>,
) -> ChunkResponse {
    if queries.len() > MAX_DELTA_QUERIES {
        return ChunkResponse::Refused(format!(
            "{} queries in one request, at most {MAX_DELTA_QUERIES}",
            queries.len()
        ));
    }
    let mut list = Vec::with_capacity(queries.len());
    let mut ids = 0;
    for q in queries {
        let Some(added) = q.added.to_hashes() else {
            return ChunkResponse::Refused("chunk id list is not a whole number of hashes".into());
        };
        ids += added.len();
        list.push((q.base, added));
    }
    if ids > MAX_MISSING_QUERY {
        return ChunkResponse::Refused(format!(
            "{ids} chunk ids in one query, at most {MAX_MISSING_QUERY}"
        ));
    }
    let n = list.len();
    match services.missing_since(peer, list).await {
        Ok(answers) if answers.len() == n => ChunkResponse::MissingSince(
            answers
                .iter()
                .map(|a| a.as_ref().map(HashBlob::from_hashes))
                .collect(),
        ),
        Ok(answers) => {
            ChunkResponse::Refused(format!("store answered {} of {n} queries", answers.len()))
        }
        Err(e) => ChunkResponse::Refused(e.0),
    }
}

async fn serve_signatures(
    services: &dyn Services,
    peer: PeerId,
    runs: Vec<HashBlob>,
) -> ChunkResponse {
    if runs.len() > MAX_DELTA_QUERIES {
        return ChunkResponse::Refused(format!(
            "{} runs in one request, at most {MAX_DELTA_QUERIES}",
            runs.len()
        ));
    }
    let Some(list) = runs
        .iter()
        .map(HashBlob::to_hashes)
        .collect::<Option<Vec<_>>>()
    else {
        return ChunkResponse::Refused("chunk id list is not a whole number of hashes".into());
    };
    let n = list.len();
    match services.signatures(peer, list).await {
        Ok(sigs) if sigs.len() == n => {
            // Runs past the budget get no signature, and the writer sends
            // their chunks whole.
            ChunkResponse::Signatures(within_frame(sigs))
        }
        Ok(sigs) => ChunkResponse::Refused(format!("store answered {} of {n} runs", sigs.len())),
        Err(e) => ChunkResponse::Refused(e.0),
    }
}

async fn serve_deltas(
    services: &dyn Services,
    peer: PeerId,
    wanted: Vec<DeltaWanted>,
) -> ChunkResponse {
    if wanted.len() > MAX_DELTA_QUERIES {
        return ChunkResponse::Refused(format!(
            "{} signatures in one request, at most {MAX_DELTA_QUERIES}",
            wanted.len()
        ));
    }
    let mut list = Vec::with_capacity(wanted.len());
    let mut n = 0;
    for w in wanted {
        let Some(ids) = w.ids.to_hashes() else {
            return ChunkResponse::Refused("chunk id list is not a whole number of hashes".into());
        };
        n += ids.len();
        list.push((w.signature, ids));
    }
    if n > MAX_CHUNKS_PER_REQUEST {
        return ChunkResponse::Refused(format!(
            "{n} chunk ids in one delta fetch, at most {MAX_CHUNKS_PER_REQUEST}"
        ));
    }
    match services.deltas(peer, list).await {
        Ok(deltas) if deltas.len() == n => ChunkResponse::Deltas(within_frame(deltas)),
        Ok(deltas) => ChunkResponse::Refused(format!(
            "store answered {} deltas for {n} ids",
            deltas.len()
        )),
        Err(e) => ChunkResponse::Refused(e.0),
    }
}

/// Keeps an answer of optional blobs under its frame limit: blobs past the
/// budget are answered as absent, which every asker already handles.
fn within_frame(blobs: Vec<Option<Vec<u8>>>) -> Vec<Option<serde_bytes::ByteBuf>> {
    let mut budget = MAX_CHUNK_BATCH_BYTES;
    blobs
        .into_iter()
        .map(|b| match b {
            Some(b) if b.len() <= budget => {
                budget -= b.len();
                Some(serde_bytes::ByteBuf::from(b))
            }
            _ => None,
        })
        .collect()
}

async fn serve_fetch(services: &dyn Services, peer: PeerId, blob: HashBlob) -> ChunkResponse {
    let Some(ids) = blob.to_hashes() else {
        return ChunkResponse::Refused("chunk id list is not a whole number of hashes".into());
    };
    if ids.len() > MAX_CHUNKS_PER_REQUEST {
        return ChunkResponse::Refused(format!(
            "{} chunk ids in one fetch, at most {MAX_CHUNKS_PER_REQUEST}",
            ids.len()
        ));
    }
    let n = ids.len();
    match services.read_chunks(peer, ids).await {
        Ok(chunks) if chunks.len() == n => {
            // Keep the answer under its frame limit: chunks past the budget
            // are reported missing, and the fetcher asks again.
            let mut budget = MAX_CHUNK_BATCH_BYTES;
            let out = chunks
                .into_iter()
                .map(|c| match c {
                    Some(b) if b.len() <= budget => {
                        budget -= b.len();
                        MaybeChunk(Some(b))
                    }
                    _ => MaybeChunk(None),
                })
                .collect();
            ChunkResponse::Fetched(out)
        }
        Ok(chunks) => ChunkResponse::Refused(format!(
            "store returned {} chunks for {n} ids",
            chunks.len()
        )),
        Err(e) => ChunkResponse::Refused(e.0),
    }
}

/// Completes an outbound request from its event; returns an inbound request
/// for the caller to serve.
fn outbound_done<P: WireProtocol>(
    pending: &mut Pending<P>,
    event: request_response::Event<P::Request, P::Response>,
) -> Option<(PeerId, P::Request, ResponseChannel<P::Response>)> {
    use request_response::{Event, Message};
    match event {
        Event::Message { peer, message, .. } => match message {
            Message::Request {
                request, channel, ..
            } => {
                tracing::debug!(%peer, protocol = P::NAME, "inbound request");
                return Some((peer, request, channel));
            }
            Message::Response {
                request_id,
                response,
            } => {
                if let Some((_, reply)) = pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
        },
        Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            tracing::debug!(%peer, protocol = P::NAME, cause = %error, "request failed");
            if let Some((_, reply)) = pending.remove(&request_id) {
                let _ = reply.send(Err(map_failure(peer, P::NAME, error)));
            }
        }
        Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, protocol = P::NAME, cause = %error, "inbound request failed");
        }
        Event::ResponseSent { .. } => {}
    }
    None
}

fn map_failure(peer: PeerId, protocol: &'static str, error: OutboundFailure) -> RequestError {
    match error {
        OutboundFailure::DialFailure
        | OutboundFailure::ConnectionClosed
        | OutboundFailure::UnsupportedProtocols => RequestError::Unreachable {
            peer,
            protocol,
            cause: error.to_string(),
        },
        OutboundFailure::Timeout => RequestError::Timeout { peer, protocol },
        // The connection died under the stream (e.g. the peer's allow-list
        // closed it right after the handshake): that peer is not there.
        OutboundFailure::Io(e) if is_connection_loss(&e) => RequestError::Unreachable {
            peer,
            protocol,
            cause: e.to_string(),
        },
        OutboundFailure::Io(e) => RequestError::Failed {
            peer,
            protocol,
            cause: e.to_string(),
        },
    }
}

fn is_connection_loss(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        NotConnected | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}
