//! What this node holds on its own disk: the record of every materialized
//! file, the manifests it knows, the chunk index and its watermark. One sled
//! database under the data dir, separate from the Raft state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use synod_chunker::{ChunkIndex, Manifest};
use synod_consensus::EntryKind;
use synod_merkle::Hash;

const FILES: &str = "local_files";
const MANIFESTS: &str = "manifests";
const META: &str = "local_meta";
const PENDING: &str = "pending";
const IN_DOUBT: &str = "in_doubt";
const PARKED: &str = "parked";
const WATERMARK: &[u8] = b"watermark";

/// A file as this node last wrote it into the folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFile {
    /// Committed version the bytes on disk belong to.
    pub version: u64,
    pub root: Hash,
    pub size: u64,
    /// Modification time and inode seen right after we wrote it: a change
    /// of either means someone edited the file behind our back.
    pub mtime_ns: i64,
    pub inode: u64,
    /// A file, a directory, or a link (whose content is its target).
    pub kind: EntryKind,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalStateError {
    #[error("cannot open the local state at {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("local state storage failed")]
    Storage(#[from] sled::Error),
    #[error("chunk index failed")]
    Index(#[from] synod_chunker::IndexError),
    #[error("corrupt local state record for {what}: {message}")]
    Corrupt { what: String, message: String },
}

/// The node-local database.
#[derive(Debug, Clone)]
pub struct LocalState {
    db: sled::Db,
    files: sled::Tree,
    manifests: sled::Tree,
    meta: sled::Tree,
    pending: sled::Tree,
    in_doubt: sled::Tree,
    parked: sled::Tree,
    /// The parked paths in memory: version, and when to try again.
    parked_mem: std::sync::Arc<std::sync::Mutex<BTreeMap<String, Retry>>>,
    index: ChunkIndex,
    /// Group commit of [`LocalState::flush`]: tickets taken, and the
    /// highest ticket a completed flush covers.
    flushing: std::sync::Arc<tokio::sync::Mutex<()>>,
    flush_tickets: std::sync::Arc<std::sync::atomic::AtomicU64>,
    flushed_upto: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// sled's data file (`<dir>/db`): sled's own flush waits with
    /// `sync_file_range`, which is not an fsync (see
    /// `synod_consensus::NodeStorage`), so [`LocalState::flush`] adds one.
    data_file: std::sync::Arc<std::fs::File>,
}

/// A committed version this node could not write into its folder because
/// no member could serve its content. The materializer goes on past it
/// and tries it again now and then; it is dropped once that version or a
/// newer one of the path is placed. Until then the watermark this node
/// reports stays below it ([`LocalState::on_disk_through`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parked {
    pub version: u64,
    /// Why it could not be placed, the last time it was tried.
    pub error: String,
    /// When it was first parked, ms since the Unix epoch.
    pub since_ms: u64,
}

/// When a parked path is tried again: after the first wait, doubling up
/// to the most.
const PARK_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const PARK_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Retry {
    version: u64,
    at: std::time::Instant,
    wait: std::time::Duration,
}

/// A local edit that could not be committed yet (no quorum): the durable
/// pending journal, retried in the order the edits were found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEdit {
    /// What the edit will commit: "put", "delete" or "rename".
    pub kind: String,
    /// The version the edit was based on (None: a new file).
    pub base: Option<u64>,
    /// When it was first found, ms since the Unix epoch.
    pub since_ms: u64,
    /// Why the last attempt failed.
    pub error: String,
}

/// The encoding of local records and of manifests pushed between nodes.
pub fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 256 << 20 }>()
}

