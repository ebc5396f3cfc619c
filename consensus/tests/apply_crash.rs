//! A process killed with SIGKILL while it applies large log entries: its
//! state machine comes back holding whole entries only (each entry's writes
//! are made from a redo record that open replays), with the namespace root,
//! inline content and change feed of the last applied entry.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use common::spawn_test_child;
use openraft::storage::RaftStateMachine;
use openraft::testing::log_id;
use openraft::EntryPayload;
use rand::Rng;
use synod_consensus::{
    open_stores, Command, Entry, Expect, NsPath, Request, RequestId, TypeConfig,
};
use synod_merkle::Hash;

const CHILD_ENV: &str = "SYNOD_APPLY_CRASH_CHILD_DIR";
const ROUNDS: usize = 8;
/// Commands per entry, each with this much inline content: an entry is
/// larger than one of sled's IO buffers, so kills land between its writes.
const COMMANDS: u64 = 32;
const INLINE: usize = 2048;

fn path(j: u64) -> NsPath {
    NsPath::parse(&format!("dir{}/s{j}", j % 4)).expect("valid path")
}

fn content(index: u64, j: u64) -> Vec<u8> {
    let seed = format!("{index}/{j}/");
    seed.bytes().cycle().take(INLINE).collect()
}

/// Log entry `index`: one inline put of every path.
fn entry(index: u64) -> openraft::Entry<TypeConfig> {
    let commands = (0..COMMANDS)
        .map(|j| {
            let data = content(index, j);
            let e = Entry::file(data.len() as u64, Hash::of(&data), 1);
            let rid = RequestId {
                client: 9,
                serial: index * COMMANDS + j,
            };
            (rid, Command::put_inline(&path(j), e, Expect::Any, data))
        })
        .collect();
    openraft::Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Request { commands }),
    }
}

/// Entry point of the child process: applies entries after the last applied
/// one until killed, printing `from <index>` once it has opened the store.
#[test]
#[ignore = "the child process of killed_applies_leave_whole_entries"]
fn apply_crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        panic!("{CHILD_ENV} not set: this is the child of another test");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (_log, mut sm) = open_stores(Path::new(&dir), "test-cluster").expect("open");
        let (applied, _) = sm.applied_state().await.expect("applied state");
        let from = applied.map_or(0, |l| l.index);
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "from {from}");
            let _ = out.flush();
        }
        // Bounded: the parent kills us long before this ends.
        for i in from + 1..from + 100_000 {
            sm.apply([entry(i)]).await.expect("apply");
        }
    });
}

#[test]
fn killed_applies_leave_whole_entries() {
    let d = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = rand::thread_rng();
    let mut last = 0;
    for round in 0..ROUNDS {
        let mut child = spawn_test_child("apply_crash_child", CHILD_ENV, d.path());
        // The test harness prints its own lines first.
        let started = BufReader::new(child.stdout.take().expect("stdout"))
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("from "));
        assert!(started, "round {round}: the child did not start");
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap child");

        rt.block_on(async {
            let (_log, mut sm) = open_stores(d.path(), "test-cluster")
                .unwrap_or_else(|e| panic!("round {round}: reopen after SIGKILL: {e}"));
            let (applied, _) = sm.applied_state().await.expect("applied state");
            let applied = applied.map_or(0, |l| l.index);
            assert!(
                applied >= last,
                "round {round}: applied went back from {last} to {applied}"
            );
            last = applied;
            let view = sm.view();
            let all = view.all().expect("entries");
            if applied == 0 {
                assert!(
                    all.is_empty(),
                    "round {round}: entries without an applied index"
                );
                return;
            }
            // Every path at the last applied entry: none ahead, none behind.
            assert_eq!(all.len() as u64, COMMANDS, "round {round}");
            for j in 0..COMMANDS {
                let e = view.get(&path(j)).expect("get").expect("present");
                assert_eq!(
                    e.version,
                    applied,
                    "round {round}: {} in another entry",
                    path(j)
                );
                let data = view
                    .inline_content(&path(j), &e.root)
                    .expect("read")
                    .unwrap_or_else(|| panic!("round {round}: content of {} lost", path(j)));
                assert_eq!(
                    data,
                    content(applied, j),
                    "round {round}: content of {}",
                    path(j)
                );
            }
            let feed = view.changes_since(0, usize::MAX).expect("feed");
            assert_eq!(
                feed.len() as u64,
                COMMANDS,
                "round {round}: change feed {feed:?}"
            );
            assert!(feed.iter().all(|c| c.version == applied), "round {round}");
            // The root is that of the same entry applied to an empty store.
            let fresh = tempfile::tempdir().expect("tempdir");
            let (_l, mut model) = open_stores(fresh.path(), "test-cluster").expect("open");
            model.apply([entry(applied)]).await.expect("apply");
            assert_eq!(
                view.namespace_root(),
                model.view().namespace_root(),
                "round {round}: namespace root after SIGKILL"
            );
            eprintln!("round {round}: applied {applied} after SIGKILL, whole");
        });
    }
    assert!(last > 0, "no entry was ever applied");
}
