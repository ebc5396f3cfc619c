//! Nemeses: faults with a start and a stop, scheduled from a seed.
//!
//! The schedule (which fault, when, for how long) depends only on the seed,
//! the enabled faults and the time limit, so a seed replays the same
//! schedule; targets chosen by role (the leader) depend on the run. Loss,
//! bandwidth and disk-full need `--net netns`; partitions use nftables
//! there and the node's test-only `drop_peers` hook in loopback mode.
//! Delay and reordering use `netem` where the kernel has it
//! ([`netns::netem_available`]), else the node's test-only delay hook;
//! clock jumps always use the node's clock-offset hook. The hooks need a
//! `synod` built with `--features lab-hooks`. Corruption flips bytes of a
//! file in a node's folder (size and mtime kept) or of a staged chunk, and
//! its stop runs `synod verify` on that node.

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
    /// Every node sees a majority, but each a different one.
    PartitionRing,
    /// Two halves joined by one node that sees both.
    PartitionBridge,
    /// Random delay per message, so messages overtake each other.
    Delay,
    /// One node's wall clock jumps forward or back.
    ClockJump,
    /// Bytes flipped in a file of one node's folder (size and mtime kept)
    /// or in a staged chunk; `synod verify` on that node at the end.
    Corrupt,
}

impl NemesisKind {
    pub const ALL: [NemesisKind; 11] = [
        NemesisKind::Partition,
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::Loss,
        NemesisKind::Bandwidth,
        NemesisKind::DiskFull,
        NemesisKind::PartitionRing,
        NemesisKind::PartitionBridge,
        NemesisKind::Delay,
        NemesisKind::ClockJump,
        NemesisKind::Corrupt,
    ];

    /// Whether the fault needs `--net netns` (packet rules, or root to
    /// mount the tmpfs of `disk-full`); loopback mode stays rootless.
    pub fn needs_netns(self) -> bool {
        matches!(
            self,
            NemesisKind::Loss | NemesisKind::Bandwidth | NemesisKind::DiskFull
        )
    }

    /// Whether the fault is a partition (cut links between nodes).
    pub fn is_partition(self) -> bool {
        matches!(
            self,
            NemesisKind::Partition | NemesisKind::PartitionRing | NemesisKind::PartitionBridge
        )
    }

    /// Whether the fault needs the node's test-only hooks (`synod` built
    /// with `--features lab-hooks`): clock jumps always, delay when the
    /// kernel has no `netem` (always so in loopback mode), partitions in
    /// loopback mode (`drop_peers`).
    pub fn needs_hooks(self, net: NetMode, netem: bool) -> bool {
        match self {
            NemesisKind::ClockJump => true,
            NemesisKind::Delay => !netem,
            k if k.is_partition() => net == NetMode::Loopback,
            _ => false,
        }
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
            NemesisKind::PartitionRing => "partition-ring",
            NemesisKind::PartitionBridge => "partition-bridge",
            NemesisKind::Delay => "delay",
            NemesisKind::ClockJump => "clock-jump",
            NemesisKind::Corrupt => "corrupt",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NemesisError {
    #[error(
        "unknown nemesis {0:?} (known: partition, partition-ring, partition-bridge, kill, pause, loss, bandwidth, delay, clock-jump, disk-full, corrupt, none)"
    )]
    Unknown(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Net(#[from] netns::NetError),
    #[error("node {node}'s clock did not jump {offset_ms}ms (it is {seen:?}ms off)")]
    ClockNotMoved {
        node: u64,
        offset_ms: i64,
        seen: Option<i64>,
    },
    #[error("cannot fill {path}")]
    Fill {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("node {node} has no file or staged chunk to corrupt")]
    NothingToCorrupt { node: u64 },
    #[error("cannot corrupt {path}")]
    Corrupt {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("`synod verify --node {node}` did not repair node {node}: {output}")]
    Verify { node: u64, output: String },
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

/// Parses `60s`, `2m`, `500ms` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 60s, 2m or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// Parses a fixed schedule, `AT KIND FOR` per fault, comma-separated:
/// `4s partition 10s, 20s kill 5s`. Windows must not overlap; targets are
/// chosen from `seed`.
pub fn parse_schedule(text: &str, seed: u64) -> Result<Vec<Step>, String> {
    let mut steps: Vec<Step> = Vec::new();
    for (i, item) in text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let words: Vec<&str> = item.split_whitespace().collect();
        let [at, kind, duration] = words[..] else {
            return Err(format!(
                "{item:?}: expected `AT KIND FOR`, e.g. `4s partition 10s`"
            ));
        };
        let step = Step {
            at: parse_duration(at)?,
            kind: kind.parse().map_err(|e: NemesisError| e.to_string())?,
            duration: parse_duration(duration)?,
            choice: seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i as u64),
        };
        if let Some(prev) = steps.last() {
            if prev.at + prev.duration >= step.at {
                return Err(format!("{item:?} starts before the previous fault ends"));
            }
        }
        steps.push(step);
    }
    Ok(steps)
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
    /// Each listed node drops what it receives from the nodes beside it.
    Grudge {
        shape: String,
        drops: Vec<(u64, Vec<u64>)>,
    },
    /// Random delay up to `max_ms` per message (plus reordering with netem).
    Delay {
        max_ms: u64,
        netem: bool,
    },
    ClockJump {
        node: u64,
        offset_ms: i64,
    },
    /// `offset` of `path` (folder-relative, or a staged chunk's file) was
    /// flipped on `node`.
    Corrupt {
        node: u64,
        path: String,
        staged: bool,
        offset: u64,
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
            Active::Grudge { shape, drops } => {
                write!(f, "{shape}:")?;
                for (i, (node, from)) in drops.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ";" };
                    write!(f, "{sep} {node} drops {from:?}")?;
                }
                Ok(())
            }
            Active::Delay { max_ms, netem } => write!(
                f,
                "delay 0..{max_ms}ms per message on every node ({})",
                if *netem {
                    "netem, with reordering"
                } else {
                    "node hook"
                }
            ),
            Active::ClockJump { node, offset_ms } => {
                write!(f, "clock of node {node} jumps {offset_ms:+}ms")
            }
            Active::Corrupt {
                node,
                path,
                staged,
                offset,
            } => write!(
                f,
                "corrupt byte {offset} of {} {path} on node {node}",
                if *staged { "staged chunk" } else { "file" }
            ),
        }
    }
}

