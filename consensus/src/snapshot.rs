//! Snapshot files: build, verify, install, all streaming with bounded memory.
//!
//! File format: `MAGIC`, then frames (`u32` LE length + bincode([`Frame`])):
//! one `Header`, `Entries` and `Dedup` frames of at most [`FRAME_ITEMS`] items,
//! `Blobs` frames (inline content of the entries, at most [`BLOB_FRAME_BYTES`]
//! each), one `End` with the counts; then the 32-byte BLAKE3 of everything
//! before it.
//! A file is fully verified (checksum, every frame decodes, header matches
//! the metadata openraft gave) before the state machine is touched.
//!
//! sled has no point-in-time read view, so a build captures the small state
//! (last applied, membership, settings, remembered answers) under the apply
//! gate and then streams without it: while it runs, apply saves the
//! pre-image of each path it changes (`Building`), and the builder uses the
//! pre-image for any entry newer than the captured index. The header's
//! namespace root is the in-memory trie's at the capture (`ns_tree`), then
//! the entries stream out in path order.
//!
//! A build and an install hold one frame ([`FRAME_ITEMS`]) beyond what the
//! state machine keeps anyway (the Merkle trie, 64 bytes per path, which an
//! install derives again from the entries it wrote); an install writes sled
//! in batches of [`LOAD_BATCH`].

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::{RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use synod_merkle::Hash;
use tokio::io::AsyncSeekExt;

use crate::apply::{may_have_blob, split_blob};
use crate::codec;
use crate::command::Answer;
use crate::state_machine::{
    answers_key, blob_key, entry_key, feed_key, load_mem, preimage_key, AnswerRecord, Building,
    SmMem, SmShared, M_APPLIED, M_INSTALLING, M_MEMBERSHIP, M_SETTINGS, P_ENTRY, P_PREIMAGE,
};
use crate::storage::NodeStorage;
use crate::types::{ClusterSettings, Entry, RequestId, SnapshotMeta, StorageError, TypeConfig};

const MAGIC: &[u8; 12] = b"SYNOD-SNAP1\n";
/// Items per frame: bounds the memory of build and install.
pub const FRAME_ITEMS: usize = 1024;
/// Bytes of inline content after which a `Blobs` frame is written.
pub const BLOB_FRAME_BYTES: usize = 1 << 20;
/// Namespace entries per sled batch while loading a snapshot. sled 0.34
/// keeps far more memory than the data after large batches (measured: 100 k
/// entries written in batches of 1024 entries grew RSS by 350 MB, in batches
/// of 64 by 22 MB, page cache 4 MiB), so loading writes small batches. The
/// install marker, not batch atomicity, protects a load cut short by a crash.
const LOAD_BATCH: usize = 64;
const CURRENT_META: &str = "snapshot";

static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

/// One record of a snapshot file.
#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Header {
        meta: SnapshotMeta,
        settings: Option<ClusterSettings>,
        root: Hash,
    },
    Entries(Vec<(String, Entry)>),
    Dedup(Vec<(u64, RequestId, Answer)>),
    End {
        entries: u64,
        dedups: u64,
    },
    /// Inline content (`b` values: root, then bytes) of entries of this
    /// snapshot, by path.
    Blobs(Vec<(String, serde_bytes::ByteBuf)>),
}

/// Why a snapshot file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot i/o on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a synod snapshot.
    #[error("snapshot {path} does not start with the synod snapshot magic")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// A frame did not decode.
    #[error("snapshot {path}: frame at byte {offset} does not decode")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Where the frame starts.
        offset: u64,
        /// The cause.
        #[source]
        source: codec::DecodeError,
    },
    /// Structure is wrong (missing header, counts, checksum, trailing data).
    #[error("snapshot {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// sled failed while loading.
    #[error("snapshot {path}: storage failed while loading")]
    Sled {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: sled::Error,
    },
}

fn snap_err(meta: Option<&SnapshotMeta>, e: &SnapshotError) -> StorageError {
    StorageIOError::read_snapshot(meta.map(|m| m.signature()), e).into()
}

fn file_for(st: &NodeStorage, id: &str) -> PathBuf {
    st.snapshot_dir().join(format!("{id}.snap"))
}

struct FrameWriter {
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    path: PathBuf,
}

