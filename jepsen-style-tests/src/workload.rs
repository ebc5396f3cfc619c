//! The `register` workload: concurrent clients (threads), each talking to a
//! random node per operation, doing read / write / compare-and-set on a few
//! paths with values that name the writer and a counter (so every written
//! value is unique). Every operation is recorded as an invoke and one
//! completion; a client whose operation ended `info` continues under a new
//! process id. Clients stop at the deadline by themselves.
//!
//! `files` (in `workload/files.rs`): larger files put, edited in place,
//! renamed and deleted through the API; `folder` (in `workload/folder.rs`):
//! edits made directly in the nodes' folders.

pub mod files;
pub mod folder;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::api::{Api, ApiError, Precondition};
use crate::checker::lost_writes::FINAL_PROCESS;
use crate::history::{Event, EventType, HistoryError, OpKind, Recorder};

/// A workload the clients run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    /// Read / write / cas on small registers (`reg0`..).
    Register,
    /// Larger files put, edited, renamed, deleted (`files/`).
    Files,
    /// Edits made directly in the nodes' folders (`folder/`).
    Folder,
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkloadKind::Register => "register",
            WorkloadKind::Files => "files",
            WorkloadKind::Folder => "folder",
        })
    }
}

/// Parses `register,files,folder`.
pub fn parse_workloads(s: &str) -> Result<Vec<WorkloadKind>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let k = match part {
            "register" => WorkloadKind::Register,
            "files" => WorkloadKind::Files,
            "folder" => WorkloadKind::Folder,
            other => {
                return Err(format!(
                    "unknown workload {other:?} (known: register, files, folder)"
                ))
            }
        };
        if !out.contains(&k) {
            out.push(k);
        }
    }
    if out.is_empty() {
        return Err("no workload given".into());
    }
    Ok(out)
}

/// Settings of one workload run.
#[derive(Debug, Clone)]
pub struct RegisterConfig {
    pub clients: usize,
    /// Paths the clients share (register keys).
    pub paths: Vec<String>,
    pub seed: u64,
    /// Per-request client timeout; past it the outcome is `info`.
    pub timeout: Duration,
    /// Pause between a client's operations (keeps histories checkable).
    pub think: Duration,
    /// Whether writes may be unconditional; without, every write is a cas
    /// (`If-Match` the last version seen, or create-only).
    pub blind_writes: bool,
}

/// (node id, API address) of every node.
pub type Targets = Vec<(u64, String)>;

pub(crate) fn event(kind: EventType, process: u64, op: OpKind, path: &str) -> Event {
    Event {
        kind,
        process,
        op,
        path: path.to_string(),
        to: None,
        value: None,
        version: None,
        node: None,
        base: None,
        error: None,
        wall_ns: 0,
        mono_ns: 0,
    }
}

/// Whether a failed write certainly had no effect.
pub(crate) fn write_failed_for_sure(e: &ApiError) -> bool {
    e.certainly_not_sent() || matches!(e.status(), Some(400 | 404 | 409 | 413))
}

/// Runs the clients until `deadline`; returns the number of operations.
pub fn run_register(
    cfg: &RegisterConfig,
    targets: &Targets,
    rec: &Arc<Recorder>,
    deadline: Instant,
) -> Result<u64, HistoryError> {
    let next_process = Arc::new(AtomicU64::new(1));
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
            // A panicking client is a lab bug; its ops so far are recorded.
            Err(_) => continue,
        }
    }
    Ok(total)
}

