//! `synod up`: every node of `cluster.toml` as a child process of this one.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::Client;
use crate::config::ClusterConfig;
use crate::daemon;

pub fn up(config_path: &Path) -> Result<()> {
    let cfg = ClusterConfig::load(config_path)?;
    let exe = std::env::current_exe().context("locating the synod binary")?;
    // Identities first: a node learns its local peers' ids from their data dirs.
    for n in cfg.nodes.values() {
        daemon::init_identity(&n.data_dir)
            .with_context(|| format!("initializing node {}", n.id))?;
    }
    let mut children: Vec<(u64, Child)> = Vec::new();
    for n in cfg.nodes.values() {
        let child = Command::new(&exe)
            .arg("--config")
            .arg(config_path)
            .args(["run", "--node", &n.id.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting node {}", n.id));
        match child {
            Ok(c) => children.push((n.id, c)),
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        }
    }
    let first = cfg.nodes.values().next().context("no nodes configured")?;
    if let Err(e) = initialize(&Client::new(&first.api.to_string()), &mut children) {
        stop(&mut children);
        return Err(e);
    }
    println!("synod cluster {:?} is up:", cfg.cluster);
    for n in cfg.nodes.values() {
        println!(
            "  node {}: folder {}  status page http://{}/",
            n.id,
            n.folder.display(),
            n.api
        );
    }
    println!(
        "Try: synod put <file> hello.txt   then look in each folder.  Ctrl-C stops the cluster."
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal handler")?;
    let exited = rt.block_on(async {
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return None,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    for (id, c) in children.iter_mut() {
                        if let Ok(Some(status)) = c.try_wait() {
                            return Some((*id, status));
                        }
                    }
                }
            }
        }
    });
    stop(&mut children);
    match exited {
        Some((id, status)) => bail!("node {id} exited ({status}); the cluster was stopped"),
        None => {
            println!("cluster stopped");
            Ok(())
        }
    }
}

/// Asks the first node to initialize the cluster, waiting for it to listen.
fn initialize(client: &Client, children: &mut [(u64, Child)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (id, c) in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("node {id} exited during start-up ({status})");
            }
        }
        match client.post_json("/v1/cluster/init", serde_json::json!({})) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the cluster did not initialize within 60 s")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// SIGTERM to every child, then SIGKILL to any still running after 10 s.
pub(crate) fn stop(children: &mut [(u64, Child)]) {
    for (_, c) in children.iter() {
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (id, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    tracing::warn!(node = *id, "node did not stop in time; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
}
