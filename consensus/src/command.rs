//! Commands (the Raft `AppData`), their preconditions and their answers.

use serde::{Deserialize, Serialize};

use crate::path::NsPath;
use crate::types::{ClusterSettings, Entry, RequestId};

/// A precondition on the current entry of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// No check.
    Any,
    /// The path has no entry, or only a tombstone.
    Absent,
    /// The path's current entry (live or tombstone) has this version.
    Version(u64),
}

/// One mutation of the namespace.
///
/// Paths travel as text and are re-checked by the state machine: an invalid
/// path must turn into a `Rejected` answer on every node, not into a log entry
/// that no node can decode. Build commands with the constructors, which take
/// [`NsPath`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Command {
    /// Create or replace the entry of `path`.
    Put {
        /// Target path.
        path: String,
        /// New metadata; `version` and `tombstone` are set by the state machine.
        entry: Entry,
        /// Precondition.
        expect: Expect,
    },
    /// Replace a live entry with a tombstone.
    Delete {
        /// Target path.
        path: String,
        /// Precondition.
        expect: Expect,
    },
    /// Move one entry; `from` becomes a tombstone.
    Rename {
        /// Source path (must be live).
        from: String,
        /// Destination path.
        to: String,
        /// Precondition on `from`.
        expect_from: Expect,
        /// Precondition on `to`.
        expect_to: Expect,
    },
    /// Set the cluster settings; allowed once.
    InitCluster {
        /// The settings.
        settings: ClusterSettings,
    },
    /// `Put` of a small file whose content travels in the log entry itself:
    /// durable on a quorum once committed, with no separate content push.
    /// Every node keeps the bytes with the entry until the path changes.
    PutInline {
        /// Target path.
        path: String,
        /// New metadata; `size` must equal the length of `data`.
        entry: Entry,
        /// Precondition.
        expect: Expect,
        /// The file's content, at most [`MAX_INLINE`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// Largest file content a [`Command::PutInline`] may carry. Small enough
/// that a full log entry of them stays far below a Raft message's limit.
pub const MAX_INLINE: usize = 4 * 1024;

impl Command {
    /// `Put` of `entry` at `path`.
    /// The paths the command writes. Two commands that share one must not
    /// travel in the same log entry: both would get that entry's index as
    /// their version, and versions of one path must be unique.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        let (a, b) = match self {
            Command::Put { path, .. }
            | Command::PutInline { path, .. }
            | Command::Delete { path, .. } => (Some(path.as_str()), None),
            Command::Rename { from, to, .. } => (Some(from.as_str()), Some(to.as_str())),
            Command::InitCluster { .. } => (None, None),
        };
        a.into_iter().chain(b)
    }

    pub fn put(path: &NsPath, entry: Entry, expect: Expect) -> Command {
        Command::Put {
            path: path.as_str().to_owned(),
            entry,
            expect,
        }
    }

    /// `Put` of `entry` at `path` carrying the file's content `data`.
    pub fn put_inline(path: &NsPath, entry: Entry, expect: Expect, data: Vec<u8>) -> Command {
        Command::PutInline {
            path: path.as_str().to_owned(),
            entry,
            expect,
            data,
        }
    }

    /// Bytes of file content the command carries.
    pub fn inline_len(&self) -> usize {
        match self {
            Command::PutInline { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// `Delete` of `path`.
    pub fn delete(path: &NsPath, expect: Expect) -> Command {
        Command::Delete {
            path: path.as_str().to_owned(),
            expect,
        }
    }

    /// `Rename` of `from` to `to`.
    pub fn rename(from: &NsPath, to: &NsPath, expect_from: Expect, expect_to: Expect) -> Command {
        Command::Rename {
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
            expect_from,
            expect_to,
        }
    }
}

/// A batch of commands committed as one log entry (group commit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Commands in the order they are applied.
    pub commands: Vec<(RequestId, Command)>,
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Answer {
    /// Applied; the written entry has this version.
    Ok {
        /// The log index of the commit.
        version: u64,
    },
    /// The precondition failed; nothing changed. `current` is the entry that
    /// failed it (a tombstone included), `None` if the path never existed.
    Conflict {
        /// The current entry.
        current: Option<Entry>,
    },
    /// The command is invalid; nothing changed.
    Rejected {
        /// Why, naming the offending value.
        reason: String,
    },
}

/// One answer per command of the log entry; empty for blank and membership entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Answers in command order.
    pub answers: Vec<Answer>,
}
