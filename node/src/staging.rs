//! The staging area: chunks pushed to this node for a write that is not
//! committed yet, or not materialized yet. Each push is one pack file (a
//! header listing its chunks, then their bytes), fsynced before the push is
//! acknowledged: one file and one fsync per push, not one per chunk. An
//! in-memory index, rebuilt from the pack headers at start, says where each
//! chunk is; a pack is deleted once none of its chunks is needed.
//!
//! A large file announced by its manifest ([`Staging::expect_file`]) is
//! staged differently: its chunks are written at their offsets into one
//! file of the file's size, and a list beside it records each chunk once
//! its bytes are synced (list and bytes are synced before the push is
//! acknowledged). When every chunk is there, placing the file is a rename
//! of that file ([`Staging::ready_file`]): its bytes are written once on
//! this node instead of staged, then copied.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use synod_chunker::Manifest;
use synod_merkle::Hash;

const MAGIC: &[u8; 8] = b"SYNODPK1";
const PACK_EXT: &str = "pack";
/// A staged file's bytes at their offsets, and its chunk list.
const FILE_EXT: &str = "file";
const LIST_EXT: &str = "list";
const LIST_MAGIC: &[u8; 8] = b"SYNODLF1";
/// Magic, the file's manifest root, its size.
const LIST_HEAD: usize = 8 + 32 + 8;
/// Per chunk in a list: id, offset, length.
const RECORD: usize = 32 + 8 + 4;

/// A chunk of an announced file: id, offset in the file, bytes.
type InFile<'a> = (&'a Hash, u64, &'a [u8]);

/// Files from this size on are staged as themselves when announced.
pub const STAGE_AS_FILE_MIN: u64 = 16 << 20;
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
    /// Whether announced files are staged as themselves: only where the
    /// folder they are placed in is on this filesystem (see
    /// [`Staging::placing_into`]).
    stage_files: bool,
    arrivals: Arc<Arrivals>,
}

/// Chunks received from a peer and still being staged, by how many
/// pushes carry each: fetching one of them now would move it twice.
#[derive(Debug, Default)]
struct Arrivals {
    ids: Mutex<HashMap<Hash, u32>>,
    landed: tokio::sync::Notify,
}

/// Marks chunks as arriving until dropped (see [`Staging::arriving`]).
#[derive(Debug)]
pub struct Arriving {
    arrivals: Arc<Arrivals>,
    ids: Vec<Hash>,
}

impl Drop for Arriving {
    fn drop(&mut self) {
        let mut ids = self.arrivals.ids.lock().expect("arrivals poisoned");
        for id in &self.ids {
            if let Some(n) = ids.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    ids.remove(id);
                }
            }
        }
        drop(ids);
        self.arrivals.landed.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct Index {
    chunks: HashMap<Hash, Slot>,
    packs: HashMap<u64, Pack>,
    /// Chunks of announced files: id → (file's root, offset).
    expected: HashMap<Hash, (Hash, u64)>,
    /// Announced files by root.
    files: HashMap<Hash, Announced>,
}

#[derive(Debug)]
struct Announced {
    size: u64,
    ids: Vec<Hash>,
    /// The staged file, once its first chunk arrived.
    pack: Option<u64>,
    at: SystemTime,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    pack: u64,
    offset: u64,
    len: u32,
}

/// Staged files opened by [`Staging::get_into`], by pack number.
#[derive(Debug, Default)]
pub struct OpenPacks(HashMap<u64, std::fs::File>);

impl OpenPacks {
    /// Appends `len` bytes at `offset` of the file `path()` names to `out`.
    fn read_at(
        &mut self,
        path: impl FnOnce() -> PathBuf,
        pack: u64,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let f = match self.0.entry(pack) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(std::fs::File::open(path())?),
        };
        let start = out.len();
        out.resize(start + len, 0);
        f.read_exact_at(&mut out[start..], offset)
    }
}

