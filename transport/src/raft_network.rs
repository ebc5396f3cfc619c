//! openraft's `RaftNetworkFactory` / `RaftNetwork` over the transport.
//!
//! Failures map so that openraft backs off from a peer that is not there
//! (`Unreachable`) and retries one that merely hiccuped (`Network`,
//! `Timeout`); a Raft error from the remote comes back as `RemoteError`.
//! Each RPC is bounded by openraft's `RPCOption::hard_ttl()`.

use std::str::FromStr;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use synod_consensus::{NodeId, NodeInfo, TypeConfig};
use tracing::Instrument;

use crate::handle::{RequestError, TransportHandle};
use crate::messages::{RaftProtocol, RaftRequest, RaftResponse, WireProtocol, MAX_SNAPSHOT_CHUNK};

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

/// Why a member's `NodeInfo` does not name a reachable peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeAddrError {
    #[error("node info {info}: peer id {peer_id:?} is not a libp2p peer id")]
    PeerId { info: String, peer_id: String },
    #[error("node info {info}: address {addr:?} is not a multiaddr")]
    Addr { info: String, addr: String },
    #[error("node info {info}: address ends in /p2p/{in_addr}, not the node's peer id")]
    Mismatch { info: String, in_addr: String },
}

/// The peer id and dial address of a member. The address may carry a
/// trailing `/p2p/<peer id>`, which must then agree with `peer_id`.
pub fn peer_of(node: &NodeInfo) -> Result<(PeerId, Multiaddr), NodeAddrError> {
    let peer = PeerId::from_str(&node.peer_id).map_err(|_| NodeAddrError::PeerId {
        info: node.to_string(),
        peer_id: node.peer_id.clone(),
    })?;
    let mut addr = Multiaddr::from_str(&node.addr).map_err(|_| NodeAddrError::Addr {
        info: node.to_string(),
        addr: node.addr.clone(),
    })?;
    if let Some(Protocol::P2p(in_addr)) = addr.iter().last() {
        if in_addr != peer {
            return Err(NodeAddrError::Mismatch {
                info: node.to_string(),
                in_addr: in_addr.to_string(),
            });
        }
        addr.pop();
    }
    Ok((peer, addr))
}

/// The largest `snapshot_max_chunk_size` a node may configure: one part
/// plus its metadata must fit the raft frame limit.
pub const fn max_snapshot_chunk_size() -> u64 {
    MAX_SNAPSHOT_CHUNK as u64
}

/// Creates one [`PeerConnection`] per Raft target.
#[derive(Debug, Clone)]
pub struct P2pRaftNetwork {
    handle: TransportHandle,
    local_id: NodeId,
}

impl P2pRaftNetwork {
    /// Raft RPCs of node `local_id` go over `handle`.
    pub fn new(handle: TransportHandle, local_id: NodeId) -> Self {
        P2pRaftNetwork { handle, local_id }
    }
}

impl RaftNetworkFactory<TypeConfig> for P2pRaftNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerConnection {
        // Never fails: a bad address makes every RPC report Unreachable.
        let peer = match peer_of(node) {
            Ok((peer, addr)) => {
                if self.handle.add_peer_address(peer, addr).await.is_err() {
                    tracing::debug!(target, "transport is shut down");
                }
                Ok(peer)
            }
            Err(e) => {
                tracing::warn!(target, cause = %e, "cannot address raft target");
                Err(e)
            }
        };
        PeerConnection {
            handle: self.handle.clone(),
            local_id: self.local_id,
            target,
            peer,
        }
    }
}

/// Raft RPCs to one target.
#[derive(Debug)]
pub struct PeerConnection {
    handle: TransportHandle,
    local_id: NodeId,
    target: NodeId,
    peer: Result<PeerId, NodeAddrError>,
}

