//! Executing one command against the namespace: precondition checks and the
//! resulting writes. Pure logic over a [`NamespaceView`], so it is unit-tested
//! without sled or Raft.

use synod_merkle::Hash;

use crate::command::{Answer, Command, Expect, MAX_INLINE};
use crate::path::NsPath;
use crate::types::{ClusterSettings, Entry, EntryKind};

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
    /// The inline content kept for `path` ([`blob_value`]), if any.
    fn blob(&mut self, path: &str) -> Option<Vec<u8>>;
    /// Keeps (or with `None` drops) the inline content of `path`.
    fn set_blob(&mut self, path: &str, blob: Option<Vec<u8>>);
}

/// How inline content is kept: the content root, then the bytes, so a
/// reader can tell which version of the path the bytes belong to.
pub(crate) fn blob_value(root: &Hash, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + data.len());
    v.extend_from_slice(root.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Splits a kept blob into its root and bytes.
pub(crate) fn split_blob(v: &[u8]) -> Option<(Hash, &[u8])> {
    let root: [u8; 32] = v.get(..32)?.try_into().ok()?;
    Some((Hash::from_bytes(root), &v[32..]))
}

/// Whether `e` may have inline content kept with it (only then is there
/// anything to drop when the path changes).
pub(crate) fn may_have_blob(e: Option<&Entry>) -> bool {
    e.is_some_and(|e| e.is_live() && e.kind == EntryKind::File && e.size <= MAX_INLINE as u64)
}

/// `Put` and `PutInline`: `entry` at `path` if `expect` holds, with the
/// inline content `data` or none.
fn put(
    view: &mut impl NamespaceView,
    index: u64,
    path: &NsPath,
    entry: &Entry,
    expect: Expect,
    data: Option<&[u8]>,
) -> Result<(), Answer> {
    let cur = view.get(path.as_str());
    if !expect_holds(expect, cur.as_ref()) {
        return Err(Answer::Conflict { current: cur });
    }
    let mut new = entry.clone();
    new.version = index;
    new.tombstone = false;
    view.set(path.as_str(), cur.as_ref(), new);
    if let Some(data) = data {
        view.set_blob(path.as_str(), Some(blob_value(&entry.root, data)));
    } else if may_have_blob(cur.as_ref()) {
        view.set_blob(path.as_str(), None);
    }
    Ok(())
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
        } => put(view, index, &parse(path)?, entry, *expect, None)?,
        Command::PutInline {
            path,
            entry,
            expect,
            data,
        } => {
            let path = parse(path)?;
            if data.len() > MAX_INLINE
                || data.len() as u64 != entry.size
                || entry.kind != EntryKind::File
            {
                return Err(Answer::Rejected {
                    reason: format!(
                        "inline content of {path}: {} bytes for a {:?} of size {} (at most {MAX_INLINE})",
                        data.len(),
                        entry.kind,
                        entry.size
                    ),
                });
            }
            put(view, index, &path, entry, *expect, Some(data))?;
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
            if may_have_blob(cur.as_ref()) {
                view.set_blob(path.as_str(), None);
            }
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
            if may_have_blob(Some(&moved_from)) {
                let blob = view.blob(from.as_str());
                view.set_blob(from.as_str(), None);
                view.set_blob(to.as_str(), blob);
            } else if may_have_blob(cur_to.as_ref()) {
                view.set_blob(to.as_str(), None);
            }
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
        pub blobs: BTreeMap<String, Vec<u8>>,
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
        fn blob(&mut self, path: &str) -> Option<Vec<u8>> {
            self.blobs.get(path).cloned()
        }
        fn set_blob(&mut self, path: &str, blob: Option<Vec<u8>>) {
            match blob {
                Some(b) => self.blobs.insert(path.to_owned(), b),
                None => self.blobs.remove(path),
            };
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

    fn inline(data: &[u8]) -> Entry {
        Entry::file(data.len() as u64, Hash::of(data), 1)
    }

    #[test]
    fn inline_content_follows_its_path() {
        let mut v = MapView::default();
        let put = Command::put_inline(&p("a"), inline(b"one"), Expect::Absent, b"one".to_vec());
        assert_eq!(execute(&mut v, 1, &put), Answer::Ok { version: 1 });
        let kept = v.blobs["a"].clone();
        assert_eq!(split_blob(&kept), Some((Hash::of(b"one"), &b"one"[..])));

        // A conflict keeps nothing new.
        let clash = Command::put_inline(&p("a"), inline(b"two"), Expect::Absent, b"two".to_vec());
        assert!(matches!(
            execute(&mut v, 2, &clash),
            Answer::Conflict { .. }
        ));
        assert_eq!(v.blobs["a"], kept);

        // A rename carries it; the source keeps none.
        let mv = Command::rename(&p("a"), &p("b"), Expect::Any, Expect::Absent);
        assert_eq!(execute(&mut v, 3, &mv), Answer::Ok { version: 3 });
        assert!(!v.blobs.contains_key("a"));
        assert_eq!(v.blobs["b"], kept);

        // A plain put (content pushed elsewhere) drops it, as does a delete.
        execute(&mut v, 4, &Command::put(&p("b"), file(9), Expect::Any));
        assert!(v.blobs.is_empty(), "{:?}", v.blobs.keys());
        execute(&mut v, 5, &put);
        execute(&mut v, 6, &Command::delete(&p("a"), Expect::Any));
        assert!(v.blobs.is_empty());
    }

    #[test]
    fn inline_content_must_match_its_entry() {
        let mut v = MapView::default();
        let data = vec![7u8; MAX_INLINE + 1];
        let cases = [
            Command::put_inline(&p("big"), inline(&data), Expect::Any, data.clone()),
            Command::put_inline(&p("short"), file(9), Expect::Any, b"abc".to_vec()),
        ];
        for cmd in cases {
            let a = execute(&mut v, 1, &cmd);
            assert!(
                matches!(a, Answer::Rejected { ref reason } if reason.contains("inline content")),
                "{a:?}"
            );
        }
        assert!(v.map.is_empty() && v.blobs.is_empty(), "nothing applied");
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
