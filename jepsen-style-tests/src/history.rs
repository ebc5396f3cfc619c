//! The recorded history: one JSON object per line, appended as clients act.
//!
//! Every client operation is an `invoke` followed by exactly one completion
//! from the same process: `ok` (took effect), `fail` (certainly did not) or
//! `info` (unknown: it may take effect at any later time, or never). A
//! process that saw `info` never acts again; its client continues under a
//! fresh process id, as in Jepsen. Nemesis windows are recorded in the same
//! stream so the report can shade them.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What a line of the history records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
    /// A nemesis started (`op` = "start") or stopped (`op` = "stop") a fault.
    Nemesis,
}

/// The operation of a register client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Read,
    Write,
    /// Compare-and-set on the version: `If-Match: expect`, or create-only
    /// (`If-None-Match: *`) when `expect` is 0.
    Cas,
    /// `POST /v1/rename` from `path` to `to` (the `files` workload).
    Rename,
    /// `DELETE` of `path` (the `files` workload), or the removal of a file
    /// from a node's folder (the `folder` workload).
    Delete,
    /// Bytes appended to a file in a node's folder (the `folder` workload).
    Append,
    Start,
    Stop,
}

/// One line of the history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Client process id; nemesis events use `u64::MAX`.
    pub process: u64,
    pub op: OpKind,
    #[serde(default)]
    pub path: String,
    /// Target of a rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Written value (invoke of write/cas) or read value (ok of read;
    /// `None` = the file did not exist).
    #[serde(default)]
    pub value: Option<String>,
    /// The version the cas expects (invoke) or the version read/written (ok).
    #[serde(default)]
    pub version: Option<u64>,
    /// Node the client talked to (or whose folder it edited).
    #[serde(default)]
    pub node: Option<u64>,
    /// `folder` workload: the digest of the bytes the edit replaced (read
    /// from the node's folder just before), so checkers know what it
    /// superseded. A completion's `base` corrects the invoke's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Error text of a fail/info, or a nemesis description.
    #[serde(default)]
    pub error: Option<String>,
    /// Wall clock, nanoseconds since the Unix epoch (for humans).
    pub wall_ns: u128,
    /// Monotonic nanoseconds since the run started (for ordering).
    pub mono_ns: u64,
}

/// Process id used for nemesis events.
pub const NEMESIS_PROCESS: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    #[error("cannot create history file {path}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write history file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read history file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad history line {line} in {path}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
}

/// Appends events to `history.jsonl`, shared by all client threads. The
/// monotonic time is taken under the lock so line order equals time order.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    start: Instant,
    out: Mutex<BufWriter<File>>,
}

impl Recorder {
    pub fn create(path: &Path) -> Result<Recorder, HistoryError> {
        let file = File::create(path).map_err(|source| HistoryError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Recorder {
            path: path.to_path_buf(),
            start: Instant::now(),
            out: Mutex::new(BufWriter::new(file)),
        })
    }

