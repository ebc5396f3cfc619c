//! The `folder` workload: edits made directly in the nodes' folders, not
//! through the API, so synod's scanner, watcher, conflict copies and pending
//! journal are what is tested. One client per node (a node's folder has one
//! user, so the client never races itself) creates, overwrites, appends to,
//! renames and deletes files `folder/d0..` while faults run.
//!
//! Every edit writes bytes no other edit writes: a first line naming node,
//! client counter and path, then filler (small to a few chunks). The history
//! records each edit with the digest of the bytes it left (`value`, BLAKE3
//! hex of the whole file) and the digest of the bytes it replaced (`base`,
//! read from the folder just before), which is what the conflict-accounting
//! checker (`checker/folder.rs`) needs. An edit is `ok` when the local
//! write completes; synod commits it later, asynchronously.
//!
//! The client guards against its own races with synod's materializer, which
//! may replace a file at any time: an overwrite or append checks (on the
//! open descriptor) that the file is still the one it read, and afterwards
//! that the path still names the inode it wrote (else the edit went to a
//! replaced file: `info`); a delete first renames the file to an ignored
//! trash name and takes the base from the bytes it actually removed; a
//! rename never replaces (`RENAME_NOREPLACE`) and records the bytes it
//! actually moved.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::event;
use crate::history::{Event, EventType, HistoryError, OpKind, Recorder};

/// Every path of the workload starts with this.
pub const FOLDER_PREFIX: &str = "folder/";

/// Largest filler of an edit: a few chunks at most.
const FILLER_MAX: usize = 256 * 1024;

/// Settings of one `folder` run.
#[derive(Debug, Clone)]
pub struct FolderConfig {
    /// (node id, folder) of each node; one client per node.
    pub nodes: Vec<(u64, PathBuf)>,
    pub paths: Vec<String>,
    pub seed: u64,
    /// Pause between a client's edits: uniform in this range.
    pub think: (Duration, Duration),
}

/// `folder/d0` .. `folder/d{n-1}`.
pub fn folder_paths(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{FOLDER_PREFIX}d{i}")).collect()
}

/// The recorded digest of a file's bytes: full BLAKE3 hex, as the
/// convergence snapshot records committed files.
pub fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A file as the client read it: bytes and the stamp that identifies them.
#[derive(Debug, Clone)]
struct Seen {
    bytes: Vec<u8>,
    inode: u64,
    size: u64,
    mtime_ns: i128,
}

fn stamp_of(m: &std::fs::Metadata) -> (u64, u64, i128) {
    (
        m.ino(),
        m.len(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    )
}

/// Reads `path` (`None` if absent). The stamp is taken on the open file,
/// before and after reading, so the bytes belong to it.
fn look(path: &Path) -> std::io::Result<Option<Seen>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let before = stamp_of(&f.metadata()?);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut bytes)?;
    let after = stamp_of(&f.metadata()?);
    if before != after {
        return Err(std::io::Error::other("changed while read"));
    }
    Ok(Some(Seen {
        bytes,
        inode: after.0,
        size: after.1,
        mtime_ns: after.2,
    }))
}

/// Unique bytes for an edit: a header line, then `filler` bytes of text.
fn content(rng: &mut StdRng, node: u64, counter: u64, path: &str) -> Vec<u8> {
    let mut out = format!("synod-lab folder edit: node {node} #{counter} {path}\n").into_bytes();
    out.extend(filler(rng));
    out
}

/// Text filler, log-uniform from a few bytes to [`FILLER_MAX`].
fn filler(rng: &mut StdRng) -> Vec<u8> {
    let exp = rng.gen_range(3.0..=(FILLER_MAX as f64).log2());
    let len = exp.exp2() as usize;
    let mut out: Vec<u8> = (0..len)
        .map(|i| {
            if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + rng.gen_range(0..26u8)
            }
        })
        .collect();
    out.push(b'\n');
    out
}

