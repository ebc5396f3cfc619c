//! The sled state machine driven directly: answers, exactly-once, change feed,
//! persistence, snapshots, and bad input.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::log_id;
use openraft::{EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder};
use synod_consensus::{
    open_stores, Answer, Command, Entry, Expect, NsPath, Request, RequestId, Response,
    StateMachineStore, TypeConfig,
};
use synod_merkle::Hash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type RaftEntry = openraft::Entry<TypeConfig>;

fn p(s: &str) -> NsPath {
    NsPath::parse(s).expect("valid test path")
}

fn file(n: u8) -> Entry {
    Entry::file(u64::from(n), Hash::of(&[n]), 1)
}

fn rid(serial: u64) -> RequestId {
    RequestId { client: 7, serial }
}

fn normal(index: u64, commands: Vec<(RequestId, Command)>) -> RaftEntry {
    RaftEntry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Request { commands }),
    }
}

async fn must_apply(sm: &mut StateMachineStore, entries: Vec<RaftEntry>) -> Vec<Response> {
    let n = entries.len();
    let r = sm.apply(entries).await.expect("apply");
    assert_eq!(r.len(), n, "one response per entry");
    r
}

#[tokio::test]
async fn one_response_per_entry_including_blank_and_membership() {
    let d = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
    let members: BTreeSet<u64> = [1, 2, 3].into();
    let entries = vec![
        RaftEntry {
            log_id: log_id(1, 1, 1),
            payload: EntryPayload::Blank,
        },
        RaftEntry {
            log_id: log_id(1, 1, 2),
            payload: EntryPayload::Membership(Membership::new(vec![members], None)),
        },
        normal(
            3,
            vec![(rid(1), Command::put(&p("a"), file(1), Expect::Absent))],
        ),
    ];
    let r = must_apply(&mut sm, entries).await;
    assert_eq!(r[0], Response::default());
    assert_eq!(r[1], Response::default());
    assert_eq!(r[2].answers, vec![Answer::Ok { version: 3 }]);
    let (applied, mem) = sm.applied_state().await.expect("applied state");
    assert_eq!(applied.map(|l| l.index), Some(3));
    assert_eq!(mem.log_id().map(|l| l.index), Some(2));
}

#[tokio::test]
async fn batch_commands_are_checked_and_answered_one_by_one() {
    let d = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
    let r = must_apply(
        &mut sm,
        vec![normal(
            1,
            vec![
                (rid(1), Command::put(&p("a"), file(1), Expect::Absent)),
                (rid(2), Command::put(&p("a"), file(2), Expect::Absent)),
                (rid(3), Command::put(&p("b"), file(3), Expect::Version(9))),
                (rid(4), Command::delete(&p("c"), Expect::Any)),
                (
                    rid(5),
                    Command::rename(&p("a"), &p("d"), Expect::Version(1), Expect::Absent),
                ),
            ],
        )],
    )
    .await;
    let a = &r[0].answers;
    assert_eq!(a.len(), 5);
    assert_eq!(a[0], Answer::Ok { version: 1 });
    assert!(
        matches!(&a[1], Answer::Conflict { current: Some(e) } if e.size == 1),
        "{:?}",
        a[1]
    );
    assert_eq!(a[2], Answer::Conflict { current: None });
    assert_eq!(a[3], Answer::Conflict { current: None });
    assert_eq!(
        a[4],
        Answer::Ok { version: 1 },
        "rename sees the put of the same batch"
    );
    let v = sm.view();
    assert!(v.get(&p("a")).expect("get").expect("tombstone").tombstone);
    assert_eq!(v.get(&p("d")).expect("get").expect("moved").size, 1);
}

#[tokio::test]
async fn a_retried_command_gets_its_first_answer_and_is_not_applied_twice() {
    let d = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
    let put = Command::put(&p("a"), file(1), Expect::Absent);
    must_apply(&mut sm, vec![normal(1, vec![(rid(1), put.clone())])]).await;
    let bump = Command::put(&p("a"), file(2), Expect::Version(1));
    let r = must_apply(&mut sm, vec![normal(2, vec![(rid(2), bump.clone())])]).await;
    assert_eq!(r[0].answers[0], Answer::Ok { version: 2 });
    // The answer of rid 2 was lost; the client retries after a leader change.
    let r = must_apply(
        &mut sm,
        vec![normal(3, vec![(rid(2), bump.clone()), (rid(1), put)])],
    )
    .await;
    assert_eq!(
        r[0].answers,
        vec![Answer::Ok { version: 2 }, Answer::Ok { version: 1 }]
    );
    assert_eq!(
        sm.view().get(&p("a")).expect("get").expect("entry").version,
        2,
        "not applied again"
    );

    // Exactly-once survives a restart.
    drop(sm);
    drop(_log);
    let (_log, mut sm) = open_stores(d.path(), "c").expect("reopen");
    let r = must_apply(&mut sm, vec![normal(4, vec![(rid(2), bump)])]).await;
    assert_eq!(r[0].answers[0], Answer::Ok { version: 2 });
}

