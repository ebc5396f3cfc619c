//! A snapshot of many entries builds and installs in bounded memory.
//!
//! Each step runs in a fresh child process (this test binary, re-run with
//! `SYNOD_MEM_PHASE` set) so that its peak RSS (`VmHWM`) is its own:
//!
//! - `build`: open a store holding N entries, then build a snapshot;
//! - `install`: open an empty store, then install that snapshot file;
//! - `open`: open the installed store (the control: what a state machine
//!   holding N entries keeps resident anyway, mostly the in-memory namespace
//!   Merkle trie and sled's page cache).
//!
//! Growth is measured from just after the store is opened to the peak during
//! the step (see the assertions for the bound and why it is stated against
//! the control). Holding the snapshot in memory (`Cursor<Vec<u8>>`) and
//! decoding it at once would cost more than twice the data on top.
//!
//! The source and target stores go under `TMPDIR`; with a full disk, run the
//! 1 M case with `TMPDIR=/dev/shm` (sled reads with `pread`, so tmpfs pages
//! do not count in the RSS).
//!
//! N is 100,000 by default (a few seconds); `SYNOD_SNAPSHOT_ENTRIES=1000000
//! cargo test --release -p synod-consensus --test snapshot_memory -- --nocapture`
//! runs the 1 M case and prints the figures.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use synod_consensus::{
    open_stores_with, Command, Entry, Expect, NsPath, Request, RequestId, StorageOptions,
    TypeConfig,
};
use synod_merkle::Hash;

const CLUSTER: &str = "snapmem";
/// Commands per applied log entry while filling the source store.
const PER_ENTRY: u64 = 1024;
/// sled page cache of the state machine in this test: small, so that the
/// bound shows up at 100 k entries already (the default is 192 MiB).
const SM_CACHE: u64 = 4 * 1024 * 1024;
/// What an install may hold beyond opening the installed store, whatever
/// the number of entries.
const INSTALL_OVERHEAD_KIB: u64 = 32 * 1024;

fn opts() -> StorageOptions {
    StorageOptions::default().with_cache_bytes(4 * 1024 * 1024, SM_CACHE)
}

fn entries() -> u64 {
    std::env::var("SYNOD_SNAPSHOT_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn path_of(i: u64) -> NsPath {
    NsPath::parse(&format!(
        "projects/p{}/dir{}/file-{i:08}.dat",
        i % 97,
        i % 1013
    ))
    .expect("valid path")
}

fn entry_of(i: u64) -> Entry {
    let mut e = Entry::file(i * 4096, Hash::of(&i.to_le_bytes()), 1);
    e.holders = vec![1, 2, 3];
    e.mtime_ns = 1_700_000_000_000_000_000 + i as i64;
    e
}

/// `(VmRSS, VmHWM)` of this process in KiB.
fn rss_hwm_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0); returns the baseline.
/// Where that is not allowed, the baseline is the current RSS and the earlier
/// peak stays counted, which only overstates growth.
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    rss_hwm_kib().0
}

fn growth_since(base_kib: u64) -> u64 {
    rss_hwm_kib().1.saturating_sub(base_kib)
}

/// Fills a store with `n` entries; returns the bytes of paths + encoded entries.
async fn must_fill(dir: &Path, n: u64) -> u64 {
    let (_log, mut sm) = open_stores_with(dir, CLUSTER, opts()).expect("open source");
    let mut i = 0;
    let mut index = 0;
    while i < n {
        let end = (i + PER_ENTRY).min(n);
        let commands = (i..end)
            .map(|k| {
                (
                    RequestId {
                        client: 7,
                        serial: k,
                    },
                    Command::put(&path_of(k), entry_of(k), Expect::Absent),
                )
            })
            .collect();
        index += 1;
        let ent = openraft::Entry::<TypeConfig> {
            log_id: openraft::testing::log_id(1, 1, index),
            payload: openraft::EntryPayload::Normal(Request { commands }),
        };
        sm.apply([ent]).await.expect("apply");
        i = end;
    }
    sm.view()
        .all()
        .expect("read namespace")
        .iter()
        .map(|(p, e)| (p.as_str().len() + synod_consensus::codec::encode(e).len()) as u64)
        .sum()
}

/// Runs one phase in a child process and returns its output line's fields.
fn must_run_phase(phase: &str, src: &Path, dst: &Path, snap: Option<&Path>) -> Vec<String> {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Process::new(exe);
    cmd.args(["--exact", "memory_phase", "--nocapture", "--ignored"])
        .env("SYNOD_MEM_PHASE", phase)
        .env("SYNOD_MEM_SRC", src)
        .env("SYNOD_MEM_DST", dst);
    if let Some(s) = snap {
        cmd.env("SYNOD_MEM_SNAP", s);
    }
    let out = cmd.output().expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "phase {phase} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SYNOD_MEM_RESULT "))
        .unwrap_or_else(|| panic!("phase {phase} printed no result: {stdout}"));
    line.split_whitespace().map(str::to_owned).collect()
}

fn field(fields: &[String], name: &str) -> u64 {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {fields:?}"))
}

