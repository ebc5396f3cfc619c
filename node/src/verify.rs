//! `synod verify`: rehash every local file whose stamp says it is what this
//! node wrote, against its committed root. A mismatch (bit rot, or a change
//! behind synod's back that kept size and mtime) is moved to
//! `.synod/corrupt/` (never deleted) and the committed content is fetched
//! again from peers.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use synod_consensus::NsPath;
use tracing::{info, warn};

use crate::engine::SyncNode;
use crate::fsutil;
use crate::peers::PeerNet;

/// Progress and outcome of the latest verification.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub running: bool,
    pub started_ms: u64,
    pub files_total: usize,
    pub files_done: usize,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Files whose bytes did not hash to their committed root.
    pub mismatched: Vec<String>,
    /// Of those, the ones restored from peers.
    pub repaired: Vec<String>,
    /// Files that could not be checked or repaired, with why.
    pub failed: Vec<(String, String)>,
    /// Files skipped because they were edited and not yet committed.
    pub skipped_edited: usize,
}

/// Shared between the API (which starts and reports) and the job.
pub type Shared = Arc<Mutex<VerifyReport>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts a verification unless one is running. Returns whether it started.
pub fn start<N: PeerNet>(node: Arc<SyncNode<N>>, shared: Shared) -> bool {
    {
        let mut r = shared.lock().unwrap_or_else(|e| e.into_inner());
        if r.running {
            return false;
        }
        *r = VerifyReport {
            running: true,
            started_ms: now_ms(),
            ..VerifyReport::default()
        };
    }
    tokio::spawn(async move {
        run(&node, &shared).await;
        let mut r = shared.lock().unwrap_or_else(|e| e.into_inner());
        r.running = false;
        info!(
            files = r.files_done,
            mismatched = r.mismatched.len(),
            repaired = r.repaired.len(),
            failed = r.failed.len(),
            "verify finished"
        );
    });
    true
}

async fn run<N: PeerNet>(node: &Arc<SyncNode<N>>, shared: &Shared) {
    let update = |f: &mut dyn FnMut(&mut VerifyReport)| {
        let mut r = shared.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut r);
    };
    let records = match node.local.files() {
        // Directories hold no bytes; a link's target is checked when read.
        Ok(r) => r
            .into_iter()
            .filter(|(_, l)| l.kind == synod_consensus::EntryKind::File)
            .collect::<Vec<_>>(),
        Err(e) => {
            update(&mut |r| {
                r.failed
                    .push((String::new(), format!("local records: {e}")))
            });
            return;
        }
    };
    update(&mut |r| {
        r.files_total = records.len();
        r.bytes_total = records.iter().map(|(_, l)| l.size).sum();
    });
    for (path, record) in records {
        let abs = node.folder.join(&path);
        let params = node.params;
        let rec = record.clone();
        let checked = tokio::task::spawn_blocking(move || -> std::io::Result<Option<bool>> {
            let meta = std::fs::symlink_metadata(&abs)?;
            if meta.len() != rec.size || fsutil::stamp(&meta) != (rec.mtime_ns, rec.inode) {
                return Ok(None);
            }
            let m =
                synod_chunker::chunk_file_scaled(&abs, params).map_err(std::io::Error::other)?;
            // Edited while we read it: the scanner's business, not rot.
            let after = std::fs::symlink_metadata(&abs)?;
            if after.len() != rec.size || fsutil::stamp(&after) != (rec.mtime_ns, rec.inode) {
                return Ok(None);
            }
            Ok(Some(m.root() == rec.root))
        })
        .await;
        match checked {
            Ok(Ok(Some(true))) => {}
            Ok(Ok(Some(false))) => {
                warn!(path = %path, "content does not match its committed root; repairing");
                update(&mut |r| r.mismatched.push(path.clone()));
                match repair(node, &path).await {
                    Ok(()) => update(&mut |r| r.repaired.push(path.clone())),
                    Err(e) => update(&mut |r| r.failed.push((path.clone(), e.clone()))),
                }
            }
            Ok(Ok(None)) => update(&mut |r| r.skipped_edited += 1),
            // Gone meanwhile: a delete the scanner handles.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                update(&mut |r| r.skipped_edited += 1)
            }
            Ok(Err(e)) => update(&mut |r| r.failed.push((path.clone(), e.to_string()))),
            Err(e) => update(&mut |r| r.failed.push((path.clone(), e.to_string()))),
        }
        update(&mut |r| {
            r.files_done += 1;
            r.bytes_done += record.size;
        });
    }
}

/// Moves the bad copy aside and materializes the committed entry again.
async fn repair<N: PeerNet>(node: &Arc<SyncNode<N>>, path: &str) -> Result<(), String> {
    let ns = NsPath::parse(path).map_err(|e| e.to_string())?;
    let _folder = node.folder_lock.lock().await;
    let entry = node
        .reader
        .view()
        .get(&ns)
        .map_err(|e| e.to_string())?
        .filter(|e| e.is_live())
        .ok_or_else(|| format!("{path} is no longer in the namespace"))?;
    let abs = node.folder.join(path);
    let aside = node
        .folder
        .join(".synod/corrupt")
        .join(format!("{}", now_ms()))
        .join(path);
    if let Some(dir) = aside.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::rename(&abs, &aside).map_err(|e| format!("moving {path} aside: {e}"))?;
    node.local.forget_file(path).map_err(|e| e.to_string())?;
    let mut group = crate::materializer::PlaceGroup::default();
    crate::materializer::materialize_entry(
        node,
        &ns,
        &entry,
        crate::materializer::Assembled::none(),
        &mut group,
    )
    .await
    .map_err(|e| e.to_string())?;
    group.flush(node).await.map_err(|e| e.to_string())?;
    info!(path = %path, kept = %aside.display(), "repaired from peers");
    Ok(())
}