#[tokio::test]
async fn the_oldest_answers_are_forgotten_past_capacity_and_the_rest_kept_across_reopen() {
    use synod_consensus::state_machine::DEDUP_CAPACITY;
    const PER_ENTRY: u64 = 2048;
    let d = tempfile::tempdir().expect("tempdir");
    let (log, mut sm) = open_stores(d.path(), "c").expect("open");
    let entries = (DEDUP_CAPACITY as u64).div_ceil(PER_ENTRY) + 1;
    let put = |n: u64| {
        Command::put(
            &p(&format!("p{}", n % 64)),
            file((n % 200) as u8),
            Expect::Any,
        )
    };
    for e in 0..entries {
        let cmds = (0..PER_ENTRY)
            .map(|i| {
                let n = e * PER_ENTRY + i;
                (rid(n + 1), put(n))
            })
            .collect();
        must_apply(&mut sm, vec![normal(e + 1, cmds)]).await;
    }
    let next = entries + 1;
    // Entry 1's answers are forgotten: its first request applies anew.
    // The last entry's are remembered: a retry gets the first answer.
    let last_rid = entries * PER_ENTRY;
    let r = must_apply(
        &mut sm,
        vec![normal(
            next,
            vec![(rid(1), put(0)), (rid(last_rid), put(last_rid - 1))],
        )],
    )
    .await;
    assert_eq!(
        r[0].answers,
        vec![
            Answer::Ok { version: next },
            Answer::Ok { version: entries }
        ],
        "first request forgotten, last one remembered"
    );

    // After a reopen the same answers are remembered and forgotten.
    drop(sm);
    drop(log);
    let (_log, mut sm) = open_stores(d.path(), "c").expect("reopen");
    let r = must_apply(
        &mut sm,
        vec![normal(
            next + 1,
            vec![
                (rid(2), put(1)),
                (rid(last_rid), put(last_rid - 1)),
                (rid(1), put(0)),
            ],
        )],
    )
    .await;
    assert_eq!(
        r[0].answers,
        vec![
            Answer::Ok { version: next + 1 },
            Answer::Ok { version: entries },
            Answer::Ok { version: next },
        ],
        "after reopen"
    );
}

#[tokio::test]
async fn invalid_path_is_rejected_and_nothing_applied() {
    let d = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
    let bad = Command::Put {
        path: "../etc/passwd".into(),
        entry: file(1),
        expect: Expect::Any,
    };
    let r = must_apply(&mut sm, vec![normal(1, vec![(rid(1), bad)])]).await;
    assert!(
        matches!(&r[0].answers[0], Answer::Rejected { reason } if reason.contains("../etc/passwd"))
    );
    assert!(sm.view().is_empty());
    assert_eq!(sm.view().namespace_root(), Hash::ZERO);
}

#[tokio::test]
async fn change_feed_lists_each_path_once_in_log_order() {
    let d = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open_stores(d.path(), "c").expect("open");
    must_apply(
        &mut sm,
        vec![
            normal(
                1,
                vec![(rid(1), Command::put(&p("a"), file(1), Expect::Any))],
            ),
            normal(
                2,
                vec![(rid(2), Command::put(&p("b"), file(2), Expect::Any))],
            ),
            normal(
                3,
                vec![(rid(3), Command::put(&p("a"), file(3), Expect::Any))],
            ),
        ],
    )
    .await;
    let v = sm.view();
    let all: Vec<(u64, String)> = v
        .changes_since(0, 100)
        .expect("feed")
        .into_iter()
        .map(|c| (c.version, c.path.to_string()))
        .collect();
    assert_eq!(all, vec![(2, "b".to_string()), (3, "a".to_string())]);
    let after2: Vec<u64> = v
        .changes_since(2, 100)
        .expect("feed")
        .into_iter()
        .map(|c| c.version)
        .collect();
    assert_eq!(after2, vec![3]);
    assert_eq!(v.applied_index(), 3);
}

