//! `NodeStorage`: the one sled database of a node, behind a narrow boundary.
//!
//! Everything durable that consensus owns lives in one directory:
//! `db/` (sled: log, vote, metadata), `sm/` (sled: the state machine) and
//! `snapshots/` (snapshot files). sled types never leave this
//! crate, so the engine can be swapped (redb, fjall, RocksDB) by rewriting this
//! file, `log_store.rs` and the sled calls of `state_machine.rs`.
//!
//! # Durability
//!
//! sled acknowledges writes from memory and fsyncs in the background every
//! `flush_every_ms` (500 ms by default). [`sled::Db::flush`] writes every
//! dirty buffer of the *whole* database (all trees), but in sled 0.34 it
//! only `pwrite`s them and waits with `sync_file_range` (`iobuf.rs`,
//! `write_to_log`): that neither flushes the device's write cache nor the
//! file's metadata (its size as the log grows), so it is not an fsync; only
//! sled's periodic flusher calls `sync_all`. The guarantee openraft needs
//! therefore comes from [`NodeStorage::flush`]: `Db::flush`, then
//! `fdatasync` of sled's data file (`db/db`) through our own handle (fsync
//! acts on the file, whichever descriptor asks). Both run on a tokio
//! blocking thread (not through `flush_async`, whose use of sled's own pool
//! deadlocked under load). Cost: the buffer write plus one `fdatasync`,
//! around 0.2–0.6 ms for a small append on this disk; it is paid once per
//! `append` call (openraft hands us a whole batch per call), per
//! `save_vote`, per `purge` and per snapshot build or install. The state machine has its
//! own database so that these flushes do not also write (and wait for) the
//! pages apply dirtied: state machine writes become durable through sled's
//! background flush (every 500 ms) or a snapshot, never on the commit path.
//! That is safe because each applied entry is atomic with `last_applied`
//! (a redo record, see `state_machine.rs`), openraft re-applies the log from `last_applied` after a
//! restart, and the log behind a snapshot is purged only after the snapshot
//! build or install has flushed the state machine (`snapshot::set_current`).

use std::path::{Path, PathBuf};

use crate::codec;

/// Name of the sled directory inside a node directory.
const DB_DIR: &str = "db";
/// Name of the state machine's sled directory inside a node directory.
const SM_DB_DIR: &str = "sm";
/// Name of the snapshot directory inside a node directory.
const SNAPSHOT_DIR: &str = "snapshots";
/// Key of the cluster id in the `meta` tree.
const CLUSTER_ID_KEY: &[u8] = b"cluster_id";

/// Why a node directory could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Creating the directory failed.
    #[error("cannot create node directory {dir}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// sled refused to open the database (locked, corrupt, ...).
    #[error("cannot open sled database in {dir}")]
    Sled {
        /// The database directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// The directory belongs to another cluster.
    #[error("node directory {dir} belongs to cluster {found:?}, expected cluster {expected:?}")]
    ClusterMismatch {
        /// The directory.
        dir: PathBuf,
        /// The cluster id stored in it.
        found: String,
        /// The cluster id asked for.
        expected: String,
    },
    /// Rebuilding the in-memory state from disk failed.
    #[error("cannot recover state from {dir}: {reason}")]
    Recover {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Tuning of a node's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageOptions {
    /// sled page cache of the log database (log, vote, metadata), in bytes.
    pub log_cache_bytes: u64,
    /// sled page cache of the state machine database, in bytes. With the
    /// snapshot frames, this bounds what a snapshot build or install holds in
    /// memory besides the namespace Merkle tree.
    pub sm_cache_bytes: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            // 256 MiB in all, as when both lived in one database; the log only
            // holds recent entries (it is purged behind snapshots).
            log_cache_bytes: 64 * 1024 * 1024,
            sm_cache_bytes: 192 * 1024 * 1024,
        }
    }
}

impl StorageOptions {
    /// Sets both page caches, in bytes.
    pub fn with_cache_bytes(mut self, log: u64, sm: u64) -> Self {
        self.log_cache_bytes = log;
        self.sm_cache_bytes = sm;
        self
    }
}

