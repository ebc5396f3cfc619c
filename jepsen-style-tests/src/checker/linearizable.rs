//! Linearizability of a versioned register, one path at a time.
//!
//! The search is Wing & Gong's, with Lowe's memoisation (the algorithm of
//! Knossos and Porcupine): walk the events in time order, try to linearize
//! each pending call against the model, backtrack when a return is reached
//! whose call was not linearized, and never revisit a (set of linearized
//! ops, model state) pair. `info` operations return "at infinity": they may
//! be linearized anywhere after their call, or not at all. `fail`ed
//! operations had no effect and are left out.
//!
//! The model is synod's file as a register: its value (None = absent) and
//! its version (the Raft index of the commit that wrote it). A read must see
//! the value and version of the state it is linearized at; a cas succeeds
//! only when the version matches (`expect` 0 means "absent").

use std::collections::{HashMap, HashSet};

use super::{Finding, Verdict};
use crate::history::{EventType, OpKind, Operation};

/// Name used in findings.
pub const CHECKER: &str = "linearizable";

/// Search budget per path (memoised states); past it the verdict is unknown.
pub const DEFAULT_BUDGET: usize = 2_000_000;

/// A register operation prepared for the search.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RegOp {
    kind: OpKind,
    /// Interned value (read result, or value written).
    value: Option<u32>,
    expect: u64,
    /// Version observed/produced; `None` if unknown (info writes).
    version: Option<u64>,
    call: u64,
    /// `None`: indeterminate (returns at infinity).
    ret: Option<u64>,
    /// Index into the caller's operation list, for reporting.
    source: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct State {
    value: Option<u32>,
    version: Option<u64>,
}

const INITIAL: State = State {
    value: None,
    version: Some(0),
};

/// Whether `op`'s version (if known) is above the state's (if known).
fn newer(s: State, op: &RegOp) -> bool {
    match (s.version, op.version) {
        (Some(current), Some(new)) => new > current,
        _ => true,
    }
}

/// Applies `op` to `s`; `None` if the model forbids it.
fn step(s: State, op: &RegOp) -> Option<State> {
    match op.kind {
        OpKind::Read => {
            if s.value != op.value {
                return None;
            }
            match (s.version, op.version) {
                (Some(a), Some(b)) if a != b && op.value.is_some() => None,
                // A read pins down a version an info write left unknown.
                (None, Some(b)) => Some(State {
                    value: s.value,
                    version: Some(b),
                }),
                _ => Some(s),
            }
        }
        // Every commit has a higher version (its Raft index) than the one
        // before: a write can only move the version forward.
        OpKind::Write => newer(s, op).then_some(State {
            value: op.value,
            version: op.version,
        }),
        OpKind::Cas => {
            let matches = if op.expect == 0 {
                s.value.is_none()
            } else {
                match s.version {
                    Some(v) => s.value.is_some() && v == op.expect,
                    None => s.value.is_some(),
                }
            };
            (matches && newer(s, op)).then_some(State {
                value: op.value,
                version: op.version,
            })
        }
        // Not register operations: the checker never passes them here.
        OpKind::Rename | OpKind::Delete | OpKind::Append | OpKind::Start | OpKind::Stop => Some(s),
    }
}

/// Outcome of one search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    Linearizable,
    NotLinearizable,
    BudgetExhausted,
}

