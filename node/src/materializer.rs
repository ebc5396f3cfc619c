//! The materialize path (DESIGN.md section 5): follow the committed change
//! feed and bring the folder to the committed namespace, fetching only the
//! chunks this node lacks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use synod_chunker::Manifest;
use synod_consensus::{Change, Entry, EntryKind, NodeId, NsPath};
use synod_merkle::{diff_trees, Hash, MerkleTree, TreeSource};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::delta;
use crate::engine::{SyncNode, BATCH_CHUNKS};
use crate::fsutil;
use crate::local::LocalFile;
use crate::metrics::Metrics;
use crate::peers::{PeerError, PeerNet};

/// Changes read from the feed at once (widened when one log entry holds more).
const FEED_BATCH: usize = 1024;

/// Why one entry could not be materialized (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error("no peer could serve the manifest of {root}")]
    NoManifest { root: Hash },
    #[error("no peer could serve chunk {id}")]
    ChunkUnavailable { id: Hash },
    #[error("assembled content of {path} has root {got}, expected {expected}")]
    RootMismatch {
        path: String,
        got: Hash,
        expected: Hash,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("local state: {0}")]
    Local(String),
    #[error("{path} version {version}: {source}")]
    At {
        path: String,
        version: u64,
        source: Box<MaterializeError>,
    },
}

