//! Reads of the namespace: one entry, a prefix listing, the namespace root, and
//! the change feed; linearizable (leader read-index) or stale (local).

use std::sync::Arc;

use synod_merkle::Hash;
use tokio::sync::watch;

use crate::codec;
use crate::path::NsPath;
use crate::state_machine::{entry_key, feed_index, feed_key, read_err, SmShared};
use crate::types::{ClusterSettings, Entry, NodeId, NodeInfo, StorageError, SynodRaft};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every commit acknowledged before the read started (leader only).
    Linearizable,
    /// Whatever this node has applied.
    Stale,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// Not the leader, or leadership could not be confirmed.
    #[error("linearizable read not possible on this node")]
    NotLeader(
        #[source]
        openraft::error::RaftError<NodeId, openraft::error::CheckIsLeaderError<NodeId, NodeInfo>>,
    ),
    /// Local storage failed.
    #[error("namespace storage failed")]
    Storage(#[source] StorageError),
}

/// One changed entry from the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its version (= log index of the commit).
    pub version: u64,
    /// The path.
    pub path: NsPath,
    /// The entry as of `version` (a tombstone for deletes and rename sources).
    pub entry: Entry,
}

/// Local (stale) read access to a node's applied namespace.
#[derive(Debug, Clone)]
pub struct StateView {
    pub(crate) shared: Arc<SmShared>,
}

impl StateView {
    /// Keeps apply from making a log entry's writes meanwhile (see
    /// `SmShared::visible`); single keys need it not.
    fn visible(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.shared
            .visible
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The inline content ([`crate::Command::PutInline`]) this node keeps for
    /// `path`, if it belongs to the content `root`.
    pub fn inline_content(
        &self,
        path: &NsPath,
        root: &Hash,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let kept = self
            .shared
            .st
            .sm
            .get(crate::state_machine::blob_key(path.as_str()))
            .map_err(read_err)?;
        Ok(kept.and_then(|v| {
            crate::apply::split_blob(&v)
                .filter(|(r, _)| r == root)
                .map(|(_, data)| data.to_vec())
        }))
    }

    /// The applied entry of `path`, tombstones included.
    pub fn get(&self, path: &NsPath) -> Result<Option<Entry>, StorageError> {
        match self
            .shared
            .st
            .sm
            .get(entry_key(path.as_str()))
            .map_err(read_err)?
        {
            None => Ok(None),
            Some(b) => codec::decode::<Entry>("namespace entry", &b)
                .map(Some)
                .map_err(read_err),
        }
    }

    /// Entries whose path starts with `prefix` (text prefix; use `dir/` for a
    /// directory), in path order, at most `limit`.
    pub fn list_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(NsPath, Entry)>, StorageError> {
        let _whole_entries = self.visible();
        let mut out = Vec::new();
        for kv in self.shared.st.sm.scan_prefix(entry_key(prefix)).take(limit) {
            let (k, v) = kv.map_err(read_err)?;
            out.push(decode_entry(&k[1..], &v)?);
        }
        Ok(out)
    }

    /// Every entry, in path order; for tests and tools.
    pub fn all(&self) -> Result<Vec<(NsPath, Entry)>, StorageError> {
        self.list_prefix("", usize::MAX)
    }

    /// The namespace Merkle root over all applied entries. Rehashes the
    /// buckets changed since the last call (see `ns_tree`).
    pub fn namespace_root(&self) -> Hash {
        self.shared
            .tree
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .root()
    }

    /// Number of entries (tombstones included).
    pub fn len(&self) -> usize {
        self.shared
            .tree
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as usize
    }

    /// True if the namespace has no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cluster settings, once initialised.
    pub fn settings(&self) -> Result<Option<ClusterSettings>, StorageError> {
        match self
            .shared
            .st
            .sm
            .get(crate::state_machine::M_SETTINGS)
            .map_err(read_err)?
        {
            None => Ok(None),
            Some(b) => codec::decode::<ClusterSettings>("cluster settings", &b)
                .map(Some)
                .map_err(read_err),
        }
    }

    /// Log index of the last applied entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        *self.shared.applied_tx.borrow()
    }