fn run_client(
    client: usize,
    cfg: &RegisterConfig,
    targets: &Targets,
    rec: &Recorder,
    next_process: &AtomicU64,
    deadline: Instant,
) -> Result<u64, HistoryError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ (0x9e37_79b9 * (client as u64 + 1)));
    let apis: Vec<(u64, Api)> = targets
        .iter()
        .map(|(id, addr)| (*id, Api::new(addr, cfg.timeout)))
        .collect();
    let mut process = next_process.fetch_add(1, Ordering::Relaxed);
    let mut known_version: std::collections::HashMap<String, u64> = Default::default();
    let mut counter = 0u64;
    let mut ops = 0u64;
    while Instant::now() + cfg.timeout / 4 < deadline && !apis.is_empty() && !cfg.paths.is_empty() {
        let (node, api) = &apis[rng.gen_range(0..apis.len())];
        let path = &cfg.paths[rng.gen_range(0..cfg.paths.len())];
        let roll = rng.gen_range(0..100);
        let kind = match roll {
            0..=49 => OpKind::Read,
            50..=74 if cfg.blind_writes => OpKind::Write,
            _ => OpKind::Cas,
        };
        let mut inv = event(EventType::Invoke, process, kind, path);
        inv.node = Some(*node);
        let mut value = String::new();
        let mut pre = Precondition::None;
        if kind != OpKind::Read {
            counter += 1;
            value = format!("c{client}-p{process}-{counter}");
            inv.value = Some(value.clone());
        }
        if kind == OpKind::Cas {
            let expect = known_version.get(path).copied().unwrap_or(0);
            inv.version = Some(expect);
            pre = if expect == 0 {
                Precondition::Absent
            } else {
                Precondition::Version(expect)
            };
        }
        rec.record(inv)?;
        let mut done = event(EventType::Ok, process, kind, path);
        done.node = Some(*node);
        match kind {
            OpKind::Read => match api.read(path) {
                Ok(Some((bytes, version))) => {
                    done.value = Some(String::from_utf8_lossy(&bytes).into_owned());
                    done.version = Some(version);
                    known_version.insert(path.clone(), version);
                }
                Ok(None) => {
                    known_version.remove(path);
                }
                Err(e) => {
                    // A read has no effect: any error is a plain failure.
                    done.kind = EventType::Fail;
                    done.error = Some(e.to_string());
                }
            },
            _ => match api.write(path, value.as_bytes(), pre) {
                Ok(version) => {
                    done.version = Some(version);
                    known_version.insert(path.clone(), version);
                }
                Err(e) => {
                    done.kind = if write_failed_for_sure(&e) {
                        EventType::Fail
                    } else {
                        EventType::Info
                    };
                    done.error = Some(e.to_string());
                }
            },
        }
        let info = done.kind == EventType::Info;
        rec.record(done)?;
        ops += 1;
        if info {
            process = next_process.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(cfg.think);
    }
    Ok(ops)
}

/// The recorded value of a register's bytes.
pub fn register_value(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// After healing: one successful linearizable read per path, recorded as
/// [`FINAL_PROCESS`] with the value `encode` makes of the bytes, trying
/// every node in turn until `deadline`.
pub fn final_reads(
    paths: &[String],
    targets: &Targets,
    rec: &Recorder,
    timeout: Duration,
    deadline: Instant,
    encode: fn(&[u8]) -> String,
) -> Result<usize, HistoryError> {
    let mut got = 0;
    for path in paths {
        'path: while Instant::now() < deadline {
            for (node, addr) in targets {
                let mut inv = event(EventType::Invoke, FINAL_PROCESS, OpKind::Read, path);
                inv.node = Some(*node);
                rec.record(inv)?;
                let mut done = event(EventType::Ok, FINAL_PROCESS, OpKind::Read, path);
                done.node = Some(*node);
                match Api::new(addr, timeout).read(path) {
                    Ok(r) => {
                        if let Some((bytes, version)) = r {
                            done.value = Some(encode(&bytes));
                            done.version = Some(version);
                        }
                        rec.record(done)?;
                        got += 1;
                        break 'path;
                    }
                    Err(e) => {
                        done.kind = EventType::Fail;
                        done.error = Some(e.to_string());
                        rec.record(done)?;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> ApiError {
        ApiError::Status {
            url: "u".into(),
            code,
            body: String::new(),
        }
    }

    #[test]
    fn workload_lists_parse() {
        assert_eq!(
            parse_workloads("files, register,files"),
            Ok(vec![WorkloadKind::Files, WorkloadKind::Register])
        );
        assert_eq!(parse_workloads("folder"), Ok(vec![WorkloadKind::Folder]));
        assert!(parse_workloads("folders").is_err());
        assert!(parse_workloads("").is_err());
    }

    #[test]
    fn only_certain_failures_are_fail_the_rest_are_info() {
        assert!(write_failed_for_sure(&status(409)));
        assert!(write_failed_for_sure(&status(400)));
        assert!(write_failed_for_sure(&ApiError::Refused {
            url: "u".into(),
            message: "refused".into()
        }));
        // A 503 may be a commit that timed out: it can still take effect.
        assert!(!write_failed_for_sure(&status(503)));
        assert!(!write_failed_for_sure(&status(500)));
        assert!(!write_failed_for_sure(&ApiError::Transport {
            url: "u".into(),
            message: "timed out".into()
        }));
    }
}
