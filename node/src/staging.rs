//! The staging area: chunks pushed to this node for a write that is not
//! committed yet, or not materialized yet. Each push is one pack file (a
//! header listing its chunks, then their bytes), fsynced before the push is
//! acknowledged: one file and one fsync per push, not one per chunk. An
//! in-memory index, rebuilt from the pack headers at start, says where each
//! chunk is; a pack is deleted once none of its chunks is needed.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use synod_merkle::Hash;

const MAGIC: &[u8; 8] = b"SYNODPK1";
const PACK_EXT: &str = "pack";
/// Bytes of the header before the chunk list, and per listed chunk.
const HEAD: usize = MAGIC.len() + 4;
const SLOT: usize = 32 + 4;

/// The staging directory with a byte budget: a push that would exceed it is
/// refused (the writer then needs other peers), so pushes of writes that
/// never commit cannot fill the disk.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
    used: Arc<AtomicU64>,
    limit: u64,
    index: Arc<Mutex<Index>>,
}

#[derive(Debug, Default)]
struct Index {
    chunks: HashMap<Hash, Slot>,
    packs: HashMap<u64, Pack>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    pack: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Pack {
    /// Chunks of this pack still indexed (a chunk held twice is indexed once).
    live: Vec<Hash>,
    size: u64,
    created: SystemTime,
}

impl Index {
    /// Forgets `id` (only if it is still held in pack `only_in`, when
    /// given); returns the pack to delete if it was its last chunk.
    fn forget(&mut self, id: &Hash, only_in: Option<u64>) -> Option<(u64, u64)> {
        if only_in.is_some_and(|p| self.chunks.get(id).is_some_and(|s| s.pack != p)) {
            return None;
        }
        let slot = self.chunks.remove(id)?;
        let pack = self.packs.get_mut(&slot.pack)?;
        pack.live.retain(|c| c != id);
        if pack.live.is_empty() {
            let size = pack.size;
            self.packs.remove(&slot.pack);
            return Some((slot.pack, size));
        }
        None
    }

    /// Forgets a whole pack; returns its size.
    fn forget_pack(&mut self, pack: u64) -> Option<u64> {
        let p = self.packs.remove(&pack)?;
        for id in &p.live {
            self.chunks.remove(id);
        }
        Some(p.size)
    }
}

impl Staging {
    /// Opens the staging directory and indexes its packs. A pack whose
    /// header does not parse is removed (its chunks are fetched again from
    /// their other holders when needed).
    pub fn open(dir: &Path, limit: u64) -> io::Result<Staging> {
        std::fs::create_dir_all(dir)?;
        let staging = Staging {
            dir: dir.to_owned(),
            used: Arc::new(AtomicU64::new(0)),
            limit,
            index: Arc::new(Mutex::new(Index::default())),
        };
        let mut used = 0;
        let mut legacy = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = entry.metadata()?;
            if let Some(id) = legacy_chunk(&path) {
                legacy.push((id, path));
                continue;
            }
            let Some(pack) = pack_number(&path) else {
                // Temp files of pushes cut off half way: counted until swept.
                used += meta.len();
                continue;
            };
            match read_header(&path, meta.len()) {
                Ok(list) => {
                    let created = meta.modified().unwrap_or_else(|_| SystemTime::now());
                    if staging.register(pack, &list, meta.len(), created) {
                        used += meta.len();
                    } else {
                        std::fs::remove_file(&path)?;
                    }
                }
                Err(e) => {
                    tracing::warn!(pack = %path.display(), cause = %e, "staged pack is unreadable; removed");
                    std::fs::remove_file(&path)?;
                }
            }
        }
        staging.used.store(used, Ordering::Relaxed);
        staging.import_legacy(legacy)?;
        Ok(staging)
    }