impl FrameWriter {
    fn create(path: PathBuf) -> Result<Self, SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: path.clone(),
            source,
        };
        let f = File::create(&path).map_err(io)?;
        let mut w = FrameWriter {
            out: BufWriter::with_capacity(128 << 10, f),
            hasher: blake3::Hasher::new(),
            path,
        };
        w.write_raw(MAGIC)?;
        Ok(w)
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<(), SnapshotError> {
        self.hasher.update(b);
        self.out.write_all(b).map_err(|source| SnapshotError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn frame(&mut self, f: &Frame) -> Result<(), SnapshotError> {
        let b = codec::try_encode(f).map_err(|e| SnapshotError::Malformed {
            path: self.path.clone(),
            reason: format!("frame does not encode: {e}"),
        })?;
        let len = u32::try_from(b.len()).map_err(|_| SnapshotError::Malformed {
            path: self.path.clone(),
            reason: format!("frame of {} bytes", b.len()),
        })?;
        self.write_raw(&len.to_le_bytes())?;
        self.write_raw(&b)
    }

    /// Writes the checksum and fsyncs.
    fn finish(mut self) -> Result<(), SnapshotError> {
        let h = self.hasher.finalize();
        let io = |source| SnapshotError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.write_all(h.as_bytes()).map_err(io)?;
        let f = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)
    }
}

struct FrameReader {
    inp: BufReader<File>,
    hasher: blake3::Hasher,
    offset: u64,
    path: PathBuf,
}

