//! Conflict accounting for the `folder` workload: no edit made in a node's
//! folder is lost, even when nodes edit the same file concurrently on both
//! sides of a partition, while down, or while a remote delete arrives.
//!
//! The rule. Every edit writes bytes no other edit writes, and records the
//! digest of the bytes it left (`value`) and of the bytes it replaced
//! (`base`, read from the same folder just before; a delete's base is the
//! bytes it removed). An edit X is *superseded* when some edit or delete
//! that may have happened (`ok` or `info`) has base X: someone looked at X
//! in a folder and replaced it on purpose, so X may legitimately be gone.
//! This covers an edit overwritten on its own node before the scanner ever
//! saw it (the next edit's base is X), an edit committed and later changed
//! on another node that had received it, and an edit deleted on purpose.
//! Renames keep bytes and supersede nothing. Then, after healing and once
//! the folders have converged:
//!
//! - every `ok` edit that is not superseded holds its bytes somewhere in the
//!   committed namespace: as the winner at its path, as a conflict copy
//!   (`name.sync-conflict-<utc>-<node>`), or at the path a rename moved it
//!   to. Anything else is a lost edit;
//! - every committed file under `folder/` holds bytes some edit wrote (a
//!   torn or mixed file is a phantom).
//!
//! It is sound: a lost edit is one whose bytes were in a folder, that no one
//! replaced on purpose, and that no node holds any more. `info` edits (the
//! write failed half way, or the path was replaced while it was written)
//! need not survive, but may. Convergence is checked separately; this
//! checker reads only the committed namespace of the convergence snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::convergence::FileState;
use super::{Finding, Verdict};
use crate::history::{EventType, OpKind, Operation};

pub const CHECKER: &str = "folder";

/// The marker synod puts in a conflict copy's name.
const CONFLICT_MARK: &str = ".sync-conflict-";

/// Checks the `folder` workload's operations against the committed files
/// (`None` when they could not be read: unknown).
pub fn check(ops: &[Operation], committed: Option<&BTreeMap<String, FileState>>) -> Finding {
    let Some(committed) = committed else {
        return Finding {
            checker: CHECKER.into(),
            verdict: Verdict::Unknown,
            summary: "the committed namespace could not be read".into(),
            details: Vec::new(),
        };
    };
    let happened = |o: &&Operation| o.outcome != EventType::Fail;
    let edits: Vec<&Operation> = ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Write | OpKind::Append))
        .collect();
    let superseded: HashSet<&str> = ops
        .iter()
        .filter(happened)
        .filter(|o| matches!(o.kind, OpKind::Write | OpKind::Append | OpKind::Delete))
        .filter_map(|o| o.base.as_deref())
        .collect();
    // Where each digest is in the final namespace.
    let mut at: HashMap<&str, Vec<&str>> = HashMap::new();
    for (path, f) in committed {
        at.entry(f.digest.as_str()).or_default().push(path);
    }
    let written: HashSet<&str> = ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Write | OpKind::Append))
        .filter_map(|o| o.value.as_deref())
        .collect();

    let mut problems = Vec::new();
    let (mut winners, mut copies, mut moved, mut excused) = (0, 0, 0, 0);
    for e in edits.iter().filter(|o| o.outcome == EventType::Ok) {
        let Some(v) = e.value.as_deref() else {
            continue;
        };
        if superseded.contains(v) {
            excused += 1;
            continue;
        }
        match at.get(v) {
            Some(paths) if paths.contains(&e.path.as_str()) => winners += 1,
            Some(paths) if paths.iter().any(|p| is_copy_of(p, &e.path)) => copies += 1,
            Some(_) => moved += 1,
            None => problems.push(format!(
                "lost edit: {} (not superseded, in no committed file)",
                describe(e)
            )),
        }
    }
    for (path, f) in committed
        .iter()
        .filter(|(p, _)| p.starts_with(crate::workload::folder::FOLDER_PREFIX))
    {
        if !written.contains(f.digest.as_str()) {
            problems.push(format!(
                "phantom: {path} holds bytes no edit wrote ({} bytes, {})",
                f.size,
                &f.digest[..f.digest.len().min(16)]
            ));
        }
    }
    let total = edits.iter().filter(|o| o.outcome == EventType::Ok).count();
    let summary = format!(
        "{total} edits: {winners} won at their path, {copies} kept as conflict copies, {moved} renamed, {excused} superseded by a later edit or delete"
    );
    if problems.is_empty() {
        Finding::valid(CHECKER, summary)
    } else {
        let mut details = vec![summary];
        details.extend(problems);
        Finding {
            checker: CHECKER.into(),
            verdict: Verdict::Invalid,
            summary: format!("{} edits lost or files unexplained", details.len() - 1),
            details,
        }
    }
}

/// Whether `copy` is a conflict copy of `path`
/// (`dir/name.sync-conflict-<utc>-<node>[.ext]`).
pub fn is_copy_of(copy: &str, path: &str) -> bool {
    let Some(i) = copy.find(CONFLICT_MARK) else {
        return false;
    };
    let (dir, file) = match path.rfind('/') {
        Some(j) => (&path[..=j], &path[j + 1..]),
        None => ("", path),
    };
    let stem = match file.rfind('.').filter(|&k| k > 0) {
        Some(k) => &file[..k],
        None => file,
    };
    copy[..i] == format!("{dir}{stem}")
}