/// The lab's wall clock, ms since the epoch.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

/// The majorities ring over `order` (Jepsen's `majorities-ring`): node `i`
/// hears itself and its ring neighbours, a majority in all, and drops the
/// rest; no two adjacent nodes hear the same majority. With 3 nodes the
/// links are one-way (each node hears the next one only).
pub fn ring_grudge(order: &[u64]) -> Vec<(u64, Vec<u64>)> {
    let n = order.len();
    let m = n / 2 + 1;
    let (before, after) = ((m - 1) / 2, m / 2);
    order
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let view: Vec<u64> = (0..=before + after)
                .map(|j| order[(i + n - before + j) % n])
                .collect();
            let mut drops: Vec<u64> = order
                .iter()
                .copied()
                .filter(|o| !view.contains(o))
                .collect();
            drops.sort_unstable();
            (*id, drops)
        })
        .filter(|(_, d)| !d.is_empty())
        .collect()
}

/// A bridge over `order` (Jepsen's `bridge`): the first (n-1)/2 nodes and
/// the last n/2 cannot hear each other; the node between them hears both.
pub fn bridge_grudge(order: &[u64]) -> Vec<(u64, Vec<u64>)> {
    let n = order.len();
    if n < 3 {
        return Vec::new();
    }
    let split = (n - 1) / 2;
    let (left, right) = (&order[..split], &order[split + 1..]);
    let sorted = |s: &[u64]| {
        let mut v = s.to_vec();
        v.sort_unstable();
        v
    };
    let mut drops: Vec<(u64, Vec<u64>)> = left
        .iter()
        .map(|id| (*id, sorted(right)))
        .chain(right.iter().map(|id| (*id, sorted(left))))
        .collect();
    drops.sort_unstable();
    drops
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
            let drops: Vec<(u64, Vec<u64>)> = a
                .iter()
                .map(|id| (*id, b.clone()))
                .chain(b.iter().map(|id| (*id, a.clone())))
                .collect();
            cut_links(cluster, &drops)?;
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
        NemesisKind::PartitionRing | NemesisKind::PartitionBridge => {
            let mut order = ids.clone();
            order.shuffle(&mut rng);
            let (shape, drops) = if step.kind == NemesisKind::PartitionRing {
                ("majority ring", ring_grudge(&order))
            } else {
                ("bridge", bridge_grudge(&order))
            };
            cut_links(cluster, &drops)?;
            Active::Grudge {
                shape: shape.to_string(),
                drops,
            }
        }
        NemesisKind::Delay => {
            let max_ms = rng.gen_range(20..=150);
            if cluster.netem {
                for id in &ids {
                    netns::netem_delay(*id, max_ms)?;
                }
            } else {
                for id in &ids {
                    cluster.set_hooks(*id, &serde_json::json!({ "delay_ms": max_ms }))?;
                }
            }
            Active::Delay {
                max_ms,
                netem: cluster.netem,
            }
        }
        NemesisKind::ClockJump => {
            let node = pick_node(&mut rng, cluster);
            let magnitude: i64 = *[30_000, 600_000, 86_400_000]
                .choose(&mut rng)
                .unwrap_or(&30_000);
            let offset_ms = if rng.gen_bool(0.5) {
                magnitude
            } else {
                -magnitude
            };
            let before = wall_ms();
            let answer =
                cluster.set_hooks(node, &serde_json::json!({ "clock_offset_ms": offset_ms }))?;
            // The node answers with its own clock: check the jump took.
            let seen = answer
                .get("now_ns")
                .and_then(|v| v.as_i64())
                .map(|ns| ns / 1_000_000 - before);
            if seen.is_none_or(|d| (d - offset_ms).abs() >= 5_000) {
                return Err(NemesisError::ClockNotMoved {
                    node,
                    offset_ms,
                    seen,
                });
            }
            Active::ClockJump { node, offset_ms }
        }
        NemesisKind::Corrupt => {
            let node = ids.choose(&mut rng).copied().unwrap_or(1);
            corrupt(cluster, node, &mut rng)?
        }
    };
    Ok(active)
}

