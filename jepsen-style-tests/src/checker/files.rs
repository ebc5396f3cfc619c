//! The `files` workload's checker: no lost acknowledged change, no content
//! that nobody wrote.
//!
//! Every mutation of a path is a write/cas (sets content), a delete or the
//! source side of a rename (makes it absent), or the target side of a rename
//! (moves some content in). Acknowledged mutations carry their version (the
//! Raft index of the commit). After healing, one final read per path gives
//! its state, and:
//! - a final state at version F is lost if an acknowledged mutation of the
//!   path has a version above F;
//! - at F it must be what the mutation(s) acknowledged at F produced (the
//!   same digest; any content for a rename's target), or, if none was
//!   acknowledged at F, what an indeterminate (`info`) mutation could have;
//! - an absent final state needs the last acknowledged mutation to be a
//!   removal, or an indeterminate removal;
//! - every read (during the run too) returns content some write produced,
//!   and a read at version V returns what was acknowledged at V.
//!
//! Byte-for-byte agreement of every node's folder is the convergence
//! checker's job.

use std::collections::{BTreeMap, HashSet};

use super::linearizable::describe;
use super::lost_writes::FINAL_PROCESS;
use super::{Finding, Verdict};
use crate::history::{EventType, OpKind, Operation};

pub const CHECKER: &str = "files";

/// What a mutation does to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect<'a> {
    /// New content with this digest.
    Content(&'a str),
    /// Content moved in by a rename (digest not recorded).
    Moved,
    Absent,
}

#[derive(Debug, Clone, Copy)]
struct Mutation<'a> {
    effect: Effect<'a>,
    op: &'a Operation,
}

impl Mutation<'_> {
    fn acked(&self) -> bool {
        self.op.outcome == EventType::Ok && self.op.version.is_some()
    }
    fn indeterminate(&self) -> bool {
        self.op.outcome == EventType::Info
    }
    /// Whether this mutation can leave the final state `digest` (None = absent).
    fn explains(&self, digest: Option<&str>) -> bool {
        match (self.effect, digest) {
            (Effect::Content(d), Some(f)) => d == f,
            (Effect::Moved, Some(_)) => true,
            (Effect::Absent, None) => true,
            _ => false,
        }
    }
}

