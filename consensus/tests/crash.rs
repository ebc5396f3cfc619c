//! A node process killed with SIGKILL while it appends: its sled log comes
//! back contiguous (log appends are plain sled inserts, which sled recovers
//! as a prefix), holding every acknowledged command, and the node restarts.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use synod_consensus::testing::TestCluster;
use synod_consensus::{open_stores, Answer, Command, Expect};

const CHILD_ENV: &str = "SYNOD_CRASH_CHILD_DIR";
const WRITERS: u64 = 16;
const ROUNDS: usize = 8;

/// Entry point of the child process (run by `killed_appends_*` below): a
/// one-node cluster in `$SYNOD_CRASH_CHILD_DIR` taking puts from 16 writers,
/// printing `acked <writer> <version>` for every answered one.
#[test]
#[ignore = "the child process of killed_appends_leave_a_contiguous_log_with_every_acknowledged_entry"]
fn crash_child() {
    let Some(base) = std::env::var_os(CHILD_ENV) else {
        panic!("{CHILD_ENV} not set: this is the child of another test");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let base = Path::new(&base);
        let mut c = TestCluster::new(base, TestCluster::fast_config()).expect("cluster");
        if c.dir_of(1).exists() {
            c.start_node(1).await.expect("restart");
            c.wait_leader(T).await.expect("leader after restart");
        } else {
            c.start(&[1]).await.expect("start");
        }
        let pr = proposer_on(&c, 1);
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let pr = pr.clone();
            tasks.push(tokio::spawn(async move {
                // Bounded: the parent kills us long before this ends.
                for n in 0..100_000u64 {
                    let cmd = Command::put(&p(&format!("k{w}")), file(n), Expect::Any);
                    if let Ok(Answer::Ok { version }) = pr.propose(cmd).await {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "acked {w} {version}");
                        let _ = out.flush();
                    }
                }
            }));
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks)).await;
    });
}

#[test]
fn killed_appends_leave_a_contiguous_log_with_every_acknowledged_entry() {
    init_tracing();
    let d = tempfile::tempdir().expect("tempdir");
    // Per writer path, the newest version acknowledged in any round.
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let mut child = spawn_test_child("crash_child", CHILD_ENV, d.path());
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut it = line.split_whitespace();
                if it.next() != Some("acked") {
                    continue;
                }
                let (Some(w), Some(v)) = (it.next(), it.next()) else {
                    continue;
                };
                let (Ok(w), Ok(v)) = (w.parse::<u64>(), v.parse::<u64>()) else {
                    continue;
                };
                if tx.send((w, v)).is_err() {
                    break;
                }
            }
        });
        // Kill at a random point after some hundreds of commits.
        let want = rng.gen_range(200..800);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((w, v)) => {
                    let e = acked.entry(w).or_default();
                    *e = (*e).max(v);
                    seen += 1;
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("round {round}: the child acknowledged only {seen} puts in 60 s");
                }
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap child");
        reader.join().expect("reader");
        // Acknowledgements printed before the kill count too.
        while let Ok((w, v)) = rx.try_recv() {
            let e = acked.entry(w).or_default();
            *e = (*e).max(v);
        }

        let (log, _sm) = open_stores(&d.path().join("node-1"), "test-cluster")
            .unwrap_or_else(|e| panic!("round {round}: reopen after SIGKILL: {e}"));
        let entries = log.read_entries(..).expect("read log");
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        for w in indexes.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "round {round}: hole in the log after SIGKILL: {} then {}",
                w[0],
                w[1]
            );
        }
        let last = indexes.last().copied().unwrap_or(0);
        let newest_ack = acked.values().copied().max().unwrap_or(0);
        eprintln!(
            "round {round}: killed after {seen} acknowledgements; log {}..={last}, newest acknowledged {newest_ack}",
            indexes.first().copied().unwrap_or(0)
        );
        assert!(
            last >= newest_ack,
            "round {round}: log ends at {last}, but index {newest_ack} was acknowledged"
        );
    }

    // The node restarts from what the kills left, with every acknowledged put.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = TestCluster::new(d.path(), TestCluster::fast_config()).expect("cluster");
        c.start_node(1).await.expect("restart");
        c.wait_leader(T).await.expect("leader");
        let newest_ack = acked.values().copied().max().unwrap_or(0);
        c.wait_applied(&[1], newest_ack, T).await.expect("applied");
        let view = &c.node(1).expect("node").view;
        for (w, v) in &acked {
            let e = view
                .get(&p(&format!("k{w}")))
                .expect("read")
                .unwrap_or_else(|| panic!("k{w} lost: version {v} was acknowledged"));
            assert!(
                e.version >= *v,
                "k{w} at version {}, but {v} was acknowledged",
                e.version
            );
        }
        c.stop_node(1).await.expect("stop");
    });
}