/// Cuts links: node `a` of each `(a, from)` stops hearing `from`. In netns
/// mode by nftables input drops in `a`'s namespace; in loopback mode by the
/// `drop_peers` hook on both ends of each link (a node never sends to a
/// peer it drops), which cuts the link both ways, as one-way packet loss
/// does to a QUIC connection.
pub fn cut_links(cluster: &Cluster, drops: &[(u64, Vec<u64>)]) -> Result<(), NemesisError> {
    match cluster.net {
        NetMode::Netns => {
            for (id, from) in drops {
                netns::drop_from(*id, from)?;
            }
        }
        NetMode::Loopback => {
            for (id, peers) in symmetric_drops(drops) {
                cluster.set_hooks(id, &serde_json::json!({ "drop_peers": peers }))?;
            }
        }
    }
    Ok(())
}

/// Each node's peers to drop so that every link named in `drops` is cut
/// both ways.
pub fn symmetric_drops(drops: &[(u64, Vec<u64>)]) -> Vec<(u64, Vec<u64>)> {
    let mut out: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for (a, from) in drops {
        for b in from {
            out.entry(*a).or_default().push(*b);
            out.entry(*b).or_default().push(*a);
        }
    }
    out.into_iter()
        .map(|(id, mut peers)| {
            peers.sort_unstable();
            peers.dedup();
            (id, peers)
        })
        .collect()
}

/// Undoes [`cut_links`] on `ids`.
fn heal_links(cluster: &Cluster, ids: &[u64]) -> Result<(), NemesisError> {
    for id in ids {
        match cluster.net {
            NetMode::Netns => netns::heal(*id)?,
            NetMode::Loopback => {
                cluster.set_hooks(*id, &serde_json::json!({ "drop_peers": [] }))?;
            }
        }
    }
    Ok(())
}

/// Flips one byte of a staged chunk of `node` (when it has one, half the
/// time) or of one of its synced files under [`CORRUPTIBLE_PREFIX`],
/// keeping the file's size, inode and mtime, so that only a rehash finds it.
fn corrupt(cluster: &Cluster, node: u64, rng: &mut StdRng) -> Result<Active, NemesisError> {
    let n = cluster
        .node(node)
        .ok_or(NemesisError::NothingToCorrupt { node })?;
    let staging = n
        .folder
        .parent()
        .map(|d| d.join("state").join("staging"))
        .unwrap_or_default();
    let list = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| e.path())
                    .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let staged = list(&staging);
    let files = list(&n.folder.join(CORRUPTIBLE_PREFIX.trim_end_matches('/')));
    let (path, is_staged) = match (staged.choose(rng), files.choose(rng)) {
        (Some(s), _) if files.is_empty() || rng.gen_bool(0.5) => (s.clone(), true),
        (_, Some(f)) => (f.clone(), false),
        _ => return Err(NemesisError::NothingToCorrupt { node }),
    };
    let offset = flip_byte(&path, rng).map_err(|source| NemesisError::Corrupt {
        path: path.clone(),
        source,
    })?;
    let shown = if is_staged {
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        path.strip_prefix(&n.folder)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Ok(Active::Corrupt {
        node,
        path: shown,
        staged: is_staged,
        offset,
    })
}