pub fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    bytes: &[u8],
) -> Result<T, LocalStateError> {
    match bincode::serde::decode_from_slice::<T, _>(bytes, codec()) {
        Ok((v, used)) if used == bytes.len() => Ok(v),
        Ok((_, used)) => Err(LocalStateError::Corrupt {
            what: what.to_owned(),
            message: format!("{} trailing bytes", bytes.len() - used),
        }),
        Err(e) => Err(LocalStateError::Corrupt {
            what: what.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// Every record of `tree`, keyed by path, in path order.
fn by_path<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
) -> Result<Vec<(String, T)>, LocalStateError> {
    let mut out = Vec::new();
    for kv in tree.iter() {
        let (k, v) = kv?;
        let path = String::from_utf8_lossy(&k).into_owned();
        let record = decode(&path, &v)?;
        out.push((path, record));
    }
    Ok(out)
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, codec()).expect("local records are small and serializable")
}

impl LocalState {
    pub fn open(path: &Path) -> Result<LocalState, LocalStateError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 << 20)
            .open()
            .map_err(|source| LocalStateError::Open {
                path: path.to_owned(),
                source,
            })?;
        let data_file =
            std::fs::File::open(path.join("db")).map_err(|e| LocalStateError::Open {
                path: path.to_owned(),
                source: e.into(),
            })?;
        let st = LocalState {
            data_file: std::sync::Arc::new(data_file),
            files: db.open_tree(FILES)?,
            manifests: db.open_tree(MANIFESTS)?,
            meta: db.open_tree(META)?,
            pending: db.open_tree(PENDING)?,
            in_doubt: db.open_tree(IN_DOUBT)?,
            parked: db.open_tree(PARKED)?,
            parked_mem: Default::default(),
            flushing: Default::default(),
            flush_tickets: Default::default(),
            flushed_upto: Default::default(),
            index: ChunkIndex::with_db(&db)?,
            db,
        };
        let now = std::time::Instant::now();
        let parked = st.parked()?;
        let mut mem = st.parked_mem.lock().expect("parked lock poisoned");
        // Tried again at once after a restart.
        for (path, p) in parked {
            let retry = Retry {
                version: p.version,
                at: now,
                wait: PARK_RETRY_FIRST,
            };
            mem.insert(path, retry);
        }
        drop(mem);
        Ok(st)
    }

    pub fn index(&self) -> &ChunkIndex {
        &self.index
    }

    pub fn file(&self, path: &str) -> Result<Option<LocalFile>, LocalStateError> {
        match self.files.get(path.as_bytes())? {
            Some(v) => Ok(Some(decode(path, &v)?)),
            None => Ok(None),
        }
    }

    /// Records that `path` now holds the content of `manifest` at `version`.
    pub fn record_file(
        &self,
        path: &str,
        file: &LocalFile,
        manifest: &Manifest,
    ) -> Result<(), LocalStateError> {
        // Only a regular file holds its chunks: reading a link follows it.
        if file.kind == EntryKind::File {
            self.index.record_file(Path::new(path), manifest)?;
        } else {
            self.index.remove_file(Path::new(path))?;
        }
        self.put_records(path, file, manifest)
    }

    /// The manifest and file record of a file just indexed.
    fn put_records(
        &self,
        path: &str,
        file: &LocalFile,
        manifest: &Manifest,
    ) -> Result<(), LocalStateError> {
        self.manifests
            .insert(manifest.root().as_bytes(), encode(manifest))?;
        self.files.insert(path.as_bytes(), encode(file))?;
        Ok(())
    }

    /// [`LocalState::record_file`] for regular files placed together: their
    /// chunk locations go into the index in one transaction.
    pub fn record_files(
        &self,
        batch: &[(&str, LocalFile, &Manifest)],
    ) -> Result<(), LocalStateError> {
        if batch.iter().any(|(_, f, _)| f.kind != EntryKind::File) {
            return batch
                .iter()
                .try_for_each(|(path, file, m)| self.record_file(path, file, m));
        }
        let held: Vec<(&Path, &Manifest)> = batch
            .iter()
            .map(|(path, _, m)| (Path::new(*path), *m))
            .collect();
        self.index.record_files(&held)?;
        batch
            .iter()
            .try_for_each(|(path, file, m)| self.put_records(path, file, m))
    }

    /// Every file record, in path order.
    pub fn files(&self) -> Result<Vec<(String, LocalFile)>, LocalStateError> {
        by_path(&self.files)
    }

    /// Journals `edit` of `path`, keeping the first `since_ms` if it was
    /// already pending.
    pub fn set_pending(&self, path: &str, mut edit: PendingEdit) -> Result<(), LocalStateError> {
        if let Some(old) = self.pending.get(path.as_bytes())? {
            let old: PendingEdit = decode(path, &old)?;
            edit.since_ms = old.since_ms;
        }
        self.pending.insert(path.as_bytes(), encode(&edit))?;
        Ok(())
    }

    pub fn clear_pending(&self, path: &str) -> Result<(), LocalStateError> {
        self.pending.remove(path.as_bytes())?;
        Ok(())
    }

    /// The pending journal, oldest first.
    pub fn pending(&self) -> Result<Vec<(String, PendingEdit)>, LocalStateError> {
        let mut out: Vec<(String, PendingEdit)> = by_path(&self.pending)?;
        out.sort_by_key(|(_, e)| e.since_ms);
        Ok(out)
    }

    /// Records a proposal whose outcome is unknown (no answer before the
    /// deadline; it may still commit). Opaque to this store: the scanner
    /// keeps what it needs to resolve it.
    pub fn set_in_doubt(&self, path: &str, record: &[u8]) -> Result<(), LocalStateError> {
        self.in_doubt.insert(path.as_bytes(), record)?;
        Ok(())
    }

    pub fn clear_in_doubt(&self, path: &str) -> Result<(), LocalStateError> {
        self.in_doubt.remove(path.as_bytes())?;
        Ok(())
    }

    /// Proposals whose outcome is unknown, by path.
    pub fn in_doubt(&self) -> Result<Vec<(String, Vec<u8>)>, LocalStateError> {
        let mut out = Vec::new();
        for kv in self.in_doubt.iter() {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    pub fn forget_file(&self, path: &str) -> Result<(), LocalStateError> {
        self.index.remove_file(Path::new(path))?;
        self.files.remove(path.as_bytes())?;
        Ok(())
    }

    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(), LocalStateError> {
        self.manifests
            .insert(manifest.root().as_bytes(), encode(manifest))?;
        Ok(())
    }

    pub fn manifest(&self, root: &Hash) -> Result<Option<Manifest>, LocalStateError> {
        match self.manifests.get(root.as_bytes())? {
            Some(v) => Ok(Some(decode(&format!("manifest {root}"), &v)?)),
            None => Ok(None),
        }
    }

    /// Parks `version` of `path` (see [`Parked`]), keeping when it was
    /// first parked; it is tried again after a while ([`Self::parked_due`]).
    pub fn park(&self, path: &str, mut p: Parked) -> Result<(), LocalStateError> {
        if let Some(old) = self.parked.get(path.as_bytes())? {
            let old: Parked = decode(path, &old)?;
            if old.version == p.version {
                p.since_ms = old.since_ms;
            }
        }
        self.parked.insert(path.as_bytes(), encode(&p))?;
        let mut mem = self.parked_mem.lock().expect("parked lock poisoned");
        let wait = match mem.get(path) {
            Some(r) if r.version == p.version => (r.wait * 2).min(PARK_RETRY_MAX),
            _ => PARK_RETRY_FIRST,
        };
        let at = std::time::Instant::now() + wait;
        mem.insert(
            path.to_owned(),
            Retry {
                version: p.version,
                at,
                wait,
            },
        );
        Ok(())
    }

    /// Drops the parked version of `path`, if any: it, or a newer version,
    /// is placed (or the path is gone). True if there was one.
    pub fn unpark(&self, path: &str) -> Result<bool, LocalStateError> {
        let mut mem = self.parked_mem.lock().expect("parked lock poisoned");
        if mem.remove(path).is_none() {
            return Ok(false);
        }
        drop(mem);
        self.parked.remove(path.as_bytes())?;
        Ok(true)
    }

    /// Every parked path, in path order.
    pub fn parked(&self) -> Result<Vec<(String, Parked)>, LocalStateError> {
        by_path(&self.parked)
    }

    /// Parked paths due to be tried again, with their versions.
    pub fn parked_due(&self) -> Vec<(String, u64)> {
        let now = std::time::Instant::now();
        let mem = self.parked_mem.lock().expect("parked lock poisoned");
        mem.iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(p, r)| (p.clone(), r.version))
            .collect()
    }

    /// When the next parked path is due, if any is parked.
    pub fn next_parked_retry(&self) -> Option<std::time::Instant> {
        let mem = self.parked_mem.lock().expect("parked lock poisoned");
        mem.values().map(|r| r.at).min()
    }

    /// Every commit up to this log index is on disk: the watermark, or
    /// just below the oldest parked version.
    pub fn on_disk_through(&self) -> Result<u64, LocalStateError> {
        let w = self.watermark()?;
        let mem = self.parked_mem.lock().expect("parked lock poisoned");
        let oldest = mem.values().map(|r| r.version).min();
        Ok(oldest.map_or(w, |v| w.min(v.saturating_sub(1))))
    }

    /// The change feed is materialized past this log index: every commit
    /// up to it is on disk but those parked ([`Self::on_disk_through`]).
    pub fn watermark(&self) -> Result<u64, LocalStateError> {
        match self.meta.get(WATERMARK)? {
            Some(v) => {
                let arr: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| LocalStateError::Corrupt {
                        what: "watermark".into(),
                        message: format!("{} bytes instead of 8", v.len()),
                    })?;
                Ok(u64::from_be_bytes(arr))
            }
            None => Ok(0),
        }
    }

    pub fn set_watermark(&self, index: u64) -> Result<(), LocalStateError> {
        self.meta.insert(WATERMARK, &index.to_be_bytes())?;
        Ok(())
    }

    /// Makes everything recorded so far durable.
    pub async fn flush(&self) -> Result<(), LocalStateError> {
        // One flush at a time (the next finds little left to write), and off
        // sled's thread pool (see `synod_consensus::NodeStorage`).
        use std::sync::atomic::Ordering::SeqCst;
        // Everything this caller recorded precedes its ticket. A flush that
        // read the ticket count after it was taken covers it: concurrent
        // callers share one flush instead of queueing one each.
        let ticket = self.flush_tickets.fetch_add(1, SeqCst) + 1;
        let _one = self.flushing.lock().await;
        if self.flushed_upto.load(SeqCst) >= ticket {
            return Ok(());
        }
        let covers = self.flush_tickets.load(SeqCst);
        let db = self.db.clone();
        let file = self.data_file.clone();
        tokio::task::spawn_blocking(move || -> Result<(), sled::Error> {
            db.flush()?;
            file.sync_data()?;
            Ok(())
        })
        .await
        .map_err(|e| sled::Error::ReportableBug(format!("flush task: {e}")))??;
        self.flushed_upto.fetch_max(covers, SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synod_chunker::{chunk_slice, ChunkParams};

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = chunk_slice(&[7u8; 100_000], ChunkParams::default());
        let f = LocalFile {
            version: 9,
            root: m.root(),
            size: 100_000,
            mtime_ns: 1,
            inode: 2,
            kind: EntryKind::File,
        };
        {
            let st = LocalState::open(dir.path()).unwrap();
            st.record_file("a/b.bin", &f, &m).unwrap();
            st.set_watermark(9).unwrap();
            st.flush().await.unwrap();
        }
        let st = LocalState::open(dir.path()).unwrap();
        assert_eq!(st.file("a/b.bin").unwrap(), Some(f));
        assert_eq!(st.manifest(&m.root()).unwrap(), Some(m.clone()));
        assert_eq!(st.watermark().unwrap(), 9);
        assert!(!st.index().locate(&m.chunks()[0].id).unwrap().is_empty());
        st.forget_file("a/b.bin").unwrap();
        assert_eq!(st.file("a/b.bin").unwrap(), None);
    }

    #[tokio::test]
    async fn a_parked_version_holds_the_reported_watermark_back_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let parked = |version, error: &str, since_ms| Parked {
            version,
            error: error.into(),
            since_ms,
        };
        {
            let st = LocalState::open(dir.path()).unwrap();
            st.set_watermark(20).unwrap();
            assert_eq!(st.on_disk_through().unwrap(), 20);
            st.park("x", parked(12, "first", 1)).unwrap();
            st.park("y", parked(15, "other", 2)).unwrap();
            // Parked again: the first time is kept, the error is the last.
            st.park("x", parked(12, "again", 3)).unwrap();
            assert_eq!(st.on_disk_through().unwrap(), 11);
            assert!(st.parked_due().is_empty(), "tried again only after a while");
            assert!(st.next_parked_retry().is_some());
            st.flush().await.unwrap();
        }
        let st = LocalState::open(dir.path()).unwrap();
        assert_eq!(
            st.parked().unwrap(),
            vec![
                ("x".into(), parked(12, "again", 1)),
                ("y".into(), parked(15, "other", 2))
            ]
        );
        assert_eq!(st.on_disk_through().unwrap(), 11);
        // After a restart, every parked path is tried at once.
        assert_eq!(st.parked_due().len(), 2);
        assert!(st.unpark("x").unwrap());
        assert!(!st.unpark("x").unwrap());
        assert_eq!(st.on_disk_through().unwrap(), 14);
        assert!(st.unpark("y").unwrap());
        assert_eq!(st.on_disk_through().unwrap(), 20);
        assert!(st.next_parked_retry().is_none());
    }
}