#[derive(Debug)]
struct Pack {
    /// Chunks of this pack still indexed (a chunk held twice is indexed once).
    live: Vec<Hash>,
    size: u64,
    created: SystemTime,
    /// For a staged file (not a pack): the root of its manifest.
    file_of: Option<Hash>,
    /// For a staged file: every chunk whose bytes it holds, including
    /// those the index finds elsewhere.
    held: std::collections::HashSet<Hash>,
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
            self.forget_pack(slot.pack);
            return Some((slot.pack, size));
        }
        None
    }

    /// Indexes the chunks (id, offset, length) of `pack` not held already;
    /// returns how many.
    fn add_pack(
        &mut self,
        pack: u64,
        slots: impl IntoIterator<Item = (Hash, u64, u32)>,
        size: u64,
        created: SystemTime,
        file_of: Option<Hash>,
    ) -> usize {
        let mut live = Vec::new();
        let mut held = std::collections::HashSet::new();
        for (id, offset, len) in slots {
            if file_of.is_some() {
                held.insert(id);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.chunks.entry(id) {
                e.insert(Slot { pack, offset, len });
                live.push(id);
            }
        }
        let n = live.len();
        self.packs.insert(
            pack,
            Pack {
                live,
                size,
                created,
                file_of,
                held,
            },
        );
        n
    }

    /// Forgets a whole pack (and the announcement of a staged file);
    /// returns its size.
    fn forget_pack(&mut self, pack: u64) -> Option<u64> {
        let p = self.packs.remove(&pack)?;
        for id in &p.live {
            self.chunks.remove(id);
        }
        if let Some(root) = p.file_of {
            self.forget_announced(&root);
        }
        Some(p.size)
    }

    /// The staged file of the file with manifest root `root`, if any.
    fn staged_file_of(&self, root: &Hash) -> Option<u64> {
        self.packs
            .iter()
            .find(|(_, p)| p.file_of.as_ref() == Some(root))
            .map(|(n, _)| *n)
    }

    fn forget_announced(&mut self, root: &Hash) {
        if let Some(a) = self.files.remove(root) {
            for id in &a.ids {
                if self.expected.get(id).is_some_and(|(r, _)| r == root) {
                    self.expected.remove(id);
                }
            }
        }
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
            stage_files: true,
            arrivals: Arc::default(),
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
            if path.extension().is_some_and(|e| e == FILE_EXT) {
                // Indexed with its list, below.
                continue;
            }
            if let Some(pack) = number_of(&path, LIST_EXT) {
                let created = meta.modified().unwrap_or_else(|_| SystemTime::now());
                used += staging.reopen_file(pack, &path, meta.len(), created)?;
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
        // Bytes of a staged file whose list is gone were never acknowledged.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if number_of(&path, FILE_EXT).is_some_and(|n| !staging.lock().packs.contains_key(&n)) {
                std::fs::remove_file(&path)?;
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
        let mut offset = (HEAD + SLOT * list.len()) as u64;
        let slots = list.iter().map(|(id, len)| {
            let at = offset;
            offset += u64::from(*len);
            (*id, at, *len)
        });
        let mut index = self.lock();
        if index.add_pack(pack, slots, size, created, None) == 0 {
            index.packs.remove(&pack);
            return false;
        }
        true
    }

    /// Indexes a staged file found at start from its list; returns the
    /// bytes it counts for. A list that does not parse, or whose file is
    /// missing or of another size, goes with its file.
    fn reopen_file(
        &self,
        pack: u64,
        list_path: &Path,
        list_len: u64,
        created: SystemTime,
    ) -> io::Result<u64> {
        let data_path = self.data_path(pack, true);
        let parsed = read_list(list_path, list_len).and_then(|(root, size, records)| {
            let len = std::fs::metadata(&data_path)?.len();
            if len != size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("staged file is {len} bytes, its list says {size}"),
                ));
            }
            Ok((root, records))
        });
        let (root, records) = match parsed {
            Ok(p) => p,
            // Placed by a rename before a crash took its list with it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::remove_file(list_path)?;
                return Ok(0);
            }
            Err(e) => {
                tracing::warn!(list = %list_path.display(), cause = %e, "staged file is unreadable; removed");
                let _ = std::fs::remove_file(&data_path);
                std::fs::remove_file(list_path)?;
                return Ok(0);
            }
        };
        let size = list_len + records.iter().map(|(_, _, l)| u64::from(*l)).sum::<u64>();
        self.lock()
            .add_pack(pack, records, size, created, Some(root));
        Ok(size)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `len` more bytes, or refuses them beyond the budget.
    fn reserve(&self, len: u64) -> io::Result<()> {
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
        Ok(())
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn pack_path(&self, pack: u64) -> PathBuf {
        self.dir.join(format!("{pack:016x}.{PACK_EXT}"))
    }

    /// Where the bytes of `pack` are: a pack file, or a staged file.
    fn data_path(&self, pack: u64, staged_file: bool) -> PathBuf {
        if staged_file {
            self.dir.join(format!("{pack:016x}.{FILE_EXT}"))
        } else {
            self.pack_path(pack)
        }
    }

    fn list_path(&self, pack: u64) -> PathBuf {
        self.dir.join(format!("{pack:016x}.{LIST_EXT}"))
    }

    /// Deletes pack `pack` of `size` bytes (no longer indexed), or a staged
    /// file and its list.
    fn delete_pack(&self, pack: u64, size: u64) {
        let gone =
            |r: io::Result<()>| r.is_ok() || r.is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
        let removed = gone(std::fs::remove_file(self.pack_path(pack)))
            && gone(std::fs::remove_file(self.data_path(pack, true)))
            && gone(std::fs::remove_file(self.list_path(pack)));
        if removed {
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
        // Chunks of announced files, by file: (id, offset, bytes).
        let mut in_files: HashMap<Hash, Vec<InFile<'_>>> = HashMap::new();
        {
            let index = self.lock();
            let mut seen = std::collections::HashSet::new();
            for (id, bytes) in chunks {
                if index.chunks.contains_key(id) || !seen.insert(*id) {
                    continue;
                }
                match index.expected.get(id) {
                    Some((root, offset)) => {
                        in_files
                            .entry(*root)
                            .or_default()
                            .push((id, *offset, bytes.as_ref()))
                    }
                    None => fresh.push((id, bytes.as_ref())),
                }
            }
        }
        for (root, list) in in_files {
            if !self.put_in_file(&root, &list)? {
                fresh.extend(list.iter().map(|(id, _, b)| (*id, *b)));
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let data: u64 = fresh.iter().map(|(_, b)| b.len() as u64).sum();
        let len = (HEAD + SLOT * fresh.len()) as u64 + data;
        self.reserve(len)?;
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

    /// Announces a file whose chunks are about to be pushed here: from
    /// [`STAGE_AS_FILE_MIN`] bytes on, those chunks are then staged at
    /// their offsets in one file that placing the file renames.
    pub fn expect_file(&self, m: &Manifest) {
        if !self.stage_files || m.size() < STAGE_AS_FILE_MIN {
            return;
        }
        let root = m.root();
        let mut index = self.lock();
        if index.files.contains_key(&root) {
            return;
        }
        let mut ids = Vec::with_capacity(m.chunk_count());
        for c in m.chunks() {
            // A chunk held already, or twice in the file, is not expected:
            // the file is then assembled from chunks as usual.
            if !index.chunks.contains_key(&c.id) && !index.expected.contains_key(&c.id) {
                index.expected.insert(c.id, (root, c.offset));
                ids.push(c.id);
            }
        }
        // A staged file from before a restart is completed, not doubled.
        let pack = index.staged_file_of(&root);
        index.files.insert(
            root,
            Announced {
                size: m.size(),
                ids,
                pack,
                at: crate::lab_hooks::now(),
            },
        );
    }

    /// Writes chunks of the announced file `root` at their offsets in its
    /// staged file, syncs it, then adds them to its list and syncs that.
    /// False if the announcement is gone meanwhile (nothing is stored).
    fn put_in_file(&self, root: &Hash, list: &[InFile<'_>]) -> io::Result<bool> {
        let data: u64 = list.iter().map(|(_, _, b)| b.len() as u64).sum();
        let len = data + (RECORD * list.len()) as u64;
        let (pack, size) = {
            let mut index = self.lock();
            let Some(a) = index.files.get_mut(root) else {
                return Ok(false);
            };
            let size = a.size;
            let pack = match a.pack {
                Some(p) => p,
                None => {
                    // Made under the lock: a concurrent push of the same
                    // file must find both in place.
                    let p: u64 = rand::random();
                    let f = std::fs::File::create(self.data_path(p, true))?;
                    f.set_len(size)?;
                    let mut head = Vec::with_capacity(LIST_HEAD);
                    head.extend_from_slice(LIST_MAGIC);
                    head.extend_from_slice(root.as_bytes());
                    head.extend_from_slice(&size.to_le_bytes());
                    std::fs::write(self.list_path(p), &head)?;
                    a.pack = Some(p);
                    index.add_pack(p, [], LIST_HEAD as u64, SystemTime::now(), Some(*root));
                    self.used.fetch_add(LIST_HEAD as u64, Ordering::Relaxed);
                    p
                }
            };
            (pack, size)
        };
        self.reserve(len)?;
        let written = (|| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(self.data_path(pack, true))?;
            let mut records = Vec::with_capacity(RECORD * list.len());
            for (id, offset, bytes) in list {
                if offset + bytes.len() as u64 > size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "chunk {} runs past the end of the staged file",
                            id.fmt_short()
                        ),
                    ));
                }
                f.write_all_at(bytes, *offset)?;
                records.extend_from_slice(id.as_bytes());
                records.extend_from_slice(&offset.to_le_bytes());
                records.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            }
            f.sync_data()?;
            // One append: a crash leaves whole records and at most a torn
            // last one, which `read_list` drops.
            let mut l = std::fs::OpenOptions::new()
                .append(true)
                .open(self.list_path(pack))?;
            l.write_all(&records)?;
            l.sync_data()
        })();
        if let Err(e) = written {
            self.used.fetch_sub(len, Ordering::Relaxed);
            return Err(e);
        }
        let mut index = self.lock();
        let mut live = Vec::new();
        for (id, offset, bytes) in list {
            if !index.chunks.contains_key(*id) {
                let slot = Slot {
                    pack,
                    offset: *offset,
                    len: bytes.len() as u32,
                };
                index.chunks.insert(**id, slot);
                live.push(**id);
            }
        }
        match index.packs.get_mut(&pack) {
            Some(p) => {
                p.held.extend(list.iter().map(|(id, _, _)| **id));
                p.live.extend(live);
                p.size += len;
            }
            // Swept meanwhile: its files are gone, so are these chunks.
            None => {
                for id in live {
                    index.chunks.remove(&id);
                }
                drop(index);
                self.used.fetch_sub(len.min(self.used()), Ordering::Relaxed);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The chunks of `m` its staged file lacks, if there is one (say, a
    /// push cut short when another node answered first). The file is
    /// announced again (after a restart it is not), so that
    /// [`Staging::fill_file`] can complete it.
    pub fn missing_in_file(&self, m: &Manifest) -> Option<Vec<synod_chunker::ChunkRef>> {
        let root = m.root();
        let mut index = self.lock();
        let pack = index.staged_file_of(&root)?;
        let held = &index.packs[&pack].held;
        let missing = m
            .chunks()
            .iter()
            .filter(|c| !held.contains(&c.id))
            .copied()
            .collect();
        index.files.entry(root).or_insert_with(|| Announced {
            size: m.size(),
            ids: Vec::new(),
            pack: Some(pack),
            at: crate::lab_hooks::now(),
        });
        Some(missing)
    }

    /// Writes `chunks` (checked against their ids by the caller) into the
    /// staged file of `m` at their offsets, durably; false if `m` has no
    /// staged file any more.
    pub fn fill_file<B: AsRef<[u8]>>(
        &self,
        m: &Manifest,
        chunks: &[(Hash, B)],
    ) -> io::Result<bool> {
        let offsets: HashMap<Hash, u64> =
            m.chunks().iter().rev().map(|c| (c.id, c.offset)).collect();
        let list: Vec<InFile<'_>> = chunks
            .iter()
            .filter_map(|(id, b)| Some((id, *offsets.get(id)?, b.as_ref())))
            .collect();
        self.put_in_file(&m.root(), &list)
    }

    /// The staged file of manifest `m` if it holds every chunk of `m` at
    /// its offset, each read back and checked against its id; otherwise
    /// None (a bad chunk is forgotten) and the caller assembles the file
    /// from chunks. The file stays staged until [`Staging::forget_file`]:
    /// whoever places it renames it out of here first.
    pub fn ready_file(&self, m: &Manifest) -> io::Result<Option<PathBuf>> {
        let root = m.root();
        let pack = {
            let index = self.lock();
            let Some(pack) = index.staged_file_of(&root) else {
                return Ok(None);
            };
            // Held at their offsets: each is read back and checked below.
            let held = &index.packs[&pack].held;
            if !m.chunks().iter().all(|c| held.contains(&c.id)) {
                return Ok(None);
            }
            pack
        };
        let path = self.data_path(pack, true);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Placed already, its list not yet removed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_file(&root);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if f.metadata()?.len() != m.size() {
            return Ok(None);
        }
        let mut buf = Vec::new();
        for c in m.chunks() {
            buf.resize(c.len as usize, 0);
            f.read_exact_at(&mut buf, c.offset)?;
            if Hash::of(&buf) != c.id {
                tracing::warn!(chunk = %c.id.fmt_short(), "staged chunk is corrupt; forgotten");
                if let Some(p) = self.lock().packs.get_mut(&pack) {
                    p.held.remove(&c.id);
                }
                self.forget_in(&c.id, pack);
                return Ok(None);
            }
        }
        Ok(Some(path))
    }

    /// Forgets the staged file of the file with manifest root `root` (placed
    /// by a rename, or no longer needed) and removes what is left of it.
    pub fn forget_file(&self, root: &Hash) {
        let gone = {
            let mut index = self.lock();
            let pack = index.staged_file_of(root);
            pack.and_then(|n| Some((n, index.forget_pack(n)?)))
        };
        if let Some((pack, size)) = gone {
            self.delete_pack(pack, size);
        }
    }

    /// Stages announced files as themselves only if `folder`, where they
    /// are placed by a rename, is on the staging area's filesystem; they
    /// are staged as chunks otherwise. Decided once, at start.
    pub fn placing_into(mut self, folder: &Path) -> io::Result<Staging> {
        use std::os::unix::fs::MetadataExt;
        self.stage_files = std::fs::metadata(&self.dir)?.dev() == std::fs::metadata(folder)?.dev();
        Ok(self)
    }

    /// Marks `ids` as arriving (received, being staged) until the guard is
    /// dropped, for [`Staging::wait_arrived`].
    pub fn arriving(&self, ids: Vec<Hash>) -> Arriving {
        let mut held = self.arrivals.ids.lock().expect("arrivals poisoned");
        for id in &ids {
            *held.entry(*id).or_default() += 1;
        }
        Arriving {
            arrivals: self.arrivals.clone(),
            ids,
        }
    }

    /// Waits, for at most `max`, until none of `ids` is arriving; whether
    /// any was.
    pub async fn wait_arrived(&self, ids: &[Hash], max: Duration) -> bool {
        let until = tokio::time::Instant::now() + max;
        let mut waited = false;
        loop {
            let landed = self.arrivals.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            {
                let held = self.arrivals.ids.lock().expect("arrivals poisoned");
                if !ids.iter().any(|id| held.contains_key(id)) {
                    return waited;
                }
            }
            waited = true;
            if tokio::time::timeout_at(until, landed).await.is_err() {
                return waited;
            }
        }
    }

    /// Makes the renames of earlier `put`s durable (one fsync for a batch).
    pub fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The bytes of chunk `id`, if staged and intact. A staged chunk whose
    /// bytes do not hash to its id is forgotten, never returned.
    pub fn get(&self, id: &Hash) -> io::Result<Option<Vec<u8>>> {
        let mut out = Vec::new();
        let found = self.get_into(id, &mut out, &mut OpenPacks::default())?;
        Ok(found.then_some(out))
    }

    /// [`Staging::get`] appending to `out` (left as it was if the chunk is
    /// not there), with the files it opens kept in `open`: assembling a
    /// file reads many chunks from a few packs, into one reused buffer.
    pub fn get_into(&self, id: &Hash, out: &mut Vec<u8>, open: &mut OpenPacks) -> io::Result<bool> {
        let (slot, staged_file) = {
            let index = self.lock();
            let Some(slot) = index.chunks.get(id).copied() else {
                return Ok(false);
            };
            let staged_file = index
                .packs
                .get(&slot.pack)
                .is_some_and(|p| p.file_of.is_some());
            (slot, staged_file)
        };
        let start = out.len();
        let read = open.read_at(
            || self.data_path(slot.pack, staged_file),
            slot.pack,
            slot.offset,
            slot.len as usize,
            out,
        );
        match read {
            Ok(()) => {}
            // Renamed into the folder by its placing, which forgets it once
            // the file is recorded there: not this read's to forget.
            Err(e) if staged_file && e.kind() == io::ErrorKind::NotFound => {
                out.truncate(start);
                tracing::debug!(chunk = %id.fmt_short(), "staged file being placed; chunk not read");
                return Ok(false);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
                ) =>
            {
                out.truncate(start);
                tracing::warn!(chunk = %id.fmt_short(), cause = %e, "staged chunk is gone; forgotten");
                self.forget_in(id, slot.pack);
                return Ok(false);
            }
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
        if Hash::of(&out[start..]) != *id {
            out.truncate(start);
            tracing::warn!(chunk = %id.fmt_short(), "staged chunk is corrupt; forgotten");
            self.forget_in(id, slot.pack);
            return Ok(false);
        }
        Ok(true)
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
        {
            // Announced files whose chunks never came.
            let mut index = self.lock();
            let stale: Vec<Hash> = index
                .files
                .iter()
                .filter(|(_, a)| {
                    a.pack.is_none() && now.duration_since(a.at).is_ok_and(|t| t > max_age)
                })
                .map(|(r, _)| *r)
                .collect();
            for r in stale {
                index.forget_announced(&r);
            }
        }
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
    number_of(path, PACK_EXT)
}

/// The number of a staging file with extension `ext`, from its name.
fn number_of(path: &Path, ext: &str) -> Option<u64> {
    if path.extension()? != ext {
        return None;
    }
    u64::from_str_radix(path.file_stem()?.to_str()?, 16).ok()
}

/// A staged file's list: its root, its size and its chunks (id, offset,
/// length). A torn last record (a crash mid-append) is dropped: it was
/// never acknowledged.
#[allow(clippy::type_complexity)]
fn read_list(path: &Path, len: u64) -> io::Result<(Hash, u64, Vec<(Hash, u64, u32)>)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if len < LIST_HEAD as u64 {
        return Err(bad("shorter than a staged file's list header"));
    }
    let raw = std::fs::read(path)?;
    if &raw[..8] != LIST_MAGIC {
        return Err(bad("not a staged file's list"));
    }
    let root = Hash::from_bytes(raw[8..40].try_into().expect("32 bytes"));
    let size = u64::from_le_bytes(raw[40..48].try_into().expect("8 bytes"));
    let mut records = Vec::new();
    for r in raw[LIST_HEAD..].chunks_exact(RECORD) {
        let id = Hash::from_bytes(r[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(r[32..40].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(r[40..].try_into().expect("4 bytes"));
        if offset + u64::from(len) > size {
            return Err(bad("a chunk runs past the end of the staged file"));
        }
        records.push((id, offset, len));
    }
    Ok((root, size, records))
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

    #[tokio::test]
    async fn waiting_for_arriving_chunks_ends_when_they_land_or_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (Hash::of(b"a"), Hash::of(b"b"));
        let none = Duration::from_secs(30);
        assert!(!st.wait_arrived(&[a, b], none).await, "nothing arriving");
        let first = st.arriving(vec![a]);
        let second = st.arriving(vec![a, b]);
        // Bounded: a push that never finishes does not hold assembly up.
        let started = std::time::Instant::now();
        assert!(st.wait_arrived(&[b], Duration::from_millis(50)).await);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // `a` is still carried by `first` after `second` lands.
        let st2 = st.clone();
        let waiter = tokio::spawn(async move { st2.wait_arrived(&[a], none).await });
        drop(second);
        assert!(!st.wait_arrived(&[b], none).await, "b landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a is still arriving");
        drop(first);
        assert!(tokio::time::timeout(none, waiter).await.unwrap().unwrap());
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
    fn chunks_read_into_one_buffer_and_a_corrupt_one_leaves_it_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (b"first chunk".to_vec(), b"second chunk".to_vec());
        let (ia, ib) = (Hash::of(&a), Hash::of(&b));
        st.put_many(&[(ia, a.clone()), (ib, b.clone())]).unwrap();
        let mut open = OpenPacks::default();
        let mut out = b"prefix:".to_vec();
        assert!(st.get_into(&ib, &mut out, &mut open).unwrap());
        assert!(st.get_into(&ia, &mut out, &mut open).unwrap());
        assert!(!st
            .get_into(&Hash::of(b"absent"), &mut out, &mut open)
            .unwrap());
        assert_eq!(out, [&b"prefix:"[..], &b, &a].concat());
        assert_eq!(open.0.len(), 1, "the pack was opened once");
        let pack = only_pack(dir.path());
        let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
        f.write_all_at(b"X", (HEAD + 2 * SLOT) as u64).unwrap();
        let before = out.clone();
        assert!(!st.get_into(&ia, &mut out, &mut open).unwrap());
        assert_eq!(out, before, "nothing of the corrupt chunk is appended");
        assert!(!st.contains(&ia));
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

    /// A seeded file just over the size staged as itself, and its manifest.
    fn large_file(seed: u8) -> (Vec<u8>, Manifest) {
        let mut data = vec![0u8; STAGE_AS_FILE_MIN as usize + 12_345];
        blake3::Hasher::new_derive_key("synod staging test")
            .update(&[seed])
            .finalize_xof()
            .fill(&mut data);
        let m = synod_chunker::chunk_slice(&data, synod_chunker::ChunkParams::default());
        (data, m)
    }

    /// What the materializer does with a staged file: place it by a rename,
    /// then let staging forget it.
    fn take(st: &Staging, m: &Manifest, dest: &Path) -> bool {
        let Some(at) = st.ready_file(m).unwrap() else {
            return false;
        };
        std::fs::rename(at, dest).unwrap();
        st.forget_file(&m.root());
        true
    }

    fn chunks_of(data: &[u8], m: &Manifest) -> Vec<(Hash, Vec<u8>)> {
        m.chunks()
            .iter()
            .map(|c| {
                let at = c.offset as usize;
                (c.id, data[at..at + c.len as usize].to_vec())
            })
            .collect()
    }

    #[test]
    fn an_announced_file_is_staged_as_itself_and_placed_by_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(&dir.path().join("staging"), 1 << 30).unwrap();
        let (data, m) = large_file(1);
        st.expect_file(&m);
        let mut chunks = chunks_of(&data, &m);
        // Out of order, in two pushes, as stripes arrive.
        chunks.reverse();
        let (a, b) = chunks.split_at(chunks.len() / 3);
        st.put_many(b).unwrap();
        st.put_many(a).unwrap();
        assert!(
            !dir.path()
                .join("staging")
                .read_dir()
                .unwrap()
                .any(|e| { e.unwrap().path().extension().is_some_and(|x| x == PACK_EXT) }),
            "no pack: every chunk went into the staged file"
        );
        for (id, bytes) in chunks.iter().take(3) {
            assert_eq!(st.get(id).unwrap().as_ref(), Some(bytes));
        }
        let dest = dir.path().join("placed");
        assert!(take(&st, &m, &dest));
        assert!(std::fs::read(&dest).unwrap() == data);
        assert_eq!(st.used(), 0);
        assert!(!st.contains(&m.chunks()[0].id));
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_staged_file_read_while_it_is_placed_stays_staged_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(&dir.path().join("staging"), 1 << 30).unwrap();
        let (data, m) = large_file(4);
        st.expect_file(&m);
        st.put_many(&chunks_of(&data, &m)).unwrap();
        let at = st.ready_file(&m).unwrap().expect("complete");
        let dest = dir.path().join("placed");
        std::fs::rename(at, &dest).unwrap();
        // A peer's fetch between the rename and the record: not served from
        // here, and the staged file is not torn down chunk by chunk.
        let first = m.chunks()[0].id;
        assert_eq!(st.get(&first).unwrap(), None);
        assert!(m.chunks().iter().all(|c| st.contains(&c.id)));
        st.forget_file(&m.root());
        assert!(!st.contains(&first));
        assert_eq!(st.used(), 0);
        assert_eq!(std::fs::read(&dest).unwrap(), data);
    }

    #[test]
    fn a_staged_file_is_indexed_again_on_open_and_a_torn_record_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (data, m) = large_file(2);
        let chunks = chunks_of(&data, &m);
        let last = chunks.last().unwrap().0;
        {
            let st = Staging::open(dir.path(), 1 << 30).unwrap();
            st.expect_file(&m);
            st.put_many(&chunks[..chunks.len() - 1]).unwrap();
            st.put_many(&chunks[chunks.len() - 1..]).unwrap();
        }
        let list = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == LIST_EXT))
            .unwrap();
        let st = Staging::open(dir.path(), 1 << 30).unwrap();
        assert!(chunks.iter().all(|(id, _)| st.contains(id)));
        assert_eq!(
            st.get(&last).unwrap(),
            Some(chunks.last().unwrap().1.clone())
        );
        drop(st);
        // A crash mid-append: the last record torn.
        let len = std::fs::metadata(&list).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&list).unwrap();
        f.set_len(len - 5).unwrap();
        let st = Staging::open(dir.path(), 1 << 30).unwrap();
        assert!(!st.contains(&last), "the torn record is dropped");
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|(id, _)| st.contains(id)));
        let dest = dir.path().join("placed");
        assert!(!take(&st, &m, &dest), "incomplete");
        assert!(!dest.exists());
        // What it lacks is fetched into it; then it is whole.
        let missing = st.missing_in_file(&m).unwrap();
        assert_eq!(missing.iter().map(|c| c.id).collect::<Vec<_>>(), [last]);
        assert!(st.fill_file(&m, &chunks[chunks.len() - 1..]).unwrap());
        assert_eq!(st.missing_in_file(&m).unwrap(), []);
        assert!(take(&st, &m, &dest));
        assert!(std::fs::read(&dest).unwrap() == data);
        assert_eq!(st.used(), 0);
    }

    #[test]
    fn a_staged_file_placed_just_before_a_crash_leaves_no_list_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (data, m) = large_file(5);
        {
            let st = Staging::open(&dir.path().join("staging"), 1 << 30).unwrap();
            st.expect_file(&m);
            st.put_many(&chunks_of(&data, &m)).unwrap();
            let at = st.ready_file(&m).unwrap().unwrap();
            // Placed; the crash comes before `forget_file`.
            std::fs::rename(at, dir.path().join("placed")).unwrap();
        }
        let st = Staging::open(&dir.path().join("staging"), 1 << 30).unwrap();
        assert_eq!(st.used(), 0);
        assert!(!st.contains(&m.chunks()[0].id));
        assert_eq!(st.missing_in_file(&m), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_folder_on_another_filesystem_gets_its_large_files_staged_as_chunks() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let Ok(folder) = tempfile::tempdir_in("/dev/shm") else {
            return; // no second filesystem here
        };
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        if dev(dir.path()) == dev(folder.path()) {
            return;
        }
        let st = Staging::open(dir.path(), 1 << 30)
            .unwrap()
            .placing_into(folder.path())
            .unwrap();
        let (data, m) = large_file(6);
        st.expect_file(&m);
        st.put_many(&chunks_of(&data, &m)).unwrap();
        assert_eq!(st.missing_in_file(&m), None, "no staged file");
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == PACK_EXT)));
        assert!(st.get(&m.chunks()[3].id).unwrap().is_some());
    }

    #[test]
    fn a_chunk_held_elsewhere_is_written_into_the_staged_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 1 << 30).unwrap();
        let (data, m) = large_file(4);
        let chunks = chunks_of(&data, &m);
        // Staged in a pack before the file was announced.
        st.put_many(&chunks[..1]).unwrap();
        st.expect_file(&m);
        st.put_many(&chunks[1..]).unwrap();
        let missing = st.missing_in_file(&m).unwrap();
        assert_eq!(missing.len(), 1);
        assert!(st.fill_file(&m, &chunks[..1]).unwrap());
        let dest = dir.path().join("placed");
        assert!(take(&st, &m, &dest));
        assert!(std::fs::read(&dest).unwrap() == data);
        // The pack's copy stays until it is removed as usual.
        assert_eq!(st.get(&chunks[0].0).unwrap(), Some(chunks[0].1.clone()));
    }

    #[test]
    fn a_corrupt_chunk_in_a_staged_file_is_never_placed() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path(), 1 << 30).unwrap();
        let (data, m) = large_file(3);
        st.expect_file(&m);
        st.put_many(&chunks_of(&data, &m)).unwrap();
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == FILE_EXT))
            .unwrap();
        let bad = m.chunks()[5];
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(b"X", bad.offset + 7).unwrap();
        let dest = dir.path().join("placed");
        assert!(!take(&st, &m, &dest));
        assert!(!dest.exists());
        assert!(!st.contains(&bad.id), "the corrupt chunk is forgotten");
        assert!(st.contains(&m.chunks()[6].id));
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
