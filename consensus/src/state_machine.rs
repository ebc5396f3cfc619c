//! `StateMachineStore`: openraft's `RaftStateMachine` holding the namespace.
//!
//! All state machine data lives in one sled tree so that each applied log
//! entry is a single atomic `apply_batch` (entries, change feed, request ids,
//! last applied and membership together). Key layout:
//!
//! | key | value |
//! |---|---|
//! | `e` path | bincode(`Entry`) |
//! | `c` BE(version) path | empty (change feed) |
//! | `p` path | pre-image during a snapshot build: bincode(`Entry`), empty = absent |
//! | `k` namespace key | leaf of the namespace Merkle trie: BE version, entry hash, path (see `ns_tree`) |
//! | `b` path | inline content of the path's current entry: root, then bytes (`Command::PutInline`) |
//! | `r` BE(index) BE(seq) | bincode(`Vec<(RequestId, index, Answer)>`): the answers of one log entry (exactly-once) |
//! | `m/…` | last applied, membership, settings, install marker |
//!
//! The index of remembered answers is kept in memory (bounded by
//! [`DEDUP_CAPACITY`]); of the namespace Merkle trie only the top levels are
//! (`ns_tree`), its leaves are in sled. Both are rebuilt from sled on open
//! and after a snapshot install. Answers are stored one record per log entry
//! rather than one key per command: sled writes dominate apply cost.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftLogId, StorageIOError};
use synod_merkle::Hash;
use tokio::sync::watch;

use crate::apply::{execute, NamespaceView};
use crate::codec;
use crate::command::{Answer, Response};
use crate::ns_tree::{bucket_of_path, leaf_key, leaf_value, NsTree};
use crate::snapshot::{self, SnapshotBuilder};
use crate::storage::{NodeStorage, OpenError};
use crate::types::{
    ClusterSettings, Entry, LogId, RequestId, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

/// How many request ids (with their answers) are remembered for exactly-once.
pub const DEDUP_CAPACITY: usize = 100_000;

pub(crate) const P_ENTRY: u8 = b'e';
pub(crate) const P_CHANGE: u8 = b'c';
pub(crate) const P_ANSWERS: u8 = b'r';
pub(crate) const P_PREIMAGE: u8 = b'p';
pub(crate) const P_BLOB: u8 = b'b';
pub(crate) const M_APPLIED: &[u8] = b"m/applied";
pub(crate) const M_MEMBERSHIP: &[u8] = b"m/membership";
pub(crate) const M_SETTINGS: &[u8] = b"m/settings";
/// Set while a snapshot is being loaded; on open it means "reload it".
pub(crate) const M_INSTALLING: &[u8] = b"m/installing";

/// `prefix` then the path: the key of a per-path record.
fn path_key(prefix: u8, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + path.len());
    k.push(prefix);
    k.extend_from_slice(path.as_bytes());
    k
}

pub(crate) fn entry_key(path: &str) -> Vec<u8> {
    path_key(P_ENTRY, path)
}

pub(crate) fn blob_key(path: &str) -> Vec<u8> {
    path_key(P_BLOB, path)
}

pub(crate) fn change_key(version: u64, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + path.len());
    k.push(P_CHANGE);
    k.extend_from_slice(&version.to_be_bytes());
    k.extend_from_slice(path.as_bytes());
    k
}

