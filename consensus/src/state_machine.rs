//! `StateMachineStore`: openraft's `RaftStateMachine` holding the namespace.
//!
//! Each applied log entry is atomic: its writes (entries, change feed,
//! request ids, last applied and membership) are first stored together as
//! one redo record ([`Writes`], one sled insert), then made one by one.
//! sled recovers a prefix of its writes after a crash, so either the redo
//! record is lost and so is every write after it, or [`StateMachineStore::open`]
//! replays it. Not a `sled::Batch`: sled seals and writes its IO buffer
//! twice for every batch, which cost 3–4 ms per entry of 60 commands while
//! the log was being flushed. Readers of the namespace take
//! [`SmShared::visible`] to see whole entries only. Key layout of the
//! state machine tree:
//!
//! | key | value |
//! |---|---|
//! | `e` path | bincode(`Entry`) |
//! | `f` BE(index) BE(seq) | bincode(`Vec<String>`): the paths written at that log index (change feed, see [`Feed`]) |
//! | `p` path | pre-image during a snapshot build: bincode(`Entry`), empty = absent |
//! | `b` path | inline content of the path's current entry: root, then bytes (`Command::PutInline`) |
//! | `r` BE(index) BE(seq) | bincode(`Vec<(RequestId, index, Answer)>`): the answers of one log entry (exactly-once) |
//! | `m/…` | last applied, membership, settings, install marker |
//!
//! The index of remembered answers is kept in memory (bounded by
//! [`DEDUP_CAPACITY`]), and so is the namespace Merkle trie (64 bytes per
//! path, derived from the `e` keys: see `ns_tree`). Both are rebuilt from
//! sled on open and after a snapshot install. Answers are stored one record per log entry
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
use crate::ns_tree::{self, NsTree, Slot};
use crate::snapshot::{self, SnapshotBuilder};
use crate::storage::{NodeStorage, OpenError};
use crate::types::{
    ClusterSettings, Entry, LogId, RequestId, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

/// How many request ids (with their answers) are remembered for exactly-once.
pub const DEDUP_CAPACITY: usize = 100_000;

pub(crate) const P_ENTRY: u8 = b'e';
pub(crate) const P_FEED: u8 = b'f';
/// Change feed of stores written by earlier versions: one key per path.
const P_OLD_CHANGE: u8 = b'c';
pub(crate) const P_ANSWERS: u8 = b'r';
pub(crate) const P_PREIMAGE: u8 = b'p';
pub(crate) const P_BLOB: u8 = b'b';
/// Merkle leaves of stores written by earlier versions (no longer kept).
const P_OLD_LEAF: u8 = b'k';
pub(crate) const M_APPLIED: &[u8] = b"m/applied";
pub(crate) const M_MEMBERSHIP: &[u8] = b"m/membership";
pub(crate) const M_SETTINGS: &[u8] = b"m/settings";
/// How many paths listed in the change feed were written again since (see [`Feed`]).
pub(crate) const M_FEED_DEAD: &[u8] = b"m/feed-dead";
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

/// `prefix`, BE(index), BE(seq): the key of a per-log-entry record.
fn index_key(prefix: u8, index: u64, seq: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = prefix;
    k[1..9].copy_from_slice(&index.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn answers_key(index: u64, seq: u32) -> [u8; 13] {
    index_key(P_ANSWERS, index, seq)
}

/// The key of a change feed record: the paths written at log index `index`.
pub(crate) fn feed_key(index: u64, seq: u32) -> [u8; 13] {
    index_key(P_FEED, index, seq)
}

/// Splits a feed record's key into its log index.
pub(crate) fn feed_index(k: &[u8]) -> Option<u64> {
    (k.len() == 13 && k[0] == P_FEED)
        .then(|| u64::from_be_bytes(k[1..9].try_into().expect("8 bytes")))
}

/// Key of the redo record in the `redo` tree.
pub(crate) const REDO_KEY: &[u8] = b"redo";

/// The writes of one log entry, in order: a key and its new value, or
/// `None` to remove it. Stored whole as the redo record before any of them
/// is made (see the module docs).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Writes {
    index: u64,
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Writes {
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops
            .push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((key.as_ref().to_vec(), None));
    }

    /// BE index, then per write: BE u32 key length, key, then 0 (remove) or
    /// 1, BE u32 value length, value.
    fn encode(&self) -> Vec<u8> {
        let size: usize = self
            .ops
            .iter()
            .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        let mut out = Vec::with_capacity(8 + size);
        out.extend_from_slice(&self.index.to_be_bytes());
        for (k, v) in &self.ops {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
            match v {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
        out
    }

    fn decode(mut b: &[u8]) -> Result<Writes, String> {
        fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
            if b.len() < n {
                return Err(format!("redo record ends inside {what}"));
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Ok(head)
        }
        let len = |b: &mut &[u8], what: &str| -> Result<usize, String> {
            let raw = take(b, 4, what)?;
            Ok(u32::from_be_bytes(raw.try_into().expect("4 bytes")) as usize)
        };
        let index = u64::from_be_bytes(take(&mut b, 8, "the index")?.try_into().expect("8 bytes"));
        let mut ops = Vec::new();
        while !b.is_empty() {
            let n = len(&mut b, "a key length")?;
            let key = take(&mut b, n, "a key")?.to_vec();
            let value = match take(&mut b, 1, "a tag")?[0] {
                0 => None,
                1 => {
                    let n = len(&mut b, "a value length")?;
                    Some(take(&mut b, n, "a value")?.to_vec())
                }
                t => return Err(format!("redo record has write tag {t}")),
            };
            ops.push((key, value));
        }
        Ok(Writes { index, ops })
    }

    /// Makes the writes, in order.
    fn write_to(&self, tree: &sled::Tree) -> sled::Result<()> {
        for (k, v) in &self.ops {
            match v {
                Some(v) => tree.insert(k.as_slice(), v.as_slice())?,
                None => tree.remove(k.as_slice())?,
            };
        }
        Ok(())
    }
}

/// Finishes the writes of a log entry whose apply a crash cut short.
fn replay_redo(st: &NodeStorage) -> Result<(), String> {
    let Some(raw) = st.sm_redo.get(REDO_KEY).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    if st
        .sm
        .get(M_INSTALLING)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        // The snapshot reload that follows replaces everything.
        return Ok(());
    }
    let w = Writes::decode(&raw)?;
    let applied: Option<LogId> = match st.sm.get(M_APPLIED).map_err(|e| e.to_string())? {
        Some(b) => codec::decode("last applied", &b).map_err(|e| e.to_string())?,
        None => None,
    };
    if applied.is_some_and(|l| l.index >= w.index) {
        return Ok(());
    }
    tracing::info!(dir = %st.dir.display(), index = w.index, "finishing the apply of a log entry cut short");
    w.write_to(&st.sm).map_err(|e| e.to_string())
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
    /// The change feed's garbage collection.
    pub feed: Feed,
}

/// Listings of the change feed to leave dead before sweeping them.
const SWEEP_AT: u64 = 16_384;
/// Listings a sweep checks per applied log entry.
const SWEEP_PER_ENTRY: usize = 1_024;

/// The change feed's garbage. Each applied log entry lists the paths it
/// wrote in one record (one sled insert per entry: one key per path cost
/// apply a B-tree insert per command). A path written again later stays
/// listed in its older record, where readers skip it (its entry's version
/// is newer); `dead` counts such listings. Once it reaches [`SWEEP_AT`],
/// each applied entry also checks up to [`SWEEP_PER_ENTRY`] listings from
/// `cursor`, rewriting records without their dead paths or removing them,
/// until a full pass ends. A pass removes every listing dead at its start,
/// so the feed holds its live paths plus at most `SWEEP_AT` and about two
/// passes' worth of rewrites.
#[derive(Debug, Default)]
pub(crate) struct Feed {
    /// Dead listings (persisted as [`M_FEED_DEAD`]).
    pub dead: u64,
    /// The next record key a sweep checks; `None` between passes.
    pub cursor: Option<[u8; 13]>,
}

impl Feed {
    /// Sweeps part of the feed through `view` (which sees the entry being
    /// applied), adding its record rewrites to the view's batch.
    fn sweep(&mut self, view: &mut BatchView<'_>, index: u64) -> Result<(), StorageError> {
        let start = self.cursor.unwrap_or_else(|| feed_key(0, 0));
        let end = feed_key(index, 0);
        let mut checked = 0;
        let mut next = None;
        for kv in view.sm.range(start..end) {
            let (k, v) = kv.map_err(read_err)?;
            let at = feed_index(&k).ok_or_else(|| read_err(bad_feed_key(&k)))?;
            let paths: Vec<String> = codec::decode("change feed record", &v).map_err(read_err)?;
            let n = paths.len();
            let live: Vec<String> = paths
                .into_iter()
                .filter(|p| view.get(p).is_some_and(|e| e.version == at))
                .collect();
            if let Some(e) = view.error.take() {
                return Err(e);
            }
            if live.is_empty() {
                view.batch.remove(&k);
            } else if live.len() < n {
                view.batch.insert(&k, codec::encode(&live));
            }
            self.dead = self.dead.saturating_sub((n - live.len()) as u64);
            checked += n;
            if checked >= SWEEP_PER_ENTRY {
                let seq = u32::from_be_bytes(k[9..13].try_into().expect("4 bytes"));
                next = Some(match seq.checked_add(1) {
                    Some(s) => feed_key(at, s),
                    None => feed_key(at + 1, 0),
                });
                break;
            }
        }
        self.cursor = next;
        if next.is_none() {
            // A whole pass is done: what died behind the cursor meanwhile
            // is left for the next pass.
            self.dead = 0;
        }
        Ok(())
    }
}

fn bad_feed_key(k: &[u8]) -> std::io::Error {
    std::io::Error::other(format!("change feed key of {} bytes", k.len()))
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
    /// Held (written) while apply makes one log entry's writes; readers of
    /// entries and of the change feed hold it (read) to see whole entries.
    pub visible: std::sync::RwLock<()>,
    /// Odd while a snapshot install replaces the state (under `visible`),
    /// bumped again when it ends: a reader whose scan of the change feed
    /// spans an install sees it changed and scans again.
    pub installs: std::sync::atomic::AtomicU64,
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
            visible: std::sync::RwLock::new(()),
            installs: std::sync::atomic::AtomicU64::new(0),
            applied_tx: watch::channel(0).0,
        });
        replay_redo(&st).map_err(recover)?;
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
    mem.feed = Feed {
        dead: match get(M_FEED_DEAD)? {
            Some(b) => u64::from_be_bytes(b.as_ref().try_into().map_err(|_| {
                read_err(std::io::Error::other("change feed counter is not 8 bytes"))
            })?),
            None => 0,
        },
        cursor: None,
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
    migrate(sm)?;
    let tree = NsTree::rebuild(sm, P_ENTRY).map_err(read_err)?;
    *shared.tree.lock().unwrap_or_else(|p| p.into_inner()) = tree;
    Ok(())
}

/// Converts a store written by an earlier version: the namespace Merkle
/// leaves it kept as a second key per path are dropped (the trie is derived
/// from the entries now), and its change feed (one key per path, under the
/// path's version) becomes one record per version.
fn migrate(sm: &sled::Tree) -> Result<(), StorageError> {
    let any = |prefix: u8| -> Result<bool, StorageError> {
        Ok(sm
            .scan_prefix([prefix])
            .next()
            .transpose()
            .map_err(read_err)?
            .is_some())
    };
    if any(P_OLD_LEAF)? {
        snapshot::clear_prefix(sm, P_OLD_LEAF).map_err(read_err)?;
    }
    if !any(P_OLD_CHANGE)? {
        return Ok(());
    }
    // In version order: each version's paths become one record.
    let mut batch = sled::Batch::default();
    let mut cur: Option<(u64, Vec<String>)> = None;
    let flush = |cur: Option<(u64, Vec<String>)>, batch: &mut sled::Batch| {
        if let Some((v, paths)) = cur {
            batch.insert(&feed_key(v, 0)[..], codec::encode(&paths));
        }
    };
    let mut n = 0;
    for k in sm.scan_prefix([P_OLD_CHANGE]).keys() {
        let k = k.map_err(read_err)?;
        let (Some(v), Ok(path)) = (
            k.get(1..9)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))),
            std::str::from_utf8(k.get(9..).unwrap_or_default()),
        ) else {
            return Err(read_err(bad_feed_key(&k)));
        };
        match &mut cur {
            Some((cv, paths)) if *cv == v => paths.push(path.to_owned()),
            _ => {
                flush(cur.take(), &mut batch);
                cur = Some((v, vec![path.to_owned()]));
            }
        }
        n += 1;
        if n % 1024 == 0 {
            sm.apply_batch(std::mem::take(&mut batch))
                .map_err(read_err)?;
        }
    }
    flush(cur, &mut batch);
    sm.apply_batch(batch).map_err(read_err)?;
    snapshot::clear_prefix(sm, P_OLD_CHANGE).map_err(read_err)
}