impl MaterializeError {
    /// No member could serve the content: placing the file waits for one
    /// that can, and the changes after it need not (see `Parked`).
    fn unobtainable(&self) -> bool {
        match self {
            MaterializeError::NoManifest { .. } | MaterializeError::ChunkUnavailable { .. } => true,
            MaterializeError::At { source, .. } => source.unobtainable(),
            _ => false,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> MaterializeError {
    let context = context.into();
    move |source| MaterializeError::Io { context, source }
}

/// Least time between the starts of two steps that are not working off a
/// backlog. Each step ends in filesystem syncs; under a steady stream of
/// commits, one step per commit had those syncs compete with the Raft
/// log's own fsyncs (a third of the commits/s at 64 writers). Small files
/// wait at most this long more to be placed, and are placed in larger groups.
const STEP_EVERY: Duration = Duration::from_millis(20);

/// What a step left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Nothing was left: the watermark is at the applied index.
    CaughtUp,
    /// Some changes were placed; more may have been applied meanwhile.
    Placed,
    /// A full feed batch was placed: a backlog remains.
    Backlog,
}

/// Runs until `shutdown` fires.
pub async fn run<N: PeerNet>(node: Arc<SyncNode<N>>, mut shutdown: broadcast::Receiver<()>) {
    node.log_started();
    let mut applied = node.reader.view().watch_applied();
    let mut backoff = Duration::from_millis(100);
    let mut last: Option<(Instant, Progress)> = None;
    loop {
        if let Some((started, progress)) = last {
            let wait = STEP_EVERY.saturating_sub(started.elapsed());
            if progress != Progress::Backlog && !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.recv() => return,
                }
            }
        }
        let started = Instant::now();
        match step(&node).await {
            Ok(Progress::CaughtUp) => {
                last = None;
                // Or until a parked path is due to be tried again.
                let retry = node.local.next_parked_retry();
                let parked_due = async move {
                    match retry {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = applied.changed() => {}
                    _ = parked_due => {}
                    _ = shutdown.recv() => return,
                }
            }
            Ok(progress) => {
                backoff = Duration::from_millis(100);
                last = Some((started, progress));
            }
            Err(e) => {
                last = None;
                warn!(cause = %e, retry_in = ?backoff, "materialize failed; will retry");
                Metrics::add(&node.metrics.materialize_errors, 1);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.recv() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Materializes the next batch of changes.
async fn step<N: PeerNet>(node: &Arc<SyncNode<N>>) -> Result<Progress, MaterializeError> {
    // Taken before the feed is read: a change the scanner commits meanwhile
    // is then either in this read or recorded before it.
    let _folder = node.folder_lock.lock().await;
    retry_parked(node).await?;
    let wm = node
        .local
        .watermark()
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    let view = node.reader.view();
    let applied = view.applied_index();
    let mut limit = FEED_BATCH;
    let mut changes = view
        .changes_since(wm, limit)
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    // A log entry (group commit) can hold more changes than a batch: widen
    // the read until it reaches past the first version, or that version's
    // tail would be skipped by the watermark below.
    while changes.len() == limit && changes[0].version == changes[limit - 1].version {
        limit *= 2;
        changes = view
            .changes_since(wm, limit)
            .map_err(|e| MaterializeError::Local(e.to_string()))?;
    }
    if changes.is_empty() {
        if applied > wm {
            set_watermark(node, applied).await?;
        }
        return Ok(Progress::CaughtUp);
    }
    // One log entry can hold many commands (group commit): never split one
    // version across two steps, or the watermark would skip its tail.
    // A full batch may stop short of the feed's end: only a short one may
    // carry the watermark up to `applied` (decided before trimming).
    let full = changes.len() == limit;
    if full {
        let last = changes[changes.len() - 1].version;
        if changes[0].version != last {
            changes.retain(|c| c.version != last);
        }
    }
    let through = if !full {
        applied.max(changes[changes.len() - 1].version)
    } else {
        changes[changes.len() - 1].version
    };
    // Live entries first: a rename's target can then take the bytes of its
    // source before the source's tombstone removes them (so the group of
    // files waiting to be placed is placed before any removal).
    let (live, dead): (Vec<Change>, Vec<Change>) =
        changes.into_iter().partition(|c| c.entry.is_live());
    // Content is assembled ahead, several files at once (their fetches and
    // fsyncs overlap), and placed in feed order below.
    // Content carried in the log (small files) is read here and written
    // by the group's own blocking task: no assembly task per file.
    let mut inline: Vec<Option<Inline>> = live
        .iter()
        .map(|c| inline_data(node, &c.path, &c.entry).ok().flatten())
        .collect();
    let wanted: Vec<bool> = live
        .iter()
        .zip(&inline)
        .map(|(c, i)| i.is_none() && worth_prefetching(node, c))
        .collect();
    let mut ready = prefetch(
        node,
        live.iter()
            .zip(&wanted)
            .filter(|(_, w)| **w)
            .map(|(c, _)| c.clone())
            .collect(),
    );
    let mut group = PlaceGroup::default();
    for ((c, wanted), inline) in live.iter().zip(wanted).zip(inline.iter_mut()) {
        let mut assembled = match wanted {
            true => match ready.recv().await {
                Some(Ok(a)) => a,
                Some(Err(e)) => {
                    debug!(path = %c.path, cause = %e, "assembly ahead failed; tried again in order");
                    Assembled::none()
                }
                None => Assembled::none(),
            },
            false => Assembled::none(),
        };
        assembled.inline = inline.take();
        match materialize_entry(node, &c.path, &c.entry, assembled, &mut group).await {
            Ok(()) => unpark(node, &c.path)?,
            // The changes after it go on (see `Parked`).
            Err(e) if e.unobtainable() => park(node, c, &e)?,
            Err(e) => {
                return Err(MaterializeError::At {
                    path: c.path.to_string(),
                    version: c.entry.version,
                    source: Box::new(e),
                })
            }
        }
        if group.is_full() {
            group.flush(node).await?;
        }
    }
    group.flush(node).await?;
    // Children before their parents: a directory goes once it is empty.
    let mut dead = dead;
    dead.sort_by(|a, b| b.path.cmp(&a.path));
    for c in &dead {
        remove_entry(node, &c.path, c.entry.version).await?;
        unpark(node, &c.path)?;
    }
    set_watermark(node, through).await?;
    Ok(if full {
        Progress::Backlog
    } else {
        Progress::Placed
    })
}

/// Files whose content assemblies run ahead of placement at once: enough
/// for small files to flow past a large one being assembled. Each holds
/// at most one gather window (`GATHER_WINDOW` chunks) in memory.
const ASSEMBLE_AHEAD: usize = 16;
/// Assembled bytes allowed ahead of placement, in MiB (a larger file
/// takes the whole budget): temp files must not fill the disk.
const AHEAD_MIB: u64 = 512;
/// Chunks gathered (read or fetched) at once by one assembly.
const GATHER_WINDOW: usize = BATCH_CHUNKS * 4;

/// Whether `c` is a file this node will most likely have to assemble.
fn worth_prefetching<N: PeerNet>(node: &SyncNode<N>, c: &Change) -> bool {
    if c.entry.kind != EntryKind::File {
        return false;
    }
    let uploaded = node
        .uploads
        .lock()
        .expect("uploads lock poisoned")
        .contains_key(&c.entry.root);
    match node.local.file(c.path.as_str()) {
        _ if uploaded => false,
        Ok(Some(l)) => l.version < c.entry.version && l.root != c.entry.root,
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Assembles the content of `changes` in the background, at most
/// [`ASSEMBLE_AHEAD`] at once, and hands the results over in order.
/// Dropping the receiver stops it; what it assembled is removed (an
/// [`Assembled`] removes its temp file when dropped, in the channel too).
fn prefetch<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    changes: Vec<Change>,
) -> tokio::sync::mpsc::Receiver<Result<Assembled, MaterializeError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ASSEMBLE_AHEAD);
    let node = node.clone();
    // Permits are taken in order (the semaphore is fair) and given back
    // when the entry is placed, so the head of the line always gets its own.
    let budget = Arc::new(tokio::sync::Semaphore::new(AHEAD_MIB as usize));
    tokio::spawn(async move {
        let node = &node;
        let budget = &budget;
        let mut results = futures::stream::iter(changes)
            .map(|c| async move {
                let mib = c.entry.size.div_ceil(1 << 20).clamp(1, AHEAD_MIB) as u32;
                let permit = budget
                    .clone()
                    .acquire_many_owned(mib)
                    .await
                    .map_err(|e| MaterializeError::Local(format!("assembly budget: {e}")))?;
                let local = node.local.file(c.path.as_str()).ok().flatten();
                assemble(node, &c.path, &c.entry, local.as_ref())
                    .await
                    .map(|a| Assembled {
                        ready: Some(a),
                        inline: None,
                        _budget: Some(permit),
                    })
            })
            .buffered(ASSEMBLE_AHEAD);
        while let Some(result) = results.next().await {
            if tx.send(result).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// Content assembled ahead for one entry; its temp file is removed unless
/// the entry takes it, and its share of the budget is given back with it.
pub(crate) struct Assembled {
    ready: Option<Ready>,
    /// Or the content from the log, written when its group is placed.
    inline: Option<Inline>,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Assembled {
    /// Nothing assembled ahead: the entry assembles its content itself.
    pub(crate) fn none() -> Assembled {
        Assembled {
            ready: None,
            inline: None,
            _budget: None,
        }
    }
}

impl Drop for Assembled {
    fn drop(&mut self) {
        if let Some(r) = self.ready.take().filter(|r| !r.staged) {
            let _ = std::fs::remove_file(r.at);
        }
    }
}

async fn set_watermark<N: PeerNet>(node: &SyncNode<N>, w: u64) -> Result<(), MaterializeError> {
    node.local
        .set_watermark(w)
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    node.local
        .flush()
        .await
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    publish_watermark(node)
}

/// Tells waiters what is on disk: the watermark, or less while a path is
/// parked.
fn publish_watermark<N: PeerNet>(node: &SyncNode<N>) -> Result<(), MaterializeError> {
    let on_disk = node
        .local
        .on_disk_through()
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    node.watermark.send_replace(on_disk);
    Ok(())
}

/// Parks `c`, whose content no member could serve (see `Parked`).
fn park<N: PeerNet>(
    node: &SyncNode<N>,
    c: &Change,
    e: &MaterializeError,
) -> Result<(), MaterializeError> {
    warn!(path = %c.path, version = c.entry.version, cause = %e, "content unobtainable; parked, the changes after it go on");
    Metrics::add(&node.metrics.materialize_errors, 1);
    node.metrics
        .events
        .record(crate::events::EventKind::Parked, &c.path);
    record_parked(node, c.path.as_str(), c.entry.version, e)
}

/// The local record of a parked path, with the last error.
fn record_parked<N: PeerNet>(
    node: &SyncNode<N>,
    path: &str,
    version: u64,
    e: &MaterializeError,
) -> Result<(), MaterializeError> {
    let since_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let parked = crate::local::Parked {
        version,
        error: e.to_string(),
        since_ms,
    };
    node.local
        .park(path, parked)
        .map_err(|e| MaterializeError::Local(e.to_string()))
}

fn unpark<N: PeerNet>(node: &SyncNode<N>, path: &NsPath) -> Result<(), MaterializeError> {
    node.local
        .unpark(path.as_str())
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    Ok(())
}

/// Parked paths tried again in one step, at most.
const PARKED_TRIES_PER_STEP: usize = 16;

/// Tries the parked paths that are due again. One whose version is no
/// longer the path's committed one is dropped: the feed carries the newer.
async fn retry_parked<N: PeerNet>(node: &Arc<SyncNode<N>>) -> Result<(), MaterializeError> {
    let due = node.local.parked_due();
    if due.is_empty() {
        return Ok(());
    }
    let view = node.reader.view();
    // A few per step: each may wait on unreachable peers, under the
    // folder lock.
    for (path, version) in due.into_iter().take(PARKED_TRIES_PER_STEP) {
        let current = NsPath::parse(&path)
            .ok()
            .and_then(|p| Some((view.get(&p).ok()??, p)));
        let Some((entry, p)) = current.filter(|(e, _)| e.version == version) else {
            node.local
                .unpark(&path)
                .map_err(|e| MaterializeError::Local(e.to_string()))?;
            continue;
        };
        let mut group = PlaceGroup::default();
        let placed = match materialize_entry(node, &p, &entry, Assembled::none(), &mut group).await
        {
            Ok(()) => group.flush(node).await,
            Err(e) => Err(e),
        };
        match placed {
            Ok(()) => {
                unpark(node, &p)?;
                info!(%path, version, "parked file placed");
            }
            // Still parked, whatever the cause now: the feed is past it, and
            // an error here must not stop the changes after it again.
            Err(e) => {
                debug!(%path, version, cause = %e, "parked file still not placed");
                record_parked(node, &path, version, &e)?;
            }
        }
    }
    publish_watermark(node)
}

pub(crate) async fn materialize_entry<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    path: &NsPath,
    entry: &Entry,
    mut assembled: Assembled,
    group: &mut PlaceGroup,
) -> Result<(), MaterializeError> {
    let target = node.folder.join(path.as_str());
    let local = node
        .local
        .file(path.as_str())
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    // Never replace what a newer commit put here with an older version.
    if local.as_ref().is_some_and(|l| l.version > entry.version) {
        return Ok(());
    }
    if let Some(l) = &local {
        if l.root == entry.root && on_disk_matches(&target, l) {
            if l.version != entry.version {
                let updated = LocalFile {
                    version: entry.version,
                    ..l.clone()
                };
                let manifest = node
                    .local
                    .manifest(&l.root)
                    .map_err(|e| MaterializeError::Local(e.to_string()))?;
                if let Some(m) = manifest {
                    record(node, path, &updated, &m)?;
                }
            }
            return Ok(());
        }
        // This node holds this very version and the user has edited it
        // since: an edit the scanner commits on top of it, not a conflict.
        if l.version == entry.version && l.root == entry.root {
            return Ok(());
        }
    }
    clear_ancestors(node, path, &mut group.dirs)?;
    match entry.kind {
        EntryKind::Directory => return make_directory(node, path, entry, local.as_ref(), &target),
        EntryKind::Symlink => return make_link(node, path, entry, local.as_ref(), &target).await,
        EntryKind::File => {}
    }
    preserve_local_edit(node, path, &target, local.as_ref(), Some(entry.root))?;

    // The uploader already holds the bytes in a temp file.
    // Left in the map until placed: if anything below fails, the upload's
    // cleanup (or the next attempt) still finds it.
    let upload = node
        .uploads
        .lock()
        .expect("uploads lock poisoned")
        .get(&entry.root)
        .cloned();
    let upload = upload.filter(|p| p.exists());
    let from_upload = upload.is_some();
    let mut inline = None;
    let (tmp, manifest, stamp, staged) = match upload {
        Some(tmp) => {
            let manifest = node
                .local
                .manifest(&entry.root)
                .map_err(|e| MaterializeError::Local(e.to_string()))?
                .ok_or(MaterializeError::NoManifest { root: entry.root })?;
            (tmp, manifest, None, false)
        }
        None => match assembled.inline.take() {
            Some(Inline { data, manifest }) => {
                let tmp = fsutil::temp_path(&node.folder, "materialize")
                    .map_err(io_err("creating temp file"))?;
                inline = Some(data);
                (tmp, manifest, None, false)
            }
            None => {
                let r = match assembled.ready.take() {
                    Some(ready) => ready,
                    None => assemble(node, path, entry, local.as_ref()).await?,
                };
                (r.at, r.manifest, Some(r.stamp), r.staged)
            }
        },
    };
    group.push(ToPlace {
        path: path.clone(),
        entry: entry.clone(),
        target,
        tmp: RemoveOnDrop((!from_upload && !staged).then(|| tmp.clone())),
        at: tmp,
        manifest,
        stamp,
        inline,
        local,
        from_upload,
    });
    Ok(())
}

/// Files up to this size are written without an fsync of their own: the
/// `syncfs` of their [`PlaceGroup`] covers them.
const GROUP_FILE_MAX: u64 = 1 << 20;
/// Most files in one group, and most of their unsynced bytes.
const GROUP_FILES: usize = 128;
const GROUP_BYTES: u64 = 64 << 20;

/// A file assembled and checked, waiting to be placed with its group.
struct ToPlace {
    path: NsPath,
    entry: Entry,
    target: PathBuf,
    /// The content; removed if it is never placed (an upload's own temp
    /// file is left to the upload's cleanup).
    at: PathBuf,
    tmp: RemoveOnDrop,
    manifest: Manifest,
    /// Of `at` with its mode and mtime set; `None` for an upload's file,
    /// which gets them when it is placed, and for content still `inline`.
    stamp: Option<Stamp>,
    /// Content from the log, not yet written to `at`.
    inline: Option<Vec<u8>>,
    local: Option<LocalFile>,
    from_upload: bool,
}

impl ToPlace {
    /// Whether `at` is already fsynced (an upload's file, or a large one).
    fn synced(&self) -> bool {
        self.from_upload || self.entry.size > GROUP_FILE_MAX
    }
}

/// Files placed together: one `syncfs` makes their contents durable before
/// the renames and one more makes the renames durable, where each file
/// alone costs an fsync of its content and one of its directory. (At
/// thousands of small files a second those fsyncs, each a few device
/// requests, were the largest cost of a node.) Crash safety is that of one
/// file: a rename is issued only once its content is durable, and a file
/// is recorded as placed only once its rename is.
#[derive(Default)]
pub(crate) struct PlaceGroup {
    files: Vec<ToPlace>,
    unsynced_bytes: u64,
    /// See [`clear_ancestors`]; forgotten at every flush.
    dirs: HashSet<PathBuf>,
}

impl PlaceGroup {
    fn push(&mut self, f: ToPlace) {
        if !f.synced() {
            self.unsynced_bytes += f.entry.size;
        }
        self.files.push(f);
    }

    fn is_full(&self) -> bool {
        self.files.len() >= GROUP_FILES || self.unsynced_bytes >= GROUP_BYTES
    }

    /// Places and records every file of the group. On an error, the files
    /// placed before it are still made durable and recorded.
    pub(crate) async fn flush<N: PeerNet>(
        &mut self,
        node: &Arc<SyncNode<N>>,
    ) -> Result<(), MaterializeError> {
        let files = std::mem::take(&mut self.files);
        self.unsynced_bytes = 0;
        self.dirs.clear();
        if files.is_empty() {
            return Ok(());
        }
        // Syncs, renames, stats and index writes: off the runtime.
        let node = node.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| place_group(&node, files)))
            .await
            .map_err(|e| MaterializeError::Local(format!("place task: {e}")))?
    }
}

/// [`PlaceGroup::flush`], blocking.
fn place_group<N: PeerNet>(
    node: &SyncNode<N>,
    mut files: Vec<ToPlace>,
) -> Result<(), MaterializeError> {
    for f in &mut files {
        if let Some(data) = f.inline.take() {
            let stamp = write_new(&f.at, &data, &f.entry)
                .map_err(io_err(format!("writing {}", f.at.display())))?;
            f.stamp = Some(stamp);
        }
    }
    if files.iter().any(|f| !f.synced()) {
        sync_filesystems(&[fsutil::tmp_dir(&node.folder)])?;
    }
    let mut placed = Vec::with_capacity(files.len());
    let mut failed = None;
    for mut f in files {
        match place_one(node, &f) {
            Ok(stamp) => {
                f.tmp.0 = None;
                placed.push((f, stamp));
            }
            Err(e) => {
                failed = Some(MaterializeError::At {
                    path: f.path.to_string(),
                    version: f.entry.version,
                    source: Box::new(e),
                });
                break;
            }
        }
    }
    let parents: BTreeSet<PathBuf> = placed
        .iter()
        .filter_map(|(f, _)| f.target.parent().map(PathBuf::from))
        .collect();
    sync_filesystems(&parents.into_iter().collect::<Vec<_>>())?;
    // Recorded together (one index transaction), with the stamps taken
    // before the renames (which keep them): a write made after a rename
    // then shows as an edit, never as our own bytes.
    let stamped: Vec<_> = placed
        .iter()
        .map(|(f, stamp)| (f.path.as_str(), stamp.record(&f.entry), &f.manifest))
        .collect();
    node.local
        .record_files(&stamped)
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    for (f, _) in &placed {
        release_staged(node, &f.manifest);
        Metrics::add(&node.metrics.files_materialized, 1);
        node.metrics
            .events
            .record(crate::events::EventKind::Materialized, &f.path);
        debug!(path = %f.path, version = f.entry.version, "materialized");
    }
    failed.map_or(Ok(()), Err)
}

/// Renames one file of a group into place (not yet durable); returns its stamp.
fn place_one<N: PeerNet>(node: &SyncNode<N>, f: &ToPlace) -> Result<Stamp, MaterializeError> {
    let (path, entry, target, tmp) = (&f.path, &f.entry, &f.target, &f.at);
    // Mode and mtime travel with the entry (set when the content was made,
    // but for an upload's file).
    let stamped = match f.stamp {
        Some(stamp) => Ok(stamp),
        None => std::fs::File::options()
            .write(true)
            .open(tmp)
            .and_then(|file| finish(&file, entry)),
    };
    // Nothing recorded at this path, so most likely nothing is there: a
    // rename that refuses to replace checks that atomically, with no stat
    // first. If something is there, the careful way below keeps it.
    if f.local.is_none() {
        if let Ok(stamp) = &stamped {
            let stamp = *stamp;
            node.placed.note(target, stamp.inode);
            if fsutil::rename_new(tmp, target).is_ok() {
                forget_upload(node, f, false);
                return Ok(stamp);
            }
        }
    }
    // Held across the replace: a write that lands between the check below
    // and the rename still reaches this inode, and is rescued from it.
    // (Regular files only: opening a pipe would block.)
    let old = std::fs::symlink_metadata(target)
        .ok()
        .filter(|m| m.is_file())
        .and_then(|_| std::fs::File::open(target).ok())
        .and_then(|f| f.metadata().ok().filter(|m| m.is_file()).map(|m| (f, m)));
    // The fetch took time: an edit made meanwhile is kept too.
    preserve_local_edit(node, path, target, f.local.as_ref(), Some(entry.root))?;
    let placed = stamped.and_then(|stamp| {
        node.placed.note(target, stamp.inode);
        fsutil::rename_into(tmp, target).map(|()| stamp)
    });
    forget_upload(node, f, placed.is_err());
    let stamp = placed.map_err(io_err(format!("placing {}", target.display())))?;
    if let Some((f, checked)) = old {
        rescue_late_write(node, path, f, &checked)?;
    }
    Ok(stamp)
}

/// An upload's temp file is placed, or failed to be and is removed: either
/// way it leaves the uploads being committed.
fn forget_upload<N: PeerNet>(node: &SyncNode<N>, f: &ToPlace, failed: bool) {
    if f.from_upload {
        node.uploads
            .lock()
            .expect("uploads lock poisoned")
            .remove(&f.entry.root);
        if failed {
            let _ = std::fs::remove_file(&f.at);
        }
    }
}

/// `syncfs` of the filesystem of each of `dirs`, once per filesystem.
fn sync_filesystems(dirs: &[PathBuf]) -> Result<(), MaterializeError> {
    use std::os::unix::fs::MetadataExt;
    let mut done = BTreeSet::new();
    for dir in dirs {
        let dev = std::fs::metadata(dir)
            .map_err(io_err(format!("stat {}", dir.display())))?
            .dev();
        if done.insert(dev) {
            let f =
                std::fs::File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
            nix::unistd::syncfs(&f)
                .map_err(std::io::Error::from)
                .map_err(io_err(format!("syncfs of {}", dir.display())))?;
        }
    }
    Ok(())
}

/// The file just replaced at `path`, still open as `f`: if it changed after
/// it was checked (`checked`), a write raced the replace. Its bytes are
/// kept under a conflict name. A file the check moved aside is skipped:
/// it is already kept.
fn rescue_late_write<N: PeerNet>(
    node: &SyncNode<N>,
    path: &NsPath,
    mut f: std::fs::File,
    checked: &std::fs::Metadata,
) -> Result<(), MaterializeError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(now) = f.metadata() else {
        return Ok(());
    };
    let unchanged = now.len() == checked.len() && fsutil::stamp(&now) == fsutil::stamp(checked);
    // Moved aside by the check: it has a name again.
    if unchanged || now.nlink() > 0 {
        return Ok(());
    }
    let aside = node.aside_name(path.as_str());
    let tmp = fsutil::temp_path(&node.folder, "rescue").map_err(io_err("creating temp file"))?;
    let copied = (|| -> std::io::Result<()> {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))?;
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut f, &mut out)?;
        out.sync_all()?;
        fsutil::place(&tmp, &node.folder.join(&aside))
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(MaterializeError::Io {
            context: format!("keeping a write that raced the update of {path}"),
            source: e,
        });
    }
    warn!(path = %path, kept_as = %aside, "a local write raced the update; kept beside the committed one");
    node.metrics
        .events
        .record(crate::events::EventKind::ConflictCopy, &aside);
    Ok(())
}

/// A committed directory (empty ones are carried too).
fn make_directory<N: PeerNet>(
    node: &SyncNode<N>,
    path: &NsPath,
    entry: &Entry,
    local: Option<&LocalFile>,
    target: &std::path::Path,
) -> Result<(), MaterializeError> {
    if std::fs::symlink_metadata(target).is_ok_and(|m| !m.is_dir()) {
        // A user's file or link there is kept aside; our own older one goes.
        preserve_local_edit(node, path, target, local, None)?;
        if std::fs::symlink_metadata(target).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(target)
                .map_err(io_err(format!("removing {}", target.display())))?;
        }
    }
    std::fs::create_dir_all(target).map_err(io_err(format!("creating {}", target.display())))?;
    if let Some(parent) = target.parent() {
        fsutil::fsync_dir(parent).map_err(io_err("fsync after mkdir"))?;
    }
    record_placed(
        node,
        path,
        entry,
        target,
        &synod_chunker::chunk_slice_scaled(&[], node.params),
    )?;
    debug!(path = %path, version = entry.version, "directory materialized");
    Ok(())
}

/// A committed link: its content is the target, fetched like a file's. A
/// target that would lead outside the folder is refused and reported.
async fn make_link<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    path: &NsPath,
    entry: &Entry,
    local: Option<&LocalFile>,
    target: &std::path::Path,
) -> Result<(), MaterializeError> {
    use std::os::unix::ffi::OsStringExt;
    let Ready {
        at: tmp, manifest, ..
    } = assemble(node, path, entry, local).await?;
    let bytes = std::fs::read(&tmp).map_err(io_err(format!("reading {}", tmp.display())));
    let _ = std::fs::remove_file(&tmp);
    let bytes = bytes?;
    let link_to = PathBuf::from(std::ffi::OsString::from_vec(bytes.clone()));
    if bytes.is_empty() || bytes.contains(&0) || crate::scanner::escapes(path.as_str(), &link_to) {
        warn!(path = %path, target = %link_to.display(), "committed link points outside the folder; not created");
        node.metrics
            .events
            .record(crate::events::EventKind::Refused, path);
        return Ok(());
    }
    preserve_local_edit(node, path, target, local, None)?;
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir(target).map_err(io_err(format!(
            "replacing directory {} by a link",
            target.display()
        )))?;
    }
    let link_tmp = fsutil::temp_path(&node.folder, "link").map_err(io_err("creating temp link"))?;
    std::os::unix::fs::symlink(&link_to, &link_tmp)
        .map_err(io_err(format!("creating link {}", link_tmp.display())))?;
    fsutil::place(&link_tmp, target).map_err(io_err(format!("placing {}", target.display())))?;
    fsutil::keep_link_target(&node.folder, &manifest, &bytes)
        .map_err(io_err("keeping the link target"))?;
    node.local
        .index()
        .record_file(&fsutil::link_target_rel(&manifest), &manifest)
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    record_placed(node, path, entry, target, &manifest)?;
    node.metrics
        .events
        .record(crate::events::EventKind::Materialized, path);
    debug!(path = %path, version = entry.version, "link materialized");
    Ok(())
}