    /// Monotonic nanoseconds since the recorder was created.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Stamps `event` with both clocks and appends it; returns the stamped copy.
    pub fn record(&self, mut event: Event) -> Result<Event, HistoryError> {
        // A poisoned lock only means another client panicked mid-write; the
        // file is still append-only, so keep recording.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        event.mono_ns = self.now_ns();
        event.wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let line = serde_json::to_string(&event).map_err(|e| HistoryError::Write {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(|source| HistoryError::Write {
                path: self.path.clone(),
                source,
            })?;
        Ok(event)
    }
}

/// Reads a history file written by [`Recorder`].
pub fn read_history(path: &Path) -> Result<Vec<Event>, HistoryError> {
    let file = File::open(path).map_err(|source| HistoryError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut events = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| HistoryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        events.push(event);
    }
    Ok(events)
}

/// A completed (or indeterminate) client operation: an invoke paired with
/// its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub process: u64,
    pub kind: OpKind,
    pub path: String,
    /// Target of a rename.
    pub to: Option<String>,
    /// Value written (write/cas) or read (read, when ok).
    pub value: Option<String>,
    /// Expected version (cas invoke).
    pub expect: Option<u64>,
    /// Version returned by an ok completion.
    pub version: Option<u64>,
    /// What a `folder` edit replaced (digest of the bytes read before it).
    pub base: Option<String>,
    pub outcome: EventType,
    pub node: Option<u64>,
    pub invoke_ns: u64,
    /// `None` when the history ended before a completion (treated as info).
    pub complete_ns: Option<u64>,
    pub error: Option<String>,
}

/// Pairs invokes with completions per process. An invoke with no completion
/// becomes `info` (the run ended with the request in flight).
pub fn pair_operations(events: &[Event]) -> Vec<Operation> {
    let mut open: std::collections::HashMap<u64, Operation> = Default::default();
    let mut done = Vec::new();
    for e in events {
        match e.kind {
            EventType::Nemesis => {}
            EventType::Invoke => {
                let op = Operation {
                    process: e.process,
                    kind: e.op,
                    path: e.path.clone(),
                    to: e.to.clone(),
                    value: e.value.clone(),
                    expect: if e.op == OpKind::Cas { e.version } else { None },
                    version: None,
                    base: e.base.clone(),
                    outcome: EventType::Info,
                    node: e.node,
                    invoke_ns: e.mono_ns,
                    complete_ns: None,
                    error: None,
                };
                if let Some(prev) = open.insert(e.process, op) {
                    done.push(prev);
                }
            }
            EventType::Ok | EventType::Fail | EventType::Info => {
                if let Some(mut op) = open.remove(&e.process) {
                    op.outcome = e.kind;
                    op.complete_ns = Some(e.mono_ns);
                    op.error = e.error.clone();
                    if e.base.is_some() {
                        op.base = e.base.clone();
                    }
                    if e.kind == EventType::Ok {
                        op.version = e.version;
                        // A read's value is what it returned.
                        if op.kind == OpKind::Read {
                            op.value = e.value.clone();
                        }
                    }
                    // A change's completion may name what it really left
                    // (a rename's bytes, a half-written file).
                    if op.kind != OpKind::Read && e.value.is_some() {
                        op.value = e.value.clone();
                    }
                    done.push(op);
                }
            }
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|o| (o.invoke_ns, o.process));
    done
}

/// A fault window for the report: start/stop times and what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultWindow {
    pub what: String,
    pub start_ns: u64,
    pub stop_ns: Option<u64>,
}

/// Pairs nemesis start/stop events (by description) into windows.
pub fn fault_windows(events: &[Event]) -> Vec<FaultWindow> {
    let mut windows: Vec<FaultWindow> = Vec::new();
    for e in events.iter().filter(|e| e.kind == EventType::Nemesis) {
        let what = e.error.clone().unwrap_or_default();
        match e.op {
            OpKind::Start => windows.push(FaultWindow {
                what,
                start_ns: e.mono_ns,
                stop_ns: None,
            }),
            _ => {
                // A stop closes the oldest open window of the same fault.
                if let Some(w) = windows
                    .iter_mut()
                    .find(|w| w.stop_ns.is_none() && w.what == what)
                {
                    w.stop_ns = Some(e.mono_ns);
                }
            }
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ev(kind: EventType, process: u64, op: OpKind, t: u64) -> Event {
        Event {
            kind,
            process,
            op,
            path: "r".into(),
            to: None,
            value: None,
            version: None,
            node: None,
            base: None,
            error: None,
            wall_ns: 0,
            mono_ns: t,
        }
    }

    #[test]
    fn recorder_round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.jsonl");
        let rec = Recorder::create(&path).expect("create");
        let mut w = ev(EventType::Invoke, 1, OpKind::Write, 0);
        w.value = Some("p1-1".into());
        rec.record(w).expect("record");
        let mut ok = ev(EventType::Ok, 1, OpKind::Write, 0);
        ok.version = Some(7);
        rec.record(ok).expect("record");
        let events = read_history(&path).expect("read");
        assert_eq!(events.len(), 2);
        assert!(events[0].mono_ns <= events[1].mono_ns);
        let ops = pair_operations(&events);
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].outcome, EventType::Ok);
        assert_eq!(ops[0].version, Some(7));
        assert_eq!(ops[0].value.as_deref(), Some("p1-1"));
    }

    #[test]
    fn a_completion_corrects_what_the_change_left_and_replaced() {
        let mut inv = ev(EventType::Invoke, 3, OpKind::Write, 0);
        inv.value = Some("intended".into());
        inv.base = Some("read".into());
        let mut done = ev(EventType::Info, 3, OpKind::Write, 1);
        done.value = Some("half-written".into());
        let ops = pair_operations(&[inv.clone(), done]);
        assert_eq!(ops[0].value.as_deref(), Some("half-written"));
        assert_eq!(ops[0].base.as_deref(), Some("read"));
        let mut done = ev(EventType::Ok, 3, OpKind::Write, 1);
        done.base = Some("removed".into());
        let ops = pair_operations(&[inv, done]);
        assert_eq!(ops[0].value.as_deref(), Some("intended"));
        assert_eq!(ops[0].base.as_deref(), Some("removed"));
    }

    #[test]
    fn an_invoke_without_completion_is_indeterminate() {
        let events = vec![ev(EventType::Invoke, 4, OpKind::Write, 10)];
        let ops = pair_operations(&events);
        assert_eq!(ops[0].outcome, EventType::Info);
        assert_eq!(ops[0].complete_ns, None);
    }

    #[test]
    fn nemesis_events_pair_into_windows() {
        let mut a = ev(EventType::Nemesis, NEMESIS_PROCESS, OpKind::Start, 5);
        a.error = Some("kill n2".into());
        let mut b = ev(EventType::Nemesis, NEMESIS_PROCESS, OpKind::Stop, 9);
        b.error = Some("kill n2".into());
        let w = fault_windows(&[a, b]);
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].start_ns, w[0].stop_ns), (5, Some(9)));
    }
}
