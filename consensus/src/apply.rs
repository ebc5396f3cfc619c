//! Executing one command against the namespace: precondition checks and the
//! resulting writes. Pure logic over a [`NamespaceView`], so it is unit-tested
//! without sled or Raft.

use crate::command::{Answer, Command, Expect};
use crate::path::NsPath;
use crate::types::{ClusterSettings, Entry};

/// What a command reads and writes.
pub(crate) trait NamespaceView {
    /// The current entry of a (valid) path, tombstones included.
    fn get(&mut self, path: &str) -> Option<Entry>;
    /// Replaces the entry of `path`; `old` is what `get` returned.
    fn set(&mut self, path: &str, old: Option<&Entry>, new: Entry);
    /// Current cluster settings.
    fn settings(&mut self) -> Option<ClusterSettings>;
    /// Sets the cluster settings.
    fn set_settings(&mut self, s: ClusterSettings);
}

/// True if `current` satisfies `expect`.
pub fn expect_holds(expect: Expect, current: Option<&Entry>) -> bool {
    match expect {
        Expect::Any => true,
        Expect::Absent => current.is_none_or(|e| e.tombstone),
        Expect::Version(v) => current.is_some_and(|e| e.version == v),
    }
}

fn parse(path: &str) -> Result<NsPath, Answer> {
    NsPath::parse(path).map_err(|e| Answer::Rejected {
        reason: e.to_string(),
    })
}

/// Applies `cmd` at log index `index`; a failed check changes nothing.
pub(crate) fn execute(view: &mut impl NamespaceView, index: u64, cmd: &Command) -> Answer {
    match execute_inner(view, index, cmd) {
        Ok(a) | Err(a) => a,
    }
}