#[tokio::test]
async fn state_and_root_survive_reopen() {
    let d = tempfile::tempdir().expect("tempdir");
    let (log, mut sm) = open_stores(d.path(), "c").expect("open");
    let settings = synod_consensus::ClusterSettings {
        chunk_min: 16384,
        chunk_avg: 65536,
        chunk_max: 262144,
        replication: 2,
    };
    let mut cmds: Vec<_> = (0..50u64)
        .map(|i| {
            (
                rid(i),
                Command::put(&p(&format!("dir/f{i}")), file(i as u8), Expect::Absent),
            )
        })
        .collect();
    cmds.push((rid(50), Command::InitCluster { settings }));
    must_apply(&mut sm, vec![normal(1, cmds)]).await;
    assert_eq!(sm.view().settings().expect("settings"), Some(settings));
    let root = sm.view().namespace_root();
    assert_ne!(root, Hash::ZERO);
    drop((log, sm));
    let (_log, sm) = open_stores(d.path(), "c").expect("reopen");
    assert_eq!(
        sm.view().settings().expect("settings after reopen"),
        Some(settings)
    );
    assert_eq!(sm.view().namespace_root(), root);
    assert_eq!(sm.view().list_prefix("dir/", 1000).expect("list").len(), 50);
    assert_eq!(
        sm.view().list_prefix("dir/f1", 1000).expect("list").len(),
        11
    );
}

async fn read_all(mut f: tokio::fs::File) -> Vec<u8> {
    let mut b = Vec::new();
    f.read_to_end(&mut b).await.expect("read snapshot");
    b
}

/// Builds a snapshot of `sm`: its description and its bytes.
async fn must_build(sm: &mut StateMachineStore) -> (synod_consensus::types::SnapshotMeta, Vec<u8>) {
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    (snap.meta, read_all(*snap.snapshot).await)
}

async fn must_install(
    sm: &mut StateMachineStore,
    meta: &synod_consensus::types::SnapshotMeta,
    bytes: &[u8],
) -> Result<(), openraft::StorageError<u64>> {
    let mut f = sm
        .begin_receiving_snapshot()
        .await
        .expect("begin receiving");
    f.write_all(bytes).await.expect("write");
    f.flush().await.expect("flush");
    sm.install_snapshot(meta, f).await
}

#[tokio::test]
async fn snapshot_round_trip_and_bad_snapshots_are_refused() {
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let (_l1, mut sm1) = open_stores(d1.path(), "c").expect("open");
    let (_l2, mut sm2) = open_stores(d2.path(), "c").expect("open");
    let cmds: Vec<_> = (0..3000u64)
        .map(|i| {
            (
                rid(i),
                Command::put(&p(&format!("f{i}")), file(i as u8), Expect::Absent),
            )
        })
        .collect();
    must_apply(&mut sm1, vec![normal(1, cmds)]).await;
    must_apply(
        &mut sm2,
        vec![normal(
            1,
            vec![(rid(9999), Command::put(&p("old"), file(1), Expect::Any))],
        )],
    )
    .await;
    let (meta, bytes) = must_build(&mut sm1).await;
    let cur = sm1
        .get_current_snapshot()
        .await
        .expect("current")
        .expect("some");
    assert_eq!(cur.meta, meta);

    let before = sm2.view().all().expect("all");
    let truncated = &bytes[..bytes.len() / 2];
    let err = must_install(&mut sm2, &meta, truncated)
        .await
        .expect_err("truncated");
    assert!(err.to_string().contains("snapshot"), "{err}");
    let mut garbage = bytes.clone();
    let mid = garbage.len() / 2;
    garbage[mid] ^= 0xFF;
    let err = must_install(&mut sm2, &meta, &garbage)
        .await
        .expect_err("garbage");
    tracing::info!(%err, "garbage refused");
    assert!(must_install(&mut sm2, &meta, b"not a snapshot")
        .await
        .is_err());
    let leftovers: Vec<_> = std::fs::read_dir(d2.path().join("snapshots"))
        .expect("snapshot dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "refused snapshots leave no files: {leftovers:?}"
    );
    assert_eq!(
        sm2.view().all().expect("all"),
        before,
        "nothing applied from a bad snapshot"
    );

    must_install(&mut sm2, &meta, &bytes)
        .await
        .expect("install");
    assert_eq!(
        sm2.view().all().expect("all"),
        sm1.view().all().expect("all")
    );
    assert_eq!(sm2.view().namespace_root(), sm1.view().namespace_root());
    assert_eq!(
        sm2.applied_state().await.expect("applied").0,
        meta.last_log_id
    );
    // Remembered answers travel with the snapshot.
    let r = must_apply(
        &mut sm2,
        vec![normal(
            2,
            vec![(rid(5), Command::put(&p("f5"), file(1), Expect::Absent))],
        )],
    )
    .await;
    assert_eq!(r[0].answers[0], Answer::Ok { version: 1 });
    // And the installed snapshot is persisted: it is current after a reopen.
    drop((_l2, sm2));
    let (_l2, mut sm2) = open_stores(d2.path(), "c").expect("reopen");
    assert_eq!(
        sm2.get_current_snapshot()
            .await
            .expect("current")
            .expect("some")
            .meta,
        meta
    );
}