#[test]
fn snapshot_build_and_install_use_bounded_memory() {
    let n = entries();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let data_kib = rt.block_on(must_fill(&src, n)) / 1024;

    let built = must_run_phase("build", &src, &dst, None);
    let snap = PathBuf::from(
        built
            .iter()
            .find_map(|f| f.strip_prefix("file="))
            .expect("snapshot file"),
    );
    // Peak RSS is noisy (allocator arenas, sled's threads; 56–80 MiB for
    // the same install under load): each figure is the least of three
    // runs, each into a fresh store.
    let (mut install, mut open) = (u64::MAX, u64::MAX);
    for run in 0..3 {
        let dst = tmp.path().join(format!("dst{run}"));
        let installed = must_run_phase("install", &src, &dst, Some(&snap));
        assert_eq!(field(&installed, "entries"), n, "every entry installed");
        let control = must_run_phase("open", &src, &dst, None);
        install = install.min(field(&installed, "growth_kib"));
        open = open.min(field(&control, "growth_kib"));
    }
    let file_kib = field(&built, "file_bytes") / 1024;
    let build = field(&built, "growth_kib");
    let summary = format!(
        "{n} entries: data (paths + encoded entries) {data_kib} KiB, snapshot file {file_kib} KiB; \
         peak RSS growth: build {build} KiB, install {install} KiB, \
         control (open the installed store) {open} KiB; sled state machine cache {} KiB",
        SM_CACHE / 1024
    );
    println!("{summary}");
    let mut report = std::io::stderr();
    let _ = writeln!(report, "{summary}");
    // sled 0.34 does not keep its memory within `cache_capacity`: opening
    // or scanning a store grows RSS with the number of keys it holds
    // (≈ 50 B per key here; sled#1093, #1410), whatever this crate does. The
    // state machine holds the Merkle trie (64 bytes per path, see `ns_tree`)
    // in the control as well, so what a snapshot adds on top is bounded:
    // an install holds less than a fresh open of its result plus the smaller
    // of the data and a constant (frames, buffers, one Merkle bucket;
    // measured 2 MiB at 100 k and 14 MiB at 1 M entries), and a build less
    // than an open.
    assert!(
        install < open + data_kib.min(INSTALL_OVERHEAD_KIB),
        "an install must hold no more than opening its result plus a constant: {summary}"
    );
    assert!(
        build < open,
        "a build must not hold the namespace in memory: {summary}"
    );
}

/// One measured phase; runs only as a child of the test above.
#[test]
#[ignore = "run by snapshot_build_and_install_use_bounded_memory in a child process"]
fn memory_phase() {
    let Ok(phase) = std::env::var("SYNOD_MEM_PHASE") else {
        return;
    };
    let src = PathBuf::from(std::env::var("SYNOD_MEM_SRC").expect("SYNOD_MEM_SRC"));
    let dst = PathBuf::from(std::env::var("SYNOD_MEM_DST").expect("SYNOD_MEM_DST"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async move {
        match phase.as_str() {
            "build" => {
                let (_log, mut sm) = open_stores_with(&src, CLUSTER, opts()).expect("open");
                let base = reset_peak();
                let mut b = sm.get_snapshot_builder().await;
                let snap = b.build_snapshot().await.expect("build snapshot");
                let growth = growth_since(base);
                let file = src
                    .join("snapshots")
                    .join(format!("{}.snap", snap.meta.snapshot_id));
                let file_bytes = std::fs::metadata(&file).expect("snapshot file").len();
                // The metadata travels next to the file for the install phase.
                std::fs::write(
                    src.join("meta.bin"),
                    synod_consensus::codec::encode(&snap.meta),
                )
                .expect("write meta");
                format!(
                    "growth_kib={growth} file_bytes={file_bytes} file={}",
                    file.display()
                )
            }
            "install" => {
                let snap = PathBuf::from(std::env::var("SYNOD_MEM_SNAP").expect("SYNOD_MEM_SNAP"));
                let meta: synod_consensus::types::SnapshotMeta = synod_consensus::codec::decode(
                    "meta",
                    &std::fs::read(src.join("meta.bin")).expect("read meta"),
                )
                .expect("decode meta");
                let (_log, mut sm) = open_stores_with(&dst, CLUSTER, opts()).expect("open");
                let base = reset_peak();
                let mut recv = sm.begin_receiving_snapshot().await.expect("receive");
                let mut f = tokio::fs::File::open(&snap).await.expect("open snapshot");
                tokio::io::copy(&mut f, &mut *recv).await.expect("copy");
                sm.install_snapshot(&meta, recv).await.expect("install");
                let growth = growth_since(base);
                format!("growth_kib={growth} entries={}", sm.view().len())
            }
            "open" => {
                let base = reset_peak();
                let (_log, sm) = open_stores_with(&dst, CLUSTER, opts()).expect("open");
                let growth = growth_since(base);
                format!("growth_kib={growth} entries={}", sm.view().len())
            }
            other => panic!("unknown phase {other}"),
        }
    });
    println!("SYNOD_MEM_RESULT {result}");
}
