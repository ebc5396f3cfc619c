//! `synod`: run a node, a local cluster, or talk to a running node.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use synod_node::client::{Client, ClientError};
use synod_node::config::ClusterConfig;

// Fewer page faults than glibc for the transport's per-request frame
// buffers and faster small allocations for sled (see README, transport).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "synod",
    version,
    about = "Keeps one folder identical on every node of a cluster, with Raft-committed metadata.",
    after_help = "Examples:
  synod up                         start the demo cluster of ./cluster.toml
  synod put ./report.pdf docs/report.pdf
  synod ls docs/
  synod cat docs/report.pdf > copy.pdf
  synod status --node 2

Exit codes: 0 ok, 1 error, 2 usage, 3 precondition conflict, 4 not found, 5 no quorum."
)]
struct Cli {
    /// The cluster configuration.
    #[arg(
        long,
        short,
        global = true,
        default_value = "cluster.toml",
        env = "SYNOD_CONFIG"
    )]
    config: PathBuf,
    /// Log format of `run` and `up`.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a node's data directory and identity; print its peer id.
    Init {
        #[arg(long)]
        node: u64,
    },
    /// Run one node in the foreground.
    Run {
        #[arg(long)]
        node: u64,
        /// Override the node's folder.
        #[arg(long)]
        folder: Option<PathBuf>,
        /// Override the node's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Start every node of the configuration on this machine; Ctrl-C stops them.
    Up,
    /// Measure replication on a fresh 3-node loopback cluster (ignores --config).
    #[command(after_help = "Example (about 1 GiB; build with --release):
  cargo run --release --bin synod -- bench
  synod bench --big-mib 64 --small-files 200   a quick run")]
    Bench {
        /// Size of the large file in MiB.
        #[arg(long, default_value_t = 512)]
        big_mib: u64,
        /// Number of small files (1-256 KiB each).
        #[arg(long, default_value_t = 2000)]
        small_files: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Concurrent uploads to node 1.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Directory for the cluster and dataset (kept); default a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Measure folder-sync scale instead: this many small files dropped
        /// into node 1's folder (initial scan, rescan, memory).
        #[arg(long)]
        scan_files: Option<usize>,
    },
    /// Cluster membership: list, add a learner, promote, remove.
    #[command(after_help = "Examples:
  synod cluster members
  synod cluster add-learner 4 10.0.0.4:7004 12D3KooW...   (peer id printed by `synod init` on node 4)
  synod cluster promote 4
  synod cluster remove 2")]
    Cluster {
        #[command(subcommand)]
        action: ClusterCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Rehash a node's files against their committed roots and repair
    /// mismatches from peers; with --cluster, compare every node's
    /// namespace root.
    Verify {
        /// Compare the namespace roots of every configured node instead.
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show a node's status.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// List files under a prefix.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        target: Target,
    },
    /// Write a file's content to standard output.
    Cat {
        path: String,
        #[command(flatten)]
        target: Target,
    },
    /// Upload a local file to a path of the cluster.
    Put {
        local: PathBuf,
        path: String,
        /// Only if the path's current version is this (0: only if absent).
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a path.
    Rm {
        path: String,
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Rename a path.
    Mv {
        from: String,
        to: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Members with their role and address.
    Members,
    /// Add a node that receives all content but does not vote.
    AddLearner {
        id: u64,
        /// Its QUIC address, host:port (UDP).
        addr: String,
        /// Its peer id (`synod init` prints it).
        peer_id: String,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a member (voter or learner); it stops being served.
    Remove { id: u64 },
}

/// Which node a client command talks to.
#[derive(Debug, clap::Args)]
struct Target {
    /// Node id from the configuration (default: the first node).
    #[arg(long)]
    node: Option<u64>,
    /// API address, overriding the configuration (host:port or URL).
    #[arg(long, env = "SYNOD_API")]
    api: Option<String>,
}

impl Target {
    /// A client of the current leader, found through the target node.
    fn leader_client(&self, config: &std::path::Path) -> Result<Client> {
        let client = self.client(config)?;
        let s = client.status()?;
        let leader = s["leader"]
            .as_u64()
            .context("the cluster has no leader right now; try again shortly")?;
        if s["node"].as_u64() == Some(leader) {
            return Ok(client);
        }
        let cfg = ClusterConfig::load(config)
            .with_context(|| format!("the leader is node {leader}; its API address is needed"))?;
        let n = cfg.node(leader).with_context(|| {
            format!(
                "the leader is node {leader}, which is not in {}; use --api",
                config.display()
            )
        })?;
        Ok(Client::new(&n.api.to_string()))
    }

    fn client(&self, config: &std::path::Path) -> Result<Client> {
        if let Some(api) = &self.api {
            return Ok(Client::new(api));
        }
        let cfg = ClusterConfig::load(config)
            .context("no --api given, so the configuration is needed")?;
        let node = match self.node {
            Some(id) => cfg
                .node(id)
                .with_context(|| format!("node {id} is not in {}", config.display()))?,
            None => cfg.nodes.values().next().context("no nodes configured")?,
        };
        Ok(Client::new(&node.api.to_string()))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("synod: {err:#}");
            let code = err
                .chain()
                .find_map(|e| e.downcast_ref::<ClientError>())
                .and_then(ClientError::status)
                .map_or(1, |s| match s {
                    409 => 3,
                    404 => 4,
                    503 => 5,
                    _ => 1,
                });
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Init { node } => {
            let cfg = ClusterConfig::load(&cli.config)?;
            let n = cfg
                .node(node)
                .with_context(|| format!("node {node} is not in {}", cli.config.display()))?;
            let peer = synod_node::daemon::init_identity(&n.data_dir)?;
            println!("{peer}");
            Ok(())
        }
        Cmd::Run {
            node,
            folder,
            data_dir,
        } => {
            // On a terminal, the first scan of the folder is a bar; log
            // lines are written around it.
            let bars =
                synod_node::progress::stderr_is_terminal().then(indicatif::MultiProgress::new);
            synod_node::logging::init_with_bars(
                matches!(cli.log_format, LogFormat::Json),
                bars.clone(),
            );
            let mut cfg = ClusterConfig::load(&cli.config)?;
            let n = cfg
                .nodes
                .get_mut(&node)
                .with_context(|| format!("node {node} is not in {}", cli.config.display()))?;
            if let Some(f) = folder {
                n.folder = f;
            }
            if let Some(d) = data_dir {
                n.data_dir = d;
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(async move {
                let daemon = synod_node::daemon::Daemon::start(cfg, node).await?;
                if let Some(mp) = bars {
                    synod_node::progress::spawn_initial_scan_bar(mp, daemon.node.metrics.clone());
                }
                daemon.run_until_signal().await
            })
        }
        Cmd::Up => {
            synod_node::logging::init(matches!(cli.log_format, LogFormat::Json));
            synod_node::up::up(&cli.config)
        }
        Cmd::Bench {
            big_mib,
            small_files,
            seed,
            clients,
            dir,
            scan_files,
        } => synod_node::bench::bench(&synod_node::bench::BenchOptions {
            big_mib,
            small_files,
            seed,
            dir,
            clients,
            scan_files,
        }),
        Cmd::Cluster { action, target } => match action {
            ClusterCmd::Members => {
                let c = target.client(&cli.config)?.get_json("/v1/cluster")?;
                println!("leader: {}  term: {}", c["leader"], c["term"]);
                for m in c["members"].as_array().into_iter().flatten() {
                    let role = if m["voter"] == true {
                        "voter"
                    } else {
                        "learner"
                    };
                    println!(
                        "  node {:<4} {:<8} {}  {}",
                        m["id"],
                        role,
                        m["addr"].as_str().unwrap_or("?"),
                        m["peer_id"].as_str().unwrap_or("?")
                    );
                }
                Ok(())
            }
            ClusterCmd::AddLearner { id, addr, peer_id } => {
                target.leader_client(&cli.config)?.post_json(
                    "/v1/cluster/learners",
                    serde_json::json!({ "id": id, "addr": addr, "peer_id": peer_id }),
                )?;
                println!("node {id} added as a learner; it now receives all content");
                Ok(())
            }
            ClusterCmd::Promote { id } => {
                target
                    .leader_client(&cli.config)?
                    .post_json("/v1/cluster/promote", serde_json::json!({ "id": id }))?;
                println!("node {id} is now a voter");
                Ok(())
            }
            ClusterCmd::Remove { id } => {
                target
                    .leader_client(&cli.config)?
                    .post_json("/v1/cluster/remove", serde_json::json!({ "id": id }))?;
                println!("node {id} removed");
                Ok(())
            }
        },
        Cmd::Verify { cluster: true, .. } => verify_cluster(&cli.config),
        Cmd::Verify {
            cluster: false,
            target,
        } => verify_node(&target.client(&cli.config)?),
        Cmd::Status { target } => {
            let s = target.client(&cli.config)?.status()?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Cmd::Ls { prefix, target } => {
            let list = target.client(&cli.config)?.list(&prefix)?;
            for e in list["entries"].as_array().into_iter().flatten() {
                println!(
                    "{:>12}  v{:<8} {}",
                    e["size"],
                    e["version"],
                    e["path"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        Cmd::Cat { path, target } => {
            let client = target.client(&cli.config)?;
            let stdout = std::io::stdout();
            client.cat(&path, &mut stdout.lock())?;
            Ok(())
        }
        Cmd::Put {
            local,
            path,
            if_version,
            target,
        } => {
            let r = put_with_progress(&target.client(&cli.config)?, &local, &path, if_version)
                .with_context(|| format!("uploading {} as {path}", local.display()))?;
            println!("{path}: version {}", r["version"]);
            Ok(())
        }
        Cmd::Rm {
            path,
            if_version,
            target,
        } => {
            let r = target.client(&cli.config)?.delete(&path, if_version)?;
            println!("{path}: deleted at version {}", r["version"]);
            Ok(())
        }
        Cmd::Mv { from, to, target } => {
            let r = target.client(&cli.config)?.rename(&from, &to)?;
            println!("{from} -> {to}: version {}", r["version"]);
            Ok(())
        }
    }
}

/// Uploads `local`; on a terminal, a bar of the bytes sent, then a
/// "committing" spinner until the node answers.
fn put_with_progress(
    client: &Client,
    local: &std::path::Path,
    path: &str,
    if_version: Option<u64>,
) -> Result<serde_json::Value> {
    let file =
        std::fs::File::open(local).with_context(|| format!("opening {}", local.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = synod_node::progress::UploadBar::new(len, synod_node::progress::stderr_is_terminal());
    let counted = {
        let bar = bar.clone();
        synod_node::progress::CountingReader::new(file, move |total, end| bar.on_read(total, end))
    };
    let answer = client.put(path, counted, if_version);
    bar.finish();
    Ok(answer?)
}

/// Starts a verification on the node and follows it to the end.
fn verify_node(client: &Client) -> Result<()> {
    use std::io::IsTerminal;
    client.post_json("/v1/verify", serde_json::json!({}))?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "verify [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    let report = loop {
        let r = client.get_json("/v1/verify")?;
        if let Some(b) = &bar {
            b.set_length(r["bytes_total"].as_u64().unwrap_or(0));
            b.set_position(r["bytes_done"].as_u64().unwrap_or(0));
        }
        if r["running"] != true {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let list = |k: &str| -> Vec<String> {
        report[k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap_or("?").to_string())
            .collect()
    };
    let (mismatched, repaired) = (list("mismatched"), list("repaired"));
    println!(
        "checked {} files ({:.1} MiB): {} mismatched, {} repaired, {} skipped (edited, not yet committed)",
        report["files_done"],
        report["bytes_done"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        mismatched.len(),
        repaired.len(),
        report["skipped_edited"]
    );
    for p in &mismatched {
        let fixed = if repaired.contains(p) {
            "repaired"
        } else {
            "NOT repaired"
        };
        println!("  {p}: content did not match its committed root; {fixed}");
    }
    let failed = report["failed"].as_array().cloned().unwrap_or_default();
    for f in &failed {
        println!(
            "  {}: {}",
            f[0].as_str().unwrap_or("?"),
            f[1].as_str().unwrap_or("?")
        );
    }
    if mismatched.len() > repaired.len() || !failed.is_empty() {
        anyhow::bail!("verification found problems it could not repair");
    }
    Ok(())
}

/// Asks every configured node for its namespace root; at the same applied
/// index all roots must be equal.
fn verify_cluster(config: &std::path::Path) -> Result<()> {
    let cfg = ClusterConfig::load(config)?;
    for attempt in 0..20 {
        let mut seen = Vec::new();
        for n in cfg.nodes.values() {
            match Client::new(&n.api.to_string()).status() {
                Ok(s) => seen.push((
                    n.id,
                    s["applied"].as_u64().unwrap_or(0),
                    s["namespace_root"].as_str().unwrap_or("?").to_string(),
                )),
                Err(e) => println!("  node {}: unreachable ({e})", n.id),
            }
        }
        let same_index = seen.windows(2).all(|w| w[0].1 == w[1].1);
        if !same_index && attempt < 19 {
            std::thread::sleep(std::time::Duration::from_millis(250));
            continue;
        }
        for (id, applied, root) in &seen {
            println!("  node {id}: applied {applied}, namespace root {root}");
        }
        if !same_index {
            anyhow::bail!(
                "the nodes did not reach the same applied index; writes are still arriving"
            );
        }
        if seen.windows(2).all(|w| w[0].2 == w[1].2) {
            println!("{} nodes agree on the namespace", seen.len());
            return Ok(());
        }
        anyhow::bail!("namespace roots differ at the same applied index");
    }
    unreachable!("the loop returns on its last attempt")
}