/// Gives the written file `f` the mode and mtime of `entry`; returns its stamp.
fn finish(f: &std::fs::File, entry: &Entry) -> std::io::Result<Stamp> {
    use std::os::unix::fs::PermissionsExt;
    if entry.mode & 0o7777 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o7777))?;
    }
    if entry.mtime_ns > 0 {
        let t = std::time::UNIX_EPOCH + Duration::from_nanos(entry.mtime_ns as u64);
        f.set_modified(t)?;
    }
    Ok(Stamp::of(&f.metadata()?))
}

/// What the local record keeps of a file on disk (a rename keeps it).
#[derive(Debug, Clone, Copy)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        let (mtime_ns, inode) = fsutil::stamp(meta);
        Stamp {
            size: fsutil::size_of(meta),
            mtime_ns,
            inode,
        }
    }

    /// The local record of `entry` with this stamp.
    fn record(self, entry: &Entry) -> LocalFile {
        LocalFile {
            version: entry.version,
            root: entry.root,
            size: self.size,
            mtime_ns: self.mtime_ns,
            inode: self.inode,
            kind: entry.kind,
        }
    }
}

/// New content in a temp file, with the entry's mode and mtime.
pub(crate) struct Ready {
    at: PathBuf,
    manifest: Manifest,
    stamp: Stamp,
    /// `at` is a staged file (`Staging::ready_file`): staging keeps it until
    /// it is placed, so it is never removed here.
    staged: bool,
}