/// Wing–Gong–Lowe over `ops` (all on one path).
fn search(ops: &[RegOp], budget: usize) -> Search {
    // Events: (time, is_return, op). Calls sort before returns at equal
    // times, which only adds concurrency (never a false alarm).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, false, i));
        events.push((op.ret.unwrap_or(u64::MAX), true, i));
    }
    events.sort();
    let n = events.len();
    // Doubly linked list over event slots; slot n is the head sentinel.
    // next[i] = i + 1 (the last event points at the sentinel, the sentinel
    // at event 0); prev the reverse. With no events both are [0] = [n].
    let mut next: Vec<usize> = (1..=n).chain([0]).collect();
    let mut prev: Vec<usize> = std::iter::once(n).chain(0..n).collect();
    let mut call_slot = vec![0usize; ops.len()];
    let mut ret_slot = vec![0usize; ops.len()];
    for (slot, &(_, is_ret, op)) in events.iter().enumerate() {
        if is_ret {
            ret_slot[op] = slot;
        } else {
            call_slot[op] = slot;
        }
    }
    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, slot: usize| {
        let (p, q) = (prev[slot], next[slot]);
        next[p] = q;
        prev[q] = p;
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, slot: usize| {
        let (p, q) = (prev[slot], next[slot]);
        next[p] = slot;
        prev[q] = slot;
    };

    let mut remaining_ok = ops.iter().filter(|o| o.ret.is_some()).count();
    let words = ops.len().div_ceil(64).max(1);
    let mut bits = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = INITIAL;
    let mut entry = next[n];
    loop {
        if remaining_ok == 0 {
            return Search::Linearizable;
        }
        if entry == n {
            // Only reachable with no events left, which remaining_ok excludes.
            return Search::Linearizable;
        }
        let (_, is_ret, op) = events[entry];
        if !is_ret {
            if let Some(new_state) = step(state, &ops[op]) {
                bits[op / 64] |= 1 << (op % 64);
                if cache.insert((bits.clone(), new_state)) {
                    if cache.len() > budget {
                        return Search::BudgetExhausted;
                    }
                    stack.push((op, state));
                    state = new_state;
                    lift(&mut next, &mut prev, call_slot[op]);
                    lift(&mut next, &mut prev, ret_slot[op]);
                    if ops[op].ret.is_some() {
                        remaining_ok -= 1;
                    }
                    entry = next[n];
                    continue;
                }
                bits[op / 64] &= !(1 << (op % 64));
            }
            entry = next[entry];
        } else {
            // A return whose call is still pending: undo the last choice.
            let Some((top, old_state)) = stack.pop() else {
                return Search::NotLinearizable;
            };
            state = old_state;
            bits[top / 64] &= !(1 << (top % 64));
            unlift(&mut next, &mut prev, ret_slot[top]);
            unlift(&mut next, &mut prev, call_slot[top]);
            if ops[top].ret.is_some() {
                remaining_ok += 1;
            }
            entry = next[call_slot[top]];
        }
    }
}

/// Turns one path's operations into search input: drops failures, interns
/// values, and gives info writes the version a read later saw them at.
fn prepare(ops: &[&Operation]) -> Vec<RegOp> {
    let mut interned: HashMap<String, u32> = HashMap::new();
    let mut intern = |v: &Option<String>| {
        v.as_ref().map(|s| {
            let next = u32::try_from(interned.len()).unwrap_or(u32::MAX);
            *interned.entry(s.clone()).or_insert(next)
        })
    };
    let mut seen_version: HashMap<String, u64> = HashMap::new();
    for o in ops.iter().filter(|o| o.outcome == EventType::Ok) {
        if let (Some(v), Some(ver)) = (&o.value, o.version) {
            seen_version.entry(v.clone()).or_insert(ver);
        }
    }
    let mut out = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        let indeterminate = match o.outcome {
            EventType::Ok => false,
            EventType::Info => true,
            _ => continue,
        };
        // A read with unknown outcome constrains nothing.
        if indeterminate && o.kind == OpKind::Read {
            continue;
        }
        let version = if indeterminate {
            o.value.as_ref().and_then(|v| seen_version.get(v).copied())
        } else {
            o.version
        };
        out.push(RegOp {
            kind: o.kind,
            value: intern(&o.value),
            expect: o.expect.unwrap_or(0),
            version,
            call: o.invoke_ns,
            ret: if indeterminate { None } else { o.complete_ns },
            source: i,
        });
    }
    out
}

/// The prefix of `ops` cut at the return of the `k`-th ok operation (by
/// return time): later calls are dropped, calls still open become info.
fn prefix(ops: &[RegOp], cut: u64) -> Vec<RegOp> {
    ops.iter()
        .filter(|o| o.call <= cut)
        .filter_map(|o| match o.ret {
            Some(r) if r <= cut => Some(o.clone()),
            _ if o.kind == OpKind::Read => None,
            _ => Some(RegOp {
                ret: None,
                ..o.clone()
            }),
        })
        .collect()
}