impl FrameReader {
    fn open(path: &Path) -> Result<Self, SnapshotError> {
        let f = File::open(path).map_err(|source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut r = FrameReader {
            inp: BufReader::with_capacity(128 << 10, f),
            hasher: blake3::Hasher::new(),
            offset: 0,
            path: path.to_owned(),
        };
        let mut m = [0u8; 12];
        if r.read_exact(&mut m, true).is_err() || &m != MAGIC {
            return Err(SnapshotError::BadMagic {
                path: path.to_owned(),
            });
        }
        Ok(r)
    }

    fn malformed(&self, reason: impl Into<String>) -> SnapshotError {
        SnapshotError::Malformed {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], hash: bool) -> Result<(), SnapshotError> {
        self.inp.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.malformed(format!("truncated at byte {}", self.offset))
            } else {
                SnapshotError::Io {
                    path: self.path.clone(),
                    source: e,
                }
            }
        })?;
        if hash {
            self.hasher.update(buf);
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn next(&mut self) -> Result<Frame, SnapshotError> {
        let start = self.offset;
        let mut len = [0u8; 4];
        self.read_exact(&mut len, true)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > codec::MAX_DECODE {
            return Err(self.malformed(format!("frame at byte {start} claims {len} bytes")));
        }
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, true)?;
        codec::decode("snapshot frame", &buf).map_err(|source| SnapshotError::Decode {
            path: self.path.clone(),
            offset: start,
            source,
        })
    }

    /// Checks the trailing checksum and that nothing follows it.
    fn finish(mut self) -> Result<(), SnapshotError> {
        let expected = self.hasher.finalize();
        let mut h = [0u8; 32];
        self.read_exact(&mut h, false)?;
        if &h != expected.as_bytes() {
            return Err(self.malformed("checksum mismatch"));
        }
        let mut extra = [0u8; 1];
        match self.inp.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(self.malformed("data after the checksum")),
            Err(source) => Err(SnapshotError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// Streams through a snapshot file; `each` sees every data frame.
fn read_file(
    path: &Path,
    mut each: impl FnMut(&Frame) -> Result<(), SnapshotError>,
) -> Result<SnapshotMeta, SnapshotError> {
    let mut r = FrameReader::open(path)?;
    let Frame::Header { meta, .. } = r.next()? else {
        return Err(r.malformed("first frame is not a header"));
    };
    let (mut n_entries, mut n_dedup) = (0u64, 0u64);
    loop {
        let f = r.next()?;
        match &f {
            Frame::Entries(v) => n_entries += v.len() as u64,
            Frame::Dedup(v) => n_dedup += v.len() as u64,
            Frame::End { entries, dedups } => {
                if (*entries, *dedups) != (n_entries, n_dedup) {
                    return Err(r.malformed(format!(
                        "end frame counts {entries}/{dedups}, file holds {n_entries}/{n_dedup}"
                    )));
                }
                break;
            }
            Frame::Header { .. } => return Err(r.malformed("second header")),
            Frame::Blobs(_) => {}
        }
        each(&f)?;
    }
    r.finish()?;
    Ok(meta)
}

/// Reads only the header of a verified file: settings and Merkle root.
fn read_header(
    path: &Path,
) -> Result<(SnapshotMeta, Option<ClusterSettings>, Hash), SnapshotError> {
    let mut r = FrameReader::open(path)?;
    match r.next()? {
        Frame::Header {
            meta,
            settings,
            root,
        } => Ok((meta, settings, root)),
        _ => Err(r.malformed("first frame is not a header")),
    }
}

/// Builds snapshots for openraft.
#[derive(Debug)]
pub struct SnapshotBuilder {
    pub(crate) shared: std::sync::Arc<SmShared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<openraft::Snapshot<TypeConfig>, StorageError> {
        let _one = self.shared.snapshot_lock.lock().await;
        // Capture the small state under the gate, then let apply go on while the
        // namespace is streamed out (apply keeps pre-images meanwhile).
        let cap = {
            let mut mem = self.shared.gate.lock().await;
            let at = mem.last_applied.map_or(0, |l| l.index);
            // The remembered answers at `at`: these stored records, which
            // stay in sled until the build ends (see `Building`).
            let dedup = mem.dedup.records.front().map(|(k, _)| *k);
            mem.building = Some(Building::default());
            // The trie is in memory and apply is held: this is the root at `at`.
            let root = self
                .shared
                .tree
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .root();
            Capture {
                at,
                root,
                last_applied: mem.last_applied,
                membership: mem.membership.clone(),
                settings: mem.settings,
                dedup,
            }
        };
        let shared = self.shared.clone();
        let res = tokio::task::spawn_blocking(move || write_snapshot(&shared, &cap)).await;
        {
            let mut mem = self.shared.gate.lock().await;
            if let Some(b) = mem.building.take() {
                let mut batch = sled::Batch::default();
                for k in b.evicted {
                    batch.remove(&k[..]);
                }
                self.shared
                    .st
                    .sm
                    .apply_batch(batch)
                    .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            }
            clear_prefix(&self.shared.st.sm, P_PREIMAGE)
                .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        }
        let meta = res
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let f = tokio::fs::File::open(file_for(&self.shared.st, &meta.snapshot_id))
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(id = %meta.snapshot_id, "snapshot built");
        Ok(openraft::Snapshot {
            meta,
            snapshot: Box::new(f),
        })
    }
}

/// What a build captures under the gate.
struct Capture {
    at: u64,
    /// The namespace root at `at`.
    root: Hash,
    last_applied: Option<crate::types::LogId>,
    membership: crate::types::StoredMembership,
    settings: Option<ClusterSettings>,
    /// Key of the oldest remembered answer record (`None`: none remembered).
    dedup: Option<[u8; 13]>,
}

/// Deletes every key under `prefix`, in bounded batches.
pub(crate) fn clear_prefix(tree: &sled::Tree, prefix: u8) -> Result<(), sled::Error> {
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in tree.scan_prefix([prefix]).keys().take(10_000) {
            batch.remove(k?);
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        tree.apply_batch(batch)?;
    }
}

fn write_snapshot(shared: &SmShared, cap: &Capture) -> Result<SnapshotMeta, SnapshotError> {
    let st = &shared.st;
    let seq = SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed);
    let id = match cap.last_applied {
        Some(l) => format!(
            "{}-{}-{}-{seq}",
            l.leader_id.term, l.leader_id.node_id, l.index
        ),
        None => format!("0-0-0-{seq}"),
    };
    let meta = SnapshotMeta {
        last_log_id: cap.last_applied,
        last_membership: cap.membership.clone(),
        snapshot_id: id.clone(),
    };
    let path = file_for(st, &id);
    let tmp = path.with_extension("tmp");
    let root = cap.root;
    let mut w = FrameWriter::create(tmp.clone())?;
    w.frame(&Frame::Header {
        meta: meta.clone(),
        settings: cap.settings,
        root,
    })?;
    let sled_err = |source| SnapshotError::Sled {
        path: path.clone(),
        source,
    };
    let mut n_entries = 0u64;
    let mut buf = Vec::with_capacity(FRAME_ITEMS);
    // Inline content of the entries. A blob that no longer matches its entry
    // at `cap.at` (the path changed during the build) is left out; the node
    // then fetches the content from peers.
    let mut bbuf: Vec<(String, serde_bytes::ByteBuf)> = Vec::new();
    let mut bbytes = 0usize;
    for kv in st.sm.scan_prefix([P_ENTRY]) {
        let (k, v) = kv.map_err(sled_err)?;
        let p = String::from_utf8_lossy(&k[1..]).into_owned();
        let decode = |v: &[u8]| {
            codec::decode::<Entry>("namespace entry", v).map_err(|source| SnapshotError::Decode {
                path: path.clone(),
                offset: 0,
                source,
            })
        };
        let mut e = decode(&v)?;
        if e.version > cap.at {
            // Changed since the capture: use the state at `cap.at`, which apply
            // saved in the same atomic batch as the change.
            match st.sm.get(preimage_key(&p)).map_err(sled_err)? {
                Some(pre) if pre.is_empty() => continue,
                Some(pre) => e = decode(&pre)?,
                None => {
                    return Err(SnapshotError::Malformed {
                        path: path.clone(),
                        reason: format!("path {p:?} changed during the build without a pre-image"),
                    })
                }
            }
        }
        if may_have_blob(Some(&e)) {
            if let Some(bv) = st.sm.get(blob_key(&p)).map_err(sled_err)? {
                if split_blob(&bv).is_some_and(|(root, _)| root == e.root) {
                    bbytes += bv.len();
                    bbuf.push((p.clone(), serde_bytes::ByteBuf::from(bv.to_vec())));
                }
            }
        }
        buf.push((p, e));
        if bbytes >= BLOB_FRAME_BYTES || bbuf.len() == FRAME_ITEMS {
            bbytes = 0;
            w.frame(&Frame::Blobs(std::mem::take(&mut bbuf)))?;
        }
        if buf.len() == FRAME_ITEMS {
            n_entries += buf.len() as u64;
            w.frame(&Frame::Entries(std::mem::take(&mut buf)))?;
        }
    }
    if !buf.is_empty() {
        n_entries += buf.len() as u64;
        w.frame(&Frame::Entries(buf))?;
    }
    if !bbuf.is_empty() {
        w.frame(&Frame::Blobs(bbuf))?;
    }
    let mut n_dedup = 0u64;
    let mut dbuf = Vec::with_capacity(FRAME_ITEMS);
    // Records in key order (= age order) from the oldest remembered one up to
    // those written at `cap.at`; later ones belong to entries after the capture.
    let last = answers_key(cap.at, u32::MAX);
    let records = match cap.dedup {
        Some(first) => st.sm.range(first..=last),
        None => st.sm.range(last..last),
    };
    for kv in records {
        let (_, v) = kv.map_err(sled_err)?;
        let rec: AnswerRecord =
            codec::decode("remembered answers", &v).map_err(|source| SnapshotError::Decode {
                path: path.clone(),
                offset: 0,
                source,
            })?;
        for (rid, i, a) in rec {
            dbuf.push((i, rid, a));
            if dbuf.len() == FRAME_ITEMS {
                n_dedup += dbuf.len() as u64;
                w.frame(&Frame::Dedup(std::mem::take(&mut dbuf)))?;
            }
        }
    }
    if !dbuf.is_empty() {
        n_dedup += dbuf.len() as u64;
        w.frame(&Frame::Dedup(dbuf))?;
    }
    w.frame(&Frame::End {
        entries: n_entries,
        dedups: n_dedup,
    })?;
    w.finish()?;
    rename_durably(&tmp, &path)?;
    // The state this snapshot covers must be durable before the log behind it is purged.
    set_current(st, &meta)?;
    Ok(meta)
}

/// Renames a finished (fsynced) snapshot file into place and fsyncs the
/// directory, so the name survives a crash before `set_current` records it.
fn rename_durably(tmp: &Path, path: &Path) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::rename(tmp, path).map_err(io)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Records `meta` as the current snapshot, flushes, and deletes older files.
fn set_current(st: &NodeStorage, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let path = file_for(st, &meta.snapshot_id);
    st.meta_put(CURRENT_META, meta)
        .map_err(|e| SnapshotError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    st.flush_all_blocking()
        .map_err(|source| SnapshotError::Sled {
            path: path.clone(),
            source,
        })?;
    if let Ok(rd) = std::fs::read_dir(st.snapshot_dir()) {
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            let is_snap = p.extension().is_some_and(|x| x == "snap");
            if is_snap && p != path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    Ok(())
}

/// The metadata of the current snapshot, if any.
pub(crate) fn current_meta(
    st: &NodeStorage,
) -> Result<Option<SnapshotMeta>, crate::storage::MetaError> {
    st.meta_get(CURRENT_META)
}

pub(crate) async fn current(
    shared: &SmShared,
) -> Result<Option<openraft::Snapshot<TypeConfig>>, StorageError> {
    let Some(meta) =
        current_meta(&shared.st).map_err(|e| StorageIOError::read_snapshot(None, &e))?
    else {
        return Ok(None);
    };
    let f = tokio::fs::File::open(file_for(&shared.st, &meta.snapshot_id))
        .await
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
    Ok(Some(openraft::Snapshot {
        meta,
        snapshot: Box::new(f),
    }))
}

/// An anonymous file to receive a snapshot into (unlinked at once, so an
/// abandoned transfer leaves nothing behind).
pub(crate) async fn begin_receiving(
    shared: &SmShared,
) -> Result<Box<tokio::fs::File>, StorageError> {
    let seq = SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed);
    let p = shared
        .st
        .snapshot_dir()
        .join(format!("recv-{}-{seq}.part", std::process::id()));
    let f = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
    let _ = tokio::fs::remove_file(&p).await;
    Ok(Box::new(f))
}

/// Verifies a received snapshot, makes it current, and loads it.
pub(crate) async fn install(
    shared: &std::sync::Arc<SmShared>,
    meta: &SnapshotMeta,
    mut data: Box<tokio::fs::File>,
) -> Result<(), StorageError> {
    let werr = |e: &dyn std::error::Error| {
        StorageIOError::write_snapshot(Some(meta.signature()), &anyerr(e))
    };
    let _one = shared.snapshot_lock.lock().await;
    let path = file_for(&shared.st, &meta.snapshot_id);
    let tmp = path.with_extension("tmp");
    data.rewind().await.map_err(|e| werr(&e))?;
    {
        let mut out = tokio::fs::File::create(&tmp).await.map_err(|e| werr(&e))?;
        tokio::io::copy(&mut data, &mut out)
            .await
            .map_err(|e| werr(&e))?;
        out.sync_all().await.map_err(|e| werr(&e))?;
    }
    let mut mem = shared.gate.clone().lock_owned().await;
    let shared2 = shared.clone();
    let meta2 = meta.clone();
    tokio::task::spawn_blocking(move || -> Result<(), SnapshotError> {
        let got = read_file(&tmp, |_| Ok(())).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        if got != meta2 {
            let _ = std::fs::remove_file(&tmp);
            return Err(SnapshotError::Malformed {
                path: tmp,
                reason: format!("header says {got}, leader sent {meta2}"),
            });
        }
        rename_durably(&tmp, &path)?;
        shared2
            .st
            .sm
            .insert(M_INSTALLING, meta2.snapshot_id.as_bytes())
            .map_err(|source| SnapshotError::Sled {
                path: path.clone(),
                source,
            })?;
        set_current(&shared2.st, &meta2)?;
        load(&shared2, &mut mem, &meta2)
    })
    .await
    .map_err(|e| werr(&e))?
    .map_err(|e| snap_err(Some(meta), &e))?;
    tracing::info!(id = %meta.snapshot_id, "snapshot installed");
    Ok(())
}

fn anyerr(e: &dyn std::error::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Marks a snapshot install under way (`SmShared::installs` odd) until
/// dropped, which happens before the `visible` lock it is taken under.
struct Installing<'a>(&'a AtomicU64);

impl<'a> Installing<'a> {
    fn begin(installs: &'a AtomicU64) -> Installing<'a> {
        installs.fetch_add(1, Ordering::SeqCst);
        Installing(installs)
    }
}

impl Drop for Installing<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Replaces the state machine with the verified snapshot file of `meta`.
pub(crate) fn load(
    shared: &SmShared,
    mem: &mut SmMem,
    meta: &SnapshotMeta,
) -> Result<(), SnapshotError> {
    let st = &shared.st;
    let path = file_for(st, &meta.snapshot_id);
    let sled_err = |source| SnapshotError::Sled {
        path: path.clone(),
        source,
    };
    let (_, settings, root) = read_header(&path)?;
    // Readers of entries and of the change feed see the state before or
    // after, never one partly cleared or refilled.
    let _visible = shared.visible.write().unwrap_or_else(|p| p.into_inner());
    let _installing = Installing::begin(&shared.installs);
    // Clear in bounded batches.
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in st.sm.iter().keys() {
            let k = k.map_err(sled_err)?;
            if k.as_ref() == M_INSTALLING {
                continue;
            }
            batch.remove(k);
            n += 1;
            if n == 10_000 {
                break;
            }
        }
        if n == 0 {
            break;
        }
        st.sm.apply_batch(batch).map_err(sled_err)?;
    }
    // What it would redo belongs to the state just cleared.
    st.sm_redo
        .remove(crate::state_machine::REDO_KEY)
        .map_err(sled_err)?;
    let mut failure = None;
    let mut frame_no = 0u32;
    // Distinguishes feed records of one version written from several parts
    // (applied entries use 0).
    let mut feed_seq = 0u32;
    read_file(&path, |f| {
        frame_no += 1;
        let res = match f {
            Frame::Entries(v) => v.chunks(LOAD_BATCH).try_for_each(|part| {
                let mut batch = sled::Batch::default();
                // The change feed: one record per version in this part.
                let mut by_version: std::collections::BTreeMap<u64, Vec<String>> =
                    Default::default();
                for (p, e) in part {
                    batch.insert(entry_key(p), codec::encode(e));
                    by_version.entry(e.version).or_default().push(p.to_string());
                }
                for (v, paths) in by_version {
                    feed_seq += 1;
                    batch.insert(&feed_key(v, feed_seq)[..], codec::encode(&paths));
                }
                st.sm.apply_batch(batch)
            }),
            Frame::Blobs(v) => v.chunks(LOAD_BATCH).try_for_each(|part| {
                let mut batch = sled::Batch::default();
                for (p, b) in part {
                    batch.insert(blob_key(p), b.as_slice());
                }
                st.sm.apply_batch(batch)
            }),
            Frame::Dedup(v) => {
                let idx = v.iter().map(|(i, _, _)| *i).max().unwrap_or(0);
                let rec: AnswerRecord = v.iter().map(|(i, rid, a)| (*rid, *i, a.clone())).collect();
                st.sm
                    .insert(&answers_key(idx, frame_no)[..], codec::encode(&rec))
                    .map(|_| ())
            }
            _ => Ok(()),
        };
        if let Err(e) = res {
            failure.get_or_insert(e);
        }
        Ok(())
    })?;
    if let Some(e) = failure {
        return Err(sled_err(e));
    }
    let mut batch = sled::Batch::default();
    batch.insert(M_APPLIED, codec::encode(&meta.last_log_id));
    batch.insert(M_MEMBERSHIP, codec::encode(&meta.last_membership));
    match settings {
        Some(s) => batch.insert(M_SETTINGS, codec::encode(&s)),
        None => batch.remove(M_SETTINGS),
    }
    batch.remove(M_INSTALLING);
    st.sm.apply_batch(batch).map_err(sled_err)?;
    st.sm_db.flush().map_err(sled_err)?;
    load_mem(shared, mem).map_err(|e| SnapshotError::Malformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let got = shared.tree.lock().unwrap_or_else(|p| p.into_inner()).root();
    if got != root {
        return Err(SnapshotError::Malformed {
            path: path.clone(),
            reason: format!("namespace root {got} does not match the header's {root}"),
        });
    }
    let applied = mem.last_applied.map_or(0, |l| l.index);
    shared.applied_tx.send_replace(applied);
    Ok(())
}

/// Verifies a snapshot file on disk without touching any state; for tools and tests.
pub fn verify_file(path: &Path) -> Result<SnapshotMeta, SnapshotError> {
    read_file(path, |_| Ok(()))
}