fn record<N: PeerNet>(
    node: &SyncNode<N>,
    path: &NsPath,
    file: &LocalFile,
    manifest: &Manifest,
) -> Result<(), MaterializeError> {
    node.local
        .record_file(path.as_str(), file, manifest)
        .map_err(|e| MaterializeError::Local(e.to_string()))
}

/// Records what was just placed at `target` for `entry`, with the stamp
/// it has now, and frees its staged chunks (the folder holds them).
fn record_placed<N: PeerNet>(
    node: &SyncNode<N>,
    path: &NsPath,
    entry: &Entry,
    target: &std::path::Path,
    manifest: &Manifest,
) -> Result<(), MaterializeError> {
    let file = placed_stamp(entry, target)?;
    record(node, path, &file, manifest)?;
    release_staged(node, manifest);
    Ok(())
}

/// Frees the staged copies of a placed file's chunks: the folder holds them.
fn release_staged<N: PeerNet>(node: &SyncNode<N>, manifest: &Manifest) {
    // A staged file goes whole first: chunk by chunk, each removal would
    // search its list of thousands.
    node.staging.forget_file(&manifest.root());
    for c in manifest.chunks() {
        node.staging.remove(&c.id);
    }
}

/// The local record of `entry` just placed at `target`, with the stamp it has now.
fn placed_stamp(entry: &Entry, target: &std::path::Path) -> Result<LocalFile, MaterializeError> {
    let meta =
        std::fs::symlink_metadata(target).map_err(io_err(format!("stat {}", target.display())))?;
    Ok(Stamp::of(&meta).record(entry))
}

