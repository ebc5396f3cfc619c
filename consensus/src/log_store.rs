//! `LogStore`: openraft's `RaftLogStorage` on the node's sled database.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogId, RaftLogReader, StorageIOError, Vote};

use crate::codec;
use crate::storage::{index_key, NodeStorage};
use crate::types::{LogId, NodeId, StorageError, TypeConfig};

type RaftEntry = openraft::Entry<TypeConfig>;

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The Raft log, vote and purge state of one node. Cloned per replication task.
#[derive(Clone, Debug)]
pub struct LogStore {
    st: NodeStorage,
}

impl LogStore {
    /// The log store of `st`.
    pub fn new(st: NodeStorage) -> LogStore {
        LogStore { st }
    }

    /// The node storage under this log.
    pub fn storage(&self) -> &NodeStorage {
        &self.st
    }

    fn range_keys<RB: RangeBounds<u64>>(range: &RB) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
        let map = |b: Bound<&u64>| match b {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        (map(range.start_bound()), map(range.end_bound()))
    }

    /// Reads log entries in `range`, decoding each; for tests and tools.
    pub fn read_entries<RB: RangeBounds<u64>>(
        &self,
        range: RB,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        let mut out = Vec::new();
        for kv in self.st.log.range(Self::range_keys(&range)) {
            let (k, v) = kv.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = key_index(&k);
            let ent: RaftEntry = codec::decode("log entry", &v)
                .map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
            if ent.get_log_id().index != index {
                return Err(StorageIOError::read_log_at_index(
                    index,
                    &std::io::Error::other(format!(
                        "log entry stored under index {index} claims index {}",
                        ent.get_log_id().index
                    )),
                )
                .into());
            }
            out.push(ent);
        }
        Ok(out)
    }

    /// Writes raw bytes under a log index; lets tests plant a corrupt entry.
    #[cfg(any(test, feature = "testing"))]
    pub fn put_raw_for_test(&self, index: u64, bytes: &[u8]) {
        self.st
            .log
            .insert(index_key(index), bytes)
            .expect("test write");
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.st
            .meta_get::<LogId>(LAST_PURGED)
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

fn key_index(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[..n].copy_from_slice(&k[..n]);
    u64::from_be_bytes(b)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        self.read_entries(range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last = match self
            .st
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            None => None,
            Some((k, v)) => {
                let index = key_index(&k);
                let ent: RaftEntry = codec::decode("log entry", &v)
                    .map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
                Some(*ent.get_log_id())
            }
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.st
            .meta_put(VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        // A vote must survive a crash before we answer it (no double vote).
        self.st
            .flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.st
            .meta_get(VOTE)
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: losing it only means re-applying from the last applied.
        self.st
            .meta_put(COMMITTED, &committed)
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .st
            .meta_get::<Option<LogId>>(COMMITTED)
            .map_err(|e| StorageIOError::read(&e))?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        // Plain inserts in index order, not a `sled::Batch`: sled recovers a
        // prefix of its writes (in log sequence order) after a crash, so a
        // crash mid-append leaves a contiguous log whose tail was never
        // acknowledged; and sled seals and writes its IO buffer twice for
        // every batch (`pin_log`), which cost ≈ 0.2 ms per append here.
        let mut encoded = Vec::new();
        for ent in entries {
            let bytes = codec::try_encode(&ent)
                .map_err(|e| StorageIOError::write_log_entry(*ent.get_log_id(), &e))?;
            encoded.push((index_key(ent.get_log_id().index), bytes));
        }
        for (key, bytes) in encoded {
            self.st
                .log
                .insert(key, bytes)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        // Tell openraft only once the entries are on disk. The flush runs
        // on its own: a leader sends the entries to its followers meanwhile.
        self.st
            .flush_then(move |res| callback.log_io_completed(res.map_err(std::io::Error::other)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for k in self.st.log.range(index_key(log_id.index)..).keys() {
            batch.remove(k.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.st
            .log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.st
            .flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point durably first: a crash halfway through the
        // deletes then still reports a consistent log state.
        self.st
            .meta_put(LAST_PURGED, &log_id)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.st
            .flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for k in self.st.log.range(..=index_key(log_id.index)).keys() {
            batch.remove(k.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.st
            .log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
