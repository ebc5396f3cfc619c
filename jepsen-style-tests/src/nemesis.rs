//! Nemeses: faults with a start and a stop, scheduled from a seed.
//!
//! The schedule (which fault, when, for how long) depends only on the seed,
//! the enabled faults and the time limit, so a seed replays the same
//! schedule; targets chosen by role (the leader) depend on the run. Network
//! faults need `--net netns`. Delay and reordering would need `netem`,
//! which this machine's kernel lacks, or a node-side test hook that synod
//! does not have yet: [`netns::netem_available`] reports which.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::cluster::{Cluster, ClusterError, NetMode};
use crate::netns;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NemesisKind {
    Partition,
    Kill,
    Pause,
    Loss,
    Bandwidth,
    /// Fill one node's folder filesystem (a small tmpfs) until ENOSPC.
    DiskFull,
}

impl NemesisKind {
    pub const ALL: [NemesisKind; 6] = [
        NemesisKind::Partition,
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::Loss,
        NemesisKind::Bandwidth,
        NemesisKind::DiskFull,
    ];

    /// Whether the fault needs `--net netns` (network rules, or root to
    /// mount the tmpfs of `disk-full`); loopback mode stays rootless.
    pub fn needs_netns(self) -> bool {
        matches!(
            self,
            NemesisKind::Partition
                | NemesisKind::Loss
                | NemesisKind::Bandwidth
                | NemesisKind::DiskFull
        )
    }
}

impl fmt::Display for NemesisKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NemesisKind::Partition => "partition",
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::Loss => "loss",
            NemesisKind::Bandwidth => "bandwidth",
            NemesisKind::DiskFull => "disk-full",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NemesisError {
    #[error(
        "unknown nemesis {0:?} (known: partition, kill, pause, loss, bandwidth, disk-full, none)"
    )]
    Unknown(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Net(#[from] netns::NetError),
    #[error("cannot fill {path}")]
    Fill {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl FromStr for NemesisKind {
    type Err = NemesisError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NemesisKind::ALL
            .into_iter()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| NemesisError::Unknown(s.to_string()))
    }
}

/// Parses `partition,kill,...` ("none" or "" = no faults).
pub fn parse_list(s: &str) -> Result<Vec<NemesisKind>, NemesisError> {
    let mut out = Vec::new();
    for part in s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "none")
    {
        let k: NemesisKind = part.parse()?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// One scheduled fault window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub at: Duration,
    pub kind: NemesisKind,
    pub duration: Duration,
    /// Seeds the choice of targets, so the step is repeatable.
    pub choice: u64,
}

/// Alternates quiet periods and faults until `limit` (every fault ends at
/// least 2 s before it); each enabled kind comes once, in a seeded order,
/// before any repeats.
pub fn schedule(seed: u64, kinds: &[NemesisKind], limit: Duration) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    if kinds.is_empty() {
        return steps;
    }
    let mut order: Vec<NemesisKind> = kinds.to_vec();
    order.shuffle(&mut rng);
    let mut t = Duration::from_millis(rng.gen_range(1500..3000));
    let mut i = 0usize;
    loop {
        let duration = Duration::from_millis(rng.gen_range(3000..7000));
        if t + duration + Duration::from_secs(2) > limit {
            break;
        }
        let kind = if i < order.len() {
            order[i]
        } else {
            kinds[rng.gen_range(0..kinds.len())]
        };
        steps.push(Step {
            at: t,
            kind,
            duration,
            choice: rng.gen(),
        });
        i += 1;
        t += duration + Duration::from_millis(rng.gen_range(2000..4000));
    }
    steps
}

/// A fault in force, with what is needed to undo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Active {
    Partition {
        sides: (Vec<u64>, Vec<u64>),
    },
    Kill {
        node: u64,
    },
    Pause {
        node: u64,
    },
    Loss {
        percent: u8,
    },
    Bandwidth {
        rate: String,
    },
    DiskFull {
        node: u64,
        filler: std::path::PathBuf,
    },
}

impl fmt::Display for Active {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Active::Partition { sides } => write!(f, "partition {:?} | {:?}", sides.0, sides.1),
            Active::Kill { node } => write!(f, "kill -9 node {node}"),
            Active::Pause { node } => write!(f, "pause node {node}"),
            Active::Loss { percent } => write!(f, "loss {percent}% on every node"),
            Active::Bandwidth { rate } => write!(f, "bandwidth {rate} on every node"),
            Active::DiskFull { node, .. } => write!(f, "disk full on node {node}"),
        }
    }
}

/// Picks a node: the leader half the time (if known), else any.
fn pick_node(rng: &mut StdRng, cluster: &Cluster) -> u64 {
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    if rng.gen_bool(0.5) {
        if let Some(l) = cluster.leader() {
            return l;
        }
    }
    ids.choose(rng).copied().unwrap_or(1)
}

