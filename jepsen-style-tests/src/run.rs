//! One lab run end to end, re-checking a recorded run, cleaning up after
//! killed runs, and campaigns of runs.
//!
//! A run directory holds: `cluster.toml`, `node*/` (folders and state),
//! `logs/node*.log`, `pids`, `schedule.txt`, `notes.txt`, `history.jsonl`,
//! `convergence.json` (what the folders held at the end), `findings.json`,
//! `summary.txt` and `report.html`. `check` recomputes the findings from
//! `history.jsonl` and `convergence.json` alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::api::Api;
use crate::checker::convergence::{self, FileState, NodeFolder};
use crate::checker::{
    files as files_checker, folder as folder_checker, linearizable, lost_writes, overall, Finding,
    Verdict,
};
use crate::cluster::{self, Cluster, ClusterError, NetMode};
use crate::history::{self, Event, EventType, HistoryError, OpKind, Recorder, NEMESIS_PROCESS};
use crate::nemesis::{self, NemesisKind, Step};
use crate::netns::{self, NetError};
use crate::report;
use crate::workload::files::{self, FilesConfig, FILES_PREFIX};
use crate::workload::folder::{self, FolderConfig, FOLDER_PREFIX};
use crate::workload::{self, RegisterConfig, WorkloadKind};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("network namespaces are not usable here (try --net loopback)")]
    NoNetns(#[source] NetError),
    #[error("nemesis {kind} needs --net netns")]
    NeedsNetns { kind: NemesisKind },
    #[error("nemesis {kind} needs the node's lab hooks{why}: build synod with `cargo build -p synod-node --features lab-hooks`")]
    NeedsHooks {
        kind: NemesisKind,
        why: &'static str,
    },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub nodes: u64,
    pub clients: usize,
    pub nemeses: Vec<NemesisKind>,
    pub time_limit: Duration,
    pub seed: u64,
    pub net: NetMode,
    pub synod: PathBuf,
    /// Parent of the run directories.
    pub out: PathBuf,
    pub workloads: Vec<WorkloadKind>,
    /// Clients of the `files` workload.
    pub file_clients: usize,
    /// Largest file of the `files` workload.
    pub file_size_max: usize,
    /// A fixed fault schedule instead of the seeded one.
    pub schedule: Option<Vec<Step>>,
    /// `SYNOD_LAB_HOOKS` for every node (needs a `lab-hooks` build).
    pub hooks_env: Option<String>,
    /// Register clients may write without a precondition (else cas only).
    pub blind_writes: bool,
}

impl RunOptions {
    /// The faults of this run, in order.
    pub fn steps(&self) -> Vec<Step> {
        match &self.schedule {
            Some(s) => s.clone(),
            None => nemesis::schedule(self.seed, &self.nemeses, self.time_limit),
        }
    }

    /// Every nemesis the run uses (the fixed schedule's too).
    pub fn all_nemeses(&self) -> Vec<NemesisKind> {
        let mut kinds = self.nemeses.clone();
        for s in self.schedule.iter().flatten() {
            if !kinds.contains(&s.kind) {
                kinds.push(s.kind);
            }
        }
        kinds
    }
}

/// What a run (or a re-check) found.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub dir: PathBuf,
    pub findings: Vec<Finding>,
    pub counts: report::Counts,
    pub summary: String,
}

impl RunOutcome {
    pub fn verdict(&self) -> Verdict {
        overall(&self.findings)
    }
}

/// The folders and committed files captured at the end of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConvergenceSnapshot {
    /// `None` when the committed namespace could not be read.
    pub committed: Option<std::collections::BTreeMap<String, FileState>>,
    pub nodes: Vec<NodeFolder>,
    /// Nodes that exited by themselves, with their exit status.
    pub exited: Vec<(u64, String)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), RunError> {
    std::fs::write(path, text).map_err(io_err(path))
}

fn nemesis_event(rec: &Recorder, op: OpKind, what: &str) -> Result<Event, HistoryError> {
    rec.record(Event {
        kind: EventType::Nemesis,
        process: NEMESIS_PROCESS,
        op,
        path: String::new(),
        to: None,
        value: None,
        version: None,
        node: None,
        base: None,
        error: Some(what.to_string()),
        wall_ns: 0,
        mono_ns: 0,
    })
}