fn execute_inner(
    view: &mut impl NamespaceView,
    index: u64,
    cmd: &Command,
) -> Result<Answer, Answer> {
    match cmd {
        Command::Put {
            path,
            entry,
            expect,
        } => {
            let path = parse(path)?;
            let cur = view.get(path.as_str());
            if !expect_holds(*expect, cur.as_ref()) {
                return Err(Answer::Conflict { current: cur });
            }
            let mut new = entry.clone();
            new.version = index;
            new.tombstone = false;
            view.set(path.as_str(), cur.as_ref(), new);
        }
        Command::Delete { path, expect } => {
            let path = parse(path)?;
            let cur = view.get(path.as_str());
            let live = cur.as_ref().filter(|e| e.is_live());
            if live.is_none() || !expect_holds(*expect, cur.as_ref()) {
                return Err(Answer::Conflict { current: cur });
            }
            let mut tomb = cur.clone().expect("checked live above");
            tomb.version = index;
            tomb.tombstone = true;
            tomb.size = 0;
            tomb.holders.clear();
            view.set(path.as_str(), cur.as_ref(), tomb);
        }
        Command::Rename {
            from,
            to,
            expect_from,
            expect_to,
        } => {
            let from = parse(from)?;
            let to = parse(to)?;
            if from == to {
                return Err(Answer::Rejected {
                    reason: format!("rename of {from:?} onto itself"),
                });
            }
            let cur_from = view.get(from.as_str());
            let from_live = cur_from.as_ref().is_some_and(Entry::is_live);
            if !from_live || !expect_holds(*expect_from, cur_from.as_ref()) {
                return Err(Answer::Conflict { current: cur_from });
            }
            let cur_to = view.get(to.as_str());
            if !expect_holds(*expect_to, cur_to.as_ref()) {
                return Err(Answer::Conflict { current: cur_to });
            }
            let moved_from = cur_from.expect("checked live above");
            let mut moved = moved_from.clone();
            moved.version = index;
            let mut tomb = moved_from.clone();
            tomb.version = index;
            tomb.tombstone = true;
            tomb.size = 0;
            tomb.holders.clear();
            view.set(to.as_str(), cur_to.as_ref(), moved);
            view.set(from.as_str(), Some(&moved_from), tomb);
        }
        Command::InitCluster { settings } => {
            if let Some(cur) = view.settings() {
                return Err(Answer::Rejected {
                    reason: format!("cluster settings are already set to {cur:?}"),
                });
            }
            if settings.chunk_min == 0
                || settings.chunk_min > settings.chunk_avg
                || settings.chunk_avg > settings.chunk_max
                || settings.replication == 0
            {
                return Err(Answer::Rejected {
                    reason: format!("invalid cluster settings {settings:?}"),
                });
            }
            view.set_settings(*settings);
        }
    }
    Ok(Answer::Ok { version: index })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use synod_merkle::Hash;

    #[derive(Default)]
    pub(crate) struct MapView {
        pub map: BTreeMap<String, Entry>,
        pub settings: Option<ClusterSettings>,
    }

    impl NamespaceView for MapView {
        fn get(&mut self, path: &str) -> Option<Entry> {
            self.map.get(path).cloned()
        }
        fn set(&mut self, path: &str, _old: Option<&Entry>, new: Entry) {
            self.map.insert(path.to_owned(), new);
        }
        fn settings(&mut self) -> Option<ClusterSettings> {
            self.settings
        }
        fn set_settings(&mut self, s: ClusterSettings) {
            self.settings = Some(s);
        }
    }

    fn p(s: &str) -> NsPath {
        NsPath::parse(s).expect("valid test path")
    }

    fn file(n: u8) -> Entry {
        Entry::file(u64::from(n), Hash::of(&[n]), 1)
    }

    #[test]
    fn put_with_preconditions() {
        let mut v = MapView::default();
        assert_eq!(
            execute(&mut v, 5, &Command::put(&p("a"), file(1), Expect::Absent)),
            Answer::Ok { version: 5 }
        );
        assert_eq!(v.map["a"].version, 5);
        let a = execute(&mut v, 6, &Command::put(&p("a"), file(2), Expect::Absent));
        assert!(
            matches!(a, Answer::Conflict { current: Some(ref e) } if e.version == 5),
            "{a:?}"
        );
        assert_eq!(v.map["a"].size, 1, "a conflict changes nothing");
        let a = execute(
            &mut v,
            7,
            &Command::put(&p("a"), file(3), Expect::Version(4)),
        );
        assert!(matches!(a, Answer::Conflict { .. }));
        assert_eq!(
            execute(
                &mut v,
                8,
                &Command::put(&p("a"), file(3), Expect::Version(5))
            ),
            Answer::Ok { version: 8 }
        );
        assert_eq!(
            execute(&mut v, 9, &Command::put(&p("a"), file(4), Expect::Any)),
            Answer::Ok { version: 9 }
        );
        let a = execute(
            &mut v,
            10,
            &Command::put(&p("b"), file(4), Expect::Version(1)),
        );
        assert_eq!(a, Answer::Conflict { current: None });
    }

    #[test]
    fn delete_leaves_tombstone_and_absent_matches_it() {
        let mut v = MapView::default();
        execute(&mut v, 1, &Command::put(&p("a"), file(1), Expect::Any));
        assert_eq!(
            execute(&mut v, 2, &Command::delete(&p("a"), Expect::Version(1))),
            Answer::Ok { version: 2 }
        );
        assert!(v.map["a"].tombstone);
        let again = execute(&mut v, 3, &Command::delete(&p("a"), Expect::Any));
        assert!(matches!(again, Answer::Conflict { current: Some(ref e) } if e.tombstone));
        assert_eq!(
            execute(&mut v, 4, &Command::put(&p("a"), file(2), Expect::Absent)),
            Answer::Ok { version: 4 }
        );
        assert!(!v.map["a"].tombstone);
        let missing = execute(&mut v, 5, &Command::delete(&p("zz"), Expect::Any));
        assert_eq!(missing, Answer::Conflict { current: None });
    }

    #[test]
    fn rename_moves_and_checks_both_ends() {
        let mut v = MapView::default();
        execute(&mut v, 1, &Command::put(&p("a"), file(1), Expect::Any));
        execute(&mut v, 2, &Command::put(&p("b"), file(2), Expect::Any));
        let c = execute(
            &mut v,
            3,
            &Command::rename(&p("a"), &p("b"), Expect::Any, Expect::Absent),
        );
        assert!(matches!(c, Answer::Conflict { current: Some(ref e) } if e.size == 2));
        assert!(v.map["a"].is_live(), "conflict changes nothing");
        let ok = execute(
            &mut v,
            4,
            &Command::rename(&p("a"), &p("c"), Expect::Version(1), Expect::Absent),
        );
        assert_eq!(ok, Answer::Ok { version: 4 });
        assert!(v.map["a"].tombstone);
        assert_eq!(v.map["c"].size, 1);
        assert_eq!(v.map["c"].version, 4);
        let gone = execute(
            &mut v,
            5,
            &Command::rename(&p("a"), &p("d"), Expect::Any, Expect::Any),
        );
        assert!(matches!(gone, Answer::Conflict { .. }));
        let self_rename = execute(
            &mut v,
            6,
            &Command::rename(&p("c"), &p("c"), Expect::Any, Expect::Any),
        );
        assert!(matches!(self_rename, Answer::Rejected { .. }));
    }

    #[test]
    fn invalid_paths_are_rejected_by_the_state_machine() {
        let mut v = MapView::default();
        for bad in ["/abs", "a/../b", "", ".synod/x", "a\0b", "a//b"] {
            let cmd = Command::Put {
                path: bad.to_owned(),
                entry: file(1),
                expect: Expect::Any,
            };
            let a = execute(&mut v, 1, &cmd);
            assert!(
                matches!(a, Answer::Rejected { ref reason } if reason.contains("invalid path")),
                "{bad:?}: {a:?}"
            );
        }
        assert!(v.map.is_empty(), "nothing applied");
    }

    #[test]
    fn settings_are_set_once() {
        let mut v = MapView::default();
        let init = Command::InitCluster {
            settings: ClusterSettings::default(),
        };
        assert_eq!(execute(&mut v, 1, &init), Answer::Ok { version: 1 });
        assert!(matches!(execute(&mut v, 2, &init), Answer::Rejected { .. }));
    }
}