#[tokio::test]
async fn inline_content_survives_reopen_and_travels_in_snapshots() {
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let (l1, mut sm1) = open_stores(d1.path(), "c").expect("open");
    let (_l2, mut sm2) = open_stores(d2.path(), "c").expect("open");
    // Enough content for several snapshot frames of blobs.
    let content = |i: u64| -> Vec<u8> {
        let len = (i as usize * 37) % synod_consensus::MAX_INLINE + 1;
        (0..len).map(|j| (i as usize + j) as u8).collect()
    };
    let n = 600u64;
    let cmds: Vec<_> = (0..n)
        .map(|i| {
            let data = content(i);
            let entry = Entry::file(data.len() as u64, Hash::of(&data), 1);
            (
                rid(i),
                Command::put_inline(&p(&format!("d/f{i:04}")), entry, Expect::Absent, data),
            )
        })
        .collect();
    must_apply(&mut sm1, vec![normal(1, cmds)]).await;
    // One deleted, one overwritten by a pushed put, one renamed.
    let changes = vec![
        (rid(n), Command::delete(&p("d/f0000"), Expect::Any)),
        (
            rid(n + 1),
            Command::put(&p("d/f0001"), file(3), Expect::Any),
        ),
        (
            rid(n + 2),
            Command::rename(&p("d/f0002"), &p("moved"), Expect::Any, Expect::Absent),
        ),
    ];
    must_apply(&mut sm1, vec![normal(2, changes)]).await;
    // The receiver holds inline content of its own that the snapshot replaces.
    let own = b"own".to_vec();
    must_apply(
        &mut sm2,
        vec![normal(
            1,
            vec![(
                rid(9999),
                Command::put_inline(
                    &p("d/f0003"),
                    Entry::file(3, Hash::of(&own), 2),
                    Expect::Any,
                    own.clone(),
                ),
            )],
        )],
    )
    .await;

    let check = |sm: &StateMachineStore| {
        let view = sm.view();
        let kept = |path: &str, data: &[u8]| {
            view.inline_content(&p(path), &Hash::of(data))
                .expect("read inline content")
        };
        assert_eq!(kept("d/f0000", &content(0)), None, "deleted");
        assert_eq!(kept("d/f0001", &content(1)), None, "overwritten");
        assert_eq!(kept("d/f0002", &content(2)), None, "renamed away");
        assert_eq!(kept("moved", &content(2)), Some(content(2)), "renamed here");
        assert_eq!(kept("d/f0003", &own), None, "receiver's own content");
        for i in 3..n {
            let path = format!("d/f{i:04}");
            assert_eq!(kept(&path, &content(i)), Some(content(i)), "{path}");
        }
    };
    check(&sm1);
    drop((l1, sm1));
    let (_l1, mut sm1) = open_stores(d1.path(), "c").expect("reopen");
    check(&sm1);

    let (meta, bytes) = must_build(&mut sm1).await;
    must_install(&mut sm2, &meta, &bytes)
        .await
        .expect("install");
    check(&sm2);
    assert_eq!(sm2.view().namespace_root(), sm1.view().namespace_root());
}