pub(crate) fn answers_key(index: u64, seq: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = P_ANSWERS;
    k[1..9].copy_from_slice(&index.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// One stored record of remembered answers.
pub(crate) type AnswerRecord = Vec<(RequestId, u64, Answer)>;

/// Remembered answers of recent requests, bounded by [`DEDUP_CAPACITY`].
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    /// Request → (log index, first answer).
    pub map: HashMap<RequestId, (u64, Answer)>,
    /// Stored records, oldest first: (sled key, requests in it).
    pub records: VecDeque<([u8; 13], Vec<RequestId>)>,
}

impl Dedup {
    /// Adds a record that is (or is being) stored under `key`.
    pub fn add(&mut self, key: [u8; 13], rec: AnswerRecord) {
        let mut ids = Vec::with_capacity(rec.len());
        for (rid, idx, a) in rec {
            ids.push(rid);
            self.map.insert(rid, (idx, a));
        }
        self.records.push_back((key, ids));
    }

    /// Drops the oldest records beyond capacity; returns their sled keys.
    pub fn evict(&mut self) -> Vec<[u8; 13]> {
        let mut gone = Vec::new();
        while self.map.len() > DEDUP_CAPACITY {
            let Some((key, ids)) = self.records.pop_front() else {
                break;
            };
            for id in ids {
                self.map.remove(&id);
            }
            gone.push(key);
        }
        gone
    }
}

/// A snapshot build in progress: apply saves the state at `at` of each path
/// it changes (its pre-image) once, so the builder reads a consistent
/// namespace without holding the gate.
///
/// Remembered answers are streamed from sled too: while a build runs, apply
/// drops evicted answers from memory but defers deleting their records, so
/// every record the build captured stays readable.
#[derive(Debug, Default)]
pub(crate) struct Building {
    pub saved: std::collections::HashSet<String>,
    /// Keys of answer records evicted during the build, deleted at its end.
    pub evicted: Vec<[u8; 13]>,
}

pub(crate) fn preimage_key(path: &str) -> Vec<u8> {
    path_key(P_PREIMAGE, path)
}

/// In-memory state guarded by the apply gate (also taken by snapshot builds).
#[derive(Debug, Default)]
pub(crate) struct SmMem {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub settings: Option<ClusterSettings>,
    /// Remembered answers (exactly-once).
    pub dedup: Dedup,
    /// Set while a snapshot build reads the namespace at this log index.
    pub building: Option<Building>,
}

/// State shared by the state machine, its snapshot builders and readers.
#[derive(Debug)]
pub(crate) struct SmShared {
    pub st: NodeStorage,
    /// Serialises apply, snapshot build and install. A tokio mutex because a
    /// build holds it while its blocking task writes the snapshot file.
    pub gate: Arc<tokio::sync::Mutex<SmMem>>,
    /// One snapshot build or install at a time (a build reads sled without the gate).
    pub snapshot_lock: tokio::sync::Mutex<()>,
    /// The namespace root (top of the trie; leaves in sled). Apply holds it
    /// from writing a log entry's batch until its buckets are marked, so a
    /// root is always that of a whole number of applied entries.
    pub tree: std::sync::Mutex<NsTree>,
    pub applied_tx: watch::Sender<u64>,
}

/// The state machine of one node.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    pub(crate) shared: Arc<SmShared>,
}

pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

impl StateMachineStore {
    /// Opens the state machine of `st`, finishing an interrupted snapshot
    /// install and rebuilding the in-memory Merkle tree.
    pub fn open(st: NodeStorage) -> Result<StateMachineStore, OpenError> {
        let recover = |reason: String| OpenError::Recover {
            dir: st.dir.clone(),
            reason,
        };
        let shared = Arc::new(SmShared {
            st: st.clone(),
            gate: Arc::new(tokio::sync::Mutex::new(SmMem::default())),
            snapshot_lock: tokio::sync::Mutex::new(()),
            tree: std::sync::Mutex::new(NsTree::default()),
            applied_tx: watch::channel(0).0,
        });
        let mut mem = SmMem::default();
        if st
            .sm
            .get(M_INSTALLING)
            .map_err(|e| recover(e.to_string()))?
            .is_some()
        {
            tracing::warn!(dir = %st.dir.display(), "reloading a snapshot whose install was interrupted");
            let meta = snapshot::current_meta(&st)
                .map_err(|e| recover(e.to_string()))?
                .ok_or_else(|| recover("install marker set but no current snapshot".into()))?;
            snapshot::load(&shared, &mut mem, &meta).map_err(|e| recover(e.to_string()))?;
        }
        // Pre-images of a build cut short by a crash are useless now.
        snapshot::clear_prefix(&st.sm, P_PREIMAGE).map_err(|e| recover(e.to_string()))?;
        load_mem(&shared, &mut mem).map_err(|e| recover(e.to_string()))?;
        let applied = mem.last_applied.map_or(0, |l| l.index);
        shared.applied_tx.send_replace(applied);
        *shared
            .gate
            .try_lock()
            .map_err(|_| recover("state machine locked during open".into()))? = mem;
        Ok(StateMachineStore { shared })
    }

    /// A read handle on this state machine (stale reads, change feed).
    pub fn view(&self) -> crate::reads::StateView {
        crate::reads::StateView {
            shared: self.shared.clone(),
        }
    }
}

