//! Local edits become commits (DESIGN.md section 4): a scan of the folder
//! at start, on filesystem events (coalesced) and periodically, comparing
//! size, mtime and inode with the local records and rehashing only what
//! changed. New and edited files are committed with `expect: Version(base)`,
//! vanished ones deleted, moved ones renamed; a lost race becomes a
//! conflict copy beside the winner; edits without quorum wait in the
//! pending journal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::{self, StreamExt};
use notify::Watcher;
use serde::{Deserialize, Serialize};
use synod_chunker::Manifest;
use synod_consensus::{Answer, Command, Entry, EntryKind, Expect, NsPath, RequestId};
use synod_merkle::Hash;
use tokio::sync::{broadcast, Notify};
use tracing::{debug, info, warn};

use crate::engine::{SyncNode, BATCHED_FILE_MAX};
use crate::error::NodeError;
use crate::fsutil;
use crate::local::{LocalFile, PendingEdit};
use crate::metrics::Metrics;
use crate::peers::PeerNet;

/// The ignore file at the folder's root, gitignore syntax.
pub const IGNORE_FILE: &str = ".synodignore";
/// A file modified more recently than this is still being written.
const SETTLE: Duration = Duration::from_millis(1000);
/// Quiet time after a filesystem event before scanning.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// Files chunked and replicated at once.
const PARALLEL: usize = 8;

/// Names never synced: our own state, editor swap and backup files.
fn builtin_ignored(name: &str) -> bool {
    name == ".synod"
        || name == "4913"
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".swpx")
        || name.ends_with('~')
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#') && name.len() > 1)
        || name == ".DS_Store"
}

/// One file as found on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Found {
    path: NsPath,
    abs: PathBuf,
    size: u64,
    mtime_ns: i64,
    inode: u64,
    mode: u32,
    kind: EntryKind,
}

impl Found {
    fn matches(&self, l: &LocalFile) -> bool {
        self.kind == l.kind
            && self.size == l.size
            && self.mtime_ns == l.mtime_ns
            && self.inode == l.inode
    }
}

/// What a scan decided to commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Op {
    /// New or edited content; `base` is the version it was edited from.
    Put {
        found: Found,
        base: Option<u64>,
    },
    Delete {
        path: String,
        base: u64,
    },
    Rename {
        from: String,
        to: Found,
        base: u64,
    },
}

impl Op {
    fn path(&self) -> &str {
        match self {
            Op::Put { found, .. } => found.path.as_str(),
            Op::Delete { path, .. } => path,
            Op::Rename { to, .. } => to.path.as_str(),
        }
    }

    /// Every path the op changes.
    fn touches(&self) -> impl Iterator<Item = &str> {
        let from = match self {
            Op::Rename { from, .. } => Some(from.as_str()),
            _ => None,
        };
        std::iter::once(self.path()).chain(from)
    }

    fn pending(&self, error: String) -> PendingEdit {
        let (kind, base) = match self {
            Op::Put { base, .. } => ("put", *base),
            Op::Delete { base, .. } => ("delete", Some(*base)),
            Op::Rename { base, .. } => ("rename", Some(*base)),
        };
        PendingEdit {
            kind: kind.into(),
            base,
            since_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            error,
        }
    }
}

/// A proposal that got no answer before its deadline: it may have
/// committed, or may still. Until that is settled the disk cannot be
/// compared with the records (a file edited after a rename that did commit
/// is an edit of the renamed file, not a new file), so its paths wait.
#[derive(Debug, Serialize, Deserialize)]
struct InDoubt {
    rid: RequestId,
    cmd: Command,
    op: Op,
    root: Option<Hash>,
}

/// What one scan found, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanReport {
    pub files: usize,
    pub hashed: usize,
    pub committed: usize,
    pub conflicts: usize,
    pub pending: usize,
    /// Files still being written, looked at again shortly.
    pub unsettled: usize,
}

impl ScanReport {
    /// Adds the counts of a part of the scan (`files` is the walk's own).
    fn absorb(&mut self, part: &ScanReport) {
        self.hashed += part.hashed;
        self.committed += part.committed;
        self.conflicts += part.conflicts;
        self.pending += part.pending;
        self.unsettled += part.unsettled;
    }
}

