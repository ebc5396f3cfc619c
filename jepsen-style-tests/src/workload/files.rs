//! The `files` workload: larger files (up to `max_size`, a few MiB in the
//! smoke campaign, tens of MiB on request) under `files/`, put whole, edited
//! in place (read, overwrite a range, put back with `If-Match`), renamed and
//! deleted through the HTTP API by concurrent clients while faults run.
//!
//! Values in the history are content digests (`<size>:<blake3 hex, 16>`),
//! never the bytes. An edit is recorded as a `read` then a `cas`; a rename
//! as one `rename` op from `path` to `to`. The `files` checker
//! (`checker/files.rs`) and the convergence checker judge the outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::{event, write_failed_for_sure, Targets};
use crate::api::{Api, ApiError, Precondition};
use crate::history::{EventType, HistoryError, OpKind, Recorder};

/// Every path of the workload starts with this.
pub const FILES_PREFIX: &str = "files/";

/// Most bytes an in-place edit overwrites.
const EDIT_MAX: usize = 256 * 1024;

/// Settings of one `files` run.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    pub clients: usize,
    pub paths: Vec<String>,
    pub seed: u64,
    /// Largest file written.
    pub max_size: usize,
    /// Per-request timeout; past it the outcome is `info`.
    pub timeout: Duration,
    pub think: Duration,
}

/// `files/f0` .. `files/f{n-1}`.
pub fn files_paths(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{FILES_PREFIX}f{i}")).collect()
}

/// The recorded value of a file's bytes: size and a short BLAKE3.
pub fn digest(bytes: &[u8]) -> String {
    let hex = blake3::hash(bytes).to_hex();
    format!("{}:{}", bytes.len(), &hex[..16])
}

/// A size between 1 KiB and `max`, log-uniform, so small and large files
/// both come up.
fn pick_size(rng: &mut StdRng, max: usize) -> usize {
    let max = max.max(1024) as f64;
    let exp = rng.gen_range(10.0..=max.log2());
    (exp.exp2() as usize).clamp(1, max as usize)
}

/// Overwrites a random range of `bytes` (and sometimes appends), as an
/// editor saving a changed file would.
fn edit(rng: &mut StdRng, bytes: &mut Vec<u8>, max: usize) {
    if bytes.is_empty() || (rng.gen_bool(0.2) && bytes.len() < max) {
        let extra = rng.gen_range(1..=EDIT_MAX.min(max - bytes.len().min(max)).max(1));
        let start = bytes.len();
        bytes.resize(start + extra, 0);
        rng.fill_bytes(&mut bytes[start..]);
        return;
    }
    let offset = rng.gen_range(0..bytes.len());
    let len = rng.gen_range(1..=EDIT_MAX.min(bytes.len() - offset));
    rng.fill_bytes(&mut bytes[offset..offset + len]);
}

