//! The local chunk index: which bytes on disk hold which chunk.
//!
//! The synced files are the chunk store; the index only points into them.
//! It can go stale behind our back (a user edits a file), so every read
//! re-hashes the bytes and drops locations that no longer hold the chunk.
//!
//! Two sled trees:
//! - `chunk_locations`: `id (32 bytes) ++ path bytes` → `offset (u64 BE) ++ len (u32 BE)`;
//!   a prefix scan by id lists every file that holds the chunk.
//! - `file_chunks`: `path bytes` → the file's ids blob (concatenated 32-byte
//!   ids), so re-recording or removing a file finds its old entries.
//!
//! Paths are relative to the synced folder and stored as raw `OsStr` bytes,
//! so names that are not UTF-8 work.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use sled::transaction::{ConflictableTransactionResult, TransactionError, Transactional};
use sled::{CompareAndSwapError, IVec, Tree};
use synod_merkle::Hash;

use crate::manifest::Manifest;

const LOCATIONS_TREE: &str = "chunk_locations";
const FILES_TREE: &str = "file_chunks";

/// Where the bytes of one chunk live: a file relative to the synced folder,
/// an offset and a length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    /// File path relative to the synced folder.
    pub path: PathBuf,
    /// Offset of the chunk in the file.
    pub offset: u64,
    /// Length of the chunk.
    pub len: u32,
}