/// Runs until `shutdown` fires.
pub async fn run<N: PeerNet>(
    node: Arc<SyncNode<N>>,
    interval: Duration,
    mut shutdown: broadcast::Receiver<()>,
) {
    let events = Arc::new(Notify::new());
    // Setting the watch walks every directory of the folder: off the runtime.
    let (folder, ev, placed) = (node.folder.clone(), events.clone(), node.placed.clone());
    let watcher = tokio::task::spawn_blocking(move || watch_folder(&folder, ev, placed))
        .await
        .unwrap_or_else(|e| Err(notify::Error::generic(&format!("watcher task: {e}"))));
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(folder = %node.folder.display(), cause = %e, "no filesystem watcher; relying on periodic scans");
            None
        }
    };
    // Catch up before publishing offline edits, so they meet the history
    // they missed through the conflict rules rather than overwrite it.
    tokio::select! {
        _ = catch_up(&node) => {}
        _ = shutdown.recv() => return,
    }
    let mut reported = HashSet::new();
    loop {
        let started = std::time::Instant::now();
        let result = scan(&node, &mut reported).await;
        node.metrics.scan_progress.first_scan_done();
        node.metrics.scan_last_ms.store(
            started.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let soon = match result {
            Ok(r) => {
                if r.committed + r.conflicts + r.pending > 0 {
                    info!(
                        files = r.files,
                        hashed = r.hashed,
                        committed = r.committed,
                        conflicts = r.conflicts,
                        pending = r.pending,
                        "scan"
                    );
                }
                r.unsettled > 0 || r.pending > 0
            }
            Err(e) => {
                warn!(cause = %e, "scan failed; will retry");
                true
            }
        };
        let wait = if soon { SETTLE } else { interval };
        tokio::select! {
            _ = events.notified() => {
                // Coalesce a burst into one scan, but never wait past a
                // bound: a file written without pause is still scanned.
                let until = tokio::time::Instant::now() + DEBOUNCE * 8;
                loop {
                    tokio::select! {
                        _ = events.notified() => {}
                        _ = tokio::time::sleep(DEBOUNCE) => break,
                    }
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.recv() => return,
        }
    }
}

async fn catch_up<N: PeerNet>(node: &SyncNode<N>) {
    if node.read_barrier().await.is_err() {
        info!("no quorum at start; local edits will wait in the pending journal");
        return;
    }
    let applied = node.reader.view().applied_index();
    let mut wm = node.watch_watermark();
    let _ = tokio::time::timeout(node.write_timeout * 4, wm.wait_for(|&w| w >= applied)).await;
}

/// Files the materializer renamed into the folder: path → the inode it
/// put there. A rename event at such a path, while the path still holds
/// that inode, is our own placement and wakes no scan: under a stream of
/// remote writes those wake-ups rescanned the whole folder every few
/// seconds, a tenth of a node's work. Writes to the file, and anything
/// else moved onto the path, still wake the scanner.
#[derive(Debug, Default)]
pub(crate) struct Placed(std::sync::Mutex<HashMap<PathBuf, u64>>);

impl Placed {
    /// Bound on the paths remembered; past it they are forgotten, which
    /// costs at most a scan.
    const MAX: usize = 1 << 16;

    /// Called before the rename of the file with inode `inode` to `target`.
    pub(crate) fn note(&self, target: &Path, inode: u64) {
        let mut m = self.0.lock().expect("placed lock poisoned");
        if m.len() >= Self::MAX {
            m.clear();
        }
        m.insert(target.to_path_buf(), inode);
    }

    /// Whether `path` holds the file the materializer placed there.
    fn holds(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(inode) = self
            .0
            .lock()
            .expect("placed lock poisoned")
            .get(path)
            .copied()
        else {
            return false;
        };
        std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == inode)
    }
}

fn watch_folder(
    folder: &Path,
    events: Arc<Notify>,
    placed: Arc<Placed>,
) -> notify::Result<notify::RecommendedWatcher> {
    let tmp = fsutil::tmp_dir(folder);
    // `.synod/`: every placement's temp file, and our state.
    let ours = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
    // Made before the watch, so it is not picked up when it appears.
    std::fs::create_dir_all(&tmp).map_err(notify::Error::io)?;
    let unwatched = ours.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
            // Reads (ours, peers' fetches, users') change nothing.
            let change = match ev.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            };
            let rename = matches!(ev.kind, EventKind::Modify(ModifyKind::Name(_)));
            let by_us = |p: &PathBuf| p.starts_with(&ours) || (rename && placed.holds(p));
            if change && !ev.paths.iter().all(by_us) {
                events.notify_one();
            }
        }
        Err(_) => events.notify_one(),
    })?;
    w.watch(folder, notify::RecursiveMode::Recursive)?;
    // Its events would all be dropped above, and they outnumber the rest.
    // Still watched if this fails: only slower.
    if let Err(e) = w.unwatch(&unwatched) {
        debug!(cause = %e, "our state directory stays watched");
    }
    Ok(w)
}

