//! synod under the benchmark: the lab's [`Cluster`] with synod's default
//! timeouts (a 1 s rescan behind the watcher), files dropped into node 1's
//! folder, and "done" meaning node 1 has committed exactly the expected
//! files and every receiver's materialized watermark has passed that
//! commit (a receiver verifies every chunk and every file's root before
//! it renames the file into place). Bytes on the wire are the receivers'
//! own counters (`/v1/status` `wire.bytes_in`: every peer protocol at the
//! framing layer, QUIC/TLS overhead not included).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::dataset::Expected;
use crate::api::Api;
use crate::cluster::{config_text_with, Cluster, NetMode};

/// The tool's name in the report.
pub const NAME: &str = "synod";

/// Timeouts of the benchmark's clusters: synod's defaults, but a short
/// rescan behind the watcher (as the lab uses).
const TIMEOUTS: &str = "rescan_ms = 1000\n";

/// Starts an `n`-node cluster under `dir`.
pub fn start(dir: &Path, n: u64, net: NetMode, synod: &Path) -> Result<Cluster> {
    let text = config_text_with(n, net, TIMEOUTS);
    Cluster::start_with_config(dir, n, net, synod, false, None, &text)
        .with_context(|| format!("starting a {n}-node synod cluster in {}", dir.display()))
}

/// A 3-node cluster on loopback.
pub fn start_loopback(dir: &Path, synod: &Path) -> Result<Cluster> {
    start(dir, 3, NetMode::Loopback, synod)
}

fn api(cluster: &Cluster, id: u64) -> Result<Api> {
    let n = cluster.node(id).with_context(|| format!("no node {id}"))?;
    Ok(Api::new(&n.api, Duration::from_secs(30)))
}

/// Bytes node `id` has received from peers.
pub fn wire_in(cluster: &Cluster, id: u64) -> Result<u64> {
    let s = api(cluster, id)?.status()?;
    s["wire"]["bytes_in"]
        .as_u64()
        .context("no wire.bytes_in in /v1/status")
}

/// Datagrams node `id`'s kernel dropped at its QUIC socket for want of
/// receive-buffer room, since it started.
pub fn udp_drops(cluster: &Cluster, id: u64) -> Result<u64> {
    let s = api(cluster, id)?.status()?;
    s["wire"]["udp_drops"]
        .as_u64()
        .context("no wire.udp_drops in /v1/status")
}

/// Committed files of node 1: path → (size, version).
pub fn committed(cluster: &Cluster) -> Result<BTreeMap<String, (u64, u64)>> {
    Ok(api(cluster, 1)?
        .list("")?
        .into_iter()
        .filter(|e| e.kind == "file" || e.kind.is_empty())
        .map(|e| (e.path, (e.size, e.version)))
        .collect())
}

/// Waits until node 1 has committed exactly `expected` (every path in
/// `changed` at a version newer than in `before`), then until every node
/// of `receivers` has materialized up to that commit.
pub fn wait_replicated(
    cluster: &mut Cluster,
    expected: &Expected,
    before: &BTreeMap<String, (u64, u64)>,
    changed: &[String],
    receivers: &[u64],
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        check_running(cluster)?;
        let now = committed(cluster)?;
        let same_set = now.len() == expected.len()
            && expected
                .iter()
                .all(|(p, (size, _))| now.get(p).is_some_and(|(s, _)| s == size));
        let all_new = changed.iter().all(|p| {
            let old = before.get(p).map(|(_, v)| *v).unwrap_or(0);
            now.get(p).is_some_and(|(_, v)| *v > old)
        });
        if same_set && all_new {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "node 1 did not commit the dropped files within {limit:?} ({} of {} committed)",
                now.len(),
                expected.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_materialized(cluster, receivers, deadline)
}

/// Waits until every node of `nodes` has materialized everything node 1
/// has applied now; fails at `deadline`.
pub fn wait_materialized(cluster: &mut Cluster, nodes: &[u64], deadline: Instant) -> Result<()> {
    let target = api(cluster, 1)?.status()?["applied"]
        .as_u64()
        .context("no applied index in /v1/status")?;
    for &id in nodes {
        let a = api(cluster, id)?;
        loop {
            let w = a.status()?["watermark"].as_u64().unwrap_or(0);
            if w >= target {
                break;
            }
            check_running(cluster)?;
            if Instant::now() >= deadline {
                bail!("node {id} did not materialize up to {target} in time (at {w})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

fn check_running(cluster: &mut Cluster) -> Result<()> {
    if let Some((id, status)) = cluster.exited().first() {
        bail!(
            "synod node {id} exited during the benchmark ({status}); see {}",
            cluster.dir.join("logs").display()
        );
    }
    Ok(())
}