/// A failure of the index itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// The sled database could not be opened.
    #[error("could not open the chunk index at {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// sled failed while reading or writing.
    #[error("chunk index storage failed")]
    Storage(#[source] sled::Error),
    /// A path that is not a plain relative path inside the folder.
    #[error("{} is not a relative path inside the synced folder", path.display())]
    InvalidPath { path: PathBuf },
    /// A stored value does not have the expected layout.
    #[error("corrupt chunk index entry: {what}")]
    Corrupt { what: &'static str },
}

impl From<sled::Error> for IndexError {
    fn from(e: sled::Error) -> Self {
        IndexError::Storage(e)
    }
}

/// Why [`ChunkIndex::read_chunk`] returned no bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkReadError {
    /// The index knows no location of this chunk.
    #[error("chunk {id} is not in the local index")]
    NotFound { id: Hash },
    /// Every known location held other bytes (or was missing or short);
    /// those locations were removed from the index.
    #[error("chunk {id} is at none of its indexed locations ({removed} stale ones removed)")]
    Stale { id: Hash, removed: usize },
    /// No location could be verified because reading failed (permissions,
    /// I/O error); the entries were kept.
    #[error("could not read chunk {id} from {}", path.display())]
    Read {
        id: Hash,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The index itself failed.
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// The local chunk index (see the module docs), over one sled `Db` that
/// other components may share.
#[derive(Debug, Clone)]
pub struct ChunkIndex {
    db: sled::Db,
    locations: Tree,
    files: Tree,
}

impl ChunkIndex {
    /// Opens (or creates) a sled database at `path` for the index alone.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = sled::open(path).map_err(|source| IndexError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::with_db(&db)
    }

    /// Uses the index trees of an already open database.
    pub fn with_db(db: &sled::Db) -> Result<Self, IndexError> {
        Ok(ChunkIndex {
            locations: db.open_tree(LOCATIONS_TREE)?,
            files: db.open_tree(FILES_TREE)?,
            db: db.clone(),
        })
    }

    /// Records every chunk of `manifest` as located in `rel_path`, replacing
    /// what was recorded for that path before, atomically.
    pub fn record_file(&self, rel_path: &Path, manifest: &Manifest) -> Result<(), IndexError> {
        self.record_files(&[(rel_path, manifest)])
    }

    /// [`ChunkIndex::record_file`] for several files in one transaction:
    /// sled seals and writes its log buffer for every transaction, so one
    /// per file costs more than the file's own writes.
    pub fn record_files(&self, batch: &[(&Path, &Manifest)]) -> Result<(), IndexError> {
        type Prepared<'a> = (&'a [u8], Vec<u8>, Vec<(Vec<u8>, [u8; 12])>);
        let mut prepared: Vec<Prepared<'_>> = Vec::with_capacity(batch.len());
        for (rel_path, manifest) in batch {
            let path = path_key(rel_path)?;
            let entries = manifest
                .chunks()
                .iter()
                .map(|c| (location_key(&c.id, path), location_value(c.offset, c.len)))
                .collect();
            prepared.push((path, manifest.ids_blob(), entries));
        }
        (&self.locations, &self.files)
            .transaction(
                |(locations, files)| -> ConflictableTransactionResult<(), sled::Error> {
                    for (path, blob, entries) in &prepared {
                        if let Some(old) = files.get(path)? {
                            for id in old.chunks_exact(Hash::LEN) {
                                locations.remove(location_key_raw(id, path))?;
                            }
                        }
                        // A chunk repeated in the file keeps its last offset; any works.
                        for (key, value) in entries {
                            locations.insert(key.as_slice(), &value[..])?;
                        }
                        files.insert(*path, blob.as_slice())?;
                    }
                    Ok(())
                },
            )
            .map_err(from_tx)
    }

    /// Forgets every chunk location in `rel_path`, atomically.
    pub fn remove_file(&self, rel_path: &Path) -> Result<(), IndexError> {
        let path = path_key(rel_path)?;
        (&self.locations, &self.files)
            .transaction(
                |(locations, files)| -> ConflictableTransactionResult<(), sled::Error> {
                    if let Some(old) = files.remove(path)? {
                        for id in old.chunks_exact(Hash::LEN) {
                            locations.remove(location_key_raw(id, path))?;
                        }
                    }
                    Ok(())
                },
            )
            .map_err(from_tx)
    }

    /// The chunk ids recorded for `rel_path`, in file order.
    pub fn file_chunk_ids(&self, rel_path: &Path) -> Result<Option<Vec<Hash>>, IndexError> {
        let path = path_key(rel_path)?;
        let Some(blob) = self.files.get(path)? else {
            return Ok(None);
        };
        if !blob.len().is_multiple_of(Hash::LEN) {
            return Err(IndexError::Corrupt {
                what: "file ids blob is not a multiple of 32 bytes",
            });
        }
        Ok(Some(
            blob.chunks_exact(Hash::LEN)
                .filter_map(Hash::from_slice)
                .collect(),
        ))
    }

    /// Every recorded location of chunk `id` (unverified).
    pub fn locate(&self, id: &Hash) -> Result<Vec<ChunkLocation>, IndexError> {
        self.locate_raw(id)
            .map(|entries| entries.into_iter().map(|(_, _, loc)| loc).collect())
    }

    fn locate_raw(&self, id: &Hash) -> Result<Vec<(IVec, IVec, ChunkLocation)>, IndexError> {
        let mut out = Vec::new();
        for entry in self.locations.scan_prefix(id.as_bytes()) {
            let (key, value) = entry?;
            let path = PathBuf::from(OsStr::from_bytes(&key[Hash::LEN..]));
            let (offset, len) = parse_location_value(&value)?;
            out.push((key, value, ChunkLocation { path, offset, len }));
        }
        Ok(out)
    }

    /// Reads chunk `id` from the files under `root_dir`, verifying its hash.
    ///
    /// A location whose bytes no longer hash to `id` (or whose file is
    /// missing or too short) is stale: it is removed from the index, logged,
    /// and the next location is tried. Never returns bytes other than the
    /// chunk's.
    pub fn read_chunk(&self, root_dir: &Path, id: &Hash) -> Result<Vec<u8>, ChunkReadError> {
        let entries = self.locate_raw(id)?;
        if entries.is_empty() {
            return Err(ChunkReadError::NotFound { id: *id });
        }
        let mut removed = 0;
        let mut read_error = None;
        for (key, value, loc) in entries {
            let full = root_dir.join(&loc.path);
            let cause = match read_exact_at(&full, loc.offset, loc.len) {
                Ok(bytes) if Hash::of(&bytes) == *id => return Ok(bytes),
                Ok(_) => "bytes no longer match the chunk id".to_string(),
                Err(e) if is_stale_error(&e) => e.to_string(),
                Err(source) => {
                    tracing::warn!(id = %id.fmt_short(), path = %full.display(), cause = %source, "could not read chunk location");
                    read_error.get_or_insert((full, source));
                    continue;
                }
            };
            tracing::warn!(id = %id.fmt_short(), path = %full.display(), offset = loc.offset, %cause, "dropping stale chunk location");
            // Only if unchanged: a concurrent record_file may have refreshed it.
            let swapped: Result<(), CompareAndSwapError> = self
                .locations
                .compare_and_swap(&key, Some(&value), None as Option<&[u8]>)
                .map_err(IndexError::Storage)?;
            if swapped.is_ok() {
                removed += 1;
            }
        }
        match read_error {
            Some((path, source)) => Err(ChunkReadError::Read {
                id: *id,
                path,
                source,
            }),
            None => Err(ChunkReadError::Stale { id: *id, removed }),
        }
    }

    /// Makes every index write so far durable. sled flushes the whole
    /// database (every tree of the shared `Db`), not just the index trees;
    /// without it writes become durable within sled's `flush_every_ms`
    /// (500 ms by default). Blocking: call it off async runtimes.
    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Reads exactly `len` bytes at `offset`; a short file is `UnexpectedEof`.
fn read_exact_at(path: &Path, offset: u64, len: u32) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut buf = vec![0; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Errors that mean "the bytes are gone", as opposed to "cannot look now".
fn is_stale_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::NotADirectory
    )
}

