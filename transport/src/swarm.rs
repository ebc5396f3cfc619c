//! The libp2p behaviour and swarm: QUIC only, an allow-list first, then
//! connection limits, identify and one request_response per protocol.

use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, connection_limits, identify, Multiaddr, PeerId, StreamProtocol, Swarm,
};

use crate::codec::{CodecMetrics, WireCodec};
use crate::messages::{ChunkProtocol, ForwardProtocol, RaftProtocol, TreeProtocol, WireProtocol};

/// Settings of one node's transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Where to listen, e.g. `/ip4/0.0.0.0/udp/7000/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers allowed from the start (the bootstrap list of `cluster.toml`),
    /// with an address to reach each.
    pub bootstrap: Vec<(PeerId, Multiaddr)>,
    /// Close a connection without open streams after this long. Raft
    /// heartbeats keep members' connections busy, so this only reaps others.
    pub idle_connection_timeout: Duration,
    /// QUIC PING interval: keeps NAT bindings and detects a dead peer.
    pub keep_alive_interval: Duration,
    /// QUIC idle timeout: a peer silent this long is gone. Kept a few
    /// heartbeats long so a crashed leader's connection closes quickly.
    pub quic_idle_timeout: Duration,
    /// Per-stream QUIC receive window, bytes.
    pub max_stream_data: u32,
    /// Per-connection QUIC receive window, bytes.
    pub max_connection_data: u32,
    /// libp2p's own deadline per Raft RPC (openraft's `hard_ttl` is tighter).
    pub raft_timeout: Duration,
    /// Deadline of a tree-node request.
    pub tree_timeout: Duration,
    /// Deadline of a chunk batch (fetch or push, fsync included).
    pub chunk_timeout: Duration,
    /// Deadline of a forwarded write (commit included).
    pub forward_timeout: Duration,
    /// Chunk requests (fetch or push) in flight per peer; more wait their
    /// turn. Times the 8 MiB batch limit, this must stay well under
    /// `max_connection_data` so Raft always finds window credit.
    pub chunk_requests_per_peer: usize,
    /// Concurrent inbound + outbound streams per connection and protocol.
    pub max_concurrent_streams: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            idle_connection_timeout: Duration::from_secs(60),
            keep_alive_interval: Duration::from_secs(1),
            quic_idle_timeout: Duration::from_secs(5),
            max_stream_data: 16 * 1024 * 1024,
            max_connection_data: 64 * 1024 * 1024,
            raft_timeout: Duration::from_secs(10),
            tree_timeout: Duration::from_secs(30),
            chunk_timeout: Duration::from_secs(60),
            forward_timeout: Duration::from_secs(15),
            chunk_requests_per_peer: 4,
            max_concurrent_streams: 128,
        }
    }
}

/// Why the swarm could not be built or could not listen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwarmError {
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: Multiaddr,
        #[source]
        source: libp2p::TransportError<std::io::Error>,
    },
    #[error("no listen address came up within {0:?}")]
    NoListenAddr(Duration),
}

/// Every behaviour of a synod node. The allow-list comes first so a stranger
/// is refused before any other behaviour sees the connection.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) raft: request_response::Behaviour<WireCodec<RaftProtocol>>,
    pub(crate) tree: request_response::Behaviour<WireCodec<TreeProtocol>>,
    pub(crate) chunks: request_response::Behaviour<WireCodec<ChunkProtocol>>,
    pub(crate) forward: request_response::Behaviour<WireCodec<ForwardProtocol>>,
    /// Raft RPCs over kept streams (see `raft_stream`).
    pub(crate) stream: libp2p_stream::Behaviour,
}

fn protocol<P: WireProtocol>(
    metrics: &Arc<CodecMetrics>,
    timeout: Duration,
    streams: usize,
) -> request_response::Behaviour<WireCodec<P>> {
    request_response::Behaviour::with_codec(
        WireCodec::new(metrics.clone()),
        [(StreamProtocol::new(P::NAME), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(timeout)
            .with_max_concurrent_streams(streams),
    )
}

/// Builds the swarm (not yet listening).
pub(crate) fn build_swarm(
    key: Keypair,
    config: &TransportConfig,
    metrics: &Arc<CodecMetrics>,
) -> Result<Swarm<Behaviour>, SwarmError> {
    let quic_idle_ms = u32::try_from(config.quic_idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic_config(|mut c| {
            c.max_idle_timeout = quic_idle_ms;
            c.keep_alive_interval = config.keep_alive_interval;
            c.max_stream_data = config.max_stream_data;
            c.max_connection_data = config.max_connection_data;
            c
        })
        .with_behaviour(|key| {
            let mut allow =
                allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
            for (peer, _) in &config.bootstrap {
                allow.allow_peer(*peer);
            }
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established_per_peer(Some(2))
                .with_max_pending_incoming(Some(32))
                .with_max_established_incoming(Some(64));
            let streams = config.max_concurrent_streams;
            Behaviour {
                allow,
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new("/synod/1".into(), key.public())
                        .with_agent_version(format!("synod/{}", env!("CARGO_PKG_VERSION"))),
                ),
                raft: protocol::<RaftProtocol>(metrics, config.raft_timeout, streams),
                tree: protocol::<TreeProtocol>(metrics, config.tree_timeout, streams),
                chunks: protocol::<ChunkProtocol>(metrics, config.chunk_timeout, streams),
                forward: protocol::<ForwardProtocol>(metrics, config.forward_timeout, streams),
                stream: libp2p_stream::Behaviour::new(),
            }
        })
        .map_err(|e| SwarmError::Build(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_connection_timeout)
                // Every request opens a stream for one protocol that all our
                // peers speak: send it with the protocol proposal instead of
                // waiting a round trip for the confirmation.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}
