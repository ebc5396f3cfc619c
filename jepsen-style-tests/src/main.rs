//! `synod-lab`: run failure-injection tests against real `synod` nodes,
//! re-check recorded runs, clean up, run campaigns.
//!
//! Exit status: 0 valid, 1 a checker found the run invalid, 2 a checker
//! could not decide (unknown), 3 the lab itself failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use synod_lab::bench;
use synod_lab::checker::Verdict;
use synod_lab::cluster::NetMode;
use synod_lab::nemesis;
use synod_lab::nemesis::parse_duration;
use synod_lab::run::{self, RunOptions};
use synod_lab::workload;

#[derive(Debug, Parser)]
#[command(name = "synod-lab", about = "Failure-injection lab for synod", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a cluster, run a workload under faults, check, report.
    Run(RunArgs),
    /// Re-check a recorded run directory.
    Check {
        /// The run directory (holds history.jsonl).
        dir: PathBuf,
    },
    /// Remove namespaces, links and node processes left by killed runs
    /// (and the processes of killed benchmarks).
    Clean {
        /// Parent of the run directories.
        #[arg(long, default_value = "target/synod-lab")]
        out: PathBuf,
    },
    /// Many runs with consecutive seeds; `--smoke` for the short CI set.
    Campaign {
        #[command(flatten)]
        run: RunArgs,
        /// Number of runs (ignored with --smoke).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// A few short runs that use every nemesis at least once.
        #[arg(long)]
        smoke: bool,
    },
    /// Shows the checkers catch a real bug: runs synod with a deliberately
    /// unsafe test-only option (stale local reads, no read index) under a
    /// partition and succeeds only if a checker reports the run invalid.
    /// Needs `cargo build -p synod-node --features lab-hooks`.
    Selftest {
        #[command(flatten)]
        run: RunArgs,
        /// Runs (consecutive seeds) before giving up; the first invalid one
        /// ends the test.
        #[arg(long, default_value_t = 3)]
        attempts: u64,
    },
    /// synod side by side with rsync, Syncthing and etcd: initial
    /// replication, delta re-sync, fan-out under a bandwidth limit, metadata
    /// commits. Prints a Markdown table; writes bench.json in the run
    /// directory. Needs rsync, syncthing and etcd installed, and root for
    /// the fan-out case (network namespaces).
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Small data and one run of each case (CI; about 2–3 minutes).
    #[arg(long)]
    quick: bool,
    /// Runs of each case (full mode).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    runs: u64,
    /// Comma-separated cases: 1 initial replication, 2 delta re-sync (1 and
    /// 2 run together), 3 fan-out, 4 metadata commits.
    #[arg(long, default_value = "1,2,3,4")]
    cases: String,
    /// Seeds the dataset and the edit set.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The synod binary (default: beside this binary, then $PATH).
    #[arg(long, env = "SYNOD_BIN")]
    synod: Option<PathBuf>,
    /// Parent of the run directory.
    #[arg(long, default_value = "target/synod-lab")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Net {
    Netns,
    Loopback,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Cluster size.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Comma-separated workloads: register, files.
    #[arg(long, default_value = "register")]
    workload: String,
    /// Comma-separated faults: partition, partition-ring, partition-bridge,
    /// kill, pause, loss, bandwidth, delay, clock-jump, disk-full, none.
    /// Default for `run`: all that the network mode allows; for `campaign`:
    /// a rotating pair. `delay` (without netem) and `clock-jump` need a
    /// synod built with `--features lab-hooks`.
    #[arg(long)]
    nemesis: Option<String>,
    /// A fixed fault schedule instead of the seeded one:
    /// `AT KIND FOR, ...`, e.g. `4s partition 10s, 20s kill 5s`.
    #[arg(long)]
    schedule: Option<String>,
    /// How long the workload runs: `60s`, `2m`, `500ms`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    time_limit: Duration,
    /// Seeds the fault schedule and the clients' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value = "netns")]
    net: Net,
    /// Concurrent clients of the register workload.
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// Concurrent clients of the files workload.
    #[arg(long, default_value_t = 3)]
    file_clients: usize,
    /// Largest file of the files workload: `2MiB`, `32MiB`, `512KiB`.
    #[arg(long, default_value = "2MiB", value_parser = parse_size)]
    file_size_max: usize,
    /// Register writes always carry a precondition (cas only).
    #[arg(long)]
    cas_only: bool,
    /// LAB ONLY, test-only node hooks for every node (`SYNOD_LAB_HOOKS`,
    /// e.g. `stale-reads` or `delay-ms=50`); needs a lab-hooks build.
    #[arg(long)]
    node_hooks: Option<String>,
    /// The synod binary (default: beside this binary, then $PATH).
    #[arg(long, env = "SYNOD_BIN")]
    synod: Option<PathBuf>,
    /// Parent of the run directories.
    #[arg(long, default_value = "target/synod-lab")]
    out: PathBuf,
}

/// `2MiB`, `512KiB`, `1GiB` or a byte count.
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 2MiB"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return Err(format!("{s:?}: unit must be KiB, MiB or GiB")),
    };
    Ok(n * mult)
}