/// The raw bytes of a relative path, after checking it stays inside the
/// folder (an absolute path would make `root.join(path)` escape it).
fn path_key(rel_path: &Path) -> Result<&[u8], IndexError> {
    let plain = rel_path.components().next().is_some()
        && rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(IndexError::InvalidPath {
            path: rel_path.to_path_buf(),
        });
    }
    Ok(rel_path.as_os_str().as_bytes())
}

fn location_key(id: &Hash, path: &[u8]) -> Vec<u8> {
    location_key_raw(id.as_bytes(), path)
}

fn location_key_raw(id: &[u8], path: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + path.len());
    key.extend_from_slice(id);
    key.extend_from_slice(path);
    key
}

fn location_value(offset: u64, len: u32) -> [u8; 12] {
    let mut v = [0; 12];
    v[..8].copy_from_slice(&offset.to_be_bytes());
    v[8..].copy_from_slice(&len.to_be_bytes());
    v
}

fn parse_location_value(v: &[u8]) -> Result<(u64, u32), IndexError> {
    let corrupt = IndexError::Corrupt {
        what: "chunk location value is not 12 bytes",
    };
    let v: &[u8; 12] = v.try_into().map_err(|_| corrupt)?;
    let (offset, len) = v.split_at(8);
    let offset = u64::from_be_bytes(offset.try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes"));
    Ok((offset, len))
}

fn from_tx(e: TransactionError<sled::Error>) -> IndexError {
    match e {
        TransactionError::Abort(e) | TransactionError::Storage(e) => IndexError::Storage(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::chunk_slice;
    use crate::chunking::tests::{pseudo_random, small_params};
    use crate::file::chunk_file;
    use std::fs;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        index: ChunkIndex,
    }

    fn must_fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("folder");
        fs::create_dir(&root).expect("mkdir folder");
        let index = ChunkIndex::open(&dir.path().join("index")).expect("open index");
        Fixture {
            _dir: dir,
            root,
            index,
        }
    }

    fn must_add(f: &Fixture, rel: &Path, data: &[u8]) -> Manifest {
        let full = f.root.join(rel);
        fs::write(&full, data).expect("write file");
        let m = chunk_file(&full, small_params()).expect("chunk file");
        f.index.record_file(rel, &m).expect("record file");
        m
    }

    #[test]
    fn records_locates_and_reads_verified_chunks() {
        let f = must_fixture();
        let data = pseudo_random(20, 30_000);
        let m = must_add(&f, Path::new("a.bin"), &data);
        for c in m.chunks() {
            let locs = f.index.locate(&c.id).expect("locate");
            assert!(locs.contains(&ChunkLocation {
                path: "a.bin".into(),
                offset: c.offset,
                len: c.len
            }));
            let bytes = f.index.read_chunk(&f.root, &c.id).expect("read chunk");
            assert_eq!(bytes, &data[c.offset as usize..c.end() as usize]);
        }
        let ids = f.index.file_chunk_ids(Path::new("a.bin")).expect("ids");
        assert_eq!(ids, Some(m.chunk_ids().collect()));
    }

    #[test]
    fn non_utf8_names_are_indexed() {
        let f = must_fixture();
        let name = Path::new(OsStr::from_bytes(b"caf\xe9.bin"));
        let data = pseudo_random(21, 5_000);
        let m = must_add(&f, name, &data);
        let c = m.chunks()[1];
        assert_eq!(f.index.locate(&c.id).expect("locate")[0].path, name);
        assert_eq!(
            f.index.read_chunk(&f.root, &c.id).expect("read"),
            &data[c.offset as usize..c.end() as usize]
        );
    }

    #[test]
    fn record_replaces_and_remove_drops_entries() {
        let f = must_fixture();
        let old = must_add(&f, Path::new("x"), &pseudo_random(22, 10_000));
        let new = must_add(&f, Path::new("x"), &pseudo_random(23, 10_000));
        for c in old.chunks() {
            assert!(f.index.locate(&c.id).expect("locate").is_empty());
        }
        for c in new.chunks() {
            assert_eq!(f.index.locate(&c.id).expect("locate").len(), 1);
        }
        f.index.remove_file(Path::new("x")).expect("remove");
        for c in new.chunks() {
            assert!(f.index.locate(&c.id).expect("locate").is_empty());
        }
        assert_eq!(f.index.file_chunk_ids(Path::new("x")).expect("ids"), None);
    }

    #[test]
    fn files_recorded_together_match_files_recorded_one_by_one() {
        let f = must_fixture();
        let old = must_add(&f, Path::new("x"), &pseudo_random(40, 10_000));
        let chunked = |name: &str, seed| {
            let data = pseudo_random(seed, 12_000);
            fs::write(f.root.join(name), &data).expect("write file");
            chunk_slice(&data, small_params())
        };
        let (first, second, y) = (chunked("x", 41), chunked("x", 42), chunked("y", 43));
        // "x" twice in one batch: the later record replaces the earlier one
        // and the record from before the batch.
        f.index
            .record_files(&[
                (Path::new("x"), &first),
                (Path::new("y"), &y),
                (Path::new("x"), &second),
            ])
            .expect("record files");
        for gone in old.chunks().iter().chain(first.chunks()) {
            if second.chunks().iter().any(|c| c.id == gone.id) {
                continue;
            }
            assert!(f.index.locate(&gone.id).expect("locate").is_empty());
        }
        for (name, m) in [("x", &second), ("y", &y)] {
            let ids: Vec<Hash> = m.chunks().iter().map(|c| c.id).collect();
            assert_eq!(
                f.index.file_chunk_ids(Path::new(name)).expect("ids"),
                Some(ids)
            );
            for c in m.chunks() {
                assert_eq!(
                    f.index.read_chunk(&f.root, &c.id).expect("read").len(),
                    c.len as usize
                );
            }
        }
        // One bad path refuses the whole batch.
        let err = f
            .index
            .record_files(&[(Path::new("z"), &y), (Path::new("../escape"), &y)])
            .unwrap_err();
        assert!(matches!(err, IndexError::InvalidPath { .. }), "{err}");
        assert_eq!(f.index.file_chunk_ids(Path::new("z")).expect("ids"), None);
    }

    #[test]
    fn shared_chunks_list_every_file() {
        let f = must_fixture();
        let data = pseudo_random(24, 10_000);
        let m = must_add(&f, Path::new("one"), &data);
        must_add(&f, Path::new("two"), &data);
        let locs = f.index.locate(&m.chunks()[0].id).expect("locate");
        let paths: Vec<_> = locs.iter().map(|l| l.path.clone()).collect();
        assert_eq!(paths, vec![PathBuf::from("one"), PathBuf::from("two")]);
    }

    #[test]
    fn bytes_changed_behind_the_index_are_never_returned() {
        let f = must_fixture();
        let data = pseudo_random(25, 10_000);
        let m = must_add(&f, Path::new("edited"), &data);
        let c = m.chunks()[2];
        // Same size, other bytes, without telling the index.
        let mut edited = data.clone();
        edited[c.offset as usize] ^= 0xff;
        fs::write(f.root.join("edited"), &edited).expect("edit file");
        let err = f.index.read_chunk(&f.root, &c.id).expect_err("stale");
        assert!(
            matches!(err, ChunkReadError::Stale { removed: 1, .. }),
            "{err:?}"
        );
        assert!(
            f.index.locate(&c.id).expect("locate").is_empty(),
            "entry dropped"
        );
        let err = f.index.read_chunk(&f.root, &c.id).expect_err("gone");
        assert!(matches!(err, ChunkReadError::NotFound { .. }), "{err:?}");
        // Untouched chunks of the file still read fine.
        let other = m.chunks()[0];
        assert!(f.index.read_chunk(&f.root, &other.id).is_ok());
    }

    #[test]
    fn stale_location_falls_back_to_a_valid_one() {
        let f = must_fixture();
        let data = pseudo_random(26, 10_000);
        let m = must_add(&f, Path::new("a"), &data);
        must_add(&f, Path::new("b"), &data);
        fs::write(f.root.join("a"), b"truncated").expect("truncate a");
        let c = m.chunks()[3];
        let bytes = f.index.read_chunk(&f.root, &c.id).expect("read from b");
        assert_eq!(bytes, &data[c.offset as usize..c.end() as usize]);
        let locs = f.index.locate(&c.id).expect("locate");
        assert_eq!(locs.len(), 1);
        assert_eq!(locs[0].path, Path::new("b"));
        // A missing file is stale too.
        fs::remove_file(f.root.join("b")).expect("remove b");
        assert!(matches!(
            f.index.read_chunk(&f.root, &c.id),
            Err(ChunkReadError::Stale { removed: 1, .. })
        ));
    }

    #[test]
    fn rejects_paths_that_escape_the_folder() {
        let f = must_fixture();
        let m = chunk_slice(b"hello", small_params());
        for bad in ["/etc/passwd", "../x", "a/../../x", "", "./a"] {
            let err = f.index.record_file(Path::new(bad), &m).expect_err(bad);
            assert!(
                matches!(err, IndexError::InvalidPath { .. }),
                "{bad}: {err:?}"
            );
        }
        f.index
            .record_file(Path::new("dir/sub/ok"), &m)
            .expect("nested relative path");
    }

    #[test]
    fn survives_reopen_after_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("index");
        let m = chunk_slice(&pseudo_random(27, 3_000), small_params());
        {
            let index = ChunkIndex::open(&db_path).expect("open");
            index.record_file(Path::new("f"), &m).expect("record");
            index.flush().expect("flush");
        }
        // sled's flusher thread lets go of the lock a moment after the drop.
        let mut tries = 0;
        let index = loop {
            match ChunkIndex::open(&db_path) {
                Ok(i) => break i,
                Err(e) if tries < 100 && format!("{e:?}").contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopen: {e:?}"),
            }
        };
        assert_eq!(
            index.file_chunk_ids(Path::new("f")).expect("ids"),
            Some(m.chunk_ids().collect())
        );
    }
}
