//! What this node did, for `/v1/status`, `/v1/events` and `/metrics`:
//! counters, the commit latency histogram, chunk traffic per peer, each
//! peer's last Raft answer and the recent events.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::contact::Contacts;
use crate::events::Events;
use crate::progress::ScanProgress;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Everything this node measures; counters are updated lock-free.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Uploads through the API being received or committed (a gauge).
            pub uploads_in_progress: AtomicU64,
            /// Time from proposing a command to its answer.
            pub commit_latency: Histogram,
            /// Chunk bytes exchanged with each peer.
            pub peer_traffic: PeerTraffic,
            /// When each peer last answered a Raft RPC.
            pub contacts: Contacts,
            /// Recent notable events.
            pub events: Events,
            /// How far the scan under way is, for the initial scan's bar.
            pub scan_progress: ScanProgress,
        }

        /// A point-in-time copy of the counters of [`Metrics`].
        #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
        pub struct MetricsSnapshot { $(pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }

            /// Prometheus text exposition of every counter, the commit
            /// latency histogram and the traffic per peer.
            pub fn prometheus(&self, node: u64) -> String {
                let mut out = String::new();
                $(
                    out.push_str(&format!(
                        "# TYPE synod_{} counter\nsynod_{}{{node=\"{}\"}} {}\n",
                        stringify!($name), stringify!($name), node,
                        self.$name.load(Ordering::Relaxed)
                    ));
                )*
                self.commit_latency.prometheus(&mut out, "synod_commit_latency_seconds", node);
                self.peer_traffic.prometheus(&mut out, node);
                out
            }
        }
    };
}

counters! {
    /// Chunk bytes received from peers by fetches.
    bytes_fetched,
    /// Chunk bytes this node served to peers' fetches.
    bytes_served,
    /// Chunk bytes this node pushed to peers for writes.
    bytes_pushed,
    /// Chunk bytes peers pushed to this node.
    bytes_received_pushed,
    /// Delta bytes peers pushed to this node, for chunks it rebuilt from
    /// chunks it held.
    delta_bytes_received,
    /// Chunks rebuilt from pushed deltas and checked against their ids.
    chunks_rebuilt,
    /// Encoded manifest bytes peers pushed to this node (whole or patches).
    manifest_bytes_received,
    /// Chunks fetched from peers and verified.
    chunks_fetched,
    /// Fetched chunks whose bytes did not match their id (pushed ones are
    /// refused, and their sender reported, by the transport).
    chunks_rejected,
    /// Chunks found locally (dedup) instead of fetched.
    chunks_local,
    /// Files written into the folder by the materializer.
    files_materialized,
    /// Of those, large files placed by moving the file their chunks were
    /// staged in (their bytes written once on this node).
    files_placed_as_staged,
    /// Failed attempts to bring the folder to the namespace (retried).
    materialize_errors,
    /// Files removed from the folder for deletes and renames.
    files_removed,
    /// Writes this node acknowledged.
    writes_committed,
    /// Writes answered with a precondition conflict.
    writes_conflicted,
    /// Folder scans completed.
    scans_completed,
    /// Duration of the latest scan in ms, commits included (a gauge).
    scan_last_ms,
    /// Local files chunked and hashed because a scan found them changed.
    files_hashed,
    /// Local edits that lost a race and were kept as conflict copies.
    conflict_copies,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one upload in progress until the guard drops.
    pub fn upload_started(&self) -> GaugeGuard<'_> {
        self.uploads_in_progress.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.uploads_in_progress)
    }
}

/// Decrements its gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upper bounds of the commit latency buckets, in seconds. The write
/// timeout defaults to 10 s, so the last bound catches timed-out proposals.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// A histogram with the fixed [`LATENCY_BUCKETS`], lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observes the time until the returned guard drops: one line at the
    /// top of the function being timed.
    pub fn timer(&self) -> HistogramTimer<'_> {
        HistogramTimer {
            histogram: self,
            start: Instant::now(),
        }
    }

    /// Cumulative counts per bound (the last is `+Inf`, the total count)
    /// and the sum in seconds.
    pub fn cumulative(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let counts = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (counts, sum)
    }

    fn prometheus(&self, out: &mut String, name: &str, node: u64) {
        let (counts, sum) = self.cumulative();
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{node=\"{node}\",le=\"{bound}\"}} {count}"
            );
        }
        let total = counts.last().copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{node=\"{node}\",le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum{{node=\"{node}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{node=\"{node}\"}} {total}");
    }
}