/// Runs one client per node until `deadline`; returns the number of edits.
/// Process ids start at `first_process`.
pub fn run_folder(
    cfg: &FolderConfig,
    rec: &Arc<Recorder>,
    deadline: Instant,
    first_process: u64,
) -> Result<u64, HistoryError> {
    let next_process = Arc::new(AtomicU64::new(first_process));
    let mut handles = Vec::new();
    for (client, (node, folder)) in cfg.nodes.iter().cloned().enumerate() {
        let cfg = cfg.clone();
        let rec = Arc::clone(rec);
        let next_process = Arc::clone(&next_process);
        handles.push(std::thread::spawn(move || {
            let mut c = Client {
                node,
                folder,
                rng: StdRng::seed_from_u64(cfg.seed ^ (0x2545_f491 * (client as u64 + 1))),
                process: next_process.fetch_add(1, Ordering::Relaxed),
                counter: 0,
            };
            c.run(&cfg, &rec, &next_process, deadline)
        }));
    }
    let mut total = 0;
    for h in handles {
        match h.join() {
            Ok(r) => total += r?,
            Err(_) => continue,
        }
    }
    Ok(total)
}

/// How one edit ended.
struct Done {
    kind: EventType,
    /// Digest of the bytes the edit left or moved, when known.
    value: Option<String>,
    /// Digest of the bytes it replaced or removed, when it differs from
    /// what the invoke recorded.
    base: Option<String>,
    error: Option<String>,
}

impl Done {
    fn ok(value: Option<String>) -> Done {
        Done {
            kind: EventType::Ok,
            value,
            base: None,
            error: None,
        }
    }
    fn fail(why: impl std::fmt::Display) -> Done {
        Done {
            kind: EventType::Fail,
            value: None,
            base: None,
            error: Some(why.to_string()),
        }
    }
    fn info(why: impl std::fmt::Display) -> Done {
        Done {
            kind: EventType::Info,
            value: None,
            base: None,
            error: Some(why.to_string()),
        }
    }
}

struct Client {
    node: u64,
    folder: PathBuf,
    rng: StdRng,
    process: u64,
    counter: u64,
}

impl Client {
    fn run(
        &mut self,
        cfg: &FolderConfig,
        rec: &Recorder,
        next_process: &AtomicU64,
        deadline: Instant,
    ) -> Result<u64, HistoryError> {
        let mut ops = 0;
        if let Some(dir) = cfg.paths.first().and_then(|p| Path::new(p).parent()) {
            let _ = std::fs::create_dir_all(self.folder.join(dir));
        }
        while Instant::now() < deadline && !cfg.paths.is_empty() {
            let path = cfg.paths[self.rng.gen_range(0..cfg.paths.len())].clone();
            if let Some(info) = self.step(cfg, rec, &path)? {
                ops += 1;
                if info {
                    self.process = next_process.fetch_add(1, Ordering::Relaxed);
                }
            }
            let (lo, hi) = cfg.think;
            let pause = if hi > lo {
                self.rng.gen_range(lo..hi)
            } else {
                lo
            };
            std::thread::sleep(pause);
        }
        Ok(ops)
    }

    /// One edit of `path`; `Some(true)` if it ended `info`, `None` if the
    /// file could not be read (nothing recorded).
    fn step(
        &mut self,
        cfg: &FolderConfig,
        rec: &Recorder,
        path: &str,
    ) -> Result<Option<bool>, HistoryError> {
        let abs = self.folder.join(path);
        let Ok(seen) = look(&abs) else {
            return Ok(None);
        };
        let roll = self.rng.gen_range(0..100);
        self.counter += 1;
        let (kind, to) = match (&seen, roll) {
            (None, _) => (OpKind::Write, None),
            (Some(_), 0..=34) => (OpKind::Write, None),
            (Some(_), 35..=69) => (OpKind::Append, None),
            (Some(_), 70..=84) => {
                let to = cfg.paths[self.rng.gen_range(0..cfg.paths.len())].clone();
                if to == path {
                    return Ok(None);
                }
                (OpKind::Rename, Some(to))
            }
            (Some(_), _) => (OpKind::Delete, None),
        };
        let new_bytes = match (kind, &seen) {
            (OpKind::Write, _) => Some(content(&mut self.rng, self.node, self.counter, path)),
            (OpKind::Append, Some(s)) => {
                let mut b = s.bytes.clone();
                b.extend(format!("append: node {} #{} {path}\n", self.node, self.counter).bytes());
                if self.rng.gen_bool(0.3) {
                    b.extend(filler(&mut self.rng));
                }
                Some(b)
            }
            _ => None,
        };
        let mut inv = event(EventType::Invoke, self.process, kind, path);
        inv.node = Some(self.node);
        inv.to = to.clone();
        inv.base = seen.as_ref().map(|s| digest(&s.bytes));
        inv.value = match (&new_bytes, &seen) {
            (Some(b), _) => Some(digest(b)),
            (None, Some(s)) if kind == OpKind::Rename => Some(digest(&s.bytes)),
            _ => None,
        };
        rec.record(inv)?;
        let done = match (kind, seen) {
            (OpKind::Write, None) => create(&abs, new_bytes.as_deref().unwrap_or_default()),
            (OpKind::Write | OpKind::Append, Some(s)) => {
                overwrite(&abs, &s, new_bytes.as_deref().unwrap_or_default())
            }
            (OpKind::Rename, Some(_)) => {
                let to = to.as_deref().unwrap_or_default();
                rename(&abs, &self.folder.join(to))
            }
            (OpKind::Delete, Some(_)) => delete(&abs, &self.folder, self.node),
            _ => Done::fail("nothing to do"),
        };
        let mut ev: Event = event(done.kind, self.process, kind, path);
        ev.node = Some(self.node);
        ev.to = to;
        ev.value = done.value;
        ev.base = done.base;
        ev.error = done.error;
        let info = ev.kind == EventType::Info;
        rec.record(ev)?;
        Ok(Some(info))
    }
}