/// The sled-backed view one log entry is applied through: reads see the batch's own
/// earlier writes through `overlay`.
struct BatchView<'a> {
    sm: &'a sled::Tree,
    /// The trie as of the entries before this one: it knows every path
    /// that has an entry, so a new path costs no sled lookup.
    tree: &'a std::sync::Mutex<NsTree>,
    batch: Writes,
    overlay: HashMap<String, Entry>,
    blob_overlay: HashMap<String, Option<Vec<u8>>>,
    /// The Merkle slots of the paths written.
    tree_updates: Vec<Slot>,
    /// The paths written (for the change feed record).
    written: Vec<String>,
    /// How many of them replaced an entry of an earlier log index.
    overwrites: u64,
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
        let key = synod_merkle::namespace_key(path);
        if !self
            .tree
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            return None;
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
        if old.is_some_and(|o| o.version != new.version) {
            self.overwrites += 1;
        }
        self.written.push(path.to_owned());
        // Encode once: the same bytes are stored and hashed (see `Entry::tree_hash`).
        let bytes = codec::encode(&new);
        self.tree_updates
            .push(ns_tree::slot(path, Hash::of(&bytes)));
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
        // One redo record per log entry: its commands, its answers and
        // `last_applied` (see the module docs). Per entry rather than per
        // call: a call can carry many entries, and a record stays small.
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
                tree: &self.shared.tree,
                batch: Writes {
                    index,
                    ops: Vec::new(),
                },
                overlay: HashMap::new(),
                blob_overlay: HashMap::new(),
                tree_updates: Vec::new(),
                written: Vec::new(),
                overwrites: 0,
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
            let dead_before = mem.feed.dead;
            mem.feed.dead += view.overwrites;
            if !view.written.is_empty() {
                let mut written = std::mem::take(&mut view.written);
                written.sort_unstable();
                written.dedup();
                view.batch
                    .insert(feed_key(index, 0), codec::encode(&written));
            }
            if mem.feed.dead >= SWEEP_AT || mem.feed.cursor.is_some() {
                mem.feed.sweep(&mut view, index)?;
            }
            if mem.feed.dead != dead_before {
                view.batch.insert(M_FEED_DEAD, mem.feed.dead.to_be_bytes());
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
                // With the entry's own writes: once the memory is full every
                // entry evicts.
                for k in gone {
                    batch.remove(&k[..]);
                }
            }
            {
                // See `SmShared::tree`: readers never see the leaves of
                // this entry without its buckets marked.
                let _visible = self
                    .shared
                    .visible
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                let mut tree = self.shared.tree.lock().unwrap_or_else(|p| p.into_inner());
                self.shared
                    .st
                    .sm_redo
                    .insert(REDO_KEY, batch.encode())
                    .and_then(|_| batch.write_to(sm))
                    .map_err(|e| StorageIOError::apply(log_id, &e))?;
                for slot in tree_updates {
                    tree.set(slot);
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

#[cfg(test)]
mod tests {
    use openraft::testing::log_id;
    use openraft::EntryPayload;

    use super::*;
    use crate::command::{Command, Expect, Request};
    use crate::node::open_stores;
    use crate::path::NsPath;
    use crate::reads::Change;

    /// Log entry `index`: 16 inline puts over the same 16 paths.
    fn entry(index: u64, serials_of: u64) -> openraft::Entry<TypeConfig> {
        let commands = (0..16u64)
            .map(|j| {
                let path = NsPath::parse(&format!("d{j}/f")).expect("valid path");
                let data = format!("{serials_of}-{j}").into_bytes();
                let e = Entry::file(data.len() as u64, Hash::of(&data), 1);
                let rid = RequestId {
                    client: 1,
                    serial: serials_of * 100 + j,
                };
                (rid, Command::put_inline(&path, e, Expect::Any, data))
            })
            .collect();
        openraft::Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(Request { commands }),
        }
    }

    type State = (Vec<(NsPath, Entry)>, Hash, Vec<Change>, Option<LogId>);

    async fn state_of(sm: &mut StateMachineStore) -> State {
        let view = sm.view();
        let (applied, _) = sm.applied_state().await.expect("applied state");
        (
            view.all().expect("entries"),
            view.namespace_root(),
            view.changes_since(0, usize::MAX).expect("change feed"),
            applied,
        )
    }

    #[tokio::test]
    async fn an_entry_cut_short_is_finished_from_its_redo_record_on_open() {
        let whole = tempfile::tempdir().expect("tempdir");
        let cut = tempfile::tempdir().expect("tempdir");
        let (redo, want) = {
            let (_log, mut sm) = open_stores(whole.path(), "c").expect("open");
            for i in 1..=5 {
                sm.apply([entry(i, i)]).await.expect("apply");
            }
            let redo = sm
                .shared
                .st
                .sm_redo
                .get(REDO_KEY)
                .expect("get")
                .expect("redo");
            (redo.to_vec(), state_of(&mut sm).await)
        };
        let w = Writes::decode(&redo).expect("decode");
        assert_eq!(w.index, 5);
        assert_eq!(Writes::decode(&w.encode()).expect("decode"), w);
        {
            let (_log, mut sm) = open_stores(cut.path(), "c").expect("open");
            for i in 1..=4 {
                sm.apply([entry(i, i)]).await.expect("apply");
            }
            // What a crash halfway through entry 5 leaves: its record and
            // the first half of its writes.
            let st = &sm.shared.st;
            st.sm_redo
                .insert(REDO_KEY, redo.as_slice())
                .expect("insert");
            let half = Writes {
                index: 5,
                ops: w.ops[..w.ops.len() / 2].to_vec(),
            };
            half.write_to(&st.sm).expect("half");
            st.sm_db.flush().expect("flush");
        }
        let (_log, mut sm) = open_stores(cut.path(), "c").expect("reopen");
        assert_eq!(state_of(&mut sm).await, want);
        // The answers of entry 5 were remembered too: its commands again
        // (a retry) get their first answers and change nothing.
        let r = sm.apply([entry(6, 5)]).await.expect("apply");
        assert!(r[0]
            .answers
            .iter()
            .all(|a| *a == crate::Answer::Ok { version: 5 }));
        assert_eq!(sm.view().all().expect("entries"), want.0);
    }

    #[tokio::test]
    async fn a_corrupt_redo_record_is_a_clear_error_on_open() {
        let d = tempfile::tempdir().expect("tempdir");
        let redo = {
            let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
            sm.apply([entry(1, 1)]).await.expect("apply");
            sm.shared
                .st
                .sm_redo
                .get(REDO_KEY)
                .expect("get")
                .expect("redo")
        };
        for bad in [&redo[..redo.len() - 3], &redo[..5], &[0u8; 12][..]] {
            {
                let st = NodeStorage::open(d.path(), "c").expect("open");
                st.sm_redo.insert(REDO_KEY, bad).expect("insert");
                st.sm_db.flush().expect("flush");
            }
            let err = open_stores(d.path(), "c").expect_err("corrupt redo record");
            let msg = err.to_string();
            assert!(msg.contains("redo record"), "{msg}");
        }
    }

    #[tokio::test]
    async fn merkle_leaves_left_by_an_earlier_version_are_dropped_on_open() {
        let d = tempfile::tempdir().expect("tempdir");
        let want = {
            let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
            for i in 1..=3 {
                sm.apply([entry(i, i)]).await.expect("apply");
            }
            let st = &sm.shared.st;
            for j in 0..100u8 {
                st.sm.insert([P_OLD_LEAF, j], &[j][..]).expect("insert");
            }
            st.sm_db.flush().expect("flush");
            state_of(&mut sm).await
        };
        let (_log, mut sm) = open_stores(d.path(), "c").expect("reopen");
        assert_eq!(state_of(&mut sm).await, want);
        assert_eq!(sm.shared.st.sm.scan_prefix([P_OLD_LEAF]).count(), 0);
    }

    fn feed_records(sm: &StateMachineStore) -> usize {
        sm.shared.st.sm.scan_prefix([P_FEED]).count()
    }

    #[tokio::test]
    async fn the_change_feed_sweeps_paths_written_again_and_stays_right() {
        let d = tempfile::tempdir().expect("tempdir");
        let entries = 1_300u64;
        let (want, dead) = {
            let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
            // The same 16 paths in every entry: each entry's record leaves
            // the previous one's 16 listings dead.
            for i in 1..=entries {
                sm.apply([entry(i, i)]).await.expect("apply");
            }
            let kept = feed_records(&sm);
            assert!(
                kept < (entries / 2) as usize,
                "{kept} feed records kept for {entries} entries over the same 16 paths"
            );
            let dead = sm.shared.gate.lock().await.feed.dead;
            assert!(dead > 0, "dead listings left since the last pass");
            (state_of(&mut sm).await, dead)
        };
        let feed = &want.2;
        assert_eq!(feed.len(), 16, "each path once");
        assert!(feed
            .iter()
            .all(|c| c.version == entries && c.entry.version == entries));
        // The count of dead listings survives a restart.
        let (_log, mut sm) = open_stores(d.path(), "c").expect("reopen");
        assert_eq!(state_of(&mut sm).await, want);
        assert_eq!(sm.shared.gate.lock().await.feed.dead, dead);
    }

    #[tokio::test]
    async fn a_change_feed_of_one_key_per_path_is_converted_on_open() {
        let d = tempfile::tempdir().expect("tempdir");
        let want = {
            let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
            for i in 1..=3 {
                sm.apply([entry(i, i)]).await.expect("apply");
            }
            let want = state_of(&mut sm).await;
            // What an earlier version kept: `c` BE(version) path, empty.
            let st = &sm.shared.st;
            snapshot::clear_prefix(&st.sm, P_FEED).expect("clear");
            for c in &want.2 {
                let mut k = vec![P_OLD_CHANGE];
                k.extend_from_slice(&c.version.to_be_bytes());
                k.extend_from_slice(c.path.as_str().as_bytes());
                st.sm.insert(k, &[][..]).expect("insert");
            }
            st.sm_db.flush().expect("flush");
            want
        };
        let (_log, mut sm) = open_stores(d.path(), "c").expect("reopen");
        assert_eq!(state_of(&mut sm).await, want);
        assert_eq!(sm.shared.st.sm.scan_prefix([P_OLD_CHANGE]).count(), 0);
        assert_eq!(feed_records(&sm), 1, "one record for the one live version");
    }
}
