//! Test-only fault hooks for synod-lab (`jepsen-style-tests/`), compiled in
//! only with the cargo feature `lab-hooks`. LAB USE ONLY: one of them breaks
//! synod's guarantees on purpose, so the lab can show its checkers catch it.
//!
//! Without the feature every function here is an inert stub (`stale_reads()`
//! is `false`, `now()` is the system clock, `raft_network` returns its
//! argument, `routes()` is empty), so the default `synod` binary holds no hook.
//!
//! With it, the hooks of the process (one node per process in the lab) are:
//! - `stale_reads`: every read is served from the local state machine,
//!   skipping the read-index barrier. UNSAFE: an isolated or lagging node
//!   answers stale data. For the lab's self-test only.
//! - `delay_ms`: every outgoing Raft RPC, forwarded write and read-index
//!   request first sleeps a random 0..=delay_ms ms (uniform, per message), so
//!   concurrent messages overtake each other: delay and reordering where the
//!   kernel has no `netem`.
//! - `clock_offset_ms`: added to every wall-clock reading of the node
//!   (upload mtimes, conflict-copy names, staging age): a clock jump on one
//!   node while the machine's clock is shared.
//! - `drop_peers`: node ids this node sends nothing to: every outgoing Raft
//!   RPC, forwarded write, read-index request, chunk or manifest exchange
//!   with them fails at once as if the peer were unreachable. The lab sets
//!   it on both ends of every cut link, which is how `--net loopback` runs
//!   the partition nemeses without network namespaces (a request that is
//!   never sent also gets no answer, so two one-sided drops cut a link both
//!   ways, as a lost QUIC path does).
//!
//! They start from the environment variable `SYNOD_LAB_HOOKS`, e.g.
//! `stale-reads,delay-ms=50,clock-offset-ms=-3600000,drop-peers=2+3`, and change at run
//! time through `GET`/`PUT /v1/lab/hooks` (JSON, fields as above; a `PUT`
//! changes only the fields it names).

#[cfg(feature = "lab-hooks")]
pub use enabled::*;

#[cfg(not(feature = "lab-hooks"))]
pub use disabled::*;

#[cfg(not(feature = "lab-hooks"))]
mod disabled {
    use std::time::SystemTime;

    /// Always `false`: linearizable reads keep their barrier.
    #[inline(always)]
    pub fn stale_reads() -> bool {
        false
    }

    /// The system clock.
    #[inline(always)]
    pub fn now() -> SystemTime {
        SystemTime::now()
    }

    /// Nothing to wait for.
    #[inline(always)]
    pub async fn delay_message() {}

    /// The network, unchanged.
    #[inline(always)]
    pub fn raft_network<F>(network: F) -> F {
        network
    }

    /// Never: every peer is reachable.
    #[inline(always)]
    pub fn dropped(_peer: u64) -> bool {
        false
    }

    /// No routes.
    pub fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
        axum::Router::new()
    }
}