fn on_disk_matches(target: &std::path::Path, l: &LocalFile) -> bool {
    match std::fs::symlink_metadata(target) {
        Ok(meta) => {
            fsutil::size_of(&meta) == l.size && fsutil::stamp(&meta) == (l.mtime_ns, l.inode)
        }
        Err(_) => false,
    }
}

/// Makes every ancestor of `path` inside the folder a real directory. A
/// symlink or a file in the way (local, never committed under that name)
/// is moved aside under a conflict name, so nothing is written through a
/// link to outside the folder and nothing local is lost.
/// `seen` holds directories already found real by this step's group:
/// siblings placed together do not stat their common parents again.
fn clear_ancestors<N: PeerNet>(
    node: &SyncNode<N>,
    path: &NsPath,
    seen: &mut HashSet<PathBuf>,
) -> Result<(), MaterializeError> {
    let mut at = node.folder.clone();
    let segments: Vec<&str> = path.as_str().split('/').collect();
    for (i, seg) in segments[..segments.len() - 1].iter().enumerate() {
        at.push(seg);
        if seen.contains(&at) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&at) else {
            return Ok(());
        };
        if meta.is_dir() {
            seen.insert(at.clone());
            continue;
        }
        let rel = segments[..=i].join("/");
        let aside = node.aside_name(&rel);
        warn!(path = %path, blocking = %rel, kept_as = %aside, "a local link or file stood where the committed path needs a directory; moved aside");
        fsutil::place(&at, &node.folder.join(&aside))
            .map_err(io_err(format!("moving {} aside", at.display())))?;
        return Ok(());
    }
    Ok(())
}

/// A file at `target` that is not what this node last wrote there was edited
/// behind synod's back: keep it under a conflict name rather than overwrite.
fn preserve_local_edit<N: PeerNet>(
    node: &SyncNode<N>,
    path: &NsPath,
    target: &std::path::Path,
    local: Option<&LocalFile>,
    incoming: Option<Hash>,
) -> Result<(), MaterializeError> {
    let Ok(meta) = std::fs::symlink_metadata(target) else {
        return Ok(());
    };
    if local.is_some_and(|l| {
        fsutil::size_of(&meta) == l.size && fsutil::stamp(&meta) == (l.mtime_ns, l.inode)
    }) {
        return Ok(());
    }
    // A crash between placing a file and recording it leaves our own bytes
    // with an unknown stamp: content we wrote is not a user's edit.
    if meta.is_file() {
        if let Ok(m) = synod_chunker::chunk_file_scaled(target, node.params) {
            let ours = local.is_some_and(|l| l.root == m.root()) || incoming == Some(m.root());
            if ours {
                return Ok(());
            }
        }
    }
    let aside = node.aside_name(path.as_str());
    let aside_path = node.folder.join(&aside);
    warn!(path = %path, kept_as = %aside, "local file changed behind synod's back; kept beside the committed one");
    node.metrics
        .events
        .record(crate::events::EventKind::ConflictCopy, &aside);
    fsutil::place(target, &aside_path).map_err(io_err(format!("keeping {}", target.display())))
}

