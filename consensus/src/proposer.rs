//! Group commit: many callers, one command each, few log entries.
//!
//! openraft 0.9 waits for each append's fsync before the next append, so one
//! command per log entry is capped by fsync latency. The proposer queues
//! commands in a bounded channel; while up to `max_in_flight` `client_write`s
//! are running, new commands accumulate and leave together as the next
//! [`Request`]. Each command keeps its own precondition check and its own answer.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::command::{Answer, Command, Request};
use crate::types::{NodeId, NodeInfo, RequestId, SynodRaft};

/// Tuning of a [`Proposer`].
#[derive(Debug, Clone, Copy)]
pub struct ProposerConfig {
    /// Commands waiting to be proposed (back-pressure beyond this).
    pub queue: usize,
    /// Most commands in one log entry.
    pub max_batch: usize,
    /// Most bytes of inline file content in one log entry (a command that
    /// alone exceeds it still travels, alone).
    pub max_batch_inline_bytes: usize,
    /// Batches proposed but not yet committed.
    pub max_in_flight: usize,
    /// Scheduler yields before cutting a batch while another is in flight.
    pub linger_yields: usize,
    /// How long a batch may wait for its commit (a leader cut off from its
    /// quorum never answers on its own).
    pub commit_timeout: std::time::Duration,
}

impl Default for ProposerConfig {
    fn default() -> Self {
        ProposerConfig {
            queue: 16 * 1024,
            max_batch: 2048,
            max_batch_inline_bytes: 128 * 1024,
            max_in_flight: 2,
            linger_yields: 8,
            commit_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// Why a proposal has no answer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    /// This node is not the leader; retry there (with the same request id).
    #[error("not the leader; leader is {leader_id:?}")]
    ForwardToLeader {
        /// The leader, if known.
        leader_id: Option<NodeId>,
        /// Its address, if known.
        leader_node: Option<NodeInfo>,
    },
    /// Raft could not commit (quorum lost, shutting down, storage failure).
    /// The command may or may not commit later: retry with the same request id.
    #[error("raft write failed")]
    Raft(#[source] Arc<RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>),
    /// No commit within the configured timeout (e.g. the leader lost its
    /// quorum). The command may still commit: retry with the same request id.
    #[error("no commit within {0:?}")]
    Timeout(std::time::Duration),
    /// The proposer task has stopped.
    #[error("proposer stopped")]
    Closed,
    /// The state machine answered a different number of commands.
    #[error("state machine returned {got} answers for {sent} commands")]
    AnswerCount {
        /// Commands sent.
        sent: usize,
        /// Answers received.
        got: usize,
    },
}

struct Pending {
    id: RequestId,
    cmd: Command,
    reply: oneshot::Sender<Result<Answer, ProposeError>>,
}

/// Submits commands to the local Raft node with group commit. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    client: u64,
    serial: Arc<AtomicU64>,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Proposer {
    /// Starts the batching task for `raft`. `client` must be unique per
    /// proposer incarnation (e.g. random, or node id and boot count), since
    /// request ids are `(client, serial)`.
    pub fn spawn(raft: SynodRaft, client: u64, cfg: ProposerConfig) -> Proposer {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(run(raft, rx, cfg));
        Proposer {
            tx,
            client,
            serial: Arc::new(AtomicU64::new(1)),
        }
    }

    /// A fresh request id of this proposer.
    pub fn next_request_id(&self) -> RequestId {
        RequestId {
            client: self.client,
            serial: self.serial.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Proposes `cmd` under a fresh request id and waits for its answer.
    pub async fn propose(&self, cmd: Command) -> Result<Answer, ProposeError> {
        self.propose_with_id(self.next_request_id(), cmd).await
    }

    /// Proposes `cmd` under `id`; a retry with the same id gets the first answer.
    pub async fn propose_with_id(
        &self,
        id: RequestId,
        cmd: Command,
    ) -> Result<Answer, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { id, cmd, reply })
            .await
            .map_err(|_| ProposeError::Closed)?;
        rx.await.map_err(|_| ProposeError::Closed)?
    }
}

async fn run(raft: SynodRaft, mut rx: mpsc::Receiver<Pending>, cfg: ProposerConfig) {
    let slots = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    // Commands held back because their path was already in a batch; they
    // lead the next one, in arrival order.
    let mut deferred: VecDeque<Pending> = VecDeque::new();
    loop {
        // Take a slot first: while all are busy, commands pile up in the queue
        // and form the next, larger batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match deferred.pop_front() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        if slots.available_permits() + 1 < cfg.max_in_flight {
            // Another batch keeps the log busy: let the callers just answered
            // re-submit before we cut this batch (costs no throughput; an idle
            // log still sends a lone command at once).
            for _ in 0..cfg.linger_yields {
                tokio::task::yield_now().await;
            }
        }
        let mut touched: HashSet<String> = first.cmd.paths().map(str::to_owned).collect();
        let mut inline_bytes = first.cmd.inline_len();
        let mut batch = vec![first];
        let mut held = VecDeque::new();
        let mut candidates = std::mem::take(&mut deferred);
        while batch.len() < cfg.max_batch {
            let next = match candidates.pop_front() {
                Some(p) => p,
                None => match rx.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            // One version per path per entry: a command on a path already in
            // this batch waits for the next one.
            if next.cmd.paths().any(|p| touched.contains(p)) {
                held.push_back(next);
                continue;
            }
            // Raft messages carry whole log entries: keep each one small.
            if inline_bytes + next.cmd.inline_len() > cfg.max_batch_inline_bytes {
                held.push_back(next);
                break;
            }
            inline_bytes += next.cmd.inline_len();
            touched.extend(next.cmd.paths().map(str::to_owned));
            batch.push(next);
        }
        held.extend(candidates);
        deferred = held;
        let raft = raft.clone();
        let timeout = cfg.commit_timeout;
        tokio::spawn(async move {
            commit(&raft, batch, timeout).await;
            drop(slot);
        });
    }
}

async fn commit(raft: &SynodRaft, batch: Vec<Pending>, timeout: std::time::Duration) {
    let mut replies = Vec::with_capacity(batch.len());
    let mut commands = Vec::with_capacity(batch.len());
    for p in batch {
        commands.push((p.id, p.cmd));
        replies.push(p.reply);
    }
    let sent = commands.len();
    tracing::debug!(commands = sent, "proposing batch");
    let res = match tokio::time::timeout(timeout, raft.client_write(Request { commands })).await {
        Ok(r) => r,
        Err(_) => {
            for r in replies {
                let _ = r.send(Err(ProposeError::Timeout(timeout)));
            }
            return;
        }
    };
    match res {
        Ok(resp) => {
            let answers = resp.data.answers;
            if answers.len() != sent {
                let e = ProposeError::AnswerCount {
                    sent,
                    got: answers.len(),
                };
                for r in replies {
                    let _ = r.send(Err(e.clone()));
                }
                return;
            }
            for (r, a) in replies.into_iter().zip(answers) {
                let _ = r.send(Ok(a));
            }
        }
        Err(e) => {
            let err = match e.forward_to_leader() {
                Some(f) => ProposeError::ForwardToLeader {
                    leader_id: f.leader_id,
                    leader_node: f.leader_node.clone(),
                },
                None => ProposeError::Raft(Arc::new(e)),
            };
            for r in replies {
                let _ = r.send(Err(err.clone()));
            }
        }
    }
}