/// Runs the clients until `deadline`; returns the number of operations.
/// Client process ids start at `first_process` (apart from the register
/// workload's).
pub fn run_files(
    cfg: &FilesConfig,
    targets: &Targets,
    rec: &Arc<Recorder>,
    deadline: Instant,
    first_process: u64,
) -> Result<u64, HistoryError> {
    let next_process = Arc::new(AtomicU64::new(first_process));
    let mut handles = Vec::new();
    for client in 0..cfg.clients {
        let cfg = cfg.clone();
        let targets = targets.clone();
        let rec = Arc::clone(rec);
        let next_process = Arc::clone(&next_process);
        handles.push(std::thread::spawn(move || {
            run_client(client, &cfg, &targets, &rec, &next_process, deadline)
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

/// Whether a failed rename or delete certainly had no effect.
fn change_failed_for_sure(e: &ApiError) -> bool {
    write_failed_for_sure(e)
}

fn run_client(
    client: usize,
    cfg: &FilesConfig,
    targets: &Targets,
    rec: &Recorder,
    next_process: &AtomicU64,
    deadline: Instant,
) -> Result<u64, HistoryError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ (0x5851_f42d * (client as u64 + 1)));
    let apis: Vec<(u64, Api)> = targets
        .iter()
        .map(|(id, addr)| (*id, Api::new(addr, cfg.timeout)))
        .collect();
    let mut process = next_process.fetch_add(1, Ordering::Relaxed);
    let mut ops = 0u64;
    while Instant::now() + cfg.timeout / 4 < deadline && !apis.is_empty() && !cfg.paths.is_empty() {
        let (node, api) = &apis[rng.gen_range(0..apis.len())];
        let path = cfg.paths[rng.gen_range(0..cfg.paths.len())].clone();
        let roll = rng.gen_range(0..100);
        let mut indeterminate = false;
        match roll {
            // Put a whole new file.
            0..=29 => {
                let mut bytes = vec![0u8; pick_size(&mut rng, cfg.max_size)];
                rng.fill_bytes(&mut bytes);
                indeterminate = put(rec, process, *node, api, &path, &bytes, None)?;
                ops += 1;
            }
            // Edit in place: read, change a range, put back if unchanged.
            30..=54 => {
                let (read, failed) = read(rec, process, *node, api, &path)?;
                ops += 1;
                if let (Some((mut bytes, version)), false) = (read, failed) {
                    edit(&mut rng, &mut bytes, cfg.max_size);
                    indeterminate = put(rec, process, *node, api, &path, &bytes, Some(version))?;
                    ops += 1;
                }
            }
            55..=74 => {
                read(rec, process, *node, api, &path)?;
                ops += 1;
            }
            75..=89 => {
                let others: Vec<&String> = cfg.paths.iter().filter(|p| **p != path).collect();
                if let Some(to) = others.get(rng.gen_range(0..others.len().max(1))) {
                    let mut inv = event(EventType::Invoke, process, OpKind::Rename, &path);
                    inv.to = Some((*to).clone());
                    inv.node = Some(*node);
                    rec.record(inv)?;
                    let mut done = event(EventType::Ok, process, OpKind::Rename, &path);
                    done.to = Some((*to).clone());
                    done.node = Some(*node);
                    finish(&mut done, api.rename(&path, to));
                    indeterminate = done.kind == EventType::Info;
                    rec.record(done)?;
                    ops += 1;
                }
            }
            _ => {
                let mut inv = event(EventType::Invoke, process, OpKind::Delete, &path);
                inv.node = Some(*node);
                rec.record(inv)?;
                let mut done = event(EventType::Ok, process, OpKind::Delete, &path);
                done.node = Some(*node);
                finish(&mut done, api.delete(&path, None));
                indeterminate = done.kind == EventType::Info;
                rec.record(done)?;
                ops += 1;
            }
        }
        if indeterminate {
            process = next_process.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(cfg.think);
    }
    Ok(ops)
}

/// Sets a mutation's completion from the API's answer.
fn finish(done: &mut crate::history::Event, r: Result<u64, ApiError>) {
    match r {
        Ok(version) => done.version = Some(version),
        Err(e) => {
            done.kind = if change_failed_for_sure(&e) {
                EventType::Fail
            } else {
                EventType::Info
            };
            done.error = Some(e.to_string());
        }
    }
}

/// Records a read; returns the bytes and version (if the file exists) and
/// whether the read failed.
#[allow(clippy::type_complexity)]
fn read(
    rec: &Recorder,
    process: u64,
    node: u64,
    api: &Api,
    path: &str,
) -> Result<(Option<(Vec<u8>, u64)>, bool), HistoryError> {
    let mut inv = event(EventType::Invoke, process, OpKind::Read, path);
    inv.node = Some(node);
    rec.record(inv)?;
    let mut done = event(EventType::Ok, process, OpKind::Read, path);
    done.node = Some(node);
    let (out, failed) = match api.read(path) {
        Ok(Some((bytes, version))) => {
            done.value = Some(digest(&bytes));
            done.version = Some(version);
            (Some((bytes, version)), false)
        }
        Ok(None) => (None, false),
        Err(e) => {
            done.kind = EventType::Fail;
            done.error = Some(e.to_string());
            (None, true)
        }
    };
    rec.record(done)?;
    Ok((out, failed))
}

/// Records a put (`expect`: `If-Match`); returns whether it ended `info`.
fn put(
    rec: &Recorder,
    process: u64,
    node: u64,
    api: &Api,
    path: &str,
    bytes: &[u8],
    expect: Option<u64>,
) -> Result<bool, HistoryError> {
    let kind = if expect.is_some() {
        OpKind::Cas
    } else {
        OpKind::Write
    };
    let mut inv = event(EventType::Invoke, process, kind, path);
    inv.node = Some(node);
    inv.value = Some(digest(bytes));
    inv.version = expect;
    rec.record(inv)?;
    let mut done = event(EventType::Ok, process, kind, path);
    done.node = Some(node);
    let pre = expect.map_or(Precondition::None, Precondition::Version);
    finish(&mut done, api.write(path, bytes, pre));
    let info = done.kind == EventType::Info;
    rec.record(done)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_stay_within_bounds_and_spread() {
        let mut rng = StdRng::seed_from_u64(3);
        let sizes: Vec<usize> = (0..500).map(|_| pick_size(&mut rng, 4 << 20)).collect();
        assert!(sizes.iter().all(|s| (1024..=4 << 20).contains(s)));
        assert!(sizes.iter().any(|s| *s < 64 * 1024));
        assert!(sizes.iter().any(|s| *s > 1 << 20));
    }

    #[test]
    fn edits_change_bytes_in_place_or_append() {
        let mut rng = StdRng::seed_from_u64(9);
        let original = vec![7u8; 1 << 20];
        for _ in 0..50 {
            let mut b = original.clone();
            edit(&mut rng, &mut b, 2 << 20);
            assert!(b.len() >= original.len() && b.len() <= 2 << 20);
            assert_ne!(digest(&b), digest(&original));
        }
        let mut empty = Vec::new();
        edit(&mut rng, &mut empty, 4096);
        assert!(!empty.is_empty() && empty.len() <= 4096);
    }

    #[test]
    fn digests_name_size_and_content() {
        assert_eq!(digest(b"abc").split(':').next(), Some("3"));
        assert_ne!(digest(b"abc"), digest(b"abd"));
        assert_eq!(files_paths(2), vec!["files/f0", "files/f1"]);
    }
}