/// Builds the new content in a temp file: manifest from a peer (diffed
/// against the local old version), chunks from the staging area, the local
/// folder, then peers.
async fn assemble<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    path: &NsPath,
    entry: &Entry,
    local: Option<&LocalFile>,
) -> Result<Ready, MaterializeError> {
    if let Some(ready) = from_inline(node, path, entry).await? {
        return Ok(ready);
    }
    if let Some(ready) = from_staged_file(node, path, entry).await? {
        return Ok(ready);
    }
    let ids = manifest_ids(node, entry, local).await?;
    let bases = delta_bases(node, &ids, local);
    let tmp =
        fsutil::temp_path(&node.folder, "materialize").map_err(io_err("creating temp file"))?;
    let out = std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    // Removed if this is cancelled half way (a prefetch that is dropped).
    let mut unfinished = RemoveOnDrop(Some(tmp.clone()));
    let mut lens = Vec::with_capacity(ids.len());
    let result = async {
        for window in ids.chunks(GATHER_WINDOW) {
            if let Some(got) = write_held_window(node, window, &out)
                .await
                .map_err(io_err(format!("writing {}", tmp.display())))?
            {
                lens.extend(got);
                continue;
            }
            let chunks = gather(node, entry, window, &bases).await?;
            lens.extend(chunks.iter().map(|b| b.len() as u32));
            // Off the runtime, as are the reads in `gather`.
            let mut file = out
                .try_clone()
                .map_err(io_err(format!("writing {}", tmp.display())))?;
            tokio::task::spawn_blocking(move || {
                chunks.iter().try_for_each(|bytes| file.write_all(bytes))
            })
            .await
            .map_err(|e| MaterializeError::Local(format!("write task: {e}")))?
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        }
        // A small file is made durable with its group (`PlaceGroup`). Off
        // the runtime: assemblies running ahead overlap their fsyncs.
        let file = out
            .try_clone()
            .map_err(io_err(format!("finishing {}", tmp.display())))?;
        let sync = entry.size > GROUP_FILE_MAX;
        let e = entry.clone();
        let stamp = tokio::task::spawn_blocking(move || {
            let stamp = finish(&file, &e)?;
            if sync {
                file.sync_all()?;
            }
            Ok(stamp)
        })
        .await
        .map_err(|e| MaterializeError::Local(format!("finish task: {e}")))?
        .map_err(io_err(format!("finishing {}", tmp.display())))?;
        let mut blob = Vec::with_capacity(ids.len() * 32);
        for id in &ids {
            blob.extend_from_slice(id.as_bytes());
        }
        let manifest =
            Manifest::from_parts(node.params.for_size(entry.size), entry.size, &blob, &lens)
                .map_err(|_| MaterializeError::RootMismatch {
                    path: path.to_string(),
                    got: Hash::ZERO,
                    expected: entry.root,
                })?;
        if manifest.root() != entry.root {
            return Err(MaterializeError::RootMismatch {
                path: path.to_string(),
                got: manifest.root(),
                expected: entry.root,
            });
        }
        Ok((manifest, stamp))
    }
    .await;
    let (manifest, stamp) = result?;
    node.local
        .put_manifest(&manifest)
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    unfinished.0 = None;
    Ok(Ready {
        at: tmp,
        manifest,
        stamp,
        staged: false,
    })
}

/// A small file's content, carried in its log entry
/// ([`synod_consensus::Command::PutInline`]) and checked against it.
pub(crate) struct Inline {
    data: Vec<u8>,
    manifest: Manifest,
}

/// The inline content of `entry`; `None` if it is not a small file or
/// this node keeps no inline bytes for it.
fn inline_data<N: PeerNet>(
    node: &SyncNode<N>,
    path: &NsPath,
    entry: &Entry,
) -> Result<Option<Inline>, MaterializeError> {
    if entry.kind != EntryKind::File || entry.size > synod_consensus::MAX_INLINE as u64 {
        return Ok(None);
    }
    let data = node
        .reader
        .view()
        .inline_content(path, &entry.root)
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    let Some(data) = data else {
        return Ok(None);
    };
    let manifest = synod_chunker::chunk_slice_scaled(&data, node.params);
    // The state machine checked the size; the root is the writer's claim.
    if manifest.root() != entry.root {
        return Err(MaterializeError::RootMismatch {
            path: path.to_string(),
            got: manifest.root(),
            expected: entry.root,
        });
    }
    Ok(Some(Inline { data, manifest }))
}

/// Creates `at` holding `data`, with `entry`'s mode and mtime.
fn write_new(at: &Path, data: &[u8], entry: &Entry) -> std::io::Result<Stamp> {
    let mut f = std::fs::File::create(at)?;
    f.write_all(data)?;
    finish(&f, entry)
}

/// The inline content of `entry` written to a temp file (not yet
/// fsynced); `None` as for [`inline_data`].
async fn from_inline<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    path: &NsPath,
    entry: &Entry,
) -> Result<Option<Ready>, MaterializeError> {
    let Some(Inline { data, manifest }) = inline_data(node, path, entry)? else {
        return Ok(None);
    };
    let tmp =
        fsutil::temp_path(&node.folder, "materialize").map_err(io_err("creating temp file"))?;
    let mut unfinished = RemoveOnDrop(Some(tmp.clone()));
    // Made durable with its group (`PlaceGroup`). Off the runtime: creating
    // a file can wait on the disk. (Its manifest is recorded with it when
    // it is placed.)
    let at = tmp.clone();
    let e = entry.clone();
    let stamp = tokio::task::spawn_blocking(move || write_new(&at, &data, &e))
        .await
        .map_err(|e| MaterializeError::Local(format!("write task: {e}")))?
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    unfinished.0 = None;
    Ok(Some(Ready {
        at: tmp,
        manifest,
        stamp,
        staged: false,
    }))
}

/// A large file staged as itself (`Staging::ready_file`), completed if a
/// push was cut short, given its mode and mtime and synced: placing it
/// renames it out of the staging area, so its bytes are not copied.
async fn from_staged_file<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    path: &NsPath,
    entry: &Entry,
) -> Result<Option<Ready>, MaterializeError> {
    if entry.size < crate::staging::STAGE_AS_FILE_MIN {
        return Ok(None);
    }
    let Some(manifest) = node
        .local
        .manifest(&entry.root)
        .map_err(|e| MaterializeError::Local(e.to_string()))?
    else {
        return Ok(None);
    };
    let Some(missing) = node.staging.missing_in_file(&manifest) else {
        return Ok(None);
    };
    // A push cut short (another node answered first): the rest is fetched
    // into the staged file, unless most of the file is missing.
    if missing.len() * 2 > manifest.chunk_count() {
        return Ok(None);
    }
    let ids: Vec<Hash> = missing.iter().map(|c| c.id).collect();
    for window in ids.chunks(GATHER_WINDOW) {
        let chunks = gather(node, entry, window, &HashMap::new()).await?;
        let (staging, m) = (node.staging.clone(), manifest.clone());
        let chunks: Vec<(Hash, Bytes)> = window.iter().copied().zip(chunks).collect();
        let filled = tokio::task::spawn_blocking(move || staging.fill_file(&m, &chunks))
            .await
            .map_err(|e| MaterializeError::Local(format!("staged file task: {e}")))?
            .map_err(io_err("filling a staged file"))?;
        if !filled {
            return Ok(None);
        }
    }
    let (staging, e, m) = (node.staging.clone(), entry.clone(), manifest.clone());
    let ready =
        tokio::task::spawn_blocking(move || -> std::io::Result<Option<(PathBuf, Stamp)>> {
            let Some(at) = staging.ready_file(&m)? else {
                return Ok(None);
            };
            // Read-only is enough to set mode and mtime (owner) and to sync, and
            // works again if a first placement failed after a read-only mode.
            let f = std::fs::File::open(&at)?;
            let stamp = finish(&f, &e)?;
            f.sync_all()?;
            Ok(Some((at, stamp)))
        })
        .await
        .map_err(|e| MaterializeError::Local(format!("staged file task: {e}")))?
        .map_err(io_err("readying a staged file"))?;
    let Some((at, stamp)) = ready else {
        return Ok(None);
    };
    Metrics::add(
        &node.metrics.chunks_local,
        (manifest.chunk_count() - missing.len()) as u64,
    );
    Metrics::add(&node.metrics.files_placed_as_staged, 1);
    debug!(%path, size = entry.size, "placing from its staged file");
    Ok(Some(Ready {
        at,
        manifest,
        stamp,
        staged: true,
    }))
}

