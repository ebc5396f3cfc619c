//! Opening a node's stores and the Raft configuration synod runs with.

use std::path::Path;

use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;
use crate::storage::{NodeStorage, OpenError, StorageOptions};

/// Opens the node directory `dir` of cluster `cluster_id` and returns its log
/// store and state machine (both over the same sled database).
pub fn open_stores(
    dir: &Path,
    cluster_id: &str,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    open_stores_with(dir, cluster_id, StorageOptions::default())
}

/// [`open_stores`] with explicit storage tuning.
pub fn open_stores_with(
    dir: &Path,
    cluster_id: &str,
    opts: StorageOptions,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let st = NodeStorage::open_with(dir, cluster_id, opts)?;
    let sm = StateMachineStore::open(st.clone())?;
    Ok((LogStore::new(st), sm))
}

/// The openraft configuration synod starts from (LAN timings; see
/// CRATE-NOTES §2.9). `heartbeat_interval` is also the AppendEntries timeout,
/// so it stays well above a worst-case fsync.
pub fn raft_config(cluster_name: &str) -> Result<openraft::Config, openraft::ConfigError> {
    openraft::Config {
        cluster_name: cluster_name.to_owned(),
        // Generous: a follower fsync stuck behind a large snapshot write must
        // not trigger an election (measured in the soak with 100/400–800 ms).
        heartbeat_interval: 200,
        election_timeout_min: 1500,
        election_timeout_max: 3000,
        install_snapshot_timeout: 2000,
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        max_in_snapshot_log_to_keep: 1000,
        purge_batch_size: 256,
        ..Default::default()
    }
    .validate()
}
