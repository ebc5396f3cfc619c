//! The staging area: chunks pushed to this node for a write that is not
//! committed yet, or not materialized yet. One file per chunk, named by its
//! id, fsynced before the push is acknowledged.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use synod_merkle::Hash;

#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    pub fn open(dir: &Path) -> io::Result<Staging> {
        std::fs::create_dir_all(dir)?;
        Ok(Staging {
            dir: dir.to_owned(),
        })
    }

    fn path_of(&self, id: &Hash) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub fn contains(&self, id: &Hash) -> bool {
        self.path_of(id).is_file()
    }

    /// Stores `bytes` as chunk `id` durably. The caller has checked the hash.
    pub fn put(&self, id: &Hash, bytes: &[u8]) -> io::Result<()> {
        let final_path = self.path_of(id);
        if final_path.is_file() {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &final_path)?;
        Ok(())
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
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    pub fn remove(&self, id: &Hash) {
        let _ = std::fs::remove_file(self.path_of(id));
    }

    /// Removes temp files and chunks older than `max_age` (writes that never
    /// committed). Returns how many files went.
    pub fn sweep(&self, max_age: Duration) -> io::Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let is_tmp = name.to_string_lossy().ends_with(".tmp");
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > max_age);
            if is_tmp || old {
                std::fs::remove_file(entry.path())?;
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
        let st = Staging::open(dir.path()).unwrap();
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
        let st = Staging::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(".x.tmp"), b"half").unwrap();
        let id = Hash::of(b"keep");
        st.put(&id, b"keep").unwrap();
        assert_eq!(st.sweep(Duration::from_secs(3600)).unwrap(), 1);
        assert!(st.contains(&id));
    }
}
