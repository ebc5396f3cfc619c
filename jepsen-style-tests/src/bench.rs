//! `synod-lab bench`: synod side by side with rsync, Syncthing and etcd,
//! on the same data, the same machine, in the same run.
//!
//! Cases (each run several times; median and min–max reported):
//! 1. initial replication of a seeded dataset from node 1 to two others;
//! 2. delta re-sync after an edit set (wall time and bytes received);
//! 3. fan-out of one large file to 4 receivers over 200 Mbit/s links
//!    (network namespaces, `tc tbf`);
//! 4. metadata commits: small writes at 1 and 64 concurrent clients.
//!
//! Layout:
//! - `dataset`: the seeded files, the edit set, folder verification.
//! - `procs`: background processes stopped on drop, bounded waits.
//! - `synod`, `rsync`, `syncthing`, `etcd`: each tool's setup and its
//!   "done" signal and byte counters.
//! - `replication`: cases 1 and 2; `fanout`: case 3; `commits`: case 4.
//! - `stats`: median, range, percentiles; `report`: targets, the Markdown
//!   table and `bench.json`.

pub mod commits;
pub mod dataset;
pub mod etcd;
pub mod fanout;
pub mod procs;
pub mod replication;
pub mod report;
pub mod rsync;
pub mod stats;
pub mod syncthing;
pub mod synod;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use dataset::{Dataset, DatasetSpec, EditPlan, Edited};

pub const CASE_INITIAL: &str = "1 initial replication";
pub const CASE_DELTA: &str = "2 delta re-sync";
pub const CASE_FANOUT: &str = "3 fan-out";
pub const CASE_COMMITS: &str = "4 metadata commits";

/// What a number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Seconds,
    Bytes,
    PerSecond,
    Millis,
    Count,
}

/// One metric of one tool in one case, with a sample per run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    pub case: String,
    pub tool: String,
    pub metric: String,
    pub unit: Unit,
    pub samples: Vec<f64>,
}

impl Measurement {
    /// Adds sample `v` to the measurement `(case, tool, metric)` in `out`.
    pub fn record(
        out: &mut Vec<Measurement>,
        case: &str,
        tool: &str,
        metric: &str,
        unit: Unit,
        v: f64,
    ) {
        match out
            .iter_mut()
            .find(|m| m.case == case && m.tool == tool && m.metric == metric)
        {
            Some(m) => m.samples.push(v),
            None => out.push(Measurement {
                case: case.to_string(),
                tool: tool.to_string(),
                metric: metric.to_string(),
                unit,
                samples: vec![v],
            }),
        }
    }

    pub fn summary(&self) -> Option<stats::Summary> {
        stats::summarize(&self.samples)
    }
}

/// The median of `(case, tool, metric)` in `ms`.
pub fn median(ms: &[Measurement], case: &str, tool: &str, metric: &str) -> Option<f64> {
    ms.iter()
        .find(|m| m.case == case && m.tool == tool && m.metric == metric)
        .and_then(Measurement::summary)
        .map(|s| s.median)
}

/// Sizes and repetitions of a benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub runs: usize,
    pub seed: u64,
    pub big_bytes: u64,
    pub small_files: usize,
    pub small_min: u64,
    pub small_max: u64,
    pub fanout_receivers: u64,
    pub link_mbit: u64,
    pub commit_window_ms: u64,
    /// Longest any one synchronisation may take before the run fails.
    pub sync_limit_s: u64,
}

impl Plan {
    /// The full benchmark of the issue.
    pub fn full(runs: usize, seed: u64) -> Plan {
        Plan {
            mode: "full",
            runs,
            seed,
            big_bytes: 512 << 20,
            small_files: 2000,
            small_min: 1 << 10,
            small_max: 256 << 10,
            fanout_receivers: 4,
            link_mbit: 200,
            commit_window_ms: 5000,
            sync_limit_s: 1200,
        }
    }

    /// A small version for CI: one run, small data, short windows.
    pub fn quick(seed: u64) -> Plan {
        Plan {
            mode: "quick",
            runs: 1,
            big_bytes: 16 << 20,
            small_files: 100,
            commit_window_ms: 1500,
            sync_limit_s: 180,
            ..Plan::full(1, seed)
        }
    }

    pub fn dataset_spec(&self) -> DatasetSpec {
        DatasetSpec {
            big_bytes: self.big_bytes,
            small_files: self.small_files,
            small_min: self.small_min,
            small_max: self.small_max,
            seed: self.seed,
        }
    }