/// One pass over the folder.
pub async fn scan<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    reported: &mut HashSet<String>,
) -> Result<ScanReport, NodeError> {
    let doubtful = resolve_in_doubt(node).await?;
    let folder = node.folder.clone();
    let local = node.local.clone();
    // The walk and the read of every record are bulk I/O: off the runtime.
    let (walked, records) = tokio::task::spawn_blocking(move || (walk_nfc(&folder), local.files()))
        .await
        .map_err(|e| NodeError::internal("scan task", e))?;
    let (found, skipped) = walked.map_err(|e| NodeError::internal("scanning the folder", e))?;
    for (what, why) in skipped {
        if reported.insert(what.clone()) {
            warn!(path = %what, "not synced: {why}");
            node.metrics
                .events
                .record(crate::events::EventKind::Refused, &what);
        }
    }
    let records: BTreeMap<String, LocalFile> = records
        .map_err(|e| NodeError::internal("local records", e))?
        .into_iter()
        .collect();
    Metrics::add(&node.metrics.scans_completed, 1);
    let mut report = ScanReport {
        files: found.len(),
        ..ScanReport::default()
    };
    let mut ops = Vec::new();
    let mut new_files = Vec::new();
    let on_disk: HashSet<&str> = found.iter().map(|f| f.path.as_str()).collect();
    for f in &found {
        match records.get(f.path.as_str()) {
            Some(l) if f.matches(l) => {}
            Some(l) => ops.push(Op::Put {
                found: f.clone(),
                base: Some(l.version),
            }),
            None => new_files.push(f.clone()),
        }
    }
    // A vanished file whose inode turns up under a new name was moved.
    let mut vanished: HashMap<u64, (String, LocalFile)> = records
        .iter()
        .filter(|(p, _)| !on_disk.contains(p.as_str()))
        .map(|(p, l)| (l.inode, (p.clone(), l.clone())))
        .collect();
    for f in new_files {
        match vanished.get(&f.inode) {
            Some((from, l)) if l.size == f.size && l.mtime_ns == f.mtime_ns => {
                let (from, l) = vanished.remove(&f.inode).expect("just found");
                ops.push(Op::Rename {
                    from,
                    to: f,
                    base: l.version,
                });
            }
            _ => ops.push(Op::Put {
                found: f,
                base: None,
            }),
        }
    }
    for (_, (path, l)) in vanished {
        ops.push(Op::Delete {
            path,
            base: l.version,
        });
    }
    // Paths with a proposal in doubt wait until it is settled.
    let before = ops.len();
    ops.retain(|op| op.touches().all(|p| !doubtful.contains(p)));
    report.pending += before - ops.len();
    node.metrics.scan_progress.planned(
        found.len(),
        ops.iter().filter_map(|op| match op {
            Op::Put { found, .. } => Some(found.size),
            _ => None,
        }),
    );
    if ops.is_empty() {
        return Ok(report);
    }
    // Journal order first, then path order.
    let pending: HashMap<String, u64> = node
        .local
        .pending()
        .map_err(|e| NodeError::internal("pending journal", e))?
        .into_iter()
        .map(|(p, e)| (p, e.since_ms))
        .collect();
    ops.sort_by(|a, b| {
        let ka = (
            pending.get(a.path()).copied().unwrap_or(u64::MAX),
            a.path().to_owned(),
        );
        let kb = (
            pending.get(b.path()).copied().unwrap_or(u64::MAX),
            b.path().to_owned(),
        );
        ka.cmp(&kb)
    });
    // Large files go in a lane of their own, one at a time, so the many
    // small ones are not held up behind their transfer.
    let (large, small): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(
        |op| matches!(op, Op::Put { found, .. } if found.kind == EntryKind::File && found.size > LARGE_FILE),
    );
    let mut large_report = ScanReport::default();
    let (small_done, large_done) = futures::join!(
        commit_in_batches(node, small, 256, &mut report),
        commit_in_batches(node, large, 1, &mut large_report)
    );
    report.absorb(&large_report);
    small_done.and(large_done)?;
    Ok(report)
}

/// Files above this size are prepared and committed apart from the others.
const LARGE_FILE: u64 = 16 << 20;

/// Prepares and commits `ops` in batches of `size`, in order; once a batch
/// finds no quorum the rest are journaled without being tried.
async fn commit_in_batches<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    ops: Vec<Op>,
    size: usize,
    report: &mut ScanReport,
) -> Result<(), NodeError> {
    let mut batches = ops.chunks(size);
    while let Some(batch) = batches.next() {
        let prepared = prepare(node, batch.to_vec(), report).await;
        if commit(node, prepared, report).await? {
            // No quorum: journal the rest without trying each one.
            for op in batches.by_ref().flatten() {
                journal(node, op, "no quorum".into())?;
                report.pending += 1;
            }
        }
    }
    Ok(())
}

/// What was left out of a walk and why, reported once per path.
type Skipped = Vec<(String, String)>;