/// Checks one path; `ops` are that path's operations.
pub fn check_path(path: &str, ops: &[&Operation], budget: usize) -> Finding {
    let reg = prepare(ops);
    match search(&reg, budget) {
        Search::Linearizable => Finding::valid(
            CHECKER,
            format!("{path}: {} operations linearizable", reg.len()),
        ),
        Search::BudgetExhausted => Finding {
            checker: CHECKER.into(),
            verdict: Verdict::Unknown,
            summary: format!("{path}: search budget of {budget} states exhausted"),
            details: vec![format!("{} operations on {path}", reg.len())],
        },
        Search::NotLinearizable => {
            let details = minimal_counterexample(&reg, ops, budget);
            Finding {
                checker: CHECKER.into(),
                verdict: Verdict::Invalid,
                summary: format!("{path}: not linearizable"),
                details,
            }
        }
    }
}

/// Binary search for the shortest prefix (by return time) that cannot be
/// linearized; non-linearizability is preserved by extending a prefix, so
/// the search is sound. Reports the prefix's last operation and the ops
/// concurrent with or just before it.
fn minimal_counterexample(reg: &[RegOp], ops: &[&Operation], budget: usize) -> Vec<String> {
    let mut returns: Vec<u64> = reg.iter().filter_map(|o| o.ret).collect();
    returns.sort_unstable();
    let (mut lo, mut hi) = (0usize, returns.len().saturating_sub(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if search(&prefix(reg, returns[mid]), budget) == Search::NotLinearizable {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let Some(&cut) = returns.get(lo) else {
        return vec!["empty history".into()];
    };
    let minimal = prefix(reg, cut);
    let culprit = reg.iter().find(|o| o.ret == Some(cut));
    let mut lines = vec![format!(
        "shortest non-linearizable prefix: {} operations, ending at {:.3}s",
        minimal.len(),
        cut as f64 / 1e9
    )];
    if let Some(c) = culprit {
        lines.push(format!("cannot linearize: {}", describe(ops[c.source])));
        if let Some(note) = torn_read(c, reg) {
            lines.push(note);
        }
    }
    // Context: the last dozen operations of the prefix by call time.
    let mut context: Vec<&RegOp> = minimal.iter().collect();
    context.sort_by_key(|o| o.call);
    let skip = context.len().saturating_sub(12);
    for o in context.into_iter().skip(skip) {
        lines.push(format!("  {}", describe(ops[o.source])));
    }
    lines
}

/// Values are unique, so a read whose version differs from the version its
/// value was acknowledged at returned bytes and ETag of different commits.
fn torn_read(read: &RegOp, reg: &[RegOp]) -> Option<String> {
    if read.kind != OpKind::Read || read.value.is_none() {
        return None;
    }
    let write = reg.iter().find(|w| {
        w.kind != OpKind::Read && w.value == read.value && w.ret.is_some() && w.version.is_some()
    })?;
    let (got, wrote) = (read.version?, write.version?);
    (got != wrote).then(|| {
        format!("note: the read returned the bytes committed at @{wrote} under version @{got}")
    })
}

/// One operation as a line of a counterexample.
pub fn describe(o: &Operation) -> String {
    let t = |ns: u64| format!("{:.3}", ns as f64 / 1e9);
    let end = o.complete_ns.map(t).unwrap_or_else(|| "∞".into());
    let what = match o.kind {
        OpKind::Read => format!("read -> {:?}@{:?}", o.value, o.version),
        OpKind::Write => format!("write {:?} -> @{:?}", o.value, o.version),
        OpKind::Cas => format!(
            "cas if @{} {:?} -> @{:?}",
            o.expect.unwrap_or(0),
            o.value,
            o.version
        ),
        OpKind::Rename => format!(
            "rename -> {} @{:?}",
            o.to.as_deref().unwrap_or("?"),
            o.version
        ),
        OpKind::Delete => format!("delete -> @{:?}", o.version),
        OpKind::Append => format!("append {:?}", o.value),
        OpKind::Start | OpKind::Stop => format!("{:?}", o.kind),
    };
    format!(
        "p{} [{}..{}] {:?} {} (node {:?})",
        o.process,
        t(o.invoke_ns),
        end,
        o.outcome,
        what,
        o.node
    )
}

/// Checks every path of a register history.
pub fn check(ops: &[Operation], budget: usize) -> Vec<Finding> {
    let mut by_path: std::collections::BTreeMap<&str, Vec<&Operation>> = Default::default();
    for o in ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Read | OpKind::Write | OpKind::Cas))
    {
        by_path.entry(o.path.as_str()).or_default().push(o);
    }
    by_path
        .into_iter()
        .map(|(path, ops)| check_path(path, &ops, budget))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an operation: `outcome` "ok"/"info"/"fail".
    fn op(
        p: u64,
        kind: OpKind,
        value: Option<&str>,
        version: Option<u64>,
        call: u64,
        ret: Option<u64>,
        outcome: EventType,
    ) -> Operation {
        Operation {
            process: p,
            kind,
            path: "r".into(),
            to: None,
            value: value.map(str::to_string),
            expect: None,
            version,
            outcome,
            node: None,
            base: None,
            invoke_ns: call,
            complete_ns: ret,
            error: None,
        }
    }
    fn w(p: u64, v: &str, ver: u64, call: u64, ret: u64) -> Operation {
        op(
            p,
            OpKind::Write,
            Some(v),
            Some(ver),
            call,
            Some(ret),
            EventType::Ok,
        )
    }
    fn r(p: u64, v: Option<&str>, ver: u64, call: u64, ret: u64) -> Operation {
        let version = v.map(|_| ver);
        op(p, OpKind::Read, v, version, call, Some(ret), EventType::Ok)
    }
    fn must_verdict(ops: &[Operation]) -> Finding {
        let refs: Vec<&Operation> = ops.iter().collect();
        check_path("r", &refs, DEFAULT_BUDGET)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            r(1, None, 0, 0, 1),
            w(1, "a", 5, 2, 3),
            r(2, Some("a"), 5, 4, 5),
            w(2, "b", 6, 6, 7),
            r(1, Some("b"), 6, 8, 9),
        ];
        assert_eq!(must_verdict(&h).verdict, Verdict::Valid);
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_a_write() {
        let h = [
            w(1, "a", 5, 0, 1),
            w(2, "b", 6, 2, 10),
            r(3, Some("b"), 6, 3, 4),
            r(4, Some("a"), 5, 3, 5),
        ];
        // r4 must linearize before the write of b and r3 after it; both
        // overlap the write, and r3 ends before r4 ends, so r4 can still
        // come first: linearizable.
        assert_eq!(must_verdict(&h).verdict, Verdict::Valid);
    }

    #[test]
    fn versions_only_move_forward() {
        // Two concurrent writes acknowledged at one version: whichever goes
        // second would not advance the version.
        let h = [
            w(1, "a", 5, 0, 3),
            w(2, "b", 5, 1, 3),
            r(3, Some("b"), 5, 4, 5),
        ];
        assert_eq!(must_verdict(&h).verdict, Verdict::Invalid);
        // A write acknowledged at an older version than one already read.
        let h = [
            w(1, "a", 7, 0, 1),
            r(2, Some("a"), 7, 2, 3),
            w(3, "b", 6, 4, 5),
        ];
        assert_eq!(must_verdict(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn stale_read_after_a_newer_read_is_caught() {
        let h = [
            w(1, "a", 5, 0, 1),
            w(2, "b", 6, 2, 10),
            r(3, Some("b"), 6, 3, 4),
            // Starts after r3 saw b, yet sees a: a stale follower read.
            r(4, Some("a"), 5, 5, 6),
        ];
        let f = must_verdict(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details[0].contains("4 operations"), "{:?}", f.details);
        assert!(f.details[1].contains("p4"), "{:?}", f.details);
    }

    #[test]
    fn read_with_bytes_of_another_version_is_caught_and_explained() {
        let h = [
            w(1, "a", 5, 0, 1),
            w(2, "b", 6, 2, 3),
            // Bytes of b, but the version of a.
            r(3, Some("b"), 5, 4, 5),
        ];
        let f = must_verdict(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(
            f.details
                .iter()
                .any(|d| d.contains("bytes committed at @6 under version @5")),
            "{:?}",
            f.details
        );
    }

    #[test]
    fn read_of_a_value_never_written_is_caught() {
        let h = [w(1, "a", 5, 0, 1), r(2, Some("zz"), 9, 2, 3)];
        assert_eq!(must_verdict(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn info_write_may_or_may_not_take_effect() {
        let lost = op(1, OpKind::Write, Some("x"), None, 0, None, EventType::Info);
        // Never observed: fine.
        assert_eq!(
            must_verdict(&[lost.clone(), r(2, None, 0, 5, 6)]).verdict,
            Verdict::Valid
        );
        // Observed much later: fine too (it returns at infinity).
        let h = [lost, r(2, None, 0, 5, 6), r(2, Some("x"), 9, 50, 60)];
        assert_eq!(must_verdict(&h).verdict, Verdict::Valid);
    }

    #[test]
    fn value_flapping_back_is_caught_even_with_an_info_write() {
        let h = [
            w(1, "a", 5, 0, 1),
            op(2, OpKind::Write, Some("b"), None, 2, None, EventType::Info),
            r(3, Some("b"), 7, 3, 4),
            r(3, Some("a"), 5, 5, 6),
        ];
        assert_eq!(must_verdict(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn failed_operations_are_ignored() {
        let failed = op(
            1,
            OpKind::Write,
            Some("x"),
            None,
            0,
            Some(1),
            EventType::Fail,
        );
        assert_eq!(
            must_verdict(&[failed, r(2, None, 0, 2, 3)]).verdict,
            Verdict::Valid
        );
    }

    #[test]
    fn cas_must_match_the_current_version() {
        let mut cas = op(
            2,
            OpKind::Cas,
            Some("c"),
            Some(8),
            4,
            Some(5),
            EventType::Ok,
        );
        cas.expect = Some(5);
        let ok = [w(1, "a", 5, 0, 1), cas.clone(), r(1, Some("c"), 8, 6, 7)];
        assert_eq!(must_verdict(&ok).verdict, Verdict::Valid);
        // The same cas after a write moved the version on: invalid.
        let bad = [
            w(1, "a", 5, 0, 1),
            w(1, "b", 6, 2, 3),
            cas,
            r(1, Some("c"), 8, 6, 7),
        ];
        assert_eq!(must_verdict(&bad).verdict, Verdict::Invalid);
    }

    #[test]
    fn create_only_cas_needs_an_absent_file() {
        let mut create = op(
            2,
            OpKind::Cas,
            Some("c"),
            Some(3),
            2,
            Some(3),
            EventType::Ok,
        );
        create.expect = Some(0);
        assert_eq!(must_verdict(&[create.clone()]).verdict, Verdict::Valid);
        let h = [w(1, "a", 2, 0, 1), create];
        assert_eq!(must_verdict(&h).verdict, Verdict::Invalid);
    }

    #[test]
    fn minimal_prefix_stops_at_the_first_anomaly() {
        let mut h = vec![
            w(1, "a", 5, 0, 1),
            r(2, Some("a"), 5, 2, 3),
            r(2, Some("q"), 4, 4, 5), // the anomaly
        ];
        for i in 0..20u64 {
            h.push(r(3, Some("a"), 5, 10 + 2 * i, 11 + 2 * i));
        }
        let f = must_verdict(&h);
        assert_eq!(f.verdict, Verdict::Invalid);
        assert!(f.details[0].contains("3 operations"), "{:?}", f.details);
    }

    #[test]
    fn many_concurrent_writers_stay_tractable() {
        // 8 processes each write then read their own value, all overlapping:
        // factorial orderings, which memoisation must collapse.
        let mut h = Vec::new();
        for p in 0..8u64 {
            h.push(w(p, &format!("v{p}"), 10 + p, 0, 100));
        }
        h.push(r(9, Some("v7"), 17, 101, 102));
        assert_eq!(must_verdict(&h).verdict, Verdict::Valid);
    }

    #[test]
    fn budget_exhaustion_is_unknown_not_valid() {
        let mut h = Vec::new();
        for p in 0..8u64 {
            h.push(w(p, &format!("v{p}"), 10 + p, 0, 100));
        }
        h.push(r(9, Some("v7"), 17, 101, 102));
        let refs: Vec<&Operation> = h.iter().collect();
        assert_eq!(check_path("r", &refs, 3).verdict, Verdict::Unknown);
    }
}