impl PeerConnection {
    async fn call<E: std::error::Error>(
        &self,
        action: RPCTypes,
        req: RaftRequest,
        ttl: Duration,
    ) -> Result<RaftResponse, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
        let peer = match &self.peer {
            Ok(peer) => *peer,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let span = tracing::debug_span!("raft_rpc", target = self.target, %peer, ?action);
        let rpc = tokio::time::timeout(ttl, self.handle.raft_request(peer, req)).instrument(span);
        match rpc.await {
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.local_id,
                target: self.target,
                timeout: ttl,
            })),
            Ok(Ok(RaftResponse::NoRaft)) => Err(RPCError::Unreachable(Unreachable::new(
                &RequestError::Refused {
                    peer,
                    protocol: RaftProtocol::NAME,
                    reason: "no raft running".into(),
                },
            ))),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(map_request_error(
                e,
                action,
                self.local_id,
                self.target,
                ttl,
            )),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        resp: &RaftResponse,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        let what = format!(
            "raft target {} sent an answer of the wrong kind: {resp:?}",
            self.target
        );
        RPCError::Network(NetworkError::new(&std::io::Error::other(what)))
    }
}

fn map_request_error<E: std::error::Error>(
    e: RequestError,
    action: RPCTypes,
    id: NodeId,
    target: NodeId,
    ttl: Duration,
) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
    match e {
        RequestError::Unreachable { .. } | RequestError::Shutdown => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        RequestError::Timeout { .. } => RPCError::Timeout(Timeout {
            action,
            id,
            target,
            timeout: ttl,
        }),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let resp = self
            .call(
                RPCTypes::AppendEntries,
                RaftRequest::Append(rpc),
                option.hard_ttl(),
            )
            .await?;
        match resp {
            RaftResponse::Append(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let resp = self
            .call(
                RPCTypes::InstallSnapshot,
                RaftRequest::Snapshot(rpc.into()),
                option.hard_ttl(),
            )
            .await?;
        match resp {
            RaftResponse::Snapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let resp = self
            .call(RPCTypes::Vote, RaftRequest::Vote(rpc), option.hard_ttl())
            .await?;
        match resp {
            RaftResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_failures_map_to_what_openraft_expects() {
        let peer = PeerId::random();
        let p = RaftProtocol::NAME;
        let map = |e| {
            map_request_error::<openraft::error::Infallible>(
                e,
                RPCTypes::Vote,
                1,
                2,
                Duration::from_millis(5),
            )
        };
        let unreachable = RequestError::Unreachable {
            peer,
            protocol: p,
            cause: "dial".into(),
        };
        assert!(matches!(map(unreachable), RPCError::Unreachable(_)));
        assert!(matches!(
            map(RequestError::Shutdown),
            RPCError::Unreachable(_)
        ));
        let timeout = map(RequestError::Timeout { peer, protocol: p });
        assert!(matches!(
            timeout,
            RPCError::Timeout(Timeout { target: 2, .. })
        ));
        let io = RequestError::Failed {
            peer,
            protocol: p,
            cause: "reset".into(),
        };
        assert!(matches!(map(io), RPCError::Network(_)));
    }

    #[test]
    fn node_info_parses_with_and_without_p2p_suffix() {
        let peer = PeerId::random();
        let plain = NodeInfo {
            addr: "/ip4/127.0.0.1/udp/7000/quic-v1".into(),
            peer_id: peer.to_string(),
        };
        let (p, a) = peer_of(&plain).unwrap();
        assert_eq!(p, peer);
        assert_eq!(a.to_string(), plain.addr);
        let suffixed = NodeInfo {
            addr: format!("{}/p2p/{peer}", plain.addr),
            ..plain.clone()
        };
        assert_eq!(peer_of(&suffixed).unwrap(), (p, a));
        let other = NodeInfo {
            addr: format!("{}/p2p/{}", plain.addr, PeerId::random()),
            ..plain.clone()
        };
        assert!(matches!(
            peer_of(&other),
            Err(NodeAddrError::Mismatch { .. })
        ));
        let bad = NodeInfo {
            peer_id: "nope".into(),
            ..plain
        };
        assert!(matches!(peer_of(&bad), Err(NodeAddrError::PeerId { .. })));
    }
}