#[cfg(feature = "lab-hooks")]
mod enabled {
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime};

    use axum::routing::get;
    use axum::{Json, Router};
    use openraft::error::{InstallSnapshotError, RPCError, RaftError};
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    };
    use rand::Rng;
    use serde::{Deserialize, Serialize};
    use synod_consensus::{NodeId, NodeInfo, TypeConfig};

    /// The hooks of this process.
    #[derive(Debug, Default)]
    struct Hooks {
        stale_reads: AtomicBool,
        delay_ms: AtomicU64,
        clock_offset_ms: AtomicI64,
        /// Bit `id` set: nothing is sent to node `id` (ids below 64).
        drop_peers: AtomicU64,
    }

    /// The hooks as JSON: the state (`GET`) or a change (`PUT`).
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct HookSettings {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub stale_reads: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub delay_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub clock_offset_ms: Option<i64>,
        /// Peers this node sends nothing to (`[]` heals).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub drop_peers: Option<Vec<u64>>,
        /// The node's (offset) clock, ns since the epoch; answers only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub now_ns: Option<i64>,
    }

    /// Reads `SYNOD_LAB_HOOKS` (`stale-reads,delay-ms=N,clock-offset-ms=N,
    /// drop-peers=A+B`).
    pub fn parse_spec(spec: &str) -> Result<HookSettings, String> {
        let mut s = HookSettings::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let bad = |_| format!("SYNOD_LAB_HOOKS: bad value in {part:?}");
            match key {
                "stale-reads" => s.stale_reads = Some(value != "0" && value != "false"),
                "delay-ms" => s.delay_ms = Some(value.parse().map_err(bad)?),
                "clock-offset-ms" => s.clock_offset_ms = Some(value.parse().map_err(bad)?),
                "drop-peers" => {
                    let ids = value
                        .split('+')
                        .filter(|v| !v.is_empty())
                        .map(|v| v.parse::<u64>().ok().filter(|id| *id < 64))
                        .collect::<Option<Vec<u64>>>()
                        .ok_or_else(|| {
                            format!("SYNOD_LAB_HOOKS: bad value in {part:?} (node ids below 64, joined by +)")
                        })?;
                    s.drop_peers = Some(ids);
                }
                _ => return Err(format!("SYNOD_LAB_HOOKS: unknown hook {key:?}")),
            }
        }
        Ok(s)
    }

    fn hooks() -> &'static Hooks {
        static HOOKS: OnceLock<Hooks> = OnceLock::new();
        HOOKS.get_or_init(|| {
            let h = Hooks::default();
            if let Ok(spec) = std::env::var("SYNOD_LAB_HOOKS") {
                match parse_spec(&spec) {
                    Ok(s) => apply(&h, &s),
                    // Crash-stop: a lab run must not go on with hooks it
                    // did not ask for.
                    Err(e) => panic!("{e}"),
                }
            }
            h
        })
    }

    fn apply(h: &Hooks, s: &HookSettings) {
        if let Some(v) = s.stale_reads {
            h.stale_reads.store(v, Ordering::SeqCst);
        }
        if let Some(v) = s.delay_ms {
            h.delay_ms.store(v, Ordering::SeqCst);
        }
        if let Some(v) = s.clock_offset_ms {
            h.clock_offset_ms.store(v, Ordering::SeqCst);
        }
        if let Some(ids) = &s.drop_peers {
            // Ids of 64 and above cannot be dropped (the lab uses 1..=9).
            let mask = ids
                .iter()
                .filter(|id| **id < 64)
                .fold(0u64, |m, id| m | (1 << id));
            h.drop_peers.store(mask, Ordering::SeqCst);
        }
        // Not `current()`: this runs inside `hooks()`'s initialisation too.
        tracing::warn!(change = ?s, "LAB HOOKS set (test-only build)");
    }

    fn current() -> HookSettings {
        let h = hooks();
        HookSettings {
            stale_reads: Some(h.stale_reads.load(Ordering::SeqCst)),
            delay_ms: Some(h.delay_ms.load(Ordering::SeqCst)),
            clock_offset_ms: Some(h.clock_offset_ms.load(Ordering::SeqCst)),
            drop_peers: Some({
                let mask = h.drop_peers.load(Ordering::SeqCst);
                (0..64).filter(|id| mask & (1 << id) != 0).collect()
            }),
            now_ns: now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_nanos() as i64),
        }
    }

    /// Whether reads skip the read-index barrier (UNSAFE, lab only).
    pub fn stale_reads() -> bool {
        hooks().stale_reads.load(Ordering::Relaxed)
    }

    /// The node's wall clock: the system clock plus the lab's offset.
    pub fn now() -> SystemTime {
        let offset = hooks().clock_offset_ms.load(Ordering::Relaxed);
        let t = SystemTime::now();
        let d = Duration::from_millis(offset.unsigned_abs());
        if offset >= 0 {
            t + d
        } else {
            t.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH)
        }
    }

    /// Whether nothing may be sent to `peer` (the lab cut the link).
    pub fn dropped(peer: u64) -> bool {
        peer < 64 && hooks().drop_peers.load(Ordering::Relaxed) & (1 << peer) != 0
    }

    /// Sleeps a random 0..=delay_ms before an outgoing message.
    pub async fn delay_message() {
        let max = hooks().delay_ms.load(Ordering::Relaxed);
        if max > 0 {
            let ms = rand::thread_rng().gen_range(0..=max);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// `GET`/`PUT /v1/lab/hooks`. Called once at start, which also reads
    /// `SYNOD_LAB_HOOKS`.
    pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
        tracing::warn!(hooks = ?current(), "built with lab-hooks: test-only fault hooks compiled in");
        Router::new().route(
            "/v1/lab/hooks",
            get(|| async { Json(current()) }).put(|Json(s): Json<HookSettings>| async move {
                apply(hooks(), &s);
                Json(current())
            }),
        )
    }

    /// Wraps the Raft network so every RPC waits [`delay_message`] first,
    /// and fails as unreachable while its target is [`dropped`].
    pub fn raft_network<F>(network: F) -> DelayedRaftNetwork<F> {
        DelayedRaftNetwork { inner: network }
    }

    /// A Raft network whose RPCs are delayed or dropped by the lab's hooks.
    #[derive(Debug, Clone)]
    pub struct DelayedRaftNetwork<F> {
        inner: F,
    }

    impl<F: RaftNetworkFactory<TypeConfig>> RaftNetworkFactory<TypeConfig> for DelayedRaftNetwork<F> {
        type Network = DelayedConnection<F::Network>;

        async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
            DelayedConnection {
                target,
                inner: self.inner.new_client(target, node).await,
            }
        }
    }

    /// One target's RPCs, delayed or dropped.
    #[derive(Debug)]
    pub struct DelayedConnection<C> {
        target: NodeId,
        inner: C,
    }

    type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

    /// The error of an RPC to a peer the lab cut off.
    fn cut<E: std::error::Error>(target: NodeId) -> RPCError<NodeId, NodeInfo, E> {
        let why = std::io::Error::other(format!("lab hook drop_peers: node {target} is cut off"));
        RPCError::Unreachable(openraft::error::Unreachable::new(&why))
    }

    impl<C: RaftNetwork<TypeConfig>> RaftNetwork<TypeConfig> for DelayedConnection<C> {
        async fn append_entries(
            &mut self,
            rpc: AppendEntriesRequest<TypeConfig>,
            option: RPCOption,
        ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
            delay_message().await;
            if dropped(self.target) {
                return Err(cut(self.target));
            }
            self.inner.append_entries(rpc, option).await
        }

        async fn install_snapshot(
            &mut self,
            rpc: InstallSnapshotRequest<TypeConfig>,
            option: RPCOption,
        ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
            delay_message().await;
            if dropped(self.target) {
                return Err(cut(self.target));
            }
            self.inner.install_snapshot(rpc, option).await
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<NodeId>,
            option: RPCOption,
        ) -> Result<VoteResponse<NodeId>, RpcErr> {
            delay_message().await;
            if dropped(self.target) {
                return Err(cut(self.target));
            }
            self.inner.vote(rpc, option).await
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse_and_reject_unknown_hooks() {
            let s = parse_spec("stale-reads, delay-ms=40,clock-offset-ms=-5000").expect("parse");
            assert_eq!(s.stale_reads, Some(true));
            assert_eq!(s.delay_ms, Some(40));
            assert_eq!(s.clock_offset_ms, Some(-5000));
            assert_eq!(parse_spec("").expect("empty"), HookSettings::default());
            assert!(parse_spec("ack-early").is_err());
            let d = parse_spec("drop-peers=2+3").expect("parse");
            assert_eq!(d.drop_peers, Some(vec![2, 3]));
            assert_eq!(
                parse_spec("drop-peers=").expect("parse").drop_peers,
                Some(vec![])
            );
            assert!(parse_spec("drop-peers=2+x").is_err());
            assert!(parse_spec("drop-peers=64").is_err());
            assert!(parse_spec("delay-ms=soon").is_err());
        }

        #[test]
        fn dropped_peers_follow_the_hook() {
            let set = |ids: Vec<u64>| {
                apply(
                    hooks(),
                    &HookSettings {
                        drop_peers: Some(ids),
                        ..Default::default()
                    },
                )
            };
            set(vec![2, 3]);
            assert!(dropped(2) && dropped(3));
            assert!(!dropped(1) && !dropped(64));
            assert_eq!(current().drop_peers, Some(vec![2, 3]));
            set(vec![]);
            assert!(!dropped(2) && !dropped(3));
        }

        #[test]
        fn clock_offset_moves_now() {
            let before = SystemTime::now();
            apply(
                hooks(),
                &HookSettings {
                    clock_offset_ms: Some(3_600_000),
                    ..Default::default()
                },
            );
            let skewed = now();
            apply(
                hooks(),
                &HookSettings {
                    clock_offset_ms: Some(0),
                    ..Default::default()
                },
            );
            let ahead = skewed.duration_since(before).expect("ahead");
            assert!(ahead >= Duration::from_secs(3600), "{ahead:?}");
        }
    }
}