    pub fn sync_limit(&self) -> Duration {
        Duration::from_secs(self.sync_limit_s)
    }
}

/// Which cases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cases {
    /// Cases 1 and 2 (the delta re-sync edits what case 1 replicated).
    pub replication: bool,
    pub fanout: bool,
    pub commits: bool,
}

impl Cases {
    pub const ALL: Cases = Cases {
        replication: true,
        fanout: true,
        commits: true,
    };

    /// `1,2,3,4` (1 and 2 both select the replication pair).
    pub fn parse(s: &str) -> Result<Cases, String> {
        let mut c = Cases {
            replication: false,
            fanout: false,
            commits: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "1" | "2" => c.replication = true,
                "3" => c.fanout = true,
                "4" => c.commits = true,
                _ => return Err(format!("{part:?}: cases are 1, 2, 3 and 4")),
            }
        }
        Ok(c)
    }
}

/// Everything a benchmark run needs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub plan: Plan,
    pub cases: Cases,
    pub synod: PathBuf,
    /// Parent of the run directory.
    pub out: PathBuf,
}

/// What a benchmark produced.
#[derive(Debug)]
pub struct BenchOutput {
    pub dir: PathBuf,
    pub table: String,
    pub elapsed: Duration,
    /// Cases that failed (each is an `ERROR:` note in the table).
    pub errors: usize,
}

/// The programs each selected case needs, with the Debian package that
/// has them.
fn needed_programs(cases: Cases) -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    if cases.replication || cases.fanout {
        v.push(("rsync", "rsync"));
    }
    if cases.replication {
        v.push(("syncthing", "syncthing"));
    }
    if cases.commits {
        v.push(("etcd", "etcd-server"));
    }
    if cases.fanout {
        v.extend([("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")]);
    }
    v
}

/// Runs the benchmark; writes `bench.json` into a new run directory.
pub fn run(opts: &BenchOptions) -> Result<BenchOutput> {
    let missing: Vec<_> = needed_programs(opts.cases)
        .into_iter()
        .filter(|(p, _)| !procs::have(p))
        .collect();
    if !missing.is_empty() {
        let pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        bail!(
            "missing programs: {}; install them with `apt-get install {}` (the benchmark installs nothing)",
            missing.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", "),
            pkgs.join(" ")
        );
    }
    if opts.cases.fanout {
        crate::netns::preflight()
            .context("case 3 needs network namespaces (root, iproute2, nftables)")?;
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = opts.out.join(format!("bench-{}-{stamp}", opts.plan.mode));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = Instant::now();
    let plan = &opts.plan;
    eprintln!(
        "bench ({} mode, {} run(s)) in {}",
        plan.mode,
        plan.runs,
        dir.display()
    );

    let data = Dataset::generate(&dir.join("dataset"), plan.dataset_spec())?;
    let edited = Edited::prepare(
        &data,
        EditPlan::new(&data.spec)?,
        &dir.join("dataset-edited"),
    )?;
    eprintln!(
        "dataset: {} files, {:.1} MiB",
        data.files.len(),
        data.bytes() as f64 / (1 << 20) as f64
    );
    let mut ms: Vec<Measurement> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    if opts.cases.replication {
        let bytes = WARM_UP_DATASETS * data.bytes();
        let took = warm_up_memory(&dir.join("warm-up"), bytes)?;
        notes.push(format!(
            "warm-up: before the first case, {} written, fsynced and deleted in {:.1} s, so that the first tool does not pay alone for memory the machine touches for the first time (on this virtual machine the first 3 GiB written took 10.8 s and the same again 3.0 s; freed memory turns cold again within seconds, 2 GiB rewritten at once 0.66 s, after 20 s idle 2.13 s, so every tool still meets some)",
            report::human_bytes(bytes as f64),
            took.as_secs_f64()
        ));
        eprintln!("warm-up: {:.1} s", took.as_secs_f64());
    }
    let result = run_cases(opts, &dir, &data, &edited, &mut ms, &mut notes);
    // The dataset is large: removed also when a case failed. The runs'
    // files, emptied as each ended, go now that nothing is measured.
    let _ = std::fs::remove_dir_all(&data.root);
    let _ = std::fs::remove_dir_all(&edited.root);
    remove_data(&dir);
    let errors = result?;
    let targets = report::targets(&ms, plan, data.bytes());
    notes.extend(report::method_notes(plan));
    let versions = report::versions(&opts.synod);
    let elapsed = started.elapsed();
    let table = report::markdown(&ms, &targets, &notes);
    let json = report::json(plan, &versions, &ms, &targets, &notes, elapsed);
    let path = dir.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(BenchOutput {
        dir,
        table,
        elapsed,
        errors,
    })
}

