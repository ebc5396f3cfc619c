//! Case 3, fan-out under a bandwidth limit: the dataset's large file from
//! node 1 to 4 receivers, each node in its own network namespace with its
//! link limited both ways by `tc tbf`. synod: a 5-node cluster, the file
//! dropped into node 1's folder (receivers may fetch from each other);
//! rsync: a daemon in node 1's namespace, the 4 receivers pulling from it
//! at once. The physical floor is one copy's time through one link.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::dataset::{drop_into, link_files, verify_folder, Dataset, BIG};
use super::procs::Procs;
use super::rsync::{self, Transfer};
use super::{empty_data, synod, Measurement, Plan, Unit, CASE_FANOUT};
use crate::cluster::NetMode;
use crate::netns;

pub const RSYNC_EACH: &str = "rsync, source to each";

/// One copy's time of `bytes` through a `mbit` link, payload only.
pub fn one_copy_seconds(bytes: u64, mbit: u64) -> f64 {
    bytes as f64 * 8.0 / (mbit as f64 * 1e6)
}

/// Namespaces for node 1 + receivers, every link limited.
/// Setup would remove another lab run's namespaces (the names are fixed):
/// refuse instead of breaking it.
fn refuse_if_busy() -> Result<()> {
    let list = netns::run("ip", &["netns", "list"])?;
    if list.contains(netns::NS_PREFIX) {
        anyhow::bail!(
            "another lab run holds the {}* namespaces; run case 3 when it is done (or `synod-lab clean`)",
            netns::NS_PREFIX
        );
    }
    Ok(())
}

fn setup_net(plan: &Plan) -> Result<u64> {
    let n = 1 + plan.fanout_receivers;
    netns::setup(n)?;
    for id in 1..=n {
        netns::limit_link(id, &format!("{}mbit", plan.link_mbit))?;
    }
    Ok(n)
}

/// Removes the namespaces even when the case failed.
struct NetGuard;

impl Drop for NetGuard {
    fn drop(&mut self) {
        let _ = netns::clean();
    }
}

/// One run of case 3 for both tools, under `run_dir`.
pub fn run_once(
    run_dir: &Path,
    synod_bin: &Path,
    plan: &Plan,
    data: &Dataset,
    out: &mut Vec<Measurement>,
) -> Result<()> {
    // The case moves the dataset's large file.
    let expected: BTreeMap<String, _> = data
        .files
        .iter()
        .filter(|(p, _)| p.as_str() == BIG)
        .map(|(p, v)| (p.clone(), *v))
        .collect();
    let wire_mbit = plan.link_mbit;
    for tool in [synod::NAME, RSYNC_EACH] {
        let dir = run_dir.join(format!("fanout-{}", tool.split(',').next().unwrap_or(tool)));
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        eprintln!(
            "{}: case 3, {tool}, {} receivers at {wire_mbit} Mbit/s",
            run_dir.display(),
            plan.fanout_receivers
        );
        let result = (|| {
            refuse_if_busy()?;
            let _net = NetGuard;
            let n = setup_net(plan)?;
            if tool == synod::NAME {
                synod_fanout(&dir, synod_bin, plan, data, &expected, n)
            } else {
                rsync_fanout(&dir, plan, data, &expected, n)
            }
        })();
        empty_data(&dir);
        let time = result.with_context(|| format!("case 3 with {tool}"))?;
        Measurement::record(
            out,
            CASE_FANOUT,
            tool,
            "wall time",
            Unit::Seconds,
            time.as_secs_f64(),
        );
    }
    Ok(())
}

fn synod_fanout(
    dir: &Path,
    synod_bin: &Path,
    plan: &Plan,
    data: &Dataset,
    expected: &BTreeMap<String, (u64, blake3::Hash)>,
    n: u64,
) -> Result<Duration> {
    let mut cluster = synod::start(dir, n, NetMode::Netns, synod_bin)?;
    let stage = dir.join("stage");
    link_files(&data.root, &stage, expected.keys())?;
    let receivers: Vec<u64> = (2..=n).collect();
    let t0 = Instant::now();
    drop_into(&stage, &dir.join("node1/folder"))?;
    synod::wait_replicated(
        &mut cluster,
        expected,
        &Default::default(),
        &[],
        &receivers,
        plan.sync_limit(),
    )?;
    let time = t0.elapsed();
    for id in &receivers {
        verify_folder(&dir.join(format!("node{id}/folder")), expected)?;
    }
    cluster.stop();
    Ok(time)
}

fn rsync_fanout(
    dir: &Path,
    plan: &Plan,
    data: &Dataset,
    expected: &BTreeMap<String, (u64, blake3::Hash)>,
    n: u64,
) -> Result<Duration> {
    let mut procs = Procs::new(dir);
    let source = dir.join("source");
    link_files(&data.root, &source, expected.keys())?;
    let ns = |id: u64| -> Vec<String> {
        ["ip", "netns", "exec", &netns::namespace(id)]
            .map(String::from)
            .to_vec()
    };
    let daemon = rsync::start_daemon(
        &mut procs,
        dir,
        "rsyncd-node1",
        &ns(1),
        &netns::node_addr(1).to_string(),
        873,
        &source,
    )?;
    let transfers: Vec<Transfer> = (2..=n)
        .map(|id| Transfer {
            wrap: ns(id),
            from: daemon.url.clone(),
            to: format!("{}/", dir.join(format!("node{id}")).display()),
            extra: vec!["--fsync".into()],
            log: dir.join(format!("logs/rsync-node{id}.log")),
        })
        .collect();
    let (time, _) = rsync::run_parallel(&transfers, plan.sync_limit())?;
    for id in 2..=n {
        verify_folder(&dir.join(format!("node{id}")), expected)?;
    }
    procs.stop();
    Ok(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_of_512_mib_at_200_mbit() {
        let s = one_copy_seconds(512 << 20, 200);
        assert!((s - 21.47).abs() < 0.01, "{s}");
    }
}
