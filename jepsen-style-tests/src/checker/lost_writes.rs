//! No lost acknowledged writes: every acknowledged write is either the final
//! value or overwritten by a later acknowledged or indeterminate write.
//!
//! "Later" is decided by synod's versions (the Raft index of the commit):
//! the final read after healing gives (value, version). An acknowledged
//! write at version V is lost if the final version is below V, wrong if the
//! final version is V with another value, and unexplained if the final
//! version is above V but no other write (ok at a higher version, or info)
//! exists to have produced it.

use std::collections::BTreeMap;

use super::linearizable::describe;
use super::{Finding, Verdict};
use crate::history::{EventType, OpKind, Operation};

pub const CHECKER: &str = "lost-writes";

/// Process id of the reads made after healing, one per path.
pub const FINAL_PROCESS: u64 = u64::MAX - 1;

/// Checks every path that has a final read. Paths written but without a
/// final read make the verdict unknown.
pub fn check(ops: &[Operation]) -> Finding {
    let mut by_path: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Read | OpKind::Write | OpKind::Cas))
    {
        by_path.entry(o.path.as_str()).or_default().push(o);
    }
    let mut problems = Vec::new();
    let mut unknown = Vec::new();
    let mut acked = 0usize;
    for (path, ops) in &by_path {
        let writes: Vec<&&Operation> = ops
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Write | OpKind::Cas))
            .collect();
        let ok_writes: Vec<&&Operation> = writes
            .iter()
            .copied()
            .filter(|o| o.outcome == EventType::Ok)
            .collect();
        acked += ok_writes.len();
        problems.extend(shared_versions(path, &ok_writes));
        let final_read = ops
            .iter()
            .filter(|o| {
                o.process == FINAL_PROCESS && o.kind == OpKind::Read && o.outcome == EventType::Ok
            })
            .max_by_key(|o| o.invoke_ns);
        let Some(fin) = final_read else {
            if !ok_writes.is_empty() {
                unknown.push(format!("{path}: no successful final read"));
            }
            continue;
        };
        let final_version = fin.version.unwrap_or(0);
        if let Some(v) = &fin.value {
            if !writes.iter().any(|w| w.value.as_ref() == Some(v)) {
                problems.push(format!(
                    "{path}: final value {v:?}@{final_version} was never written"
                ));
            }
        }
        for w in &ok_writes {
            let Some(version) = w.version else {
                problems.push(format!(
                    "{path}: acknowledged without a version: {}",
                    describe(w)
                ));
                continue;
            };
            if final_version < version {
                problems.push(format!(
                    "{path}: lost: final state is @{final_version}, older than the acknowledged {}",
                    describe(w)
                ));
            } else if final_version == version {
                if fin.value != w.value {
                    problems.push(format!(
                        "{path}: final @{final_version} holds {:?}, but it was acknowledged as {}",
                        fin.value,
                        describe(w)
                    ));
                }
            } else {
                let overwritten = writes.iter().any(|o| {
                    !std::ptr::eq(**o, **w)
                        && match o.outcome {
                            EventType::Ok => o.version.is_some_and(|v| v > version),
                            EventType::Info => true,
                            _ => false,
                        }
                });
                if !overwritten {
                    problems.push(format!(
                        "{path}: final @{final_version} but no later write explains it: {}",
                        describe(w)
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Finding {
            checker: CHECKER.into(),
            verdict: Verdict::Invalid,
            summary: format!(
                "{} of {acked} acknowledged writes lost or wrong",
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
            "{acked} acknowledged writes on {} paths accounted for",
            by_path.len()
        ),
    )
}

/// Versions are unique per commit (DESIGN.md section 2): two different
/// acknowledged writes of one path at the same version break `If-Match`
/// (a cas on that version may overwrite the other write unseen).
pub fn shared_versions(path: &str, acked: &[&&Operation]) -> Vec<String> {
    let mut by_version: BTreeMap<u64, Vec<&Operation>> = BTreeMap::new();
    for w in acked {
        if let Some(v) = w.version {
            by_version.entry(v).or_default().push(w);
        }
    }
    by_version
        .into_iter()
        .filter(|(_, ws)| ws.len() > 1)
        .map(|(v, ws)| {
            let all: Vec<String> = ws.iter().map(|w| describe(w)).collect();
            format!(
                "{path}: {} acknowledged changes share version {v}: {}",
                ws.len(),
                all.join(" / ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        p: u64,
        kind: OpKind,
        v: Option<&str>,
        ver: Option<u64>,
        t: u64,
        out: EventType,
    ) -> Operation {
        Operation {
            process: p,
            kind,
            path: "r".into(),
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
    fn fin(v: Option<&str>, ver: u64) -> Operation {
        op(
            FINAL_PROCESS,
            OpKind::Read,
            v,
            Some(ver),
            1000,
            EventType::Ok,
        )
    }

    #[test]
    fn final_value_is_the_last_acked_write() {
        let h = [
            op(1, OpKind::Write, Some("a"), Some(3), 0, EventType::Ok),
            op(2, OpKind::Write, Some("b"), Some(4), 5, EventType::Ok),
            fin(Some("b"), 4),
        ];
        assert_eq!(check(&h).verdict, Verdict::Valid);
    }

    #[test]
    fn rolled_back_write_is_lost() {
        let h = [
            op(1, OpKind::Write, Some("a"), Some(3), 0, EventType::Ok),
            op(2, OpKind::Write, Some("b"), Some(4), 5, EventType::Ok),
            fin(Some("a"), 3),
        ];
        let f = check(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details[0].contains("lost"), "{:?}", f.details);
    }

    #[test]
    fn info_write_may_overwrite() {
        let h = [
            op(1, OpKind::Write, Some("a"), Some(3), 0, EventType::Ok),
            op(2, OpKind::Write, Some("b"), None, 5, EventType::Info),
            fin(Some("b"), 9),
        ];
        assert_eq!(check(&h).verdict, Verdict::Valid);
    }

    #[test]
    fn same_version_different_value_is_wrong() {
        let h = [
            op(1, OpKind::Write, Some("a"), Some(3), 0, EventType::Ok),
            op(2, OpKind::Write, Some("b"), None, 5, EventType::Info),
            fin(Some("b"), 3),
        ];
        assert_eq!(check(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn two_acknowledged_writes_at_one_version_are_caught() {
        let h = [
            op(1, OpKind::Write, Some("a"), Some(3), 0, EventType::Ok),
            op(2, OpKind::Write, Some("b"), Some(3), 0, EventType::Ok),
            fin(Some("b"), 3),
        ];
        let f = check(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(
            f.details.iter().any(|d| d.contains("share version 3")),
            "{:?}",
            f.details
        );
    }

    #[test]
    fn phantom_final_value_is_caught() {
        let h = [fin(Some("ghost"), 3)];
        assert_eq!(check(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn missing_final_read_is_unknown() {
        let h = [op(1, OpKind::Write, Some("a"), Some(3), 0, EventType::Ok)];
        assert_eq!(check(&h).verdict, Verdict::Unknown);
    }
}