/// Bytes of page cache the warm-up touches, in datasets: cases 1 and 2
/// keep about four copies of the dataset in memory (the source, staged and
/// placed copies on two receivers).
const WARM_UP_DATASETS: u64 = 4;

/// Writes `bytes` to a scratch file at `path`, fsyncs and deletes it. The
/// tools then run on memory the machine has touched before, whatever order
/// they run in; returns how long it took.
fn warm_up_memory(path: &Path, bytes: u64) -> Result<Duration> {
    use std::io::Write;
    let t0 = Instant::now();
    let block = vec![0x5au8; 8 << 20];
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    drop(f);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(t0.elapsed())
}

/// Every run of every selected case.
fn run_cases(
    opts: &BenchOptions,
    dir: &Path,
    data: &Dataset,
    edited: &Edited,
    ms: &mut Vec<Measurement>,
    notes: &mut Vec<String>,
) -> Result<usize> {
    let plan = &opts.plan;
    // A failed case is recorded and the benchmark goes on: the other
    // figures stay, and the exit status says something failed.
    let mut errors = 0;
    let mut failed = |what: String, r: Result<()>| {
        if let Err(e) = r {
            eprintln!("ERROR: {what}: {e:#}");
            notes.push(format!("ERROR: {what}: {e:#}"));
            errors += 1;
        }
    };
    for run in 1..=plan.runs {
        let run_dir = dir.join(format!("run{run}"));
        if opts.cases.replication {
            let mut found = Vec::new();
            let r =
                replication::run_once(&run_dir, &opts.synod, plan, data, edited, ms, &mut found);
            failed(format!("run {run}, cases 1 and 2"), r);
            for f in found {
                failed(format!("run {run}, cases 1 and 2"), Err(anyhow::anyhow!(f)));
            }
        }
        if opts.cases.fanout {
            let r = fanout::run_once(&run_dir, &opts.synod, plan, data, ms);
            failed(format!("run {run}, case 3"), r);
        }
        if opts.cases.commits {
            eprintln!("run {run}: case 4, metadata commits");
            let r = commits::run_once(
                &run_dir.join("commits"),
                &opts.synod,
                Duration::from_millis(plan.commit_window_ms),
                ms,
            );
            empty_data(&run_dir.join("commits"));
            failed(format!("run {run}, case 4"), r);
        }
    }
    Ok(errors)
}

/// Kills what killed benchmarks left running: every pid recorded in a
/// `pids` file under `out/bench-*/` whose command line still names that
/// benchmark's directory (so a reused pid is never touched).
pub fn clean(out: &Path) -> Vec<String> {
    fn pid_files(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pid_files(&p, found);
            } else if e.file_name() == "pids" {
                found.push(p);
            }
        }
    }
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return done;
    };
    for bench in entries.flatten() {
        if !bench.file_name().to_string_lossy().starts_with("bench-") {
            continue;
        }
        let root = bench.path().display().to_string();
        let mut files = Vec::new();
        pid_files(&bench.path(), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            // Lines are `node pid` (clusters) or `pid name` (other tools):
            // every number is a candidate; the command line decides.
            for pid in text
                .split_whitespace()
                .filter_map(|w| w.parse::<i32>().ok())
                .filter(|p| *p > 1)
            {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&root) {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                        done.push(format!("killed benchmark process {pid}"));
                    }
                }
            }
        }
    }
    done
}

/// Empties every file a tool's run left under `dir`, except under `logs/`
/// folders: the disk space comes back, but no inode is freed until the
/// benchmark ends ([`remove_data`]). On a journal-less ext4 (this machine's)
/// a new inode skips every inode freed in the last 60 to 360 s
/// (`recently_deleted` in `fs/ext4/ialloc.c`): deleting one run's 90,000
/// small files made each file the next tool created cost a scan of them.
pub fn empty_data(dir: &Path) {
    clear_data(dir, false);
}

/// Removes what a tool's run left under `dir`, except every `logs/`
/// folder (at any depth) and what leads to it.
pub fn remove_data(dir: &Path) {
    clear_data(dir, true);
}

