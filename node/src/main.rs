//! `synod`: run a node, a local cluster, or talk to a running node.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use synod_node::client::{Client, ClientError};
use synod_node::config::ClusterConfig;

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
            synod_node::logging::init(matches!(cli.log_format, LogFormat::Json));
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
            rt.block_on(synod_node::daemon::run_until_signal(cfg, node))
        }
        Cmd::Up => {
            synod_node::logging::init(matches!(cli.log_format, LogFormat::Json));
            synod_node::up::up(&cli.config)
        }
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
            let r = target
                .client(&cli.config)?
                .put_file(&local, &path, if_version)
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