/// Creates `abs` (never replacing a file).
fn create(abs: &Path, bytes: &[u8]) -> Done {
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(abs)
    {
        Ok(f) => f,
        Err(e) => return Done::fail(format!("create: {e}")),
    };
    match f.write_all(bytes) {
        Ok(()) => Done::ok(None),
        // Part of it may be on disk (a full disk): record what is there.
        Err(e) => Done {
            value: left_on_disk(abs),
            ..Done::info(format!("create: {e}"))
        },
    }
}

/// Digest of what a failed write left at `abs`, so that a half-written
/// file synod commits is not taken for bytes nobody wrote.
fn left_on_disk(abs: &Path) -> Option<String> {
    std::fs::read(abs).ok().map(|b| digest(&b))
}

/// Rewrites `abs` in place (same inode) with `bytes`, if it is still the
/// file `seen`.
fn overwrite(abs: &Path, seen: &Seen, bytes: &[u8]) -> Done {
    let mut f = match std::fs::OpenOptions::new().write(true).open(abs) {
        Ok(f) => f,
        Err(e) => return Done::fail(format!("open: {e}")),
    };
    match f.metadata() {
        Ok(m) if stamp_of(&m) == (seen.inode, seen.size, seen.mtime_ns) => {}
        Ok(_) => return Done::fail("changed since it was read; not written"),
        Err(e) => return Done::fail(format!("stat: {e}")),
    }
    // An append writes only the new tail, as `>>` would.
    let written = if bytes.starts_with(&seen.bytes) && bytes.len() > seen.bytes.len() {
        f.seek(SeekFrom::End(0))
            .and_then(|_| f.write_all(&bytes[seen.bytes.len()..]))
    } else {
        f.set_len(0)
            .and_then(|()| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(bytes))
    };
    if let Err(e) = written {
        return Done {
            value: left_on_disk(abs),
            ..Done::info(format!("write: {e}"))
        };
    }
    // The materializer may have renamed a committed file over the path
    // between the check and the write: then these bytes went to a file
    // that is no longer in the folder (or was kept as a conflict copy).
    let ours = f.metadata().map(|m| m.ino()).ok();
    match std::fs::metadata(abs) {
        Ok(m) if Some(m.ino()) == ours => Done::ok(None),
        _ => Done::info("the path was replaced while being written"),
    }
}

/// Renames `from` to `to` if `to` does not exist; records what moved.
fn rename(from: &Path, to: &Path) -> Done {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    if let Err(e) = renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        return Done::fail(format!("rename: {e}"));
    }
    // What really moved (the materializer may have replaced `from` since
    // it was read); a rename keeps bytes, so it supersedes nothing.
    match std::fs::read(to) {
        Ok(b) => Done::ok(Some(digest(&b))),
        Err(_) => Done::ok(None),
    }
}

