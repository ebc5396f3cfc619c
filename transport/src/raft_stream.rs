//! Raft RPCs over long-lived streams of an established connection.
//!
//! A request_response exchange opens a stream per message and passes it
//! through the swarm task on both sides (and a spawned task and an answer
//! queue on the receiver): several task hand-offs per round trip, which on a
//! busy machine cost as much as the receiver's own work. Here the Raft task
//! writes the request to a stream it keeps, the receiver's task for that
//! stream reads it, asks Raft, writes the answer back: one request at a
//! time per stream, frames and limits as in [`crate::codec`].
//!
//! A stream is opened only over a connection that already exists. Without
//! one, or when a kept stream turns out dead, the RPC goes by
//! request_response, which dials (Raft RPCs may be sent twice: every one
//! of them is idempotent).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use tracing::Instrument;

use crate::codec::{read_next_frame, write_frame, Direction};
use crate::driver::{answer_raft, RaftSlot};
use crate::handle::RequestError;
use crate::messages::{
    RaftProtocol, RaftRequest, RaftResponse, WireProtocol, RAFT_STREAM_PROTOCOL,
};
use crate::metrics::TransportMetrics;

/// The protocol of Raft streams.
pub(crate) const RAFT_STREAM: StreamProtocol = StreamProtocol::new(RAFT_STREAM_PROTOCOL);

/// Idle streams kept per peer (openraft sends to a peer from one
/// replication task, plus the odd vote).
const IDLE_PER_PEER: usize = 4;

/// Longest wait for a new stream before falling back to request_response.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// The client side: kept streams per peer, and which peers are connected.
pub(crate) struct RaftStreams {
    control: libp2p_stream::Control,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connected: HashSet<PeerId>,
    /// Connected peers that do not speak [`RAFT_STREAM`] (an older synod):
    /// not asked again until they reconnect.
    unsupported: HashSet<PeerId>,
    idle: HashMap<PeerId, Vec<Stream>>,
}

impl RaftStreams {
    pub(crate) fn new(control: libp2p_stream::Control) -> RaftStreams {
        RaftStreams {
            control,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The swarm has (or no longer has) a connection to `peer`; a lost
    /// connection takes its streams with it.
    pub(crate) fn set_connected(&self, peer: PeerId, connected: bool) {
        let mut st = self.state();
        if connected {
            st.connected.insert(peer);
        } else {
            st.connected.remove(&peer);
            st.unsupported.remove(&peer);
            st.idle.remove(&peer);
        }
    }

    /// A kept stream to `peer`, or a new one over an existing connection.
    async fn take(&self, peer: PeerId) -> Option<Stream> {
        {
            let mut st = self.state();
            if let Some(s) = st.idle.get_mut(&peer).and_then(Vec::pop) {
                return Some(s);
            }
            if !st.connected.contains(&peer) || st.unsupported.contains(&peer) {
                return None;
            }
        }
        let mut control = self.control.clone();
        match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, RAFT_STREAM)).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!(%peer, cause = %e, "no raft stream");
                if matches!(e, libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) {
                    self.state().unsupported.insert(peer);
                }
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "raft stream not opened in time");
                None
            }
        }
    }

    fn put_back(&self, peer: PeerId, stream: Stream) {
        let mut st = self.state();
        if !st.connected.contains(&peer) {
            return;
        }
        let idle = st.idle.entry(peer).or_default();
        if idle.len() < IDLE_PER_PEER {
            idle.push(stream);
        }
    }

    /// Sends `req` to `peer` over a stream and reads the answer; `None` if
    /// no stream could carry it (the caller then uses request_response).
    pub(crate) async fn request(
        &self,
        peer: PeerId,
        req: &RaftRequest,
        metrics: &TransportMetrics,
    ) -> Option<Result<RaftResponse, RequestError>> {
        let mut stream = self.take(peer).await?;
        let codec = &metrics.codec;
        let sent = write_frame(
            &mut stream,
            req,
            RaftProtocol::NAME,
            Direction::Request,
            RaftProtocol::REQUEST_LIMIT,
            codec,
        )
        .await;
        match sent {
            Ok(()) => {}
            // Our own message does not fit: no other path would take it.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                return Some(Err(RequestError::Invalid(e.to_string())))
            }
            Err(e) => {
                tracing::debug!(%peer, cause = %e, "raft stream write failed");
                return None;
            }
        }
        let answer = read_next_frame::<RaftResponse, _>(
            &mut stream,
            RaftProtocol::NAME,
            Direction::Response,
            RaftProtocol::RESPONSE_LIMIT,
            codec,
        )
        .await;
        match answer {
            // Closed before an answer (its connection being replaced, say):
            // a dead stream, not a malformed answer.
            Ok(None) => {
                tracing::debug!(%peer, "raft stream closed before the answer");
                None
            }
            Ok(Some(resp)) => {
                metrics
                    .raft_stream_rpcs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.put_back(peer, stream);
                Some(Ok(resp))
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                metrics.report_peer(peer, "malformed raft answer");
                Some(Err(RequestError::BadAnswer {
                    peer,
                    protocol: RaftProtocol::NAME,
                    what: e.to_string(),
                }))
            }
            Err(e) => {
                tracing::debug!(%peer, cause = %e, "raft stream read failed");
                None
            }
        }
    }
}

/// The server side: answers the Raft streams peers open, each in its own
/// task, until the transport's swarm (and with it `incoming`) is gone.
pub(crate) fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    raft: RaftSlot,
    metrics: Arc<TransportMetrics>,
) {
    tokio::spawn(
        async move {
            while let Some((peer, stream)) = incoming.next().await {
                let span = tracing::debug_span!("raft-stream", %peer);
                tokio::spawn(
                    serve_stream(peer, stream, raft.clone(), metrics.clone()).instrument(span),
                );
            }
        }
        .in_current_span(),
    );
}

async fn serve_stream(
    peer: PeerId,
    mut stream: Stream,
    raft: RaftSlot,
    metrics: Arc<TransportMetrics>,
) {
    loop {
        let req = read_next_frame::<RaftRequest, _>(
            &mut stream,
            RaftProtocol::NAME,
            Direction::Request,
            RaftProtocol::REQUEST_LIMIT,
            &metrics.codec,
        )
        .await;
        let req = match req {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                metrics.report_peer(peer, "malformed raft request");
                return;
            }
            Err(e) => {
                tracing::debug!(cause = %e, "raft stream ended");
                return;
            }
        };
        let raft = raft.read().unwrap_or_else(|e| e.into_inner()).clone();
        let resp = answer_raft(raft, req).await;
        let written = write_frame(
            &mut stream,
            &resp,
            RaftProtocol::NAME,
            Direction::Response,
            RaftProtocol::RESPONSE_LIMIT,
            &metrics.codec,
        )
        .await;
        if let Err(e) = written {
            tracing::debug!(cause = %e, "raft stream answer not sent");
            return;
        }
    }
}