/// Observes the time since it was made into its histogram when dropped.
#[derive(Debug)]
pub struct HistogramTimer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for HistogramTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed());
    }
}

/// Chunk bytes exchanged with one peer: pushed to it and served to its
/// fetches (`sent`), fetched from it and pushed by it (`received`). Raft
/// traffic is not in it; the wire counters of `/v1/status` count all of it,
/// every peer together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerBytes {
    pub sent: u64,
    pub received: u64,
}

/// [`PeerBytes`] per peer node id.
#[derive(Debug, Default)]
pub struct PeerTraffic {
    peers: Mutex<BTreeMap<u64, PeerBytes>>,
}

impl PeerTraffic {
    pub fn sent(&self, peer: u64, bytes: u64) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.entry(peer).or_default().sent += bytes;
    }

    pub fn received(&self, peer: u64, bytes: u64) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.entry(peer).or_default().received += bytes;
    }

    pub fn snapshot(&self) -> BTreeMap<u64, PeerBytes> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn prometheus(&self, out: &mut String, node: u64) {
        let peers = self.snapshot();
        for (dir, name) in [(0, "sent"), (1, "received")] {
            let _ = writeln!(out, "# TYPE synod_peer_chunk_bytes_{name} counter");
            for (peer, b) in &peers {
                let v = if dir == 0 { b.sent } else { b.received };
                let _ = writeln!(
                    out,
                    "synod_peer_chunk_bytes_{name}{{node=\"{node}\",peer=\"{peer}\"}} {v}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_the_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (counts, sum) = h.cumulative();
        assert_eq!(counts.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(counts[0], 1, "0.5 ms is under 1 ms");
        assert_eq!(counts[1], 1, "nothing between 1 and 2 ms");
        assert_eq!(counts[2], 3, "3 ms is under 5 ms");
        assert_eq!(counts[LATENCY_BUCKETS.len() - 1], 3, "60 s is above 30 s");
        assert_eq!(counts.last(), Some(&4));
        assert!((sum - 60.0065).abs() < 1e-6, "{sum}");
        let mut text = String::new();
        h.prometheus(&mut text, "x", 1);
        assert!(
            text.contains("x_bucket{node=\"1\",le=\"0.005\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("x_bucket{node=\"1\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("x_count{node=\"1\"} 4\n"), "{text}");
    }

    #[test]
    fn timer_and_gauge_guards_act_on_drop() {
        let m = Metrics::default();
        {
            let _t = m.commit_latency.timer();
            let _u = m.upload_started();
            assert_eq!(m.uploads_in_progress.load(Ordering::Relaxed), 1);
        }
        assert_eq!(m.uploads_in_progress.load(Ordering::Relaxed), 0);
        assert_eq!(m.commit_latency.cumulative().0.last(), Some(&1));
    }

    #[test]
    fn peer_traffic_is_kept_per_peer_and_direction() {
        let t = PeerTraffic::default();
        t.sent(2, 10);
        t.received(2, 5);
        t.sent(3, 7);
        t.sent(2, 1);
        let s = t.snapshot();
        assert_eq!(
            s[&2],
            PeerBytes {
                sent: 11,
                received: 5
            }
        );
        assert_eq!(
            s[&3],
            PeerBytes {
                sent: 7,
                received: 0
            }
        );
        let mut text = String::new();
        t.prometheus(&mut text, 1);
        assert!(text.contains("synod_peer_chunk_bytes_sent{node=\"1\",peer=\"2\"} 11\n"));
        assert!(text.contains("synod_peer_chunk_bytes_received{node=\"1\",peer=\"3\"} 0\n"));
    }
}