/// A temp file that is removed when this is dropped, unless taken.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(tmp) = self.0.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Peers worth asking for `entry`'s content: its holders first, then the
/// other members.
fn sources<N: PeerNet>(node: &SyncNode<N>, entry: &Entry) -> Vec<NodeId> {
    let (voters, learners, _) = node.members();
    let mut out: Vec<NodeId> = entry
        .holders
        .iter()
        .copied()
        .filter(|&p| p != node.id)
        .collect();
    for p in voters.into_iter().chain(learners) {
        if p != node.id && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The chunk ids of `entry`'s content: known locally, or found by a Merkle
/// diff of the peer's tree against the local old version's.
async fn manifest_ids<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    entry: &Entry,
    local: Option<&LocalFile>,
) -> Result<Vec<Hash>, MaterializeError> {
    if let Ok(Some(m)) = node.local.manifest(&entry.root) {
        return Ok(m.chunk_ids().collect());
    }
    if entry.size == 0 {
        return Ok(Vec::new());
    }
    let old_ids: Vec<Hash> = match local.map(|l| node.local.manifest(&l.root)) {
        Some(Ok(Some(m))) => m.chunk_ids().collect(),
        _ => Vec::new(),
    };
    let old_tree = MerkleTree::from_leaves(old_ids);
    for peer in sources(node, entry) {
        let net = node.net.clone();
        let root = entry.root;
        let tree = old_tree.clone();
        let handle = tokio::runtime::Handle::current();
        // diff_trees is synchronous; its source blocks on the network from a
        // blocking thread, never from a runtime worker.
        let result = tokio::task::spawn_blocking(move || {
            let mut source = NetTreeSource {
                net,
                peer,
                root,
                handle,
            };
            diff_trees(&tree, &root, &mut source)
        })
        .await;
        match result {
            Ok(Ok(diff)) => {
                let mut ids: Vec<Hash> = old_tree.leaves().to_vec();
                ids.resize(diff.remote_leaf_count as usize, Hash::ZERO);
                for (i, id) in diff.remote_leaves {
                    ids[i as usize] = id;
                }
                return Ok(ids);
            }
            Ok(Err(e)) => debug!(peer, cause = %e, "manifest diff failed"),
            Err(e) => debug!(peer, cause = %e, "manifest diff task failed"),
        }
    }
    Err(MaterializeError::NoManifest { root: entry.root })
}

struct NetTreeSource<N> {
    net: Arc<N>,
    peer: NodeId,
    root: Hash,
    handle: tokio::runtime::Handle,
}

impl<N: PeerNet> TreeSource for NetTreeSource<N> {
    type Error = PeerError;

    fn top(&mut self) -> Result<(u64, Hash), PeerError> {
        self.handle
            .block_on(self.net.tree_top(self.peer, self.root))?
            .ok_or_else(|| PeerError::new(self.peer, format!("does not have tree {}", self.root)))
    }

    fn nodes(&mut self, level: usize, range: Range<u64>) -> Result<Vec<Hash>, PeerError> {
        // Large ranges go in slices the wire accepts.
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut start = range.start;
        while start < range.end {
            let end = (start + 16_384).min(range.end);
            out.extend(self.handle.block_on(self.net.tree_nodes(
                self.peer,
                self.root,
                level as u32,
                start..end,
            ))?);
            start = end;
        }
        Ok(out)
    }
}

/// For each chunk of the new version `ids` that replaced chunks of the
/// version held here, those old chunks: what it can be fetched as a delta
/// against.
fn delta_bases<N: PeerNet>(
    node: &SyncNode<N>,
    ids: &[Hash],
    local: Option<&LocalFile>,
) -> HashMap<Hash, Arc<Vec<Hash>>> {
    let Some(Ok(Some(old))) = local.map(|l| node.local.manifest(&l.root)) else {
        return HashMap::new();
    };
    let mut out = HashMap::new();
    for run in delta::runs(ids, |id| *id, &old) {
        let base = Arc::new(run.old);
        for id in run.new {
            out.entry(id).or_insert_with(|| base.clone());
        }
    }
    out
}

/// The bytes of `ids`, in order, each verified against its id.
async fn gather<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    entry: &Entry,
    ids: &[Hash],
    bases: &HashMap<Hash, Arc<Vec<Hash>>>,
) -> Result<Vec<Bytes>, MaterializeError> {
    let (mut found, mut missing) = held(node, ids.to_vec()).await?;
    // A push to this node that lost the race to another may still be
    // landing: its chunks are taken from it, not fetched a second time.
    if !missing.is_empty() && node.staging.wait_arrived(&missing, ARRIVAL_WAIT).await {
        let (more, still) = held(node, missing).await?;
        found.extend(more);
        missing = still;
    }
    let missing = fetch_as_deltas(node, entry, missing, bases, &mut found).await;
    if !missing.is_empty() {
        fetch_from_peers(node, entry, missing, &mut found).await?;
    }
    ids.iter()
        .map(|id| {
            found
                .get(id)
                .cloned()
                .ok_or(MaterializeError::ChunkUnavailable { id: *id })
        })
        .collect()
}

/// How long assembling waits for chunks that are arriving in a push before
/// fetching them anyway.
const ARRIVAL_WAIT: Duration = Duration::from_secs(5);

/// The chunks of `ids` held here (staged or in the folder), and those not.
async fn held<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    ids: Vec<Hash>,
) -> Result<(HashMap<Hash, Bytes>, Vec<Hash>), MaterializeError> {
    // Staging and folder reads are disk reads: off the runtime.
    let node = node.clone();
    tokio::task::spawn_blocking(move || {
        let mut found: HashMap<Hash, Bytes> = HashMap::new();
        let mut missing: Vec<Hash> = Vec::new();
        for id in &ids {
            if found.contains_key(id) || missing.contains(id) {
                continue;
            }
            match node.serve_chunk(id) {
                Some(bytes) => {
                    Metrics::add(&node.metrics.chunks_local, 1);
                    found.insert(*id, Bytes::from(bytes));
                }
                None => missing.push(*id),
            }
        }
        (found, missing)
    })
    .await
    .map_err(|e| MaterializeError::Local(format!("chunk lookup task: {e}")))
}

/// Largest window buffer a blocking thread keeps for the next window.
const KEEP_WINDOW_BUFFER: usize = 16 << 20;