/// The durable storage of one node: log, vote, state machine and snapshots.
///
/// Cheap to clone (sled handles are reference counted). The sled directory lock
/// is held until every clone is dropped.
#[derive(Clone, Debug)]
pub struct NodeStorage {
    pub(crate) dir: PathBuf,
    pub(crate) db: sled::Db,
    /// The state machine's own database: its writes never ride along with
    /// (and never slow down) the log's flushes. See the module docs.
    pub(crate) sm_db: sled::Db,
    /// sled's data file of `db` (`db/db`), for `fdatasync` (see the module docs).
    pub(crate) db_file: std::sync::Arc<std::fs::File>,
    /// sled's data file of `sm_db` (`sm/db`).
    pub(crate) sm_file: std::sync::Arc<std::fs::File>,
    /// Raft log: big-endian index → bincode(openraft Entry).
    pub(crate) log: sled::Tree,
    /// Vote, committed, last purged, cluster id, current snapshot meta.
    pub(crate) meta: sled::Tree,
    /// State machine (see `state_machine.rs`).
    pub(crate) sm: sled::Tree,
    /// The writes of the log entry being applied, as one value (see
    /// `state_machine::Writes`); in `sm_db`, so in the same sled log as `sm`.
    pub(crate) sm_redo: sled::Tree,
    /// Test hook on the log's background flushes.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) flush_hook: std::sync::Arc<FlushHook>,
}

/// Holds back the log's background flushes ([`NodeStorage::flush_then`])
/// and counts those that completed: lets tests see what a node does while
/// its own log write is still in flight.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FlushHook {
    delay_ms: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
}

#[cfg(any(test, feature = "testing"))]
impl FlushHook {
    /// Every later background flush first sleeps `delay`.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Background flushes completed so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl NodeStorage {
    /// Opens (or creates) the node directory `dir` for cluster `cluster_id`.
    /// A directory created for another cluster is refused.
    pub fn open(dir: &Path, cluster_id: &str) -> Result<NodeStorage, OpenError> {
        Self::open_with(dir, cluster_id, StorageOptions::default())
    }