/// `synod` beside this executable (the workspace's target dir), else PATH.
fn find_synod(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.exists() {
            bail!("--synod {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    // Test binaries live one level deeper, in target/<profile>/deps.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("synod");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("synod");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("no synod binary found; build it with `cargo build -p synod-node` or pass --synod PATH")
}

/// The synod binary and the output directory (created), both absolute.
fn synod_and_out(synod: Option<&Path>, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let synod = find_synod(synod)?;
    let synod = synod
        .canonicalize()
        .with_context(|| format!("resolving {}", synod.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    Ok((synod, out))
}

fn options(a: &RunArgs, default_all: bool) -> Result<RunOptions> {
    let net = match a.net {
        Net::Netns => NetMode::Netns,
        Net::Loopback => NetMode::Loopback,
    };
    let nemeses = match &a.nemesis {
        Some(list) => nemesis::parse_list(list).context("reading --nemesis")?,
        None if default_all => nemesis::NemesisKind::ALL
            .into_iter()
            .filter(|k| net == NetMode::Netns || !k.needs_netns())
            .collect(),
        None => Vec::new(),
    };
    let workloads = workload::parse_workloads(&a.workload)
        .map_err(anyhow::Error::msg)
        .context("reading --workload")?;
    let schedule = a
        .schedule
        .as_deref()
        .map(|t| nemesis::parse_schedule(t, a.seed))
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("reading --schedule")?;
    let (synod, out) = synod_and_out(a.synod.as_deref(), &a.out)?;
    Ok(RunOptions {
        nodes: a.nodes,
        clients: a.clients,
        nemeses,
        time_limit: a.time_limit,
        seed: a.seed,
        net,
        synod,
        out,
        workloads,
        file_clients: a.file_clients,
        file_size_max: a.file_size_max,
        schedule,
        hooks_env: a.node_hooks.clone(),
        blind_writes: !a.cas_only,
    })
}

fn bench_options(a: &BenchArgs) -> Result<bench::BenchOptions> {
    let plan = if a.quick {
        bench::Plan::quick(a.seed)
    } else {
        bench::Plan::full(usize::try_from(a.runs).unwrap_or(1), a.seed)
    };
    let cases = bench::Cases::parse(&a.cases)
        .map_err(anyhow::Error::msg)
        .context("reading --cases")?;
    let (synod, out) = synod_and_out(a.synod.as_deref(), &a.out)?;
    Ok(bench::BenchOptions {
        plan,
        cases,
        synod,
        out,
    })
}

fn exit_for(v: Verdict) -> ExitCode {
    match v {
        Verdict::Valid => ExitCode::SUCCESS,
        Verdict::Invalid => ExitCode::from(1),
        Verdict::Unknown => ExitCode::from(2),
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => {
            let opts = options(&a, true)?;
            let out = run::run(&opts).with_context(|| {
                format!(
                    "run with seed {} failed; `synod-lab clean` removes what it left",
                    opts.seed
                )
            })?;
            println!("{}", out.summary);
            println!("report: {}", out.dir.join("report.html").display());
            Ok(exit_for(out.verdict()))
        }
        Cmd::Check { dir } => {
            let out =
                run::check_dir(&dir).with_context(|| format!("checking {}", dir.display()))?;
            println!("{}", out.summary);
            Ok(exit_for(out.verdict()))
        }
        Cmd::Clean { out } => {
            for line in run::clean(&out) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Selftest { run: a, attempts } => {
            let base = options(&a, false)?;
            let (caught, lines) = run::selftest(&base, attempts);
            println!("selftest:");
            for l in &lines {
                println!("  {l}");
            }
            if caught {
                println!("  the checkers caught the unsafe node: PASS");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("  no checker caught the unsafe node in {attempts} runs: FAIL");
                Ok(ExitCode::from(1))
            }
        }
        Cmd::Bench(a) => {
            let opts = bench_options(&a)?;
            if std::env::var_os("SYNOD_LAB_LOG").is_none() {
                // Before any thread starts: the nodes log warnings only.
                std::env::set_var("SYNOD_LAB_LOG", "warn");
            }
            let out = bench::run(&opts)
                .context("the benchmark failed; `synod-lab clean` removes what it left")?;
            println!("{}", out.table);
            println!(
                "bench.json: {} ({:.0} s)",
                out.dir.join("bench.json").display(),
                out.elapsed.as_secs_f64()
            );
            if out.errors > 0 {
                eprintln!(
                    "synod-lab: {} benchmark case(s) failed (ERROR lines above)",
                    out.errors
                );
                return Ok(ExitCode::from(3));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Campaign {
            run: a,
            runs,
            smoke,
        } => {
            let base = options(&a, false)?;
            let plans = if smoke {
                run::smoke_plans(&base)
            } else {
                run::campaign_plans(&base, runs)
            };
            let (t, lines) = run::campaign(&plans);
            println!("campaign:");
            for l in &lines {
                println!("  {l}");
            }
            println!(
                "  runs {}, operations {}, faults injected {}, invalid runs {}, unknown runs {}, errors {}",
                t.runs, t.operations, t.faults, t.invalid_runs, t.unknown_runs, t.errors
            );
            Ok(if t.invalid_runs > 0 {
                ExitCode::from(1)
            } else if t.errors > 0 {
                ExitCode::from(3)
            } else if t.unknown_runs > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("synod-lab: {e:#}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("1h").is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("2MB").is_err());
    }
}
