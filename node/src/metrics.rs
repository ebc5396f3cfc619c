//! Counters of what this node did, for `/v1/status` and `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters, updated lock-free.
        #[derive(Debug, Default)]
        pub struct Metrics { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct MetricsSnapshot { $(pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }

            /// Prometheus text exposition of every counter.
            pub fn prometheus(&self, node: u64) -> String {
                let mut out = String::new();
                $(
                    out.push_str(&format!(
                        "# TYPE synod_{} counter\nsynod_{}{{node=\"{}\"}} {}\n",
                        stringify!($name), stringify!($name), node,
                        self.$name.load(Ordering::Relaxed)
                    ));
                )*
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
    /// Chunks fetched from peers and verified.
    chunks_fetched,
    /// Chunks a peer sent with bytes that did not match their id.
    chunks_rejected,
    /// Chunks found locally (dedup) instead of fetched.
    chunks_local,
    /// Files written into the folder by the materializer.
    files_materialized,
    /// Files removed from the folder for deletes and renames.
    files_removed,
    /// Writes this node acknowledged.
    writes_committed,
    /// Writes answered with a precondition conflict.
    writes_conflicted,
    /// Folder scans completed.
    scans_completed,
    /// Local files chunked and hashed because a scan found them changed.
    files_hashed,
    /// Local edits that lost a race and were kept as conflict copies.
    conflict_copies,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