    /// Watches the last applied index, to wait for new commits.
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    /// Waits until the applied index reaches `index`.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.watch_applied();
        let _ = rx.wait_for(|&i| i >= index).await;
    }

    /// Entries changed after log index `after`, in log order, at most `limit`.
    ///
    /// An entry overwritten later appears once, under its latest version, so
    /// resuming from the last version seen never misses a change. Entries that
    /// arrived through a snapshot install appear under their own versions.
    pub fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StorageError> {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            // A snapshot install replaces the whole feed: a scan it
            // overlapped may mix the two, so it is done again.
            let installs = self.shared.installs.load(SeqCst);
            if installs % 2 == 1 {
                // Under way: its write lock is held until it ends.
                drop(self.visible());
                continue;
            }
            let out = self.scan_feed(after, limit)?;
            if self.shared.installs.load(SeqCst) == installs {
                return Ok(out);
            }
        }
    }

    /// One scan of the change feed: [`Self::changes_since`] without its
    /// guard against a snapshot install running meanwhile.
    fn scan_feed(&self, after: u64, limit: usize) -> Result<Vec<Change>, StorageError> {
        // Up to what was applied when the call began: later entries may be
        // applied while this reads (see below), and a record the scan
        // missed must not be passed over by a caller resuming after the
        // last version it was given.
        let applied = self.applied_index();
        if after >= applied {
            return Ok(Vec::new());
        }
        let start = feed_key(after.saturating_add(1), 0);
        let end = feed_key(applied.saturating_add(1), 0);
        let mut out = Vec::new();
        for kv in self.shared.st.sm.range(start.to_vec()..end.to_vec()) {
            let (k, v) = kv.map_err(read_err)?;
            // Held per record, not for the whole scan: a background reader
            // (the materializer runs at a low priority) would otherwise
            // hold apply up for as long as it is kept off the CPU.
            let _whole_entries = self.visible();
            let version = feed_index(&k).ok_or_else(|| {
                read_err(std::io::Error::other(format!(
                    "change feed key of {} bytes",
                    k.len()
                )))
            })?;
            let paths: Vec<String> = codec::decode("change feed record", &v).map_err(read_err)?;
            for path in paths {
                let path = NsPath::parse(&path).map_err(read_err)?;
                // Written again later: listed under that version instead.
                let Some(entry) = self.get(&path)?.filter(|e| e.version == version) else {
                    continue;
                };
                if out.len() == limit {
                    return Ok(out);
                }
                out.push(Change {
                    version,
                    path,
                    entry,
                });
            }
        }
        Ok(out)
    }
}

fn decode_entry(path: &[u8], v: &[u8]) -> Result<(NsPath, Entry), StorageError> {
    let path = std::str::from_utf8(path).map_err(read_err)?;
    let path = NsPath::parse(path).map_err(read_err)?;
    let e: Entry = codec::decode("namespace entry", v).map_err(read_err)?;
    Ok((path, e))
}

/// Reads with a choice of consistency: the Raft handle plus the local view.
#[derive(Clone)]
pub struct Reader {
    raft: SynodRaft,
    view: StateView,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Reader {
    /// Reads through `raft` from `view` (both of the same node).
    pub fn new(raft: SynodRaft, view: StateView) -> Reader {
        Reader { raft, view }
    }

    async fn settle(&self, c: Consistency) -> Result<(), ReadError> {
        if c == Consistency::Linearizable {
            // Read index: confirms leadership with a quorum, waits for apply.
            self.raft
                .ensure_linearizable()
                .await
                .map_err(ReadError::NotLeader)?;
        }
        Ok(())
    }

    /// The entry of `path`.
    pub async fn read_entry(
        &self,
        path: &NsPath,
        c: Consistency,
    ) -> Result<Option<Entry>, ReadError> {
        self.settle(c).await?;
        self.view.get(path).map_err(ReadError::Storage)
    }

    /// Entries under a text prefix.
    pub async fn list_prefix(
        &self,
        prefix: &str,
        limit: usize,
        c: Consistency,
    ) -> Result<Vec<(NsPath, Entry)>, ReadError> {
        self.settle(c).await?;
        self.view
            .list_prefix(prefix, limit)
            .map_err(ReadError::Storage)
    }

    /// The namespace root.
    pub async fn namespace_root(&self, c: Consistency) -> Result<Hash, ReadError> {
        self.settle(c).await?;
        Ok(self.view.namespace_root())
    }

    /// The local view.
    pub fn view(&self) -> &StateView {
        &self.view
    }
}