/// Checks the operations on paths of the `files` workload.
pub fn check(ops: &[Operation]) -> Finding {
    let mut by_path: BTreeMap<&str, Vec<Mutation>> = BTreeMap::new();
    let mut written: HashSet<&str> = HashSet::new();
    for o in ops.iter().filter(|o| o.outcome != EventType::Fail) {
        match o.kind {
            OpKind::Write | OpKind::Cas => {
                if let Some(d) = o.value.as_deref() {
                    written.insert(d);
                    by_path.entry(&o.path).or_default().push(Mutation {
                        effect: Effect::Content(d),
                        op: o,
                    });
                }
            }
            OpKind::Delete => by_path.entry(&o.path).or_default().push(Mutation {
                effect: Effect::Absent,
                op: o,
            }),
            OpKind::Rename => {
                by_path.entry(&o.path).or_default().push(Mutation {
                    effect: Effect::Absent,
                    op: o,
                });
                if let Some(to) = o.to.as_deref() {
                    by_path.entry(to).or_default().push(Mutation {
                        effect: Effect::Moved,
                        op: o,
                    });
                }
            }
            _ => {}
        }
    }
    let none = Vec::new();
    let mut problems = Vec::new();
    let mut unknown = Vec::new();

    // Reads during the run.
    let mut reads = 0usize;
    for r in ops
        .iter()
        .filter(|o| o.kind == OpKind::Read && o.outcome == EventType::Ok)
    {
        reads += 1;
        let Some(d) = r.value.as_deref() else {
            continue;
        };
        if !written.contains(d) {
            problems.push(format!("read content nobody wrote: {}", describe(r)));
            continue;
        }
        let muts = by_path.get(r.path.as_str()).unwrap_or(&none);
        let at: Vec<&Mutation> = muts
            .iter()
            .filter(|m| m.acked() && m.op.version == r.version)
            .collect();
        let explained = at.iter().any(|m| m.explains(Some(d)))
            || muts
                .iter()
                .any(|m| m.indeterminate() && m.explains(Some(d)));
        if !at.is_empty() && !explained {
            problems.push(format!(
                "{}: read at @{:?} returned other content than acknowledged there: {} vs {}",
                r.path,
                r.version,
                describe(r),
                describe(at[0].op)
            ));
        }
    }

    // Final states.
    let mut paths: Vec<&str> = by_path.keys().copied().collect();
    for o in ops.iter().filter(|o| o.process == FINAL_PROCESS) {
        if !paths.contains(&o.path.as_str()) {
            paths.push(&o.path);
        }
    }
    let mut acked_total = 0usize;
    for path in paths {
        let muts = by_path.get(path).unwrap_or(&none);
        let acked: Vec<&Mutation> = muts.iter().filter(|m| m.acked()).collect();
        acked_total += acked.len();
        // Versions are unique per commit: one rename's two sides aside, two
        // acknowledged changes of a path never share one.
        let ops_of: Vec<&Operation> = acked.iter().map(|m| m.op).collect();
        let refs: Vec<&&Operation> = ops_of.iter().collect();
        problems.extend(super::lost_writes::shared_versions(path, &refs));
        let fin = ops
            .iter()
            .filter(|o| {
                o.process == FINAL_PROCESS
                    && o.path == path
                    && o.kind == OpKind::Read
                    && o.outcome == EventType::Ok
            })
            .max_by_key(|o| o.invoke_ns);
        let Some(fin) = fin else {
            if !acked.is_empty() {
                unknown.push(format!("{path}: no successful final read"));
            }
            continue;
        };
        let final_digest = fin.value.as_deref();
        let max_acked = acked.iter().filter_map(|m| m.op.version).max();
        let explained_by_info = || {
            muts.iter()
                .any(|m| m.indeterminate() && m.explains(final_digest))
        };
        match (final_digest, fin.version) {
            (Some(_), Some(f)) => {
                if let Some(later) = acked.iter().find(|m| m.op.version > Some(f)) {
                    problems.push(format!(
                        "{path}: final state @{f} is older than an acknowledged change (lost): {}",
                        describe(later.op)
                    ));
                    continue;
                }
                let at: Vec<&&Mutation> =
                    acked.iter().filter(|m| m.op.version == Some(f)).collect();
                if at.is_empty() {
                    if !explained_by_info() {
                        problems.push(format!(
                            "{path}: final {} @{f} comes from no recorded change",
                            final_digest.unwrap_or("?")
                        ));
                    }
                } else if !at.iter().any(|m| m.explains(final_digest)) && !explained_by_info() {
                    problems.push(format!(
                        "{path}: final {} @{f}, but @{f} was acknowledged as {}",
                        final_digest.unwrap_or("?"),
                        describe(at[0].op)
                    ));
                }
            }
            (None, _) => {
                let Some(top) = max_acked else { continue };
                let last: Vec<&&Mutation> =
                    acked.iter().filter(|m| m.op.version == Some(top)).collect();
                if !last.iter().any(|m| m.effect == Effect::Absent) && !explained_by_info() {
                    problems.push(format!(
                        "{path}: absent at the end, but its last acknowledged change keeps it (lost): {}",
                        describe(last[0].op)
                    ));
                }
            }
            (Some(_), None) => {
                problems.push(format!("{path}: final read has content but no version"))
            }
        }
    }

    if !problems.is_empty() {
        return Finding {
            checker: CHECKER.into(),
            verdict: Verdict::Invalid,
            summary: format!(
                "{} anomalies in {acked_total} acknowledged changes and {reads} reads",
                problems.len()
            ),
            details: problems,
        };
    }
    if !unknown.is_empty() {
        return Finding {
            checker: CHECKER.into(),
            verdict: Verdict::Unknown,
            summary: "no final read on some paths".into(),
            details: unknown,
        };
    }
    Finding::valid(
        CHECKER,
        format!(
            "{acked_total} acknowledged changes on {} paths and {reads} reads accounted for",
            by_path.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        p: u64,
        kind: OpKind,
        path: &str,
        v: Option<&str>,
        ver: Option<u64>,
        t: u64,
        out: EventType,
    ) -> Operation {
        Operation {
            process: p,
            kind,
            path: path.into(),
            to: None,
            value: v.map(str::to_string),
            expect: None,
            version: ver,
            outcome: out,
            node: None,
            base: None,
            invoke_ns: t,
            complete_ns: Some(t + 1),
            error: None,
        }
    }
    fn put(path: &str, d: &str, ver: u64, t: u64) -> Operation {
        op(1, OpKind::Write, path, Some(d), Some(ver), t, EventType::Ok)
    }
    fn rename(from: &str, to: &str, ver: Option<u64>, t: u64, out: EventType) -> Operation {
        let mut o = op(2, OpKind::Rename, from, None, ver, t, out);
        o.to = Some(to.into());
        o
    }
    fn fin(path: &str, d: Option<&str>, ver: Option<u64>) -> Operation {
        op(
            FINAL_PROCESS,
            OpKind::Read,
            path,
            d,
            ver,
            1000,
            EventType::Ok,
        )
    }

    #[test]
    fn puts_edits_renames_and_deletes_that_add_up_are_valid() {
        let mut edit = op(
            3,
            OpKind::Cas,
            "f/a",
            Some("2:bb"),
            Some(4),
            20,
            EventType::Ok,
        );
        edit.expect = Some(2);
        let h = [
            put("f/a", "1:aa", 2, 0),
            op(
                3,
                OpKind::Read,
                "f/a",
                Some("1:aa"),
                Some(2),
                10,
                EventType::Ok,
            ),
            edit,
            rename("f/a", "f/b", Some(6), 30, EventType::Ok),
            put("f/c", "3:cc", 7, 40),
            op(4, OpKind::Delete, "f/c", None, Some(9), 50, EventType::Ok),
            fin("f/a", None, None),
            fin("f/b", Some("2:bb"), Some(6)),
            fin("f/c", None, None),
        ];
        let f = check(&h);
        assert_eq!(f.verdict, Verdict::Valid, "{:?}", f.details);
    }

    #[test]
    fn a_rolled_back_put_is_lost() {
        let h = [
            put("f/a", "1:aa", 2, 0),
            put("f/a", "1:bb", 5, 10),
            fin("f/a", Some("1:aa"), Some(2)),
        ];
        let f = check(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details[0].contains("lost"), "{:?}", f.details);
    }

    #[test]
    fn a_file_that_comes_back_after_its_delete_is_lost_delete() {
        let h = [
            put("f/a", "1:aa", 2, 0),
            op(4, OpKind::Delete, "f/a", None, Some(3), 10, EventType::Ok),
            fin("f/a", Some("1:aa"), Some(2)),
        ];
        assert_eq!(check(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn a_vanished_file_is_lost_unless_an_unknown_removal_explains_it() {
        let h = [put("f/a", "1:aa", 2, 0), fin("f/a", None, None)];
        assert_eq!(check(&h).verdict, Verdict::Invalid);
        let h = [
            put("f/a", "1:aa", 2, 0),
            rename("f/a", "f/b", None, 5, EventType::Info),
            fin("f/a", None, None),
            fin("f/b", Some("1:aa"), Some(8)),
        ];
        let f = check(&h);
        assert_eq!(f.verdict, Verdict::Valid, "{:?}", f.details);
    }

    #[test]
    fn content_nobody_wrote_is_caught() {
        let h = [
            put("f/a", "1:aa", 2, 0),
            op(
                3,
                OpKind::Read,
                "f/a",
                Some("1:zz"),
                Some(2),
                10,
                EventType::Ok,
            ),
            fin("f/a", Some("1:aa"), Some(2)),
        ];
        let f = check(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details[0].contains("nobody wrote"), "{:?}", f.details);
    }

    #[test]
    fn a_read_at_a_version_must_see_what_was_acknowledged_there() {
        let h = [
            put("f/a", "1:aa", 2, 0),
            put("f/b", "1:bb", 3, 0),
            op(
                3,
                OpKind::Read,
                "f/a",
                Some("1:bb"),
                Some(2),
                10,
                EventType::Ok,
            ),
            fin("f/a", Some("1:aa"), Some(2)),
            fin("f/b", Some("1:bb"), Some(3)),
        ];
        assert_eq!(check(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn two_changes_acknowledged_at_one_version_are_caught() {
        let h = [
            put("f/a", "1:aa", 2, 0),
            op(4, OpKind::Delete, "f/a", None, Some(2), 10, EventType::Ok),
            fin("f/a", None, None),
        ];
        let f = check(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details[0].contains("share version 2"), "{:?}", f.details);
    }

    #[test]
    fn a_missing_final_read_is_unknown() {
        let h = [put("f/a", "1:aa", 2, 0)];
        assert_eq!(check(&h).verdict, Verdict::Unknown);
    }
}
