//! The staging area: chunks pushed to this node for a write that is not
//! committed yet, or not materialized yet. One file per chunk, named by its
//! id, fsynced before the push is acknowledged.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use synod_merkle::Hash;

/// The staging directory with a byte budget: a push that would exceed it is
/// refused (the writer then needs other peers), so pushes of writes that
/// never commit cannot fill the disk.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
    used: Arc<AtomicU64>,
    limit: u64,
}

impl Staging {
    pub fn open(dir: &Path, limit: u64) -> io::Result<Staging> {
        std::fs::create_dir_all(dir)?;
        let mut used = 0;
        for entry in std::fs::read_dir(dir)? {
            used += entry?.metadata()?.len();
        }
        Ok(Staging {
            dir: dir.to_owned(),
            used: Arc::new(AtomicU64::new(used)),
            limit,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Removes `path`, counting its bytes out of the budget.
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let len = std::fs::metadata(path)?.len();
        std::fs::remove_file(path)?;
        self.used.fetch_sub(len.min(self.used()), Ordering::Relaxed);
        Ok(())
    }

    fn path_of(&self, id: &Hash) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub fn contains(&self, id: &Hash) -> bool {
        self.path_of(id).is_file()
    }

    /// Stores `bytes` as chunk `id` durably. The caller has checked the hash.
    pub fn put(&self, id: &Hash, bytes: &[u8]) -> io::Result<()> {
        self.put_many(&[(*id, bytes.to_vec())])
    }

    /// Stores every chunk durably: all are written first and fsynced after,
    /// so the filesystem commits its journal about once for the batch
    /// rather than once per chunk. The caller has checked the hashes.
    pub fn put_many(&self, chunks: &[(Hash, Vec<u8>)]) -> io::Result<()> {
        let fresh: Vec<&(Hash, Vec<u8>)> = chunks
            .iter()
            .filter(|(id, _)| !self.path_of(id).is_file())
            .collect();
        let len: u64 = fresh.iter().map(|(_, b)| b.len() as u64).sum();
        let before = self.used.fetch_add(len, Ordering::Relaxed);
        if before + len > self.limit {
            self.used.fetch_sub(len, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "staging area {} is full ({before} of {} bytes; limits.max_staging_bytes)",
                    self.dir.display(),
                    self.limit
                ),
            ));
        }
        let tag: u32 = rand::random();
        let tmps: Vec<PathBuf> = fresh
            .iter()
            .map(|(id, _)| self.dir.join(format!(".{id}.{tag:08x}.tmp")))
            .collect();
        let written = (|| {
            let mut files = Vec::with_capacity(fresh.len());
            for ((_, bytes), tmp) in fresh.iter().zip(&tmps) {
                let mut f = std::fs::File::create(tmp)?;
                f.write_all(bytes)?;
                files.push(f);
            }
            for f in &files {
                f.sync_all()?;
            }
            for ((id, _), tmp) in fresh.iter().zip(&tmps) {
                std::fs::rename(tmp, self.path_of(id))?;
            }
            Ok(())
        })();
        if written.is_err() {
            self.used.fetch_sub(len, Ordering::Relaxed);
            for tmp in &tmps {
                let _ = std::fs::remove_file(tmp);
            }
        }
        written
    }

    /// Makes the renames of earlier `put`s durable (one fsync for a batch).
    pub fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The bytes of chunk `id`, if staged and intact. A staged file whose
    /// bytes do not hash to its name is removed, never returned.
    pub fn get(&self, id: &Hash) -> io::Result<Option<Vec<u8>>> {
        let path = self.path_of(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if Hash::of(&bytes) != *id {
            tracing::warn!(chunk = %id.fmt_short(), "staged chunk is corrupt; removed");
            let _ = self.remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    pub fn remove(&self, id: &Hash) {
        let _ = self.remove_file(&self.path_of(id));
    }

    /// Removes chunks older than `max_age` (writes that never committed) and
    /// temp files older than `tmp_age` (pushes cut off half way; zero at
    /// start-up, when no push can be in flight). Returns how many went.
    pub fn sweep(&self, max_age: Duration, tmp_age: Duration) -> io::Result<usize> {
        let now = crate::lab_hooks::now();
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let is_tmp = name.to_string_lossy().ends_with(".tmp");
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            let expired = if is_tmp {
                tmp_age.is_zero() || age.is_some_and(|a| a > tmp_age)
            } else {
                age.is_some_and(|a| a > max_age)
            };
            if expired {
                self.remove_file(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 1 << 20).unwrap();
        let data = b"some chunk bytes".to_vec();
        let id = Hash::of(&data);
        assert!(!st.contains(&id));
        st.put(&id, &data).unwrap();
        st.sync_dir().unwrap();
        assert_eq!(st.get(&id).unwrap(), Some(data));
        std::fs::write(dir.path().join(id.to_string()), b"rotten").unwrap();
        assert_eq!(
            st.get(&id).unwrap(),
            None,
            "corrupt chunk is never returned"
        );
        assert!(!st.contains(&id));
    }

    #[test]
    fn sweep_removes_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 1 << 20).unwrap();
        std::fs::write(dir.path().join(".x.tmp"), b"half").unwrap();
        let id = Hash::of(b"keep");
        st.put(&id, b"keep").unwrap();
        assert_eq!(
            st.sweep(Duration::from_secs(3600), Duration::from_secs(60))
                .unwrap(),
            0,
            "a fresh temp file may be a push in flight"
        );
        assert_eq!(
            st.sweep(Duration::from_secs(3600), Duration::ZERO).unwrap(),
            1
        );
        assert!(st.contains(&id));
    }

    #[test]
    fn a_push_over_the_budget_is_refused_and_removal_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 100).unwrap();
        let a = vec![1u8; 60];
        let b = vec![2u8; 60];
        st.put(&Hash::of(&a), &a).unwrap();
        let err = st.put(&Hash::of(&b), &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(err.to_string().contains("max_staging_bytes"), "{err}");
        assert!(!st.contains(&Hash::of(&b)));
        st.remove(&Hash::of(&a));
        assert_eq!(st.used(), 0);
        st.put(&Hash::of(&b), &b).unwrap();
        // Reopening counts what is on disk.
        assert_eq!(Staging::open(dir.path(), 100).unwrap().used(), 60);
    }
}