thread_local! {
    /// The window buffer of [`write_held_window`], reused: a fresh buffer
    /// per window cost page faults and zeroing (a tenth of a receiver's CPU
    /// when assembling thousands of small files).
    static WINDOW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends the chunks `ids` to `out` if this node holds every one (staged
/// or in the folder, each checked against its id), reading them into one
/// reused buffer; returns their lengths, or `None` (nothing written) if
/// some must be fetched.
async fn write_held_window<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    ids: &[Hash],
    out: &std::fs::File,
) -> std::io::Result<Option<Vec<u32>>> {
    let (node, ids, mut out) = (node.clone(), ids.to_vec(), out.try_clone()?);
    tokio::task::spawn_blocking(move || {
        WINDOW.with_borrow_mut(|buf| {
            buf.clear();
            let mut open = crate::staging::OpenPacks::default();
            let mut lens = Vec::with_capacity(ids.len());
            for id in &ids {
                let start = buf.len();
                if !node.serve_chunk_into(id, buf, &mut open) {
                    return Ok(None);
                }
                lens.push((buf.len() - start) as u32);
            }
            out.write_all(buf)?;
            if buf.capacity() > KEEP_WINDOW_BUFFER {
                *buf = Vec::new();
            }
            Metrics::add(&node.metrics.chunks_local, ids.len() as u64);
            Ok(Some(lens))
        })
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Fetches the chunks of `missing` that replaced chunks held here as
/// deltas against those, rebuilt and checked here; returns the rest (and
/// any whose delta failed), to be fetched whole.
async fn fetch_as_deltas<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    entry: &Entry,
    missing: Vec<Hash>,
    bases: &HashMap<Hash, Arc<Vec<Hash>>>,
    found: &mut HashMap<Hash, Bytes>,
) -> Vec<Hash> {
    let mut by_base: HashMap<Arc<Vec<Hash>>, Vec<Hash>> = HashMap::new();
    let mut rest = Vec::new();
    for id in missing {
        match bases.get(&id) {
            Some(base) => by_base.entry(base.clone()).or_default().push(id),
            None => rest.push(id),
        }
    }
    let Some(&peer) = sources(node, entry).first() else {
        rest.extend(by_base.into_values().flatten());
        return rest;
    };
    for (base, ids) in by_base {
        let signed = {
            let node = node.clone();
            let base = base.clone();
            tokio::task::spawn_blocking(move || node.signed_run(&base)).await
        };
        let Ok(Some((bytes, sig))) = signed else {
            rest.extend(ids);
            continue;
        };
        for part in ids.chunks(BATCH_CHUNKS) {
            let got = match node
                .net
                .fetch_deltas(peer, vec![(sig.clone(), part.to_vec())])
                .await
            {
                Ok(got) => got,
                Err(e) => {
                    debug!(peer, cause = %e, "delta fetch failed; fetching chunks whole");
                    rest.extend_from_slice(part);
                    continue;
                }
            };
            for (id, d) in part.iter().zip(got) {
                match d.map(|d| (d.len(), delta::rebuild(id, &bytes, &d))) {
                    Some((len, Ok(chunk))) => {
                        Metrics::add(&node.metrics.delta_bytes_received, len as u64);
                        Metrics::add(&node.metrics.chunks_rebuilt, 1);
                        found.insert(*id, Bytes::from(chunk));
                    }
                    Some((_, Err(e))) => {
                        debug!(peer, cause = %e, "delta did not rebuild its chunk; fetching it whole");
                        rest.push(*id);
                    }
                    None => rest.push(*id),
                }
            }
        }
    }
    rest
}

/// Splits `missing` across the peers that may hold them and fetches
/// batches in parallel; every chunk is verified. A chunk a peer lacked is
/// asked of the next peer; a peer that failed or sent wrong bytes is dropped
/// for the rest of this transfer.
async fn fetch_from_peers<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    entry: &Entry,
    missing: Vec<Hash>,
    found: &mut HashMap<Hash, Bytes>,
) -> Result<(), MaterializeError> {
    let peers = sources(node, entry);
    let mut todo: BTreeSet<Hash> = missing.into_iter().collect();
    let mut dropped: BTreeSet<NodeId> = BTreeSet::new();
    let mut tried: HashMap<Hash, BTreeSet<NodeId>> = HashMap::new();
    loop {
        // Each chunk goes to a live peer that has not been asked for it,
        // spread round-robin so every peer gets a share.
        let mut per_peer: BTreeMap<NodeId, Vec<Hash>> = BTreeMap::new();
        for (k, id) in todo.iter().enumerate() {
            let asked = tried.get(id);
            let candidates: Vec<NodeId> = peers
                .iter()
                .copied()
                .filter(|p| !dropped.contains(p) && !asked.is_some_and(|a| a.contains(p)))
                .collect();
            if let Some(&p) = candidates.get(k % candidates.len().max(1)) {
                per_peer.entry(p).or_default().push(*id);
            }
        }
        if per_peer.is_empty() {
            break;
        }
        let requests: Vec<(NodeId, Vec<Hash>)> = per_peer
            .into_iter()
            .flat_map(|(p, ids)| {
                ids.chunks(BATCH_CHUNKS)
                    .map(|b| (p, b.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let results =
            futures::future::join_all(requests.into_iter().map(|(peer, ids)| async move {
                let result = node.net.fetch_chunks(peer, ids.clone()).await;
                (peer, ids, result)
            }))
            .await;
        for (peer, ids, result) in results {
            for id in &ids {
                tried.entry(*id).or_default().insert(peer);
            }
            match result {
                Ok(chunks) => {
                    // Verified by the transport; a peer that sent wrong
                    // bytes answered with an error.
                    for (id, bytes) in ids.iter().zip(chunks) {
                        let Some(bytes) = bytes else { continue };
                        Metrics::add(&node.metrics.chunks_fetched, 1);
                        Metrics::add(&node.metrics.bytes_fetched, bytes.len() as u64);
                        todo.remove(id);
                        found.insert(*id, bytes);
                    }
                }
                Err(e) => {
                    debug!(peer, cause = %e, "chunk fetch failed; peer dropped for this transfer");
                    dropped.insert(peer);
                }
            }
        }
        if todo.is_empty() {
            break;
        }
    }
    match todo.into_iter().next() {
        Some(id) => Err(MaterializeError::ChunkUnavailable { id }),
        None => Ok(()),
    }
}

async fn remove_entry<N: PeerNet>(
    node: &Arc<SyncNode<N>>,
    path: &NsPath,
    version: u64,
) -> Result<(), MaterializeError> {
    let target = node.folder.join(path.as_str());
    let local = node
        .local
        .file(path.as_str())
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    // The local file belongs to a newer commit than this delete.
    if local.as_ref().is_some_and(|l| l.version > version) {
        return Ok(());
    }
    match std::fs::symlink_metadata(&target) {
        Ok(meta) if meta.is_dir() => {
            // Only empty directories go; files inside have their own entries.
            let _ = std::fs::remove_dir(&target);
        }
        Ok(meta) => {
            let ours = local.as_ref().is_some_and(|l| {
                fsutil::size_of(&meta) == l.size && fsutil::stamp(&meta) == (l.mtime_ns, l.inode)
            });
            if ours {
                std::fs::remove_file(&target)
                    .map_err(io_err(format!("removing {}", target.display())))?;
                if let Some(parent) = target.parent() {
                    fsutil::fsync_dir(parent).map_err(io_err("fsync after remove"))?;
                }
                Metrics::add(&node.metrics.files_removed, 1);
                node.metrics
                    .events
                    .record(crate::events::EventKind::Removed, path);
            } else {
                // Edit/delete conflict: the edit is kept where it is and, no
                // longer recorded, is committed again by the scanner.
                warn!(path = %path, "deleted remotely but edited here; the edit is kept");
                node.metrics
                    .events
                    .record(crate::events::EventKind::EditKept, path);
            }
        }
        Err(_) => {}
    }
    node.local
        .forget_file(path.as_str())
        .map_err(|e| MaterializeError::Local(e.to_string()))?;
    info!(path = %path, "removed");
    Ok(())
}
