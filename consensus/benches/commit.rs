//! Committed `Put`s per second and latency on a 3-node in-process cluster with
//! real sled storage on disk, through the group-commit `Proposer`.
//!
//! `cargo bench -p synod-consensus` runs 1 and 64 concurrent proposers.
//! `SYNOD_SOAK=1 cargo bench -p synod-consensus` runs the soak instead:
//! 1 M commands with snapshots and log purges, then prints disk and memory use.
//! `SYNOD_BENCH_N` overrides the command count of the 64-proposer run,
//! `SYNOD_INFLIGHT` / `SYNOD_YIELDS` the proposer tuning, and
//! `SYNOD_BENCH_APPLY=1` measures the state machine's apply alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use synod_consensus::testing::TestCluster;
use synod_consensus::{
    raft_config, Answer, Command, Entry, Expect, NsPath, ProposeError, Proposer, ProposerConfig,
};
use synod_merkle::Hash;

fn entry(i: u64) -> Entry {
    let mut e = Entry::file(i * 4096, Hash::of(&i.to_le_bytes()), 1);
    e.holders = vec![1, 2, 3];
    e.mtime_ns = 1_700_000_000_000_000_000 + i as i64;
    e
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Commands retried after a leader change (same request id, new leader).
static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Proposers on every node (index = node id - 1) and the leader in use.
struct Proposers {
    by_node: Vec<Proposer>,
    leader: std::sync::atomic::AtomicU64,
}

impl Proposers {
    /// Proposes through the current leader; on a leader change retries the
    /// same request id on the new leader (exactly-once makes that safe).
    async fn put(&self, path: &NsPath, e: Entry) -> Answer {
        use std::sync::atomic::Ordering::Relaxed;
        let cmd = Command::put(path, e, Expect::Any);
        let first = self.by_node[self.leader.load(Relaxed) as usize - 1].next_request_id();
        for _ in 0..600 {
            let l = self.leader.load(Relaxed);
            match self.by_node[l as usize - 1]
                .propose_with_id(first, cmd.clone())
                .await
            {
                Ok(a) => return a,
                Err(ProposeError::ForwardToLeader {
                    leader_id: Some(n), ..
                }) => {
                    let _ = self.leader.compare_exchange(l, n, Relaxed, Relaxed);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            RETRIES.fetch_add(1, Relaxed);
        }
        panic!("no leader accepted {path} for 30 s");
    }
}

/// Runs `total` puts split over `writers` concurrent proposers; returns latencies and wall time.
async fn run(
    pr: &Arc<Proposers>,
    writers: usize,
    total: usize,
    prefix: &str,
) -> (Vec<Duration>, Duration) {
    let per = total / writers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pr = pr.clone();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let path = NsPath::parse(&format!("{prefix}/w{w}/dir{}/file-{i}.dat", i % 64))
                    .expect("valid path");
                let t = Instant::now();
                let a = pr.put(&path, entry(i as u64)).await;
                lat.push(t.elapsed());
                assert!(matches!(a, Answer::Ok { .. }), "put failed: {a:?}");
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.expect("writer task"));
    }
    let wall = start.elapsed();
    all.sort();
    (all, wall)
}

fn report(label: &str, lat: &[Duration], wall: Duration) {
    println!(
        "{label}: {} commands in {:.2} s = {:.0} commands/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(lat, 0.50).as_secs_f64() * 1e3,
        percentile(lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Cost of the state machine alone: apply 64-command entries directly.
async fn bench_apply() -> anyhow::Result<()> {
    use openraft::storage::RaftStateMachine;
    let dir = tempfile::tempdir()?;
    let (_log, mut sm) = synod_consensus::open_stores(dir.path(), "apply")?;
    let entries = 1000u64;
    let t = Instant::now();
    let cpu0 = cpu_ms();
    for e in 0..entries {
        let commands = (0..64u64)
            .map(|i| {
                let n = e * 64 + i;
                let path =
                    NsPath::parse(&format!("a/w{i}/dir{}/file-{n}.dat", n % 64)).expect("valid");
                (
                    synod_consensus::RequestId {
                        client: 1,
                        serial: n,
                    },
                    Command::put(&path, entry(n), Expect::Any),
                )
            })
            .collect();
        let ent = openraft::Entry::<synod_consensus::TypeConfig> {
            log_id: openraft::testing::log_id(1, 1, e + 1),
            payload: openraft::EntryPayload::Normal(synod_consensus::Request { commands }),
        };
        sm.apply([ent]).await?;
    }
    let n = entries * 64;
    println!(
        "state machine apply alone: {n} commands in {:.2} s = {:.1} us/command wall, {:.1} us/command cpu",
        t.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64() * 1e6 / n as f64,
        (cpu_ms() - cpu0) * 1e3 / n as f64
    );
    Ok(())
}

fn cpu_ms() -> f64 {
    // utime + stime of this process, from /proc/self/stat (clock ticks of 10 ms).
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) * 10.0
}

async fn bench() -> anyhow::Result<()> {
    if std::env::var("SYNOD_BENCH_APPLY").is_ok_and(|v| v == "1") {
        return bench_apply().await;
    }
    let soak = std::env::var("SYNOD_SOAK").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir_in(
        std::env::var("SYNOD_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )?;
    // The production config: snapshot every 20,000 log entries, keep 1,000
    // behind it; `SYNOD_SOAK_SNAPSHOT=n` snapshots every n entries instead.
    let mut cfg = raft_config("bench")?;
    if let Some(n) = std::env::var("SYNOD_SOAK_SNAPSHOT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(n);
    }
    let mut c = TestCluster::new(dir.path(), cfg)?;
    let leader = c.start(&[1, 2, 3]).await?;
    let mut pcfg = ProposerConfig::default();
    if let Some(n) = std::env::var("SYNOD_INFLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        pcfg.max_in_flight = n;
    }
    if let Some(n) = std::env::var("SYNOD_YIELDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        pcfg.linger_yields = n;
    }
    let pr = Arc::new(Proposers {
        by_node: c
            .ids()
            .iter()
            .map(|id| {
                Proposer::spawn(
                    c.node(*id).expect("running").raft.clone(),
                    rand::random(),
                    pcfg,
                )
            })
            .collect(),
        leader: std::sync::atomic::AtomicU64::new(leader),
    });
    println!("proposer: {pcfg:?}");
    println!(
        "3-node in-process cluster, sled on disk in {}, leader {leader}",
        dir.path().display()
    );

    if !soak {
        // Warm up.
        run(&pr, 8, 800, "warm").await;
        let (lat, wall) = run(&pr, 1, 3_000, "one").await;
        report("1 proposer  ", &lat, wall);
        let n: usize = std::env::var("SYNOD_BENCH_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64_000);
        let (lat, wall) = run(&pr, 64, n, "many").await;
        report("64 proposers", &lat, wall);
        let applied = c.node(leader)?.view.applied_index();
        println!(
            "log entries used: {applied} for {} commands",
            800 + 3_000 + n
        );
    } else {
        let total: usize = std::env::var("SYNOD_SOAK_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let rounds = 10;
        let t0 = Instant::now();
        for r in 0..rounds {
            let (lat, wall) = run(&pr, 64, total / rounds, &format!("soak{r}")).await;
            let n = c.node(leader)?;
            let (db, snaps) = c.node(leader)?.log_storage_usage();
            let m = n.raft.metrics().borrow().clone();
            println!(
                "round {r}: {:.0} commands/s, p99 {:.2} ms | entries {} | leader sled dir {:.1} MiB, snapshots {:.1} MiB | purged up to {:?}, snapshot {:?} | RSS {:.1} MiB",
                lat.len() as f64 / wall.as_secs_f64(),
                percentile(&lat, 0.99).as_secs_f64() * 1e3,
                n.view.len(),
                db as f64 / 1048576.0,
                snaps as f64 / 1048576.0,
                m.purged.map(|l| l.index),
                m.snapshot.map(|l| l.index),
                rss_kib() as f64 / 1024.0,
            );
        }
        let elapsed = t0.elapsed();
        println!(
            "commands retried after a leader change: {}",
            RETRIES.load(std::sync::atomic::Ordering::Relaxed)
        );
        let ids = c.ids();
        c.wait_applied(
            &ids,
            c.node(leader)?.view.applied_index(),
            Duration::from_secs(60),
        )
        .await?;
        let live: usize = c
            .node(leader)?
            .view
            .all()?
            .iter()
            .map(|(p, e)| p.as_str().len() + synod_consensus::codec::encode(e).len())
            .sum();
        println!("soak: {total} commands in {:.1} s", elapsed.as_secs_f64());
        for id in &ids {
            let (db, snaps) = c.node(*id)?.log_storage_usage();
            println!(
                "node {id}: sled dir {:.1} MiB, snapshot dir {:.1} MiB, entries {}",
                db as f64 / 1048576.0,
                snaps as f64 / 1048576.0,
                c.node(*id)?.view.len()
            );
        }
        println!(
            "live data (paths + encoded entries): {:.1} MiB; process RSS at end (3 nodes in one process): {:.1} MiB",
            live as f64 / 1048576.0,
            rss_kib() as f64 / 1024.0
        );
    }
    for id in c.ids() {
        c.stop_node(id).await?;
    }
    Ok(())
}

// The allocator of synod's binaries.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = Arc::new(rt);
    r.block_on(bench())
}