/// Files the workloads never read or write, created for `corrupt` (see
/// `run::CORRUPTIBLE_SIZES`): corrupting a file a client reads through the
/// API would be judged by that workload's checker, not by the repair.
pub const CORRUPTIBLE_PREFIX: &str = "static/";

/// Inverts one byte of `path` in place and puts its mtime back; returns the
/// offset.
pub fn flip_byte(path: &std::path::Path, rng: &mut StdRng) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let meta = f.metadata()?;
    if meta.len() == 0 {
        return Err(std::io::Error::other("empty file"));
    }
    let offset = rng.gen_range(0..meta.len());
    let mut f = f;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&b)?;
    f.sync_all()?;
    let times = std::fs::FileTimes::new()
        .set_modified(meta.modified()?)
        .set_accessed(meta.accessed()?);
    f.set_times(times)?;
    Ok(offset)
}

/// Undoes `active`.
pub fn stop(active: &Active, cluster: &mut Cluster) -> Result<(), NemesisError> {
    match active {
        Active::Partition { sides } => {
            let ids: Vec<u64> = sides.0.iter().chain(&sides.1).copied().collect();
            heal_links(cluster, &ids)?;
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
        Active::Grudge { drops, .. } => {
            let ids: Vec<u64> = symmetric_drops(drops)
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            heal_links(cluster, &ids)?;
        }
        Active::Delay { netem: true, .. } => {
            for n in &cluster.nodes {
                netns::uncap_bandwidth(n.id);
            }
        }
        Active::Delay { netem: false, .. } => {
            for n in &cluster.nodes {
                cluster.set_hooks(n.id, &serde_json::json!({ "delay_ms": 0 }))?;
            }
        }
        Active::ClockJump { node, .. } => {
            cluster.set_hooks(*node, &serde_json::json!({ "clock_offset_ms": 0 }))?;
        }
        // A staged chunk is checked whenever it is read: nothing to do.
        Active::Corrupt { staged: true, .. } => {}
        Active::Corrupt { node, path, .. } => {
            let (ok, output) = cluster.verify(*node)?;
            // `synod verify` also fails when a file changes while it is
            // hashed (a workload's edit); what matters here is the path.
            if !ok && !verify_repaired(&output, path) {
                return Err(NemesisError::Verify {
                    node: *node,
                    output,
                });
            }
        }
    }
    Ok(())
}

/// Whether `synod verify`'s output says `path` was found and repaired.
pub fn verify_repaired(output: &str, path: &str) -> bool {
    output.contains(&format!(
        "{path}: content did not match its committed root; repaired"
    ))
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
        if cluster.hooks {
            // A node that is down starts with no delay and no offset anyway.
            let _ = cluster.set_hooks(
                id,
                &serde_json::json!({ "delay_ms": 0, "clock_offset_ms": 0, "drop_peers": [] }),
            );
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
        let kinds = vec![NemesisKind::Kill, NemesisKind::Loss, NemesisKind::Delay];
        let a = schedule(42, &kinds, limit);
        let mut first: Vec<NemesisKind> = a.iter().take(3).map(|s| s.kind).collect();
        first.sort();
        assert_eq!(first, kinds);
    }

    /// Node `id` hears every node of `order` it does not drop.
    fn hears(drops: &[(u64, Vec<u64>)], order: &[u64], id: u64) -> Vec<u64> {
        let none = Vec::new();
        let d = drops
            .iter()
            .find(|(n, _)| *n == id)
            .map(|(_, d)| d)
            .unwrap_or(&none);
        order.iter().copied().filter(|o| !d.contains(o)).collect()
    }

    #[test]
    fn every_node_of_a_ring_hears_its_own_majority() {
        for order in [
            vec![3, 1, 2],
            vec![5, 2, 4, 1, 3],
            vec![1, 2, 3, 4, 5, 6, 7],
        ] {
            let drops = ring_grudge(&order);
            let majority = order.len() / 2 + 1;
            let views: Vec<Vec<u64>> = order.iter().map(|id| hears(&drops, &order, *id)).collect();
            for (id, v) in order.iter().zip(&views) {
                assert_eq!(v.len(), majority, "node {id} hears {v:?}");
                assert!(v.contains(id));
            }
            // No majority is everyone's: the cluster is not simply split.
            let mut distinct = views.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), order.len(), "{views:?}");
        }
        // 5 nodes: the grudges are symmetric.
        let order = [5, 2, 4, 1, 3];
        let drops = ring_grudge(&order);
        for (a, from) in &drops {
            for b in from {
                assert!(!hears(&drops, &order, *b).contains(a), "{a} / {b}");
            }
        }
        assert!(ring_grudge(&[1, 2]).is_empty());
    }

    #[test]
    fn a_bridge_joins_two_halves_through_one_node() {
        let order = [4, 2, 5, 1, 3];
        let drops = bridge_grudge(&order);
        assert_eq!(
            drops,
            vec![
                (1, vec![2, 4]),
                (2, vec![1, 3]),
                (3, vec![2, 4]),
                (4, vec![1, 3])
            ]
        );
        assert_eq!(hears(&drops, &order, 5).len(), 5);
        assert_eq!(bridge_grudge(&[2, 3, 1]), vec![(1, vec![2]), (2, vec![1])]);
        assert!(bridge_grudge(&[1, 2]).is_empty());
    }

    #[test]
    fn only_clock_jumps_hooked_delay_and_loopback_partitions_need_the_node_hooks() {
        use NetMode::{Loopback, Netns};
        assert!(NemesisKind::ClockJump.needs_hooks(Netns, true));
        assert!(NemesisKind::Delay.needs_hooks(Netns, false));
        assert!(!NemesisKind::Delay.needs_hooks(Netns, true));
        assert!(!NemesisKind::Kill.needs_hooks(Loopback, false));
        assert!(!NemesisKind::Corrupt.needs_hooks(Loopback, false));
        for k in [
            NemesisKind::Partition,
            NemesisKind::PartitionRing,
            NemesisKind::PartitionBridge,
        ] {
            assert!(k.needs_hooks(Loopback, false) && !k.needs_hooks(Netns, false));
            assert!(!k.needs_netns());
        }
        assert!(!NemesisKind::Delay.needs_netns() && !NemesisKind::ClockJump.needs_netns());
        assert!(NemesisKind::Loss.needs_netns() && NemesisKind::DiskFull.needs_netns());
        assert!(!NemesisKind::Corrupt.needs_netns());
    }

    #[test]
    fn loopback_cuts_every_link_on_both_ends() {
        // A ring over 3 nodes: one-way drops become two-way cuts.
        let drops = ring_grudge(&[3, 1, 2]);
        let sym = symmetric_drops(&drops);
        for (a, from) in &drops {
            for b in from {
                let has = |x: u64, y: u64| sym.iter().any(|(n, p)| *n == x && p.contains(&y));
                assert!(has(*a, *b) && has(*b, *a), "{a}-{b} in {sym:?}");
            }
        }
        let halves = vec![(1, vec![2, 3]), (2, vec![1]), (3, vec![1])];
        assert_eq!(
            symmetric_drops(&halves),
            vec![(1, vec![2, 3]), (2, vec![1]), (3, vec![1])]
        );
    }

    #[test]
    fn a_repair_is_read_from_verify_output() {
        let out = "checked 3 files: 1 mismatched, 1 repaired; \
                   static/s1: content did not match its committed root; repaired; \
                   files/f4: changed while it was being chunked";
        assert!(verify_repaired(out, "static/s1"));
        assert!(!verify_repaired(out, "static/s0"));
        assert!(!verify_repaired(
            "static/s1: content did not match its committed root; NOT repaired",
            "static/s1"
        ));
    }

    #[test]
    fn a_flipped_byte_keeps_size_and_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 4096]).expect("write");
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_modified(old))
            .expect("set mtime");
        let before = std::fs::metadata(&p).expect("stat");
        let offset = flip_byte(&p, &mut StdRng::seed_from_u64(1)).expect("flip");
        let after = std::fs::metadata(&p).expect("stat");
        let bytes = std::fs::read(&p).expect("read");
        assert_eq!(bytes.len(), 4096);
        assert_eq!(bytes.iter().filter(|b| **b != 7).count(), 1);
        assert_eq!(bytes[offset as usize], !7u8);
        assert_eq!(after.modified().expect("mtime"), old);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(after.ino(), before.ino());
    }

    #[test]
    fn fixed_schedules_parse_in_order() {
        let s = parse_schedule("4s partition 10s, 20s clock-jump 2500ms", 1).expect("parse");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].kind, NemesisKind::Partition);
        assert_eq!(s[0].at, Duration::from_secs(4));
        assert_eq!(s[1].duration, Duration::from_millis(2500));
        assert_ne!(s[0].choice, s[1].choice);
        assert!(parse_schedule("4s partition", 1).is_err());
        assert!(parse_schedule("4s partition 10s, 8s kill 1s", 1).is_err());
        assert!(parse_schedule("4s netem 1s", 1).is_err());
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1h").is_err());
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