/// Loads `mem` and the Merkle tree from sled.
pub(crate) fn load_mem(shared: &SmShared, mem: &mut SmMem) -> Result<(), StorageError> {
    let sm = &shared.st.sm;
    let get = |k: &[u8]| sm.get(k).map_err(read_err);
    mem.last_applied = match get(M_APPLIED)? {
        Some(b) => codec::decode("last applied", &b).map_err(read_err)?,
        None => None,
    };
    mem.membership = match get(M_MEMBERSHIP)? {
        Some(b) => codec::decode("last membership", &b).map_err(read_err)?,
        None => StoredMembership::default(),
    };
    mem.settings = match get(M_SETTINGS)? {
        Some(b) => Some(codec::decode("cluster settings", &b).map_err(read_err)?),
        None => None,
    };
    mem.dedup = Dedup::default();
    for kv in sm.scan_prefix([P_ANSWERS]) {
        let (k, v) = kv.map_err(read_err)?;
        let key: [u8; 13] = k.as_ref().try_into().map_err(|_| {
            read_err(std::io::Error::other(format!(
                "answer record key of {} bytes",
                k.len()
            )))
        })?;
        let rec: AnswerRecord = codec::decode("remembered answers", &v).map_err(read_err)?;
        mem.dedup.add(key, rec);
    }
    // Records whose deletion a snapshot build deferred and a crash cut short:
    // evict them now, so every node remembers the same answers.
    let gone = mem.dedup.evict();
    if !gone.is_empty() {
        let mut b = sled::Batch::default();
        for k in gone {
            b.remove(&k[..]);
        }
        sm.apply_batch(b).map_err(read_err)?;
    }
    ensure_leaf_index(sm)?;
    let tree = NsTree::rebuild(sm).map_err(read_err)?;
    *shared.tree.lock().unwrap_or_else(|p| p.into_inner()) = tree;
    Ok(())
}

/// Writes the Merkle leaves of a store created before they were kept in
/// sled (entries but no leaves), in bounded batches.
fn ensure_leaf_index(sm: &sled::Tree) -> Result<(), StorageError> {
    let has_leaves = sm
        .scan_prefix([crate::ns_tree::P_LEAF])
        .next()
        .transpose()
        .map_err(read_err)?
        .is_some();
    if has_leaves {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for kv in sm.scan_prefix([P_ENTRY]) {
        let (k, v) = kv.map_err(read_err)?;
        let path = std::str::from_utf8(&k[1..]).map_err(read_err)?;
        let e: Entry = codec::decode("namespace entry", &v).map_err(read_err)?;
        let (key, _) = bucket_of_path(path);
        batch.insert(
            &leaf_key(&key)[..],
            leaf_value(e.version, &e.tree_hash(), path),
        );
        n += 1;
        if n % 64 == 0 {
            sm.apply_batch(std::mem::take(&mut batch))
                .map_err(read_err)?;
        }
    }
    sm.apply_batch(batch).map_err(read_err)
}

/// The sled-backed view one log entry is applied through: reads see the batch's own
/// earlier writes through `overlay`.
struct BatchView<'a> {
    sm: &'a sled::Tree,
    batch: sled::Batch,
    overlay: HashMap<String, Entry>,
    blob_overlay: HashMap<String, Option<Vec<u8>>>,
    /// Buckets of the leaves written, and whether each path is new.
    tree_updates: Vec<(usize, bool)>,
    settings: &'a mut Option<ClusterSettings>,
    settings_changed: bool,
    error: Option<StorageError>,
    building: Option<&'a mut Building>,
}