    /// Moves chunks staged one file per chunk (the layout before packs)
    /// into one pack; a file whose bytes do not match its name is dropped.
    fn import_legacy(&self, files: Vec<(Hash, PathBuf)>) -> io::Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let mut chunks = Vec::new();
        for (id, path) in &files {
            let bytes = std::fs::read(path)?;
            if Hash::of(&bytes) == *id {
                chunks.push((*id, bytes));
            } else {
                tracing::warn!(chunk = %id.fmt_short(), "staged chunk is corrupt; removed");
            }
        }
        // Budget-free: these were accepted before; the pack replaces them.
        let limit = u64::MAX;
        let unlimited = Staging {
            limit,
            ..self.clone()
        };
        for part in chunks.chunks(256) {
            unlimited.put_many(part)?;
        }
        self.sync_dir()?;
        for (_, path) in files {
            std::fs::remove_file(path)?;
        }
        self.sync_dir()
    }

    /// Indexes the chunks of pack `pack`; false if it holds none not held
    /// already (then it is not needed).
    fn register(&self, pack: u64, list: &[(Hash, u32)], size: u64, created: SystemTime) -> bool {
        let mut index = self.lock();
        let mut offset = (HEAD + SLOT * list.len()) as u64;
        let mut live = Vec::new();
        for (id, len) in list {
            if !index.chunks.contains_key(id) {
                index.chunks.insert(
                    *id,
                    Slot {
                        pack,
                        offset,
                        len: *len,
                    },
                );
                live.push(*id);
            }
            offset += u64::from(*len);
        }
        if live.is_empty() {
            return false;
        }
        index.packs.insert(
            pack,
            Pack {
                live,
                size,
                created,
            },
        );
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn pack_path(&self, pack: u64) -> PathBuf {
        self.dir.join(format!("{pack:016x}.{PACK_EXT}"))
    }

    /// Deletes pack `pack` of `size` bytes (no longer indexed).
    fn delete_pack(&self, pack: u64, size: u64) {
        let removed = std::fs::remove_file(self.pack_path(pack));
        if removed.is_ok() || removed.is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
            self.used
                .fetch_sub(size.min(self.used()), Ordering::Relaxed);
        }
    }

    pub fn contains(&self, id: &Hash) -> bool {
        self.lock().chunks.contains_key(id)
    }

    /// Stores `bytes` as chunk `id` durably. The caller has checked the hash.
    pub fn put(&self, id: &Hash, bytes: &[u8]) -> io::Result<()> {
        self.put_many(&[(*id, bytes)])
    }

    /// Stores every chunk not held yet as one pack, written and fsynced
    /// whole before it is renamed into place. The caller has checked the
    /// hashes; [`Staging::sync_dir`] then makes the rename durable.
    pub fn put_many<B: AsRef<[u8]>>(&self, chunks: &[(Hash, B)]) -> io::Result<()> {
        let mut fresh: Vec<(&Hash, &[u8])> = Vec::new();
        {
            let index = self.lock();
            let mut seen = std::collections::HashSet::new();
            for (id, bytes) in chunks {
                if !index.chunks.contains_key(id) && seen.insert(*id) {
                    fresh.push((id, bytes.as_ref()));
                }
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let data: u64 = fresh.iter().map(|(_, b)| b.len() as u64).sum();
        let len = (HEAD + SLOT * fresh.len()) as u64 + data;
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
        let pack: u64 = rand::random();
        let tmp = self.dir.join(format!(".{pack:016x}.tmp"));
        let written = (|| {
            let mut head = Vec::with_capacity(HEAD + SLOT * fresh.len());
            head.extend_from_slice(MAGIC);
            head.extend_from_slice(&(fresh.len() as u32).to_le_bytes());
            for (id, bytes) in &fresh {
                head.extend_from_slice(id.as_bytes());
                head.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            }
            // One vectored write: the chunks go from where they are.
            let mut f = std::fs::File::create(&tmp)?;
            let mut slices: Vec<io::IoSlice<'_>> = std::iter::once(io::IoSlice::new(&head))
                .chain(fresh.iter().map(|(_, b)| io::IoSlice::new(b)))
                .collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let n = f.write_vectored(rest)?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                io::IoSlice::advance_slices(&mut rest, n);
            }
            f.sync_data()?;
            std::fs::rename(&tmp, self.pack_path(pack))
        })();
        if let Err(e) = written {
            self.used.fetch_sub(len, Ordering::Relaxed);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let list: Vec<(Hash, u32)> = fresh.iter().map(|(id, b)| (**id, b.len() as u32)).collect();
        if !self.register(pack, &list, len, SystemTime::now()) {
            // Every chunk arrived meanwhile through another push.
            self.delete_pack(pack, len);
        }
        Ok(())
    }

    /// Makes the renames of earlier `put`s durable (one fsync for a batch).
    pub fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The bytes of chunk `id`, if staged and intact. A staged chunk whose
    /// bytes do not hash to its id is forgotten, never returned.
    pub fn get(&self, id: &Hash) -> io::Result<Option<Vec<u8>>> {
        let Some(slot) = self.lock().chunks.get(id).copied() else {
            return Ok(None);
        };
        let read = std::fs::File::open(self.pack_path(slot.pack))
            .and_then(|f| crate::fsutil::read_exact_at(&f, slot.offset, slot.len as usize));
        let bytes = match read {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
                ) =>
            {
                tracing::warn!(chunk = %id.fmt_short(), cause = %e, "staged chunk is gone; forgotten");
                self.forget_in(id, slot.pack);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if Hash::of(&bytes) != *id {
            tracing::warn!(chunk = %id.fmt_short(), "staged chunk is corrupt; forgotten");
            self.forget_in(id, slot.pack);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Forgets chunk `id`; its pack goes with its last chunk.
    pub fn remove(&self, id: &Hash) {
        let gone = self.lock().forget(id, None);
        if let Some((pack, size)) = gone {
            self.delete_pack(pack, size);
        }
    }

    /// Forgets `id` as held in `pack` (a bad copy), not a copy another push
    /// stored since.
    fn forget_in(&self, id: &Hash, pack: u64) {
        let gone = self.lock().forget(id, Some(pack));
        if let Some((pack, size)) = gone {
            self.delete_pack(pack, size);
        }
    }

    /// Removes packs older than `max_age` (writes that never committed) and
    /// temp files older than `tmp_age` (pushes cut off half way; zero at
    /// start-up, when no push can be in flight). Returns how many went.
    pub fn sweep(&self, max_age: Duration, tmp_age: Duration) -> io::Result<usize> {
        let now = crate::lab_hooks::now();
        let old: Vec<u64> = self
            .lock()
            .packs
            .iter()
            .filter(|(_, p)| now.duration_since(p.created).is_ok_and(|a| a > max_age))
            .map(|(n, _)| *n)
            .collect();
        let mut removed = 0;
        for pack in old {
            let size = self.lock().forget_pack(pack);
            if let Some(size) = size {
                self.delete_pack(pack, size);
                removed += 1;
            }
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_name().to_string_lossy().ends_with(".tmp") {
                continue;
            }
            let meta = entry.metadata()?;
            let age = meta
                .modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            if tmp_age.is_zero() || age.is_some_and(|a| a > tmp_age) {
                std::fs::remove_file(entry.path())?;
                self.used
                    .fetch_sub(meta.len().min(self.used()), Ordering::Relaxed);
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The id of a chunk staged in a file of its own (named by its id).
fn legacy_chunk(path: &Path) -> Option<Hash> {
    let name = path.file_name()?.to_str()?;
    if name.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let id = Hash::from_bytes(bytes);
    (id.to_string() == name).then_some(id)
}

/// The number of a pack file, from its name.
fn pack_number(path: &Path) -> Option<u64> {
    if path.extension()? != PACK_EXT {
        return None;
    }
    u64::from_str_radix(path.file_stem()?.to_str()?, 16).ok()
}

/// The chunk list of a pack, checked against the file's length.
fn read_header(path: &Path, file_len: u64) -> io::Result<Vec<(Hash, u32)>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let f = std::fs::File::open(path)?;
    let mut head = [0u8; HEAD];
    f.read_exact_at(&mut head, 0)
        .map_err(|_| bad("shorter than a pack header"))?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err(bad("not a staging pack"));
    }
    let count = u32::from_le_bytes(head[MAGIC.len()..].try_into().expect("4 bytes")) as u64;
    let list_len = count * SLOT as u64;
    if HEAD as u64 + list_len > file_len {
        return Err(bad("chunk list runs past the end of the file"));
    }
    let mut list = vec![0u8; list_len as usize];
    f.read_exact_at(&mut list, HEAD as u64)?;
    let out: Vec<(Hash, u32)> = list
        .chunks_exact(SLOT)
        .map(|s| {
            let id = Hash::from_bytes(s[..32].try_into().expect("32 bytes"));
            (id, u32::from_le_bytes(s[32..].try_into().expect("4 bytes")))
        })
        .collect();
    let data: u64 = out.iter().map(|(_, l)| u64::from(*l)).sum();
    if HEAD as u64 + list_len + data != file_len {
        return Err(bad("chunk lengths do not add up to the file's length"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only_pack(dir: &Path) -> PathBuf {
        let packs: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| pack_number(p).is_some())
            .collect();
        assert_eq!(packs.len(), 1, "{packs:?}");
        packs[0].clone()
    }

    #[test]
    fn put_get_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 1 << 20).unwrap();
        let data = b"some chunk bytes".to_vec();
        let other = b"another chunk".to_vec();
        let id = Hash::of(&data);
        assert!(!st.contains(&id));
        st.put_many(&[(id, data.clone()), (Hash::of(&other), other.clone())])
            .unwrap();
        st.sync_dir().unwrap();
        assert_eq!(st.get(&id).unwrap(), Some(data.clone()));
        assert_eq!(st.get(&Hash::of(&other)).unwrap(), Some(other.clone()));
        // Rot one byte of the first chunk's bytes (right after the header).
        let pack = only_pack(dir.path());
        let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
        f.write_all_at(b"X", (HEAD + 2 * SLOT) as u64).unwrap();
        assert_eq!(
            st.get(&id).unwrap(),
            None,
            "corrupt chunk is never returned"
        );
        assert!(!st.contains(&id));
        assert_eq!(
            st.get(&Hash::of(&other)).unwrap(),
            Some(other),
            "its neighbour in the pack is intact"
        );
    }

    #[test]
    fn packs_are_indexed_again_on_open_and_a_broken_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![1u8; 1000];
        let b = vec![2u8; 500];
        {
            let st = Staging::open(dir.path(), 1 << 20).unwrap();
            st.put_many(&[(Hash::of(&a), a.clone()), (Hash::of(&b), b.clone())])
                .unwrap();
        }
        std::fs::write(dir.path().join("00000000000000ff.pack"), b"SYNODPK1garbage").unwrap();
        let st = Staging::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(st.get(&Hash::of(&b)).unwrap(), Some(b));
        assert_eq!(st.get(&Hash::of(&a)).unwrap(), Some(a.clone()));
        assert!(!dir.path().join("00000000000000ff.pack").exists());
        assert_eq!(
            st.used(),
            std::fs::metadata(only_pack(dir.path())).unwrap().len()
        );
        // The pack goes with its last chunk.
        st.remove(&Hash::of(&a));
        assert!(st.contains(&Hash::of(&[2u8; 500])));
        st.remove(&Hash::of(&[2u8; 500]));
        assert_eq!(st.used(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn chunks_staged_one_file_each_are_moved_into_a_pack() {
        let dir = tempfile::tempdir().unwrap();
        let good = vec![7u8; 300];
        std::fs::write(dir.path().join(Hash::of(&good).to_string()), &good).unwrap();
        let rotten = Hash::of(b"expected bytes");
        std::fs::write(dir.path().join(rotten.to_string()), b"other bytes").unwrap();
        let st = Staging::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(st.get(&Hash::of(&good)).unwrap(), Some(good));
        assert!(!st.contains(&rotten));
        let pack = only_pack(dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(st.used(), std::fs::metadata(pack).unwrap().len());
    }

    #[test]
    fn sweep_removes_temp_files_and_old_packs() {
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
        assert_eq!(st.sweep(Duration::ZERO, Duration::ZERO).unwrap(), 1);
        assert!(!st.contains(&id));
        assert_eq!(st.used(), 0);
    }

    #[test]
    fn a_push_over_the_budget_is_refused_and_removal_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let one = (HEAD + SLOT + 60) as u64;
        let st = Staging::open(dir.path(), one + 50).unwrap();
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
        assert_eq!(Staging::open(dir.path(), one + 50).unwrap().used(), one);
    }
}