/// Walks the folder after giving every name spelled in another Unicode
/// normal form its NFC spelling on disk: NFC and NFD spellings of one name
/// are one path. A name present in both spellings keeps both files; only
/// the NFC one is synced and the other is reported.
fn walk_nfc(folder: &Path) -> std::io::Result<(Vec<Found>, Skipped)> {
    let (found, skipped, respell) = walk(folder)?;
    if respell.is_empty() {
        return Ok((found, skipped));
    }
    let mut renamed = 0;
    // Deepest first: a directory's children move with it afterwards.
    let mut respell = respell;
    respell.sort_by_key(|(from, _)| std::cmp::Reverse(from.components().count()));
    for (from, to) in &respell {
        if std::fs::symlink_metadata(to).is_ok() {
            continue;
        }
        match std::fs::rename(from, to) {
            Ok(()) => {
                info!(from = %from.display(), to = %to.display(), "name respelled in NFC");
                renamed += 1;
            }
            Err(e) => warn!(path = %from.display(), cause = %e, "could not respell a name in NFC"),
        }
    }
    if renamed == 0 {
        return Ok((found, skipped));
    }
    let (found, skipped, _) = walk(folder)?;
    Ok((found, skipped))
}

/// Names to respell in NFC: (as on disk, as it should be).
type Respell = Vec<(PathBuf, PathBuf)>;

/// Walks the folder: files, directories and links, minus ignores and what
/// cannot be synced.
fn walk(folder: &Path) -> std::io::Result<(Vec<Found>, Skipped, Respell)> {
    let mut respell = Vec::new();
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let walker = ignore::WalkBuilder::new(folder)
        .standard_filters(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .filter_entry(|e| !builtin_ignored(&e.file_name().to_string_lossy()))
        .build();
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                skipped.push((folder.display().to_string(), e.to_string()));
                continue;
            }
        };
        if entry.depth() == 0 {
            continue;
        }
        let abs = entry.path().to_path_buf();
        let rel = abs
            .strip_prefix(folder)
            .unwrap_or(&abs)
            .to_string_lossy()
            .into_owned();
        let Some(ft) = entry.file_type() else {
            continue;
        };
        let kind = if ft.is_dir() {
            EntryKind::Directory
        } else if ft.is_symlink() {
            match std::fs::read_link(&abs) {
                Ok(t) if escapes(&rel, &t) => {
                    let why = format!("symbolic link to {} points outside the folder", t.display());
                    skipped.push((rel, why));
                    continue;
                }
                Ok(_) => EntryKind::Symlink,
                // Gone since it was listed: the next scan sees the truth.
                Err(_) => continue,
            }
        } else if ft.is_file() {
            EntryKind::File
        } else {
            skipped.push((rel, "not a regular file (device, socket or pipe)".into()));
            continue;
        };
        let path = match NsPath::parse(&rel) {
            Ok(p) if p.as_str() == rel => p,
            Ok(p) => {
                use unicode_normalization::UnicodeNormalization;
                let name = entry.file_name().to_string_lossy().into_owned();
                let nfc: String = name.nfc().collect();
                if folder.join(p.as_str()).exists() {
                    skipped.push((
                        rel,
                        format!(
                            "the name exists in two Unicode spellings here; only {p} is synced"
                        ),
                    ));
                } else if nfc != name {
                    respell.push((abs.clone(), abs.with_file_name(nfc)));
                }
                continue;
            }
            Err(e) => {
                skipped.push((rel, e.to_string()));
                continue;
            }
        };
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            // Gone since it was listed: the next scan sees the truth.
            Err(_) => continue,
        };
        let (mtime_ns, inode) = fsutil::stamp(&meta);
        found.push(Found {
            path,
            abs,
            size: fsutil::size_of(&meta),
            mtime_ns,
            inode,
            mode: if kind == EntryKind::Symlink {
                0
            } else {
                meta.permissions().mode() & 0o7777
            },
            kind,
        });
    }
    Ok((found, skipped, respell))
}