#[tokio::test]
async fn corrupt_log_entry_is_a_storage_error_naming_the_index() {
    let d = tempfile::tempdir().expect("tempdir");
    let (mut log, _sm) = open_stores(d.path(), "c").expect("open");
    log.put_raw_for_test(5, b"\xff\xff\xff garbage");
    let err = log.try_get_log_entries(0..10).await.expect_err("garbage");
    assert!(err.to_string().contains('5'), "{err}");
    assert!(log.get_log_state().await.is_err());
    let good = openraft::Entry::<TypeConfig> {
        log_id: log_id(1, 1, 5),
        payload: EntryPayload::Blank,
    };
    let mut bytes = synod_consensus::codec::encode(&good);
    bytes.truncate(bytes.len() - 1);
    log.put_raw_for_test(5, &bytes);
    assert!(
        log.try_get_log_entries(5..6).await.is_err(),
        "truncated entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_built_while_apply_runs_is_consistent() {
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let (_l1, mut sm1) = open_stores(d1.path(), "c").expect("open");
    let (_l2, mut sm2) = open_stores(d2.path(), "c").expect("open");
    let cmds: Vec<_> = (0..20_000u64)
        .map(|i| {
            (
                rid(i),
                Command::put(&p(&format!("f{i:05}")), file(i as u8), Expect::Absent),
            )
        })
        .collect();
    must_apply(&mut sm1, vec![normal(1, cmds)]).await;
    let mut builder = sm1.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    // Overwrite, delete, rename and create while the build streams.
    let mut index = 1;
    while !build.is_finished() && index < 400 {
        index += 1;
        let base = index * 40;
        let cmds = vec![
            (
                rid(100_000 + base),
                Command::put(&p(&format!("f{:05}", base % 20_000)), file(1), Expect::Any),
            ),
            (
                rid(100_001 + base),
                Command::delete(&p(&format!("f{:05}", (base + 1) % 20_000)), Expect::Any),
            ),
            (
                rid(100_002 + base),
                Command::rename(
                    &p(&format!("f{:05}", (base + 2) % 20_000)),
                    &p(&format!("new{base}")),
                    Expect::Any,
                    Expect::Any,
                ),
            ),
        ];
        must_apply(&mut sm1, vec![normal(index, cmds)]).await;
    }
    let snap = build.await.expect("join").expect("build");
    let at = snap.meta.last_log_id.expect("applied").index;
    let bytes = read_all(*snap.snapshot).await;
    // Install checks the streamed namespace against the root captured at `at`.
    must_install(&mut sm2, &snap.meta, &bytes)
        .await
        .expect("consistent snapshot installs");
    let all = sm2.view().all().expect("all");
    assert!(
        all.iter().all(|(_, e)| e.version <= at),
        "nothing newer than the capture"
    );
    assert!(index > 2, "apply ran during the build ({index})");
    tracing::info!(at, index, "snapshot at {at} while apply reached {index}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_during_a_snapshot_install_see_the_old_state_or_the_new_never_a_mix() {
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let (_l1, mut sm1) = open_stores(d1.path(), "c").expect("open");
    let (_l2, mut sm2) = open_stores(d2.path(), "c").expect("open");
    const NEW: usize = 30_000;
    const OLD: usize = 50;
    let cmds: Vec<_> = (0..NEW as u64)
        .map(|i| {
            let put = Command::put(&p(&format!("new/f{i:05}")), file(i as u8), Expect::Absent);
            (rid(i), put)
        })
        .collect();
    must_apply(&mut sm1, vec![normal(1, cmds)]).await;
    let (meta, bytes) = must_build(&mut sm1).await;
    let cmds: Vec<_> = (0..OLD as u64)
        .map(|i| {
            let put = Command::put(&p(&format!("old/f{i:02}")), file(i as u8), Expect::Absent);
            (rid(i), put)
        })
        .collect();
    must_apply(&mut sm2, vec![normal(1, cmds)]).await;

    // Entries and the change feed, read over and over while the install runs.
    let view = sm2.view();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut seen = BTreeSet::new();
        loop {
            // Taken before reading: the reads after `stop` began after the
            // install ended.
            let last = stop2.load(std::sync::atomic::Ordering::SeqCst);
            let all = view.all().expect("all");
            let old = all
                .iter()
                .filter(|(p, _)| p.as_str().starts_with("old/"))
                .count();
            seen.insert(("entries (old, new)", old, all.len() - old));
            let feed = view.changes_since(0, usize::MAX).expect("feed").len();
            seen.insert(("feed", feed, 0));
            if last {
                return seen;
            }
        }
    });
    must_install(&mut sm2, &meta, &bytes)
        .await
        .expect("install");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.join().expect("reader");
    let whole: BTreeSet<_> = [
        ("entries (old, new)", OLD, 0),
        ("entries (old, new)", 0, NEW),
        ("feed", OLD, 0),
        ("feed", NEW, 0),
    ]
    .into();
    assert!(
        seen.is_subset(&whole),
        "a reader saw a partly cleared or refilled state: {seen:?}"
    );
    assert!(
        seen.contains(&("entries (old, new)", 0, NEW)) && seen.contains(&("feed", NEW, 0)),
        "the reader saw the installed state: {seen:?}"
    );
}