/// [`remove_data`] if `remove`, else [`empty_data`].
fn clear_data(dir: &Path, remove: bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name() == "logs" {
            continue;
        }
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                clear_data(&p, remove);
                if remove {
                    // Fails, as it should, where a `logs/` was kept.
                    let _ = std::fs::remove_dir(&p);
                }
            }
            _ if remove => {
                let _ = std::fs::remove_file(&p);
            }
            // A hard link to the dataset (node 1's source files) is only
            // unlinked: the dataset still holds its inode, and its bytes.
            Ok(t) if t.is_file() && e.metadata().is_ok_and(|m| m.nlink() > 1) => {
                let _ = std::fs::remove_file(&p);
            }
            Ok(t) if t.is_file() => {
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) {
                    let _ = f.set_len(0);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_writes_what_it_says_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let scratch = dir.path().join("warm-up");
        let before = std::fs::read_to_string("/proc/self/io").ok();
        warm_up_memory(&scratch, (16 << 20) + 5).expect("warm-up");
        assert!(!scratch.exists(), "scratch file left behind");
        // Where the kernel counts it, the bytes were really written.
        if let (Some(b), Ok(a)) = (before, std::fs::read_to_string("/proc/self/io")) {
            let wchar = |s: &str| -> u64 {
                s.lines()
                    .find_map(|l| l.strip_prefix("wchar: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("wchar line")
            };
            assert!(wchar(&a) - wchar(&b) >= (16 << 20) + 5);
        }
    }

    /// A run directory of a logs folder, a node's folder and logs, and
    /// `other`, each file holding `bytes`.
    fn run_tree(other: &str, bytes: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["logs/a.log", "node1/folder/x", "node1/logs/n.log", other] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, bytes).expect("write");
        }
        dir
    }

    #[test]
    fn removing_data_keeps_logs() {
        let dir = run_tree("stage/y", b"x");
        let d = dir.path();
        remove_data(d);
        assert!(d.join("logs/a.log").exists() && d.join("node1/logs/n.log").exists());
        assert!(!d.join("node1/folder").exists() && !d.join("stage").exists());
    }

    #[test]
    fn emptying_data_frees_bytes_but_no_inode_and_keeps_logs() {
        let dir = run_tree("dataset/y", b"bytes");
        let d = dir.path();
        // A source file linked from the dataset into a node's folder.
        std::fs::hard_link(d.join("dataset/y"), d.join("node1/folder/y")).expect("link");
        let run = d.join("node1");
        let inode = |p: &str| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(d.join(p)).expect("still there").ino()
        };
        let before = inode("node1/folder/x");
        empty_data(&run);
        assert_eq!(std::fs::read(d.join("node1/folder/x")).expect("kept"), b"");
        assert_eq!(inode("node1/folder/x"), before, "the same file, emptied");
        assert!(!d.join("node1/folder/y").exists(), "a link is unlinked");
        assert_eq!(
            std::fs::read(d.join("dataset/y")).expect("dataset"),
            b"bytes",
            "the dataset keeps its bytes"
        );
        assert_eq!(std::fs::read(d.join("logs/a.log")).expect("log"), b"bytes");
        assert_eq!(
            std::fs::read(d.join("node1/logs/n.log")).expect("log"),
            b"bytes"
        );
    }

    #[test]
    fn cases_parse() {
        assert_eq!(Cases::parse("1,2,3,4"), Ok(Cases::ALL));
        let c = Cases::parse("4").expect("4");
        assert!(c.commits && !c.replication && !c.fanout);
        assert!(Cases::parse("2").expect("2").replication);
        assert!(Cases::parse("5").is_err());
    }

    #[test]
    fn samples_gather_per_metric() {
        let mut ms = Vec::new();
        Measurement::record(&mut ms, "c", "synod", "wall time", Unit::Seconds, 2.0);
        Measurement::record(&mut ms, "c", "synod", "wall time", Unit::Seconds, 4.0);
        Measurement::record(&mut ms, "c", "rsync", "wall time", Unit::Seconds, 1.0);
        assert_eq!(ms.len(), 2);
        assert_eq!(median(&ms, "c", "synod", "wall time"), Some(3.0));
        assert_eq!(median(&ms, "c", "etcd", "wall time"), None);
    }

    #[test]
    fn quick_mode_is_small_and_full_is_the_issues() {
        let q = Plan::quick(1);
        assert_eq!(q.runs, 1);
        assert!(q.big_bytes <= 32 << 20 && q.small_files >= 20);
        let f = Plan::full(5, 1);
        assert_eq!((f.big_bytes, f.small_files), (512 << 20, 2000));
        assert_eq!((f.fanout_receivers, f.link_mbit), (4, 200));
    }
}