impl NamespaceView for BatchView<'_> {
    fn get(&mut self, path: &str) -> Option<Entry> {
        if let Some(e) = self.overlay.get(path) {
            return Some(e.clone());
        }
        match self.sm.get(entry_key(path)) {
            Ok(None) => None,
            Ok(Some(b)) => match codec::decode("namespace entry", &b) {
                Ok(e) => Some(e),
                Err(e) => {
                    self.error.get_or_insert(read_err(e));
                    None
                }
            },
            Err(e) => {
                self.error.get_or_insert(read_err(e));
                None
            }
        }
    }

    fn set(&mut self, path: &str, old: Option<&Entry>, new: Entry) {
        if let Some(b) = self.building.as_deref_mut() {
            // First change since the build started: `old` is the state at `b.at`.
            if b.saved.insert(path.to_owned()) {
                let pre = old.map(codec::encode).unwrap_or_default();
                self.batch.insert(preimage_key(path), pre);
            }
        }
        if let Some(old) = old {
            self.batch.remove(change_key(old.version, path));
        }
        self.batch.insert(change_key(new.version, path), &[][..]);
        // Encode once: the same bytes are stored and hashed (see `Entry::tree_hash`).
        let bytes = codec::encode(&new);
        let (key, bucket) = bucket_of_path(path);
        self.batch.insert(
            &leaf_key(&key)[..],
            leaf_value(new.version, &Hash::of(&bytes), path),
        );
        self.tree_updates.push((bucket, old.is_none()));
        self.batch.insert(entry_key(path), bytes);
        self.overlay.insert(path.to_owned(), new);
    }

    fn settings(&mut self) -> Option<ClusterSettings> {
        *self.settings
    }

    fn set_settings(&mut self, s: ClusterSettings) {
        *self.settings = Some(s);
        self.settings_changed = true;
    }

    fn blob(&mut self, path: &str) -> Option<Vec<u8>> {
        if let Some(b) = self.blob_overlay.get(path) {
            return b.clone();
        }
        match self.sm.get(blob_key(path)) {
            Ok(b) => b.map(|b| b.to_vec()),
            Err(e) => {
                self.error.get_or_insert(read_err(e));
                None
            }
        }
    }

    fn set_blob(&mut self, path: &str, blob: Option<Vec<u8>>) {
        match &blob {
            Some(b) => self.batch.insert(blob_key(path), b.as_slice()),
            None => self.batch.remove(blob_key(path)),
        }
        self.blob_overlay.insert(path.to_owned(), blob);
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let mem = self.shared.gate.lock().await;
        Ok((mem.last_applied, mem.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut mem = self.shared.gate.lock().await;
        let mem = &mut *mem;
        let sm = &self.shared.st.sm;
        let mut responses = Vec::new();
        // One atomic sled batch per log entry: its commands, its answers and
        // `last_applied`. Per entry rather than per call because sled 0.34
        // keeps far more memory than the data after very large batches (see
        // `snapshot::LOAD_BATCH`), and a call can carry many entries.
        for ent in entries {
            let log_id = *ent.get_log_id();
            let index = log_id.index;
            let mut resp = Response::default();
            let mut settings = mem.settings;
            let mut membership = None;
            let mut record: AnswerRecord = Vec::new();
            // Position in `record` of each request answered in this entry.
            let mut answered: HashMap<RequestId, usize> = HashMap::new();
            let mut view = BatchView {
                sm,
                batch: sled::Batch::default(),
                overlay: HashMap::new(),
                blob_overlay: HashMap::new(),
                tree_updates: Vec::new(),
                settings: &mut settings,
                settings_changed: false,
                error: None,
                building: mem.building.as_mut(),
            };
            match ent.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m));
                }
                EntryPayload::Normal(req) => {
                    resp.answers.reserve(req.commands.len());
                    for (rid, cmd) in &req.commands {
                        let first = match answered.get(rid) {
                            Some(&at) => Some(record[at].2.clone()),
                            None => mem.dedup.map.get(rid).map(|(_, a)| a.clone()),
                        };
                        if let Some(a) = first {
                            // A retry: answer as the first time, apply nothing.
                            resp.answers.push(a);
                            continue;
                        }
                        let a = execute(&mut view, index, cmd);
                        if let Some(e) = view.error.take() {
                            return Err(e);
                        }
                        answered.insert(*rid, record.len());
                        record.push((*rid, index, a.clone()));
                        resp.answers.push(a);
                    }
                }
            }
            let BatchView {
                mut batch,
                tree_updates,
                settings_changed,
                ..
            } = view;
            let record_key = answers_key(index, 0);
            if !record.is_empty() {
                batch.insert(&record_key[..], codec::encode(&record));
            }
            batch.insert(M_APPLIED, codec::encode(&Some(log_id)));
            if let Some(m) = &membership {
                batch.insert(M_MEMBERSHIP, codec::encode(m));
            }
            if let Some(s) = settings.as_ref().filter(|_| settings_changed) {
                batch.insert(M_SETTINGS, codec::encode(s));
            }
            if !record.is_empty() {
                mem.dedup.add(record_key, record);
                let mut gone = mem.dedup.evict();
                if let Some(b) = mem.building.as_mut() {
                    b.evicted.append(&mut gone);
                }
                // In the entry's own batch: once the memory is full every
                // entry evicts, and each `apply_batch` costs sled two IO
                // buffer writes (see `log_store.rs`, `append`).
                for k in gone {
                    batch.remove(&k[..]);
                }
            }
            {
                // See `SmShared::tree`: readers never see the leaves of
                // this entry without its buckets marked.
                let mut tree = self.shared.tree.lock().unwrap_or_else(|p| p.into_inner());
                sm.apply_batch(batch)
                    .map_err(|e| StorageIOError::apply(log_id, &e))?;
                for (bucket, new_path) in tree_updates {
                    tree.mark(bucket, new_path);
                }
            }
            mem.last_applied = Some(log_id);
            mem.settings = settings;
            if let Some(m) = membership {
                mem.membership = m;
            }
            responses.push(resp);
        }
        if let Some(l) = mem.last_applied {
            self.shared.applied_tx.send_replace(l.index);
        }
        Ok(responses)
    }
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        snapshot::begin_receiving(&self.shared).await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        snapshot::install(&self.shared, meta, snapshot).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::Snapshot<TypeConfig>>, StorageError> {
        snapshot::current(&self.shared).await
    }
}