/// Whether link `target`, found at `rel` inside the folder, resolves
/// lexically outside the folder.
pub(crate) fn escapes(rel: &str, target: &Path) -> bool {
    if target.is_absolute() {
        return true;
    }
    let mut depth = rel.split('/').count() as i64 - 1;
    for c in target.components() {
        match c {
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

/// An op ready to commit: content chunked and replicated where needed.
#[derive(Debug)]
struct Prepared {
    op: Op,
    manifest: Option<Manifest>,
    holders: Vec<u64>,
}

#[derive(Debug)]
enum Outcome {
    Ready(Prepared),
    /// Changed while it was read: still being written.
    Unsettled(Op),
    Failed(Op, NodeError),
}

/// Chunks and replicates the content of puts, in parallel, outside the
/// folder lock. Unsettled files are left for a later scan.
async fn prepare<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    ops: Vec<Op>,
    report: &mut ScanReport,
) -> Vec<Outcome> {
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let mut unsettled = 0;
    let ready: Vec<Op> = ops
        .into_iter()
        .filter(|op| match op {
            Op::Put { found, .. } if now_ns - found.mtime_ns < SETTLE.as_nanos() as i64 => {
                unsettled += 1;
                false
            }
            _ => true,
        })
        .collect();
    report.unsettled += unsettled;
    // First every file is chunked (in parallel)...
    let chunked: Vec<(Op, Content)> = stream::iter(ready)
        .map(|op| async move {
            let content = match &op {
                Op::Put { found, .. } => match found.kind {
                    EntryKind::File => chunk_stable(node, found)
                        .await
                        .map(|m| m.map(|m| (m, found.abs.clone()))),
                    EntryKind::Symlink => link_content(node, found).await,
                    // Nothing to carry but the name.
                    EntryKind::Directory => Ok(Some((
                        synod_chunker::chunk_slice_scaled(&[], node.params),
                        PathBuf::new(),
                    ))),
                },
                _ => Ok(None),
            };
            if let Op::Put { found, .. } = &op {
                node.metrics.scan_progress.hashed(found.size);
            }
            (op, content)
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    // ...then the content goes to the peers: small files together, the
    // others one by one.
    let mut results = Vec::new();
    let mut small = Vec::new();
    let mut big = Vec::new();
    for (op, content) in chunked {
        let (manifest, source) = match content {
            Ok(Some(c)) => c,
            Ok(None) if !matches!(op, Op::Put { .. }) => {
                results.push(Outcome::Ready(Prepared {
                    op,
                    manifest: None,
                    holders: Vec::new(),
                }));
                continue;
            }
            Ok(None) => {
                results.push(Outcome::Unsettled(op));
                continue;
            }
            Err(e) => {
                results.push(Outcome::Failed(op, e));
                continue;
            }
        };
        if matches!(&op, Op::Put { found, .. } if found.kind == EntryKind::Directory) {
            results.push(Outcome::Ready(Prepared {
                op,
                manifest: Some(manifest),
                holders: vec![node.id],
            }));
            continue;
        }
        if let Err(e) = node.local.put_manifest(&manifest) {
            results.push(Outcome::Failed(
                op,
                NodeError::internal("storing a manifest", e),
            ));
            continue;
        }
        if manifest.size() <= BATCHED_FILE_MAX {
            small.push((op, manifest, source));
        } else {
            big.push((op, manifest, source));
        }
    }
    let one_by_one = |files: Vec<(Op, Manifest, PathBuf)>| {
        stream::iter(files)
            .map(|(op, manifest, source)| async move {
                let base = node.base_manifest(op.path());
                let replicate = node.replicate(&manifest, &source, base.as_ref());
                let replicated = replicate_within(node, manifest.size(), replicate).await;
                match replicated {
                    Ok(holders) => Outcome::Ready(Prepared {
                        op,
                        manifest: Some(manifest),
                        holders,
                    }),
                    Err(e) => Outcome::Failed(op, e),
                }
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>()
    };
    let small_done = async {
        let total: u64 = small.iter().map(|(_, m, _)| m.size()).sum();
        let bases: Vec<Option<Manifest>> = small
            .iter()
            .map(|(op, _, _)| node.base_manifest(op.path()))
            .collect();
        let files: Vec<(&Manifest, &Path, Option<&Manifest>)> = small
            .iter()
            .zip(&bases)
            .map(|((_, m, p), base)| (m, p.as_path(), base.as_ref()))
            .collect();
        match replicate_within(node, total, node.replicate_many(&files)).await {
            Ok(holders) => small
                .into_iter()
                .map(|(op, manifest, _)| {
                    Outcome::Ready(Prepared {
                        op,
                        manifest: Some(manifest),
                        holders: holders.clone(),
                    })
                })
                .collect::<Vec<_>>(),
            Err(NodeError::Unavailable(why)) => small
                .into_iter()
                .map(|(op, _, _)| Outcome::Failed(op, NodeError::Unavailable(why.clone())))
                .collect(),
            // One file could not be read (gone, say): the others need not
            // wait for the next scan.
            Err(_) => one_by_one(small).await,
        }
    };
    let big_done = one_by_one(big);
    let (small_done, big_done) = futures::join!(small_done, big_done);
    results.extend(small_done);
    results.extend(big_done);
    let hashed = results
        .iter()
        .filter(|r| matches!(r, Outcome::Ready(p) if p.manifest.is_some()))
        .count();
    report.hashed += hashed;
    Metrics::add(&node.metrics.files_hashed, hashed as u64);
    results
}

/// A put's content and the file to read it from; `None`: changed while read.
type Content = Result<Option<(Manifest, PathBuf)>, NodeError>;

/// `replicating`, bounded by the content timeout of `bytes`.
async fn replicate_within<N: PeerNet>(
    node: &SyncNode<N>,
    bytes: u64,
    replicating: impl std::future::Future<Output = Result<Vec<u64>, NodeError>>,
) -> Result<Vec<u64>, NodeError> {
    let limit = node.content_timeout(bytes);
    tokio::time::timeout(limit, replicating)
        .await
        .unwrap_or_else(|_| {
            Err(NodeError::Unavailable(format!(
                "content did not reach {} nodes within {limit:?}",
                node.replication
            )))
        })
}

/// The manifest of `found`, or `None` if the file changed while it was
/// read (it is still being written; a later scan takes it).
async fn chunk_stable<N: PeerNet>(
    node: &SyncNode<N>,
    found: &Found,
) -> Result<Option<Manifest>, NodeError> {
    let params = node.params;
    let f = found.clone();
    let manifest = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Manifest>> {
        let m = match synod_chunker::chunk_file_scaled(&f.abs, params) {
            Ok(m) => m,
            // Still there but changed while read: still being written.
            Err(synod_chunker::ChunkFileError::ChangedWhileReading { .. })
                if std::fs::symlink_metadata(&f.abs).is_ok() =>
            {
                return Ok(None)
            }
            Err(e) => return Err(std::io::Error::other(e)),
        };
        let meta = std::fs::symlink_metadata(&f.abs)?;
        let (mtime_ns, inode) = fsutil::stamp(&meta);
        Ok((meta.len() == f.size && mtime_ns == f.mtime_ns && inode == f.inode).then_some(m))
    })
    .await
    .map_err(|e| NodeError::internal("chunking task", e))?;
    match manifest {
        Ok(m) => Ok(m),
        // Vanished or unreadable mid-way: reported, retried next scan.
        Err(e) if std::fs::symlink_metadata(&found.abs).is_err() => Err(NodeError::internal(
            &format!(
                "{} vanished while it was read; nothing committed",
                found.path
            ),
            e,
        )),
        Err(e) => Err(NodeError::internal(
            &format!("reading {}", found.abs.display()),
            e,
        )),
    }
}

/// A link's content is its target. The target is kept in a file under
/// `.synod/links/`, named by its root, which is what pushes read and what
/// the index serves to peers (reading the link itself would follow it).
async fn link_content<N: PeerNet>(
    node: &SyncNode<N>,
    found: &Found,
) -> Result<Option<(Manifest, PathBuf)>, NodeError> {
    let f = found.clone();
    let folder = node.folder.clone();
    let params = node.params;
    let local = node.local.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<Option<(Manifest, PathBuf)>> {
        let target = std::fs::read_link(&f.abs)?;
        let meta = std::fs::symlink_metadata(&f.abs)?;
        let (mtime_ns, inode) = fsutil::stamp(&meta);
        if meta.len() != f.size || mtime_ns != f.mtime_ns || inode != f.inode {
            return Ok(None);
        }
        let bytes = target.as_os_str().as_encoded_bytes();
        let m = synod_chunker::chunk_slice_scaled(bytes, params);
        let kept = fsutil::keep_link_target(&folder, &m, bytes)?;
        local
            .index()
            .record_file(&fsutil::link_target_rel(&m), &m)
            .map_err(std::io::Error::other)?;
        Ok(Some((m, kept)))
    })
    .await
    .map_err(|e| NodeError::internal("link task", e))?
    .map_err(|e| NodeError::internal(&format!("reading link {}", found.abs.display()), e))
}

fn journal<N: PeerNet>(node: &SyncNode<N>, op: &Op, error: String) -> Result<(), NodeError> {
    node.local
        .set_pending(op.path(), op.pending(error))
        .map_err(|e| NodeError::internal("pending journal", e))
}

/// Commits prepared ops under the folder lock. `Ok(true)`: no quorum, stop.
async fn commit<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    prepared: Vec<Outcome>,
    report: &mut ScanReport,
) -> Result<bool, NodeError> {
    let _folder = node.folder_lock.lock().await;
    let mut no_quorum = false;
    let mut ready = Vec::new();
    for p in prepared {
        match p {
            Outcome::Ready(p) => ready.push(p),
            Outcome::Failed(op, NodeError::Unavailable(why)) => {
                journal(node, &op, why)?;
                report.pending += 1;
                no_quorum = true;
            }
            Outcome::Unsettled(op) => {
                debug!(path = op.path(), "changed while read; next scan");
                report.unsettled += 1;
            }
            Outcome::Failed(op, e) => {
                warn!(path = op.path(), cause = %e, "local change not committed");
                let what = format!("{}: {e}", op.path());
                node.metrics
                    .events
                    .record(crate::events::EventKind::NotCommitted, what);
            }
        }
    }
    // Whatever the materializer did while we prepared: only ops whose file
    // is still as found are committed.
    ready.retain(|p| still_as_found(node, &p.op));
    let sent: Vec<(RequestId, Command)> = ready
        .iter()
        .map(|p| (node.proposer.next_request_id(), command(node, p)))
        .collect();
    let answers = futures::future::join_all(
        sent.iter()
            .map(|(rid, cmd)| node.propose_as(*rid, cmd.clone())),
    )
    .await;
    for ((p, answer), (rid, cmd)) in ready.into_iter().zip(answers).zip(sent) {
        match answer {
            Ok(Answer::Ok { version }) => {
                settle_ok(node, &p, version)?;
                report.committed += 1;
                Metrics::add(&node.metrics.writes_committed, 1);
            }
            Ok(Answer::Conflict { current }) => {
                report.conflicts += 1;
                Metrics::add(&node.metrics.writes_conflicted, 1);
                lost_race(node, &p, current).await?;
            }
            Ok(other) => {
                warn!(path = p.op.path(), answer = ?other, "local change refused");
                node.local
                    .clear_pending(p.op.path())
                    .map_err(|e| NodeError::internal("pending journal", e))?;
            }
            Err(NodeError::Unavailable(why)) => {
                let doubt = InDoubt {
                    rid,
                    cmd,
                    root: p.manifest.as_ref().map(Manifest::root),
                    op: p.op.clone(),
                };
                node.local
                    .set_in_doubt(p.op.path(), &crate::local::encode(&doubt))
                    .map_err(local_err)?;
                journal(node, &p.op, why)?;
                report.pending += 1;
                no_quorum = true;
            }
            Err(e) => warn!(path = p.op.path(), cause = %e, "local change not committed"),
        }
    }
    Ok(no_quorum)
}

/// Settles the proposals earlier scans left in doubt by proposing each
/// again under its request id: the answer is the first one if it
/// committed, and a command that did not commit cannot commit later once
/// its id has an answer. Returns the paths still in doubt.
async fn resolve_in_doubt<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
) -> Result<HashSet<String>, NodeError> {
    let mut left = HashSet::new();
    let records = node.local.in_doubt().map_err(local_err)?;
    if records.is_empty() {
        return Ok(left);
    }
    let _folder = node.folder_lock.lock().await;
    for (key, bytes) in records {
        let doubt: InDoubt = match crate::local::decode(
            &format!("in-doubt proposal of {key}"),
            &bytes,
        ) {
            Ok(d) => d,
            Err(e) => {
                warn!(path = %key, cause = %e, "unreadable in-doubt record dropped; the next scan compares the file afresh");
                node.local.clear_in_doubt(&key).map_err(local_err)?;
                continue;
            }
        };
        match node.propose_as(doubt.rid, doubt.cmd.clone()).await {
            Ok(Answer::Ok { version }) => {
                let manifest = match doubt.root {
                    Some(root) => node.local.manifest(&root).map_err(local_err)?,
                    None => None,
                };
                let p = Prepared {
                    op: doubt.op,
                    manifest,
                    holders: Vec::new(),
                };
                if p.manifest.is_some() || !matches!(p.op, Op::Put { .. }) {
                    settle_ok(node, &p, version)?;
                }
                info!(path = %key, version, "an unanswered proposal had committed; recorded");
            }
            Ok(answer) => {
                // Not committed, and now never will be: the disk decides.
                debug!(path = %key, ?answer, "an unanswered proposal did not commit");
                node.local.clear_pending(&key).map_err(local_err)?;
            }
            Err(e) => {
                debug!(path = %key, cause = %e, "proposal still in doubt");
                left.extend(doubt.op.touches().map(str::to_owned));
                continue;
            }
        }
        node.local.clear_in_doubt(&key).map_err(local_err)?;
    }
    Ok(left)
}

fn still_as_found<N: PeerNet>(node: &SyncNode<N>, op: &Op) -> bool {
    let same = |f: &Found| {
        std::fs::symlink_metadata(&f.abs).is_ok_and(|m| {
            let (mtime_ns, inode) = fsutil::stamp(&m);
            fsutil::size_of(&m) == f.size && mtime_ns == f.mtime_ns && inode == f.inode
        })
    };
    match op {
        Op::Put { found, .. } => same(found),
        Op::Rename { from, to, .. } => same(to) && !node.folder.join(from).exists(),
        Op::Delete { path, .. } => !node.folder.join(path).exists(),
    }
}

fn entry_of<N: PeerNet>(node: &SyncNode<N>, f: &Found, m: &Manifest, holders: &[u64]) -> Entry {
    Entry {
        kind: f.kind,
        size: m.size(),
        root: m.root(),
        mode: f.mode,
        mtime_ns: f.mtime_ns,
        version: 0,
        origin: node.id,
        holders: holders.to_vec(),
        tombstone: false,
    }
}

fn command<N: PeerNet>(node: &SyncNode<N>, p: &Prepared) -> Command {
    match &p.op {
        Op::Put { found, base } => {
            let m = p.manifest.as_ref().expect("puts are chunked");
            let expect = base.map_or(Expect::Absent, Expect::Version);
            Command::put(&found.path, entry_of(node, found, m, &p.holders), expect)
        }
        Op::Delete { path, base } => Command::delete(
            &NsPath::parse(path).expect("recorded paths are valid"),
            Expect::Version(*base),
        ),
        Op::Rename { from, to, base } => Command::rename(
            &NsPath::parse(from).expect("recorded paths are valid"),
            &to.path,
            Expect::Version(*base),
            Expect::Absent,
        ),
    }
}

fn local_err(e: crate::local::LocalStateError) -> NodeError {
    NodeError::internal("local records", e)
}

/// Records what a successful commit put on disk.
fn settle_ok<N: PeerNet>(node: &SyncNode<N>, p: &Prepared, version: u64) -> Result<(), NodeError> {
    match &p.op {
        Op::Put { found, .. } => {
            let m = p.manifest.as_ref().expect("puts are chunked");
            record(node, found, m, version)?;
        }
        Op::Delete { path, .. } => node.local.forget_file(path).map_err(local_err)?,
        Op::Rename { from, to, .. } => {
            let root = node.local.file(from).map_err(local_err)?.map(|l| l.root);
            node.local.forget_file(from).map_err(local_err)?;
            if let Some(m) = root.and_then(|r| node.local.manifest(&r).ok().flatten()) {
                record(node, to, &m, version)?;
            }
            node.local.clear_pending(from).map_err(local_err)?;
        }
    }
    node.local.clear_pending(p.op.path()).map_err(local_err)?;
    debug!(path = p.op.path(), version, "local change committed");
    Ok(())
}

fn record<N: PeerNet>(
    node: &SyncNode<N>,
    f: &Found,
    m: &Manifest,
    version: u64,
) -> Result<(), NodeError> {
    let file = LocalFile {
        version,
        root: m.root(),
        size: f.size,
        mtime_ns: f.mtime_ns,
        inode: f.inode,
        kind: f.kind,
    };
    node.local
        .record_file(f.path.as_str(), &file, m)
        .map_err(local_err)
}

/// Someone else changed the path first. An edit that lost is committed as
/// a conflict copy beside the winner and moved there on disk; the winner
/// then arrives through the materializer. A delete that lost is dropped: the
/// newer content comes back.
async fn lost_race<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    p: &Prepared,
    current: Option<Entry>,
) -> Result<(), NodeError> {
    node.local.clear_pending(p.op.path()).map_err(local_err)?;
    let (found, m) = match &p.op {
        Op::Put { found, .. } => (found, p.manifest.as_ref().expect("puts are chunked")),
        Op::Rename { from, to, .. } => {
            // The source moved on: the file under its new name is a new file,
            // committed by the next scan.
            node.local.forget_file(from).map_err(local_err)?;
            debug!(from = %from, to = %to.path, "rename lost a race; the next scan adds the file");
            return Ok(());
        }
        Op::Delete { path, .. } => {
            info!(path = %path, "local delete lost to a newer version; keeping the newer one");
            return Ok(());
        }
    };
    // The same bytes already won (two nodes made one edit): nothing lost.
    if let Some(cur) = current
        .as_ref()
        .filter(|c| c.is_live() && c.root == m.root())
    {
        return record(node, found, m, cur.version);
    }
    // A deleted path: the edit is kept under its own name.
    if current.as_ref().is_none_or(|c| !c.is_live()) {
        let expect = current.map_or(Expect::Absent, |c| Expect::Version(c.version));
        let cmd = Command::put(&found.path, entry_of(node, found, m, &p.holders), expect);
        if let Ok(Answer::Ok { version }) = node.propose(cmd).await {
            info!(path = %found.path, "edit of a deleted file kept");
            node.metrics
                .events
                .record(crate::events::EventKind::EditKept, &found.path);
            return record(node, found, m, version);
        }
        // Changed again meanwhile: the next scan deals with it.
        return Ok(());
    }
    // A directory is only a name: nothing to keep as a conflict copy.
    if found.kind == EntryKind::Directory {
        debug!(path = %found.path, "directory lost a race; the committed entry wins");
        return Ok(());
    }
    let aside = node.aside_name(found.path.as_str());
    let aside_path = NsPath::parse(&aside).map_err(|e| NodeError::BadRequest(e.to_string()))?;
    let cmd = Command::put(
        &aside_path,
        entry_of(node, found, m, &p.holders),
        Expect::Absent,
    );
    match node.propose(cmd).await? {
        Answer::Ok { version } => {
            let target = node.folder.join(&aside);
            fsutil::place(&found.abs, &target)
                .map_err(|e| NodeError::internal(&format!("moving {} aside", found.path), e))?;
            // The old record of the path no longer describes the disk.
            node.local
                .forget_file(found.path.as_str())
                .map_err(local_err)?;
            let moved = Found {
                path: aside_path,
                abs: target,
                ..found.clone()
            };
            record(node, &moved, m, version)?;
            Metrics::add(&node.metrics.conflict_copies, 1);
            node.metrics
                .events
                .record(crate::events::EventKind::ConflictCopy, &aside);
            warn!(path = %found.path, kept_as = %aside, "concurrent edit lost; kept as a conflict copy");
            Ok(())
        }
        other => {
            warn!(path = %found.path, answer = ?other, "conflict copy not committed; retried next scan");
            Ok(())
        }
    }
}