    /// [`NodeStorage::open`] with explicit tuning.
    pub fn open_with(
        dir: &Path,
        cluster_id: &str,
        opts: StorageOptions,
    ) -> Result<NodeStorage, OpenError> {
        let snap_dir = dir.join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&snap_dir).map_err(|source| OpenError::CreateDir {
            dir: snap_dir.clone(),
            source,
        })?;
        let db_dir = dir.join(DB_DIR);
        let sled_err = |source| OpenError::Sled {
            dir: db_dir.clone(),
            source,
        };
        let db = sled::Config::new()
            .path(&db_dir)
            .cache_capacity(opts.log_cache_bytes)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(sled_err)?;
        let meta = db.open_tree("meta").map_err(sled_err)?;
        match meta.get(CLUSTER_ID_KEY).map_err(sled_err)? {
            Some(found) if found.as_ref() != cluster_id.as_bytes() => {
                return Err(OpenError::ClusterMismatch {
                    dir: dir.to_owned(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: cluster_id.to_owned(),
                });
            }
            Some(_) => {}
            None => {
                meta.insert(CLUSTER_ID_KEY, cluster_id.as_bytes())
                    .map_err(sled_err)?;
                db.flush().map_err(sled_err)?;
                data_file(&db_dir)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| sled_err(e.into()))?;
            }
        }
        let log = db.open_tree("raft_log").map_err(sled_err)?;
        let sm_dir = dir.join(SM_DB_DIR);
        let sm_db = sled::Config::new()
            .path(&sm_dir)
            .cache_capacity(opts.sm_cache_bytes)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|source| OpenError::Sled {
                dir: sm_dir.clone(),
                source,
            })?;
        let sm = sm_db
            .open_tree("state_machine")
            .map_err(|source| OpenError::Sled {
                dir: sm_dir.clone(),
                source,
            })?;
        let sm_redo = sm_db.open_tree("redo").map_err(|source| OpenError::Sled {
            dir: sm_dir.clone(),
            source,
        })?;
        let db_file = data_file(&db_dir).map_err(|e| sled_err(e.into()))?;
        let sm_file = data_file(&sm_dir).map_err(|e| OpenError::Sled {
            dir: sm_dir.clone(),
            source: e.into(),
        })?;
        Ok(NodeStorage {
            dir: dir.to_owned(),
            db,
            sm_db,
            db_file: std::sync::Arc::new(db_file),
            sm_file: std::sync::Arc::new(sm_file),
            log,
            meta,
            sm,
            sm_redo,
            #[cfg(any(test, feature = "testing"))]
            flush_hook: Default::default(),
        })
    }

    /// See [`FlushHook`].
    #[cfg(any(test, feature = "testing"))]
    pub fn flush_hook(&self) -> &FlushHook {
        &self.flush_hook
    }

    /// The node directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where snapshot files live.
    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR)
    }

    /// Bytes on disk of the sled directories (log and state machine) and the
    /// snapshot directory.
    pub fn disk_usage(&self) -> (u64, u64) {
        (
            dir_size(&self.dir.join(DB_DIR)) + dir_size(&self.dir.join(SM_DB_DIR)),
            dir_size(&self.snapshot_dir()),
        )
    }

    /// sled's own estimate of its on-disk size.
    pub fn sled_size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + self.sm_db.size_on_disk().unwrap_or(0)
    }

    /// Makes every write to the log database durable: sled's flush, then
    /// `fdatasync` (see the module docs for why both, and the cost).
    pub(crate) async fn flush(&self) -> Result<(), sled::Error> {
        // Not `flush_async`: that runs the flush on sled's own thread pool,
        // and when every pool thread waits in a flush, the buffer writes the
        // flushes wait for have no thread left (a deadlock seen under load).
        let db = self.db.clone();
        let file = self.db_file.clone();
        tokio::task::spawn_blocking(move || sync_db(&db, &file))
            .await
            .map_err(|e| sled::Error::ReportableBug(format!("flush task: {e}")))?
    }

    /// [`NodeStorage::flush`] on a blocking thread; `done` gets its result.
    pub(crate) fn flush_then(&self, done: impl FnOnce(Result<(), sled::Error>) + Send + 'static) {
        let db = self.db.clone();
        let file = self.db_file.clone();
        #[cfg(any(test, feature = "testing"))]
        let hook = self.flush_hook.clone();
        tokio::task::spawn_blocking(move || {
            #[cfg(any(test, feature = "testing"))]
            match hook.delay_ms.load(std::sync::atomic::Ordering::SeqCst) {
                0 => {}
                ms => std::thread::sleep(std::time::Duration::from_millis(ms)),
            }
            let res = sync_db(&db, &file);
            #[cfg(any(test, feature = "testing"))]
            hook.completed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            done(res)
        });
    }

    /// [`NodeStorage::flush`] of both databases, on the calling thread.
    pub(crate) fn flush_all_blocking(&self) -> Result<(), sled::Error> {
        sync_db(&self.sm_db, &self.sm_file)?;
        sync_db(&self.db, &self.db_file)
    }

    /// Reads and decodes a value of the `meta` tree.
    pub(crate) fn meta_get<T: serde::de::DeserializeOwned>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, MetaError> {
        match self.meta.get(key).map_err(|e| MetaError::Sled(key, e))? {
            None => Ok(None),
            Some(b) => codec::decode(key, &b)
                .map(Some)
                .map_err(|e| MetaError::Decode(key, e)),
        }
    }

    /// Encodes and writes a value of the `meta` tree (not flushed).
    pub(crate) fn meta_put<T: serde::Serialize>(
        &self,
        key: &'static str,
        v: &T,
    ) -> Result<(), MetaError> {
        self.meta
            .insert(key, codec::encode(v))
            .map(|_| ())
            .map_err(|e| MetaError::Sled(key, e))
    }
}

/// A `meta` tree value that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// sled failed.
    #[error("sled error on meta key {0:?}")]
    Sled(&'static str, #[source] sled::Error),
    /// The value did not decode.
    #[error("meta key {0:?} does not decode")]
    Decode(&'static str, #[source] codec::DecodeError),
}

/// sled 0.34's data file inside its directory.
fn data_file(sled_dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(sled_dir.join("db"))
}

/// sled's flush (buffers written, `sync_file_range`), then `fdatasync`.
fn sync_db(db: &sled::Db, file: &std::fs::File) -> Result<(), sled::Error> {
    db.flush()?;
    file.sync_data()?;
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Big-endian key of a log index (keeps sled's order = log order).
pub(crate) fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_cluster_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        drop(NodeStorage::open(d.path(), "alpha").expect("create"));
        drop(NodeStorage::open(d.path(), "alpha").expect("reopen same cluster"));
        let err = NodeStorage::open(d.path(), "beta").expect_err("other cluster");
        let msg = err.to_string();
        assert!(matches!(err, OpenError::ClusterMismatch { .. }), "{msg}");
        assert!(msg.contains("alpha") && msg.contains("beta"), "{msg}");
    }
}