/// Starts the fault of `step`.
pub fn start(step: &Step, cluster: &mut Cluster) -> Result<Active, NemesisError> {
    let mut rng = StdRng::seed_from_u64(step.choice);
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let active = match step.kind {
        NemesisKind::Partition => {
            let isolated_leader = if rng.gen_bool(0.5) {
                cluster.leader()
            } else {
                None
            };
            let (a, b) = match isolated_leader {
                Some(l) => (vec![l], ids.iter().copied().filter(|i| *i != l).collect()),
                None => {
                    let mut shuffled = ids.clone();
                    shuffled.shuffle(&mut rng);
                    let minority = shuffled.len() / 2;
                    let (x, y) = shuffled.split_at(minority);
                    let (mut x, mut y) = (x.to_vec(), y.to_vec());
                    x.sort_unstable();
                    y.sort_unstable();
                    (x, y)
                }
            };
            for id in &a {
                netns::drop_from(*id, &b)?;
            }
            for id in &b {
                netns::drop_from(*id, &a)?;
            }
            Active::Partition { sides: (a, b) }
        }
        NemesisKind::Kill => {
            let node = pick_node(&mut rng, cluster);
            cluster.crash(node)?;
            Active::Kill { node }
        }
        NemesisKind::Pause => {
            let node = pick_node(&mut rng, cluster);
            cluster.pause(node)?;
            Active::Pause { node }
        }
        NemesisKind::Loss => {
            let percent = rng.gen_range(10..40);
            for id in &ids {
                netns::random_loss(*id, percent)?;
            }
            Active::Loss { percent }
        }
        NemesisKind::Bandwidth => {
            let rate = "512kbit".to_string();
            for id in &ids {
                netns::cap_bandwidth(*id, &rate)?;
            }
            Active::Bandwidth { rate }
        }
        NemesisKind::DiskFull => {
            let node = pick_node(&mut rng, cluster);
            let folder = cluster
                .node(node)
                .map(|n| n.folder.clone())
                .unwrap_or_default();
            // Under `.synod/`, which synod never syncs, so the filler is not
            // a user edit; the tmpfs bounds how much is written.
            let filler = folder.join(".synod").join("lab-filler");
            fill_until_full(&filler)?;
            Active::DiskFull { node, filler }
        }
    };
    Ok(active)
}

/// Undoes `active`.
pub fn stop(active: &Active, cluster: &mut Cluster) -> Result<(), NemesisError> {
    match active {
        Active::Partition { sides } => {
            for id in sides.0.iter().chain(&sides.1) {
                netns::heal(*id)?;
            }
        }
        Active::Kill { node } => cluster.spawn(*node)?,
        Active::Pause { node } => cluster.resume(*node)?,
        Active::Loss { .. } => {
            for n in &cluster.nodes {
                netns::heal(n.id)?;
            }
        }
        Active::Bandwidth { .. } => {
            for n in &cluster.nodes {
                netns::uncap_bandwidth(n.id);
            }
        }
        Active::DiskFull { filler, .. } => {
            std::fs::remove_file(filler).map_err(|source| NemesisError::Fill {
                path: filler.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Writes zeros to `path` until the filesystem is full (ENOSPC ends it).
fn fill_until_full(path: &std::path::Path) -> Result<(), NemesisError> {
    use std::io::Write;
    let err = |source| NemesisError::Fill {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::File::create(path).map_err(err)?;
    let block = vec![0u8; 1 << 20];
    // Bounded: the folder's tmpfs is FOLDER_TMPFS_MIB; 4096 MiB is a guard
    // in case the folder is not a tmpfs after all.
    for _ in 0..4096 {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => return Ok(()),
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// Belt and braces at the end of a run: every filter and qdisc removed,
/// every node resumed and running.
pub fn heal_all(cluster: &mut Cluster) -> Result<(), NemesisError> {
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    for id in ids {
        if cluster.net == NetMode::Netns {
            netns::heal(id)?;
            netns::uncap_bandwidth(id);
        }
        if let Some(n) = cluster.node(id) {
            let _ = std::fs::remove_file(n.folder.join(".synod").join("lab-filler"));
        }
        let (running, paused) = cluster
            .node(id)
            .map(|n| (n.is_running(), n.is_paused()))
            .unwrap_or((true, false));
        if paused {
            cluster.resume(id)?;
        }
        if !running {
            cluster.spawn(id)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_repeatable_and_bounded() {
        let kinds = NemesisKind::ALL.to_vec();
        let limit = Duration::from_secs(60);
        let a = schedule(42, &kinds, limit);
        assert_eq!(a, schedule(42, &kinds, limit));
        assert_ne!(a, schedule(43, &kinds, limit));
        assert!(a
            .iter()
            .all(|s| s.at + s.duration + Duration::from_secs(2) <= limit));
        // Windows never overlap.
        assert!(a.windows(2).all(|w| w[0].at + w[0].duration < w[1].at));
        // Every kind appears once before repeats.
        let mut first: Vec<NemesisKind> = a.iter().take(6).map(|s| s.kind).collect();
        first.sort();
        assert_eq!(first, kinds);
    }

    #[test]
    fn nemesis_lists_parse() {
        assert_eq!(
            parse_list("partition,kill,kill").expect("parse"),
            vec![NemesisKind::Partition, NemesisKind::Kill]
        );
        assert!(parse_list("none").expect("parse").is_empty());
        assert!(parse_list("netem").is_err());
    }
}