/// Deletes `abs`: renamed to an ignored trash name first, so the base is
/// exactly the bytes removed.
fn delete(abs: &Path, folder: &Path, node: u64) -> Done {
    // Names ending in `~` are never synced (editor backups).
    let trash = folder.join(format!(".synod-lab-trash-{node}~"));
    if let Err(e) = std::fs::rename(abs, &trash) {
        return Done::fail(format!("delete: {e}"));
    }
    let removed = std::fs::read(&trash).ok().map(|b| digest(&b));
    match std::fs::remove_file(&trash) {
        Ok(()) => Done {
            base: removed,
            ..Done::ok(None)
        },
        Err(e) => Done {
            base: removed,
            ..Done::info(format!("delete: {e}"))
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_write_unique_bytes_and_record_what_they_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = Arc::new(Recorder::create(&dir.path().join("h.jsonl")).expect("rec"));
        let folder = dir.path().join("n1");
        std::fs::create_dir_all(&folder).expect("mkdir");
        let cfg = FolderConfig {
            nodes: vec![(1, folder.clone())],
            paths: folder_paths(2),
            seed: 5,
            think: (Duration::ZERO, Duration::ZERO),
        };
        let mut c = Client {
            node: 1,
            folder: folder.clone(),
            rng: StdRng::seed_from_u64(1),
            process: 1,
            counter: 0,
        };
        std::fs::create_dir_all(folder.join("folder")).expect("mkdir");
        for _ in 0..200 {
            let i = c.rng.gen_range(0..2);
            c.step(&cfg, &rec, &cfg.paths[i]).expect("step");
        }
        let events = crate::history::read_history(&dir.path().join("h.jsonl")).expect("read");
        let ops = crate::history::pair_operations(&events);
        // Only renames onto an existing file fail; nothing is unknown.
        assert!(
            ops.iter()
                .all(|o| o.outcome == EventType::Ok || o.kind == OpKind::Rename),
            "{ops:?}"
        );
        for k in [
            OpKind::Write,
            OpKind::Append,
            OpKind::Rename,
            OpKind::Delete,
        ] {
            assert!(ops.iter().any(|o| o.kind == k), "{k:?} never chosen");
        }
        // Every written value is unique.
        let mut values: Vec<&str> = ops
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Write | OpKind::Append))
            .filter_map(|o| o.value.as_deref())
            .collect();
        let n = values.len();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), n);
        // Replaying the history on an empty folder gives what is on disk:
        // each edit's base is what the path held before it.
        let mut model: std::collections::BTreeMap<String, String> = Default::default();
        for o in &ops {
            let before = model.get(&o.path).cloned();
            match o.kind {
                OpKind::Write | OpKind::Append => {
                    assert_eq!(o.base, before, "{o:?}");
                    model.insert(o.path.clone(), o.value.clone().expect("value"));
                }
                OpKind::Delete => {
                    assert_eq!(o.base, before, "{o:?}");
                    model.remove(&o.path);
                }
                OpKind::Rename => {
                    let to = o.to.clone().expect("to");
                    assert_eq!(o.value, before, "{o:?}");
                    if o.outcome == EventType::Ok {
                        assert!(!model.contains_key(&to), "{o:?}");
                        if let Some(v) = model.remove(&o.path) {
                            model.insert(to, v);
                        }
                    }
                }
                _ => {}
            }
        }
        for p in &cfg.paths {
            let on_disk = std::fs::read(folder.join(p)).ok().map(|b| digest(&b));
            assert_eq!(on_disk.as_ref(), model.get(p), "{p}");
        }
        assert!(!folder.join(".synod-lab-trash-1~").exists());
    }

    #[test]
    fn an_overwrite_of_a_file_replaced_since_it_was_read_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").expect("write");
        let seen = look(&p).expect("look").expect("exists");
        // Another writer (the materializer) replaces the file by rename.
        let other = dir.path().join("tmp");
        std::fs::write(&other, b"two").expect("write");
        std::fs::rename(&other, &p).expect("rename");
        let d = overwrite(&p, &seen, b"three");
        assert_eq!(d.kind, EventType::Fail);
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        // Renames never replace.
        std::fs::write(&other, b"x").expect("write");
        assert_eq!(rename(&other, &p).kind, EventType::Fail);
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
    }
}