/// Register paths of a run.
pub fn register_paths() -> Vec<String> {
    (0..3).map(|i| format!("reg{i}")).collect()
}

/// Runs one test: cluster up, workload + nemeses until the time limit, heal,
/// quiet period, final reads, convergence capture, checks, report.
pub fn run(opts: &RunOptions) -> Result<RunOutcome, RunError> {
    if opts.net == NetMode::Loopback {
        if let Some(k) = opts.all_nemeses().iter().find(|k| k.needs_netns()) {
            return Err(RunError::NeedsNetns { kind: *k });
        }
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = opts.out.join(format!("run-{}-{stamp}", opts.seed));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut notes = Vec::new();
    let mut netem = false;
    if opts.net == NetMode::Netns {
        netns::preflight().map_err(RunError::NoNetns)?;
        netns::setup(opts.nodes)?;
        netem = netns::netem_available();
        notes.push(if netem {
            "netem: available; the delay nemesis uses it (delay and reordering)".to_string()
        } else {
            "netem: NOT available in this kernel; the delay nemesis uses the node's delay hook"
                .to_string()
        });
    }
    let result = run_in(opts, &dir, netem, &mut notes);
    if opts.net == NetMode::Netns {
        if let Err(e) = netns::clean() {
            notes.push(format!("cleanup: {e}"));
        }
    }
    write(&dir.join("notes.txt"), &notes.join("\n"))?;
    result?;
    check_dir(&dir)
}

fn run_in(
    opts: &RunOptions,
    dir: &Path,
    netem: bool,
    notes: &mut Vec<String>,
) -> Result<(), RunError> {
    let steps = opts.steps();
    let plan: Vec<String> = steps
        .iter()
        .map(|s| {
            format!(
                "{:>6.1}s {:>10} for {:.1}s",
                s.at.as_secs_f64(),
                s.kind,
                s.duration.as_secs_f64()
            )
        })
        .collect();
    write(&dir.join("schedule.txt"), &plan.join("\n"))?;
    let tmpfs = opts.all_nemeses().contains(&NemesisKind::DiskFull);
    let mut cluster = Cluster::start(
        dir,
        opts.nodes,
        opts.net,
        &opts.synod,
        tmpfs,
        opts.hooks_env.as_deref(),
    )?;
    cluster.netem = netem;
    if let Some(h) = &opts.hooks_env {
        notes.push(format!("LAB HOOKS on every node: SYNOD_LAB_HOOKS={h}"));
    }
    if let Some(k) = opts
        .all_nemeses()
        .into_iter()
        .find(|k| k.needs_hooks(opts.net, netem) && !cluster.hooks)
    {
        let why = if k == NemesisKind::Delay {
            " (this kernel has no netem)"
        } else if k.is_partition() {
            " (loopback partitions use the drop_peers hook)"
        } else {
            ""
        };
        return Err(RunError::NeedsHooks { kind: k, why });
    }
    if opts.all_nemeses().contains(&NemesisKind::Corrupt) {
        notes.push(create_corruptible(&cluster));
    }
    let rec = Arc::new(Recorder::create(&dir.join("history.jsonl"))?);
    let targets: workload::Targets = cluster
        .nodes
        .iter()
        .map(|n| (n.id, n.api.clone()))
        .collect();
    let register = opts.workloads.contains(&WorkloadKind::Register);
    let with_files = opts.workloads.contains(&WorkloadKind::Files);
    let with_folder = opts.workloads.contains(&WorkloadKind::Folder);
    let paths = if register {
        register_paths()
    } else {
        Vec::new()
    };
    let file_paths = if with_files {
        files::files_paths(6)
    } else {
        Vec::new()
    };
    let cfg = RegisterConfig {
        clients: if register { opts.clients } else { 0 },
        paths: paths.clone(),
        seed: opts.seed,
        timeout: Duration::from_millis(cluster::WRITE_MS + 2000),
        think: Duration::from_millis(20),
        blind_writes: opts.blind_writes,
    };
    let fcfg = FilesConfig {
        clients: if with_files { opts.file_clients } else { 0 },
        paths: file_paths.clone(),
        seed: opts.seed,
        max_size: opts.file_size_max,
        // Uploads of several MiB under faults take longer than a register.
        timeout: Duration::from_millis(cluster::WRITE_MS + 7000),
        think: Duration::from_millis(50),
    };
    let folder_cfg = FolderConfig {
        nodes: if with_folder {
            cluster
                .nodes
                .iter()
                .map(|n| (n.id, n.folder.clone()))
                .collect()
        } else {
            Vec::new()
        },
        paths: folder::folder_paths(6),
        seed: opts.seed,
        think: (Duration::from_millis(100), Duration::from_millis(700)),
    };
    let start = Instant::now();
    let deadline = start + opts.time_limit;
    let clients = {
        let (cfg, targets, rec) = (cfg.clone(), targets.clone(), Arc::clone(&rec));
        std::thread::spawn(move || workload::run_register(&cfg, &targets, &rec, deadline))
    };
    let file_clients = {
        let (fcfg, targets, rec) = (fcfg.clone(), targets.clone(), Arc::clone(&rec));
        // Process ids far from the register clients' (which count from 1).
        std::thread::spawn(move || files::run_files(&fcfg, &targets, &rec, deadline, 1 << 32))
    };
    let folder_clients = {
        let rec = Arc::clone(&rec);
        std::thread::spawn(move || folder::run_folder(&folder_cfg, &rec, deadline, 2 << 32))
    };

    for step in &steps {
        sleep_until(start + step.at, deadline);
        if Instant::now() >= deadline {
            break;
        }
        match nemesis::start(step, &mut cluster) {
            Ok(active) => {
                let what = active.to_string();
                nemesis_event(&rec, OpKind::Start, &what)?;
                sleep_until(start + step.at + step.duration, deadline);
                let stopped = nemesis::stop(&active, &mut cluster);
                nemesis_event(&rec, OpKind::Stop, &what)?;
                if let Err(e) = stopped {
                    notes.push(format!("stopping {what}: {}", chain(&e)));
                }
            }
            Err(e) => notes.push(format!("starting {}: {}", step.kind, chain(&e))),
        }
    }
    let mut ops = 0;
    for (name, handle) in [
        ("register", clients),
        ("files", file_clients),
        ("folder", folder_clients),
    ] {
        match handle.join() {
            Ok(r) => {
                let n = r?;
                if n > 0 {
                    notes.push(format!("workload {name}: {n} operations"));
                }
                ops += n;
            }
            Err(_) => notes.push(format!("a {name} client thread panicked")),
        }
    }
    notes.push(format!("workload: {ops} operations"));
    if let Err(e) = nemesis::heal_all(&mut cluster) {
        notes.push(format!("healing: {}", chain(&e)));
    }

    // Quiet period: a leader, then time for followers to catch up.
    let quiet_deadline = Instant::now() + Duration::from_secs(20);
    while cluster.leader().is_none() && Instant::now() < quiet_deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(2));
    let got = workload::final_reads(
        &paths,
        &targets,
        &rec,
        Duration::from_secs(5),
        Instant::now() + Duration::from_secs(20),
        workload::register_value,
    )?;
    let got_files = workload::final_reads(
        &file_paths,
        &targets,
        &rec,
        Duration::from_secs(15),
        Instant::now() + Duration::from_secs(30),
        files::digest,
    )?;
    notes.push(format!(
        "final reads: {} of {}",
        got + got_files,
        paths.len() + file_paths.len()
    ));

    // Folder edits made on a minority wait in the pending journal and
    // conflicts take a scan or two after healing: give them longer.
    let settle = if with_folder { 40 } else { 20 };
    let snapshot = capture_convergence(&mut cluster, Duration::from_secs(settle));
    let path = dir.join("convergence.json");
    let text = serde_json::to_string_pretty(&snapshot).map_err(|e| RunError::Decode {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write(&path, &text)?;
    cluster.stop();
    Ok(())
}

/// Sizes of the files the `corrupt` nemesis may damage: one chunk, a few,
/// many (the lab's chunk sizes average 64 KiB).
pub const CORRUPTIBLE_SIZES: [usize; 3] = [4 << 10, 300 << 10, 1 << 20];

/// Writes the files `corrupt` targets (`static/s*`, which no workload
/// touches) and waits until every node holds them; returns a note.
fn create_corruptible(cluster: &Cluster) -> String {
    let Some(first) = cluster.nodes.first() else {
        return "corrupt: no nodes".into();
    };
    let api = Api::new(&first.api, Duration::from_secs(10));
    let mut written = 0;
    for (i, size) in CORRUPTIBLE_SIZES.iter().enumerate() {
        let path = format!("{}s{i}", nemesis::CORRUPTIBLE_PREFIX);
        let bytes: Vec<u8> = (0..*size)
            .map(|j| (j * 31 + i * 7 + j / 977) as u8)
            .collect();
        if api
            .write(&path, &bytes, crate::api::Precondition::None)
            .is_ok()
        {
            written += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let everywhere = || {
        cluster.nodes.iter().all(|n| {
            (0..CORRUPTIBLE_SIZES.len()).all(|i| {
                n.folder
                    .join(format!("{}s{i}", nemesis::CORRUPTIBLE_PREFIX))
                    .is_file()
            })
        })
    };
    while !everywhere() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    format!(
        "corrupt: wrote {written} of {} files under {} (on every node: {})",
        CORRUPTIBLE_SIZES.len(),
        nemesis::CORRUPTIBLE_PREFIX,
        everywhere()
    )
}

/// Polls until every folder matches the committed files or `within` ends;
/// convergence is eventual, so only the last capture is judged.
fn capture_convergence(cluster: &mut Cluster, within: Duration) -> ConvergenceSnapshot {
    let deadline = Instant::now() + within;
    loop {
        let mut snap = ConvergenceSnapshot {
            exited: cluster.exited(),
            ..Default::default()
        };
        let leader = cluster.leader();
        let api_addr = leader
            .and_then(|l| cluster.node(l))
            .or_else(|| cluster.nodes.first())
            .map(|n| n.api.clone())
            .unwrap_or_default();
        snap.committed = Api::new(&api_addr, Duration::from_secs(10))
            .committed_files()
            .ok();
        for n in &cluster.nodes {
            match convergence::scan_folder(n.id, &n.folder) {
                Ok(f) => snap.nodes.push(f),
                Err(_) => snap.nodes.push(NodeFolder {
                    node: n.id,
                    files: Default::default(),
                    temp_files: vec!["<folder unreadable>".into()],
                }),
            }
        }
        let done = snap
            .committed
            .as_ref()
            .is_some_and(|c| convergence::check(c, &snap.nodes).verdict == Verdict::Valid);
        if done || Instant::now() >= deadline {
            return snap;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn sleep_until(t: Instant, deadline: Instant) {
    let now = Instant::now();
    let t = t.min(deadline);
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// The error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Recomputes every finding from a run directory and rewrites its
/// `findings.json`, `summary.txt` and `report.html`.
pub fn check_dir(dir: &Path) -> Result<RunOutcome, RunError> {
    let events = history::read_history(&dir.join("history.jsonl"))?;
    let ops = history::pair_operations(&events);
    let faults = history::fault_windows(&events);
    // Register paths go to the register checkers, `files/` and `folder/`
    // to their own.
    let (folder_ops, ops_rest): (Vec<_>, Vec<_>) = ops
        .iter()
        .cloned()
        .partition(|o| o.path.starts_with(FOLDER_PREFIX));
    let (file_ops, reg_ops): (Vec<_>, Vec<_>) = ops_rest
        .into_iter()
        .partition(|o| o.path.starts_with(FILES_PREFIX));
    let mut findings = Vec::new();
    if !reg_ops.is_empty() || (file_ops.is_empty() && folder_ops.is_empty()) {
        findings.extend(linearizable::check(&reg_ops, linearizable::DEFAULT_BUDGET));
        findings.push(lost_writes::check(&reg_ops));
    }
    if !file_ops.is_empty() {
        findings.push(files_checker::check(&file_ops));
    }
    let conv_path = dir.join("convergence.json");
    match std::fs::read_to_string(&conv_path) {
        Ok(text) => {
            let snap: ConvergenceSnapshot =
                serde_json::from_str(&text).map_err(|e| RunError::Decode {
                    path: conv_path.clone(),
                    message: e.to_string(),
                })?;
            if !folder_ops.is_empty() {
                findings.push(folder_checker::check(&folder_ops, snap.committed.as_ref()));
            }
            match &snap.committed {
                Some(c) => findings.push(convergence::check(c, &snap.nodes)),
                None => findings.push(Finding {
                    checker: convergence::CHECKER.into(),
                    verdict: Verdict::Unknown,
                    summary: "the committed namespace could not be read after healing".into(),
                    details: Vec::new(),
                }),
            }
            if !snap.exited.is_empty() {
                findings.push(Finding {
                    checker: "node-exits".into(),
                    verdict: Verdict::Invalid,
                    summary: format!("{} nodes exited by themselves", snap.exited.len()),
                    details: snap
                        .exited
                        .iter()
                        .map(|(id, s)| format!("node {id}: {s} (see logs/node{id}.log)"))
                        .collect(),
                });
            }
        }
        Err(_) => findings.push(Finding {
            checker: convergence::CHECKER.into(),
            verdict: Verdict::Unknown,
            summary: "no convergence.json in the run directory".into(),
            details: Vec::new(),
        }),
    }
    let counts = report::counts(&ops, &faults);
    let title = format!("synod-lab {}", dir.display());
    let summary = report::summary(&title, &counts, &findings);
    write(&dir.join("summary.txt"), &summary)?;
    write(
        &dir.join("report.html"),
        &report::html(&title, &ops, &faults, &findings),
    )?;
    let fpath = dir.join("findings.json");
    let text = serde_json::to_string_pretty(&findings).map_err(|e| RunError::Decode {
        path: fpath.clone(),
        message: e.to_string(),
    })?;
    write(&fpath, &text)?;
    Ok(RunOutcome {
        dir: dir.to_path_buf(),
        findings,
        counts,
        summary,
    })
}

/// Ends nodes recorded in `<out>/*/pids` that are still running synod, then
/// removes the lab's namespaces, veths and bridge.
pub fn clean(out: &Path) -> Vec<String> {
    let mut done = Vec::new();
    // /proc/mounts and the recorded configs hold absolute paths.
    let out = &out.canonicalize().unwrap_or_else(|_| out.to_path_buf());
    if let Ok(dirs) = std::fs::read_dir(out) {
        for d in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(d.path().join("pids")) else {
                continue;
            };
            let config = d.path().join("cluster.toml").display().to_string();
            for line in text.lines() {
                let Some(pid) = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<i32>().ok())
                else {
                    continue;
                };
                // Only a process still running synod on this run's config.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("synod") && cmdline.contains(&config) {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                        done.push(format!("killed node process {pid}"));
                    }
                }
            }
        }
    }
    done.extend(crate::bench::clean(out));
    done.extend(cluster::unmount_under(out));
    match netns::clean() {
        Ok(r) => done.extend(r),
        Err(e) => done.push(format!("network cleanup failed: {e}")),
    }
    done
}

/// A campaign: many runs with consecutive seeds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CampaignTotals {
    pub runs: usize,
    pub operations: usize,
    pub faults: usize,
    pub invalid_runs: usize,
    pub unknown_runs: usize,
    pub errors: usize,
}

/// Runs `plans` one after another; a run that fails to start counts as an
/// error (and fails the campaign) rather than aborting the rest.
pub fn campaign(plans: &[RunOptions]) -> (CampaignTotals, Vec<String>) {
    let mut t = CampaignTotals::default();
    let mut lines = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let kinds: Vec<String> = p.nemeses.iter().map(|k| k.to_string()).collect();
        let head = format!(
            "run {}/{} seed {} nodes {} nemesis {} ({}s)",
            i + 1,
            plans.len(),
            p.seed,
            p.nodes,
            if kinds.is_empty() {
                "none".into()
            } else {
                kinds.join(",")
            },
            p.time_limit.as_secs()
        );
        t.runs += 1;
        match run(p) {
            Ok(o) => {
                t.operations += o.counts.ok + o.counts.fail + o.counts.info;
                t.faults += o.counts.faults;
                match o.verdict() {
                    Verdict::Invalid => t.invalid_runs += 1,
                    Verdict::Unknown => t.unknown_runs += 1,
                    Verdict::Valid => {}
                }
                lines.push(format!("{head}: {:?} — {}", o.verdict(), o.dir.display()));
                println!("{}", o.summary);
            }
            Err(e) => {
                t.errors += 1;
                lines.push(format!("{head}: ERROR {}", chain(&e)));
                println!("{head}: ERROR {}", chain(&e));
            }
        }
    }
    (t, lines)
}

/// The smoke campaign: short runs that together use every nemesis the
/// network mode allows, both workloads, and files up to 2 MiB. Each run's
/// seed is the first from `base.seed + 1000 * i` whose schedule fits all of
/// the run's faults in its time limit, so coverage does not depend on luck.
pub fn smoke_plans(base: &RunOptions) -> Vec<RunOptions> {
    use NemesisKind::*;
    use WorkloadKind::{Files, Folder, Register};
    let n = base.nodes;
    // Ring and bridge shapes come once more with 5 nodes, where every
    // ring link is two-way and the bridge joins two real halves.
    let sets: Vec<(Vec<NemesisKind>, Vec<WorkloadKind>, u64)> = match base.net {
        NetMode::Netns => vec![
            (vec![Partition, Kill, ClockJump], vec![Register, Files], n),
            (vec![Pause, Loss, PartitionRing], vec![Register, Files], n),
            (vec![Bandwidth, PartitionBridge, Delay], vec![Register], n),
            (vec![DiskFull, Kill], vec![Register], n),
            (vec![Partition, Kill, Corrupt], vec![Folder, Register], n),
            (
                vec![PartitionRing, PartitionBridge, Delay],
                vec![Register, Files],
                n.max(5),
            ),
        ],
        NetMode::Loopback => vec![
            (vec![Kill, Delay], vec![Register, Files], n),
            (vec![Pause, ClockJump, PartitionRing], vec![Register], n),
            (
                vec![Partition, Corrupt, PartitionBridge],
                vec![Folder, Register],
                n,
            ),
        ],
    };
    let time_limit = Duration::from_secs(30);
    sets.into_iter()
        .enumerate()
        .map(|(i, (nemeses, workloads, nodes))| {
            let first = base.seed + 1000 * i as u64;
            let seed = (first..first + 1000)
                .find(|s| {
                    let steps = nemesis::schedule(*s, &nemeses, time_limit);
                    nemeses.iter().all(|k| steps.iter().any(|st| st.kind == *k))
                })
                .unwrap_or(first);
            RunOptions {
                nodes,
                nemeses,
                workloads,
                seed,
                time_limit,
                file_size_max: base.file_size_max.min(2 << 20),
                schedule: None,
                ..base.clone()
            }
        })
        .collect()
}

/// The self-test: synod with a deliberately unsafe lab hook (reads served
/// from local state, no read index) under a fault that makes stale state
/// visible (one node cut off from the others: nftables in netns mode, the
/// `drop_peers` hook in loopback mode), which the linearizability checker
/// must catch. A fixed schedule: the fault from 4 s to 14 s of a 20 s run.
pub fn selftest_plan(base: &RunOptions, attempt: u64) -> RunOptions {
    let kind = NemesisKind::Partition;
    let seed = base.seed + attempt;
    RunOptions {
        nodes: 3,
        clients: base.clients.max(5),
        nemeses: Vec::new(),
        workloads: vec![WorkloadKind::Register],
        time_limit: Duration::from_secs(20),
        seed,
        schedule: Some(vec![Step {
            at: Duration::from_secs(4),
            kind,
            duration: Duration::from_secs(10),
            choice: seed,
        }]),
        hooks_env: Some("stale-reads".into()),
        // Cas only: the stale read is then the one anomaly to find, not
        // masked by blind writes that may share a version.
        blind_writes: false,
        ..base.clone()
    }
}

/// Whether the linearizability checker caught a stale read: an invalid
/// path whose counterexample ends in a read (not some other anomaly, such
/// as two writes sharing a version, which a sound node may also show).
pub fn caught_unsafe(findings: &[Finding]) -> bool {
    findings.iter().any(|f| {
        f.verdict == Verdict::Invalid
            && f.checker == linearizable::CHECKER
            && f.details
                .iter()
                .any(|d| d.starts_with("cannot linearize:") && d.contains(" read -> "))
    })
}

/// Runs [`selftest_plan`] up to `attempts` times, stopping at the first run
/// the checkers find invalid. Returns whether one did, and a line per run.
pub fn selftest(base: &RunOptions, attempts: u64) -> (bool, Vec<String>) {
    let mut lines = Vec::new();
    for attempt in 0..attempts.max(1) {
        let plan = selftest_plan(base, attempt);
        let head = format!(
            "selftest {}/{} seed {} (stale reads + {})",
            attempt + 1,
            attempts.max(1),
            plan.seed,
            plan.all_nemeses()
                .first()
                .map(|k| k.to_string())
                .unwrap_or_default()
        );
        match run(&plan) {
            Ok(o) => {
                println!("{}", o.summary);
                let caught = caught_unsafe(&o.findings);
                let what: Vec<String> = o
                    .findings
                    .iter()
                    .filter(|f| f.verdict == Verdict::Invalid)
                    .map(|f| f.checker.clone())
                    .collect();
                lines.push(format!(
                    "{head}: {} — invalid: [{}] — {}",
                    if caught { "CAUGHT" } else { "not caught" },
                    what.join(", "),
                    o.dir.display()
                ));
                if caught {
                    return (true, lines);
                }
            }
            Err(e) => lines.push(format!("{head}: ERROR {}", chain(&e))),
        }
    }
    (false, lines)
}

/// Plans of a long campaign: seeds `seed..seed+runs`, every run with the
/// given nemeses (or, if none were given, a rotating pair).
pub fn campaign_plans(base: &RunOptions, runs: usize) -> Vec<RunOptions> {
    let allowed: Vec<NemesisKind> = NemesisKind::ALL
        .into_iter()
        .filter(|k| base.net == NetMode::Netns || !k.needs_netns())
        .collect();
    (0..runs)
        .map(|i| {
            let nemeses = if base.nemeses.is_empty() && !allowed.is_empty() {
                vec![allowed[i % allowed.len()], allowed[(i + 1) % allowed.len()]]
            } else {
                base.nemeses.clone()
            };
            RunOptions {
                nemeses,
                seed: base.seed + i as u64,
                ..base.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(net: NetMode) -> RunOptions {
        RunOptions {
            nodes: 3,
            clients: 4,
            nemeses: Vec::new(),
            time_limit: Duration::from_secs(30),
            seed: 7,
            net,
            synod: PathBuf::from("synod"),
            out: PathBuf::from("/nonexistent"),
            workloads: vec![WorkloadKind::Register],
            file_clients: 2,
            file_size_max: 8 << 20,
            schedule: None,
            hooks_env: None,
            blind_writes: true,
        }
    }

    #[test]
    fn smoke_campaign_covers_every_nemesis() {
        let plans = smoke_plans(&base(NetMode::Netns));
        let mut seen: Vec<NemesisKind> = plans.iter().flat_map(|p| p.nemeses.clone()).collect();
        seen.sort();
        seen.dedup();
        let mut all = NemesisKind::ALL.to_vec();
        all.sort();
        assert_eq!(seen, all);
        assert!(plans
            .iter()
            .any(|p| p.workloads.contains(&WorkloadKind::Files)));
        assert!(plans.iter().all(|p| p.file_size_max <= 2 << 20));
        assert!(plans.iter().any(|p| p.nodes == 5));
        // A few minutes in all.
        let total: Duration = plans.iter().map(|p| p.time_limit).sum();
        assert!(total <= Duration::from_secs(180), "{total:?}");
        assert!(plans
            .iter()
            .any(|p| p.workloads.contains(&WorkloadKind::Folder)
                && p.nemeses
                    .iter()
                    .any(|k| k.is_partition() || *k == NemesisKind::Kill)));
        // Each run's schedule really contains each of its nemeses.
        for p in &plans {
            let steps = nemesis::schedule(p.seed, &p.nemeses, p.time_limit);
            for k in &p.nemeses {
                assert!(
                    steps.iter().any(|s| s.kind == *k),
                    "seed {} lacks {k}",
                    p.seed
                );
            }
        }
    }

    #[test]
    fn loopback_smoke_uses_the_faults_loopback_allows() {
        let plans = smoke_plans(&base(NetMode::Loopback));
        let seen: Vec<NemesisKind> = plans.iter().flat_map(|p| p.nemeses.clone()).collect();
        for k in NemesisKind::ALL.into_iter().filter(|k| !k.needs_netns()) {
            assert!(seen.contains(&k), "{k} missing");
        }
        assert!(seen.iter().all(|k| !k.needs_netns()));
    }

    #[test]
    fn the_selftest_runs_an_unsafe_node_under_a_fixed_fault() {
        let p = selftest_plan(&base(NetMode::Netns), 1);
        assert_eq!(p.hooks_env.as_deref(), Some("stale-reads"));
        assert!(!p.blind_writes);
        assert_eq!(p.seed, 8);
        let steps = p.steps();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].kind, NemesisKind::Partition);
        assert!(steps[0].at + steps[0].duration + Duration::from_secs(2) <= p.time_limit);
        let lo = selftest_plan(&base(NetMode::Loopback), 0);
        assert!(lo.all_nemeses().iter().all(|k| !k.needs_netns()));
        assert_eq!(lo.steps()[0].kind, NemesisKind::Partition);
        let invalid = |checker: &str, last: &str| Finding {
            checker: checker.into(),
            verdict: Verdict::Invalid,
            summary: String::new(),
            details: vec![
                "shortest non-linearizable prefix: 9 operations".into(),
                format!("cannot linearize: p9 [1.0..1.1] Ok {last} (node Some(1))"),
            ],
        };
        assert!(caught_unsafe(&[invalid(
            "linearizable",
            "read -> Some(\"a\")@Some(3)"
        )]));
        // Only a stale read counts: not a write the model rejects, nor
        // another checker's finding.
        assert!(!caught_unsafe(&[invalid(
            "linearizable",
            "write Some(\"b\") -> @Some(4)"
        )]));
        assert!(!caught_unsafe(&[invalid(
            "convergence",
            "read -> None@None"
        )]));
    }

    #[test]
    fn loopback_campaigns_avoid_network_faults() {
        let plans = campaign_plans(&base(NetMode::Loopback), 4);
        assert!(plans
            .iter()
            .all(|p| p.nemeses.iter().all(|k| !k.needs_netns())));
        assert_eq!(plans[3].seed, 10);
    }

    #[test]
    fn check_dir_recomputes_findings_from_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = Recorder::create(&dir.path().join("history.jsonl")).expect("create");
        let ev = |kind, process, op, value: Option<&str>, version| Event {
            kind,
            process,
            op,
            path: "reg0".into(),
            to: None,
            value: value.map(str::to_string),
            version,
            node: Some(1),
            base: None,
            error: None,
            wall_ns: 0,
            mono_ns: 0,
        };
        let fin = lost_writes::FINAL_PROCESS;
        for e in [
            ev(EventType::Invoke, 1, OpKind::Write, Some("a"), None),
            ev(EventType::Ok, 1, OpKind::Write, None, Some(5)),
            ev(EventType::Invoke, fin, OpKind::Read, None, None),
            // The final read sees an older state: the acknowledged write is lost.
            ev(EventType::Ok, fin, OpKind::Read, Some("a"), Some(2)),
        ] {
            rec.record(e).expect("record");
        }
        let out = check_dir(dir.path()).expect("check");
        assert_eq!(out.verdict(), Verdict::Invalid);
        assert!(out.summary.contains("lost-writes"), "{}", out.summary);
        assert!(dir.path().join("report.html").exists());
    }
}