fn describe(o: &Operation) -> String {
    let short = |d: Option<&str>| d.map_or("-".to_string(), |d| d[..d.len().min(12)].to_string());
    format!(
        "p{} node {} {:?} {} at {:.3}s -> {} (replaced {})",
        o.process,
        o.node.map_or("?".into(), |n| n.to_string()),
        o.kind,
        o.path,
        o.invoke_ns as f64 / 1e9,
        short(o.value.as_deref()),
        short(o.base.as_deref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        kind: OpKind,
        path: &str,
        value: Option<&str>,
        base: Option<&str>,
        outcome: EventType,
    ) -> Operation {
        Operation {
            process: 1,
            kind,
            path: path.into(),
            to: None,
            value: value.map(str::to_string),
            expect: None,
            version: None,
            base: base.map(str::to_string),
            outcome,
            node: Some(1),
            invoke_ns: 0,
            complete_ns: Some(1),
            error: None,
        }
    }

    fn edit(path: &str, value: &str, base: Option<&str>) -> Operation {
        op(OpKind::Write, path, Some(value), base, EventType::Ok)
    }

    fn ns(files: &[(&str, &str)]) -> BTreeMap<String, FileState> {
        files
            .iter()
            .map(|(p, d)| {
                (
                    p.to_string(),
                    FileState {
                        size: 1,
                        mode: None,
                        digest: d.to_string(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn concurrent_edits_survive_as_winner_and_conflict_copy() {
        // x on both nodes; node 1 writes a, node 2 writes b, both from x.
        let ops = vec![
            edit("folder/d0", "x", None),
            edit("folder/d0", "a", Some("x")),
            edit("folder/d0", "b", Some("x")),
        ];
        let f = check(
            &ops,
            Some(&ns(&[
                ("folder/d0", "a"),
                ("folder/d0.sync-conflict-20250101-000000-2", "b"),
            ])),
        );
        assert_eq!(f.verdict, Verdict::Valid, "{:?}", f.details);
        assert!(
            f.summary.contains("1 kept as conflict copies"),
            "{}",
            f.summary
        );
    }

    #[test]
    fn an_edit_that_vanished_without_a_successor_is_lost() {
        let ops = vec![
            edit("folder/d0", "x", None),
            edit("folder/d0", "a", Some("x")),
            edit("folder/d0", "b", Some("x")),
        ];
        // b was overwritten by the winner: no conflict copy.
        let f = check(&ops, Some(&ns(&[("folder/d0", "a")])));
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f
            .details
            .iter()
            .any(|d| d.contains("lost edit") && d.contains("-> b")));
    }

    #[test]
    fn superseded_edits_need_not_survive_but_info_edits_may_supersede() {
        let ops = vec![
            edit("folder/d0", "x", None),
            // Overwritten locally before any scan: its successor names it.
            edit("folder/d0", "y", Some("x")),
            op(
                OpKind::Append,
                "folder/d0",
                Some("y+"),
                Some("y"),
                EventType::Info,
            ),
            // A delete on purpose.
            edit("folder/d1", "z", None),
            op(OpKind::Delete, "folder/d1", None, Some("z"), EventType::Ok),
            // A failed delete supersedes nothing.
            edit("folder/d2", "w", None),
            op(
                OpKind::Delete,
                "folder/d2",
                None,
                Some("w"),
                EventType::Fail,
            ),
        ];
        let f = check(&ops, Some(&ns(&[("folder/d2", "w")])));
        assert_eq!(f.verdict, Verdict::Valid, "{:?}", f.details);
        let f = check(&ops, Some(&ns(&[])));
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details.iter().any(|d| d.contains("folder/d2")));
    }

    #[test]
    fn renamed_bytes_survive_elsewhere_and_phantoms_are_found() {
        let ops = vec![
            edit("folder/d0", "x", None),
            op(
                OpKind::Rename,
                "folder/d0",
                Some("x"),
                Some("x"),
                EventType::Ok,
            ),
        ];
        let f = check(&ops, Some(&ns(&[("folder/d3", "x")])));
        assert_eq!(f.verdict, Verdict::Valid, "{:?}", f.details);
        assert!(f.summary.contains("1 renamed"), "{}", f.summary);
        let f = check(
            &ops,
            Some(&ns(&[("folder/d3", "x"), ("folder/d1", "torn")])),
        );
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details.iter().any(|d| d.contains("phantom: folder/d1")));
        assert_eq!(check(&ops, None).verdict, Verdict::Unknown);
    }

    #[test]
    fn conflict_copy_names_are_recognised() {
        assert!(is_copy_of(
            "folder/d0.sync-conflict-20250101-000000-2",
            "folder/d0"
        ));
        assert!(is_copy_of(
            "a/r.sync-conflict-20250101-000000-2.txt",
            "a/r.txt"
        ));
        assert!(!is_copy_of(
            "folder/d1.sync-conflict-20250101-000000-2",
            "folder/d0"
        ));
        assert!(!is_copy_of("folder/d0", "folder/d0"));
    }
}
