//! `cluster.toml`: read into a raw serde struct, then validated into a typed
//! [`ClusterConfig`] that cannot hold an invalid value.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors that name the file, the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The file as written: every field documented, defaults as functions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Name of the cluster; a data directory of another cluster is refused.
    cluster: String,
    /// Folder kept in sync, per node; `{id}` is replaced by the node id.
    #[serde(default = "default_folder")]
    folder: String,
    /// Where a node keeps its identity, Raft log and index; `{id}` as above.
    #[serde(default = "default_data_dir")]
    data_dir: String,
    #[serde(default)]
    chunking: RawChunking,
    #[serde(default)]
    replication: RawReplication,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default, rename = "node")]
    nodes: Vec<RawNode>,
}

fn default_folder() -> String {
    "./data/node{id}/folder".into()
}
fn default_data_dir() -> String {
    "./data/node{id}/state".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChunking {
    /// FastCDC minimum chunk size in bytes.
    #[serde(default = "default_min")]
    min: u32,
    /// FastCDC average chunk size in bytes (a power of two).
    #[serde(default = "default_avg")]
    avg: u32,
    /// FastCDC maximum chunk size in bytes.
    #[serde(default = "default_max")]
    max: u32,
}

fn default_min() -> u32 {
    16 * 1024
}
fn default_avg() -> u32 {
    64 * 1024
}
fn default_max() -> u32 {
    256 * 1024
}

impl Default for RawChunking {
    fn default() -> Self {
        RawChunking {
            min: default_min(),
            avg: default_avg(),
            max: default_max(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    /// Voters that must hold a file's content fsynced before a write is
    /// acknowledged. Absent: a majority of voters.
    copies: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    /// Raft heartbeat interval (also the AppendEntries RPC timeout).
    #[serde(default = "default_heartbeat")]
    heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    #[serde(default = "default_election_min")]
    election_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    #[serde(default = "default_election_max")]
    election_max_ms: u64,
    /// How long a write may wait for content replication and commit before
    /// it is answered 503.
    #[serde(default = "default_write")]
    write_ms: u64,
    /// Interval of the folder rescan that backs up the filesystem watcher.
    #[serde(default = "default_rescan")]
    rescan_ms: u64,
}

fn default_heartbeat() -> u64 {
    250
}
fn default_election_min() -> u64 {
    1000
}
fn default_election_max() -> u64 {
    2000
}
fn default_write() -> u64 {
    10_000
}
fn default_rescan() -> u64 {
    60_000
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            heartbeat_ms: default_heartbeat(),
            election_min_ms: default_election_min(),
            election_max_ms: default_election_max(),
            rescan_ms: default_rescan(),
            write_ms: default_write(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    /// Largest body `PUT /v1/files/{path}` accepts, in bytes.
    #[serde(default = "default_max_upload")]
    max_upload_bytes: u64,
    /// Most bytes of pushed, not yet materialized chunks a node keeps.
    #[serde(default = "default_max_staging")]
    max_staging_bytes: u64,
}

fn default_max_upload() -> u64 {
    64 << 30
}

fn default_max_staging() -> u64 {
    16 << 30
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_upload_bytes: default_max_upload(),
            max_staging_bytes: default_max_staging(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    /// Node id, unique, ≥ 1.
    id: u64,
    /// UDP address the node's QUIC transport listens on.
    address: String,
    /// TCP address of the node's HTTP API and status page.
    api: String,
    /// libp2p peer id, printed by `synod init`. May be left out when every
    /// node runs on this machine: it is then read from the node's data dir.
    peer_id: Option<String>,
    /// Overrides the cluster-wide `folder` for this node.
    folder: Option<String>,
    /// Overrides the cluster-wide `data_dir` for this node.
    data_dir: Option<String>,
}

/// A validated cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub source: PathBuf,
    pub cluster: String,
    pub chunking: Chunking,
    /// Copies required before a write is acknowledged.
    pub replication: u32,
    pub timeouts: Timeouts,
    pub max_upload_bytes: u64,
    pub max_staging_bytes: u64,
    pub nodes: BTreeMap<u64, NodeConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub write: Duration,
    pub rescan: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: u64,
    pub address: SocketAddr,
    pub api: SocketAddr,
    pub peer_id: Option<String>,
    pub folder: PathBuf,
    pub data_dir: PathBuf,
}

impl ClusterConfig {
    /// Reads and validates `path`. Relative folders are resolved against the
    /// directory holding the file, so `synod up` works from anywhere.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ClusterConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        raw.validate(path)
    }

    pub fn node(&self, id: u64) -> Option<&NodeConfig> {
        self.nodes.get(&id)
    }

    /// Voters needed for a majority.
    pub fn majority(&self) -> u32 {
        self.nodes.len() as u32 / 2 + 1
    }
}

impl RawConfig {
    fn validate(self, path: &Path) -> Result<ClusterConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.cluster.is_empty()
            || !self
                .cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "cluster",
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-' and '_'",
                    self.cluster
                ),
            ));
        }
        let c = &self.chunking;
        synod_chunker::ChunkParams::new(c.min, c.avg, c.max)
            .map_err(|e| invalid("chunking", e.to_string()))?;
        let t = &self.timeouts;
        if t.heartbeat_ms == 0 {
            return Err(invalid("timeouts.heartbeat_ms", "must be > 0".into()));
        }
        if t.election_min_ms <= t.heartbeat_ms * 2 {
            return Err(invalid(
                "timeouts.election_min_ms",
                format!(
                    "{} must exceed twice heartbeat_ms ({}), or every heartbeat delay starts an election",
                    t.election_min_ms, t.heartbeat_ms
                ),
            ));
        }
        if t.election_max_ms <= t.election_min_ms {
            return Err(invalid(
                "timeouts.election_max_ms",
                format!(
                    "{} must be greater than election_min_ms ({})",
                    t.election_max_ms, t.election_min_ms
                ),
            ));
        }
        if t.write_ms == 0 {
            return Err(invalid("timeouts.write_ms", "must be > 0".into()));
        }
        if self.nodes.is_empty() {
            return Err(invalid(
                "node",
                "no [[node]] entries: a cluster needs at least one node".into(),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |template: &str, id: u64| -> PathBuf {
            let p = PathBuf::from(template.replace("{id}", &id.to_string()));
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };
        let mut nodes = BTreeMap::new();
        let mut addresses = HashSet::new();
        let mut folders = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let key = |field: &str| format!("node[{i}].{field}");
            if n.id == 0 {
                return Err(invalid(&key("id"), "node ids start at 1".into()));
            }
            if nodes.contains_key(&n.id) {
                return Err(invalid(&key("id"), format!("duplicate node id {}", n.id)));
            }
            let address: SocketAddr = n.address.parse().map_err(|e| {
                invalid(
                    &key("address"),
                    format!("{:?} is not an ip:port address ({e})", n.address),
                )
            })?;
            let api: SocketAddr = n.api.parse().map_err(|e| {
                invalid(
                    &key("api"),
                    format!("{:?} is not an ip:port address ({e})", n.api),
                )
            })?;
            for (field, addr) in [("address", address), ("api", api)] {
                if addr.port() == 0 {
                    return Err(invalid(&key(field), "port 0 is not allowed".into()));
                }
                // QUIC is UDP and the API is TCP, but one port for both reads as a mistake.
                if !addresses.insert(addr) {
                    return Err(invalid(
                        &key(field),
                        format!("{addr} is already used by another node or endpoint"),
                    ));
                }
            }
            if let Some(peer) = &n.peer_id {
                if peer.parse::<synod_transport::PeerId>().is_err() {
                    return Err(invalid(
                        &key("peer_id"),
                        format!("{peer:?} is not a libp2p peer id (run `synod init` to print it)"),
                    ));
                }
            }
            let folder = resolve(n.folder.as_deref().unwrap_or(&self.folder), n.id);
            let data_dir = resolve(n.data_dir.as_deref().unwrap_or(&self.data_dir), n.id);
            if !folders.insert(folder.clone()) {
                return Err(invalid(
                    &key("folder"),
                    format!("{} is already another node's folder", folder.display()),
                ));
            }
            if data_dir.starts_with(&folder) {
                return Err(invalid(
                    &key("data_dir"),
                    format!(
                        "{} lies inside the synced folder {}",
                        data_dir.display(),
                        folder.display()
                    ),
                ));
            }
            nodes.insert(
                n.id,
                NodeConfig {
                    id: n.id,
                    address,
                    api,
                    peer_id: n.peer_id.clone(),
                    folder,
                    data_dir,
                },
            );
        }
        let voters = nodes.len() as u32;
        let replication = match self.replication.copies {
            None => voters / 2 + 1,
            Some(0) => return Err(invalid("replication.copies", "must be ≥ 1".into())),
            Some(n) if n > voters => {
                return Err(invalid(
                    "replication.copies",
                    format!("{n} copies asked but the cluster has {voters} nodes"),
                ))
            }
            Some(n) => n,
        };
        Ok(ClusterConfig {
            source: path.to_owned(),
            cluster: self.cluster,
            chunking: Chunking {
                min: c.min,
                avg: c.avg,
                max: c.max,
            },
            replication,
            timeouts: Timeouts {
                heartbeat: Duration::from_millis(t.heartbeat_ms),
                election_min: Duration::from_millis(t.election_min_ms),
                election_max: Duration::from_millis(t.election_max_ms),
                write: Duration::from_millis(t.write_ms),
                rescan: Duration::from_millis(t.rescan_ms.max(100)),
            },
            max_upload_bytes: self.limits.max_upload_bytes,
            max_staging_bytes: self.limits.max_staging_bytes,
            nodes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../cluster.toml");

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(text, Path::new("/etc/synod/cluster.toml"))
    }

    fn must_fail(text: &str) -> String {
        parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    const MINIMAL: &str = r#"
cluster = "t"
[[node]]
id = 1
address = "127.0.0.1:7101"
api = "127.0.0.1:7201"
"#;

    #[test]
    fn the_example_file_is_valid() {
        let cfg = parse(EXAMPLE).unwrap();
        assert_eq!(cfg.nodes.len(), 3);
        assert_eq!(cfg.replication, 2);
        assert_eq!(
            cfg.node(2).unwrap().folder,
            PathBuf::from("/etc/synod/./data/node2/folder")
        );
    }

    #[test]
    fn defaults_fill_the_gaps() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(
            cfg.chunking,
            Chunking {
                min: 16384,
                avg: 65536,
                max: 262144
            }
        );
        assert_eq!(cfg.replication, 1);
        assert_eq!(cfg.timeouts.heartbeat, Duration::from_millis(250));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = must_fail(&format!("{MINIMAL}\nbogus = 1\n"));
        assert!(err.contains("/etc/synod/cluster.toml"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                MINIMAL.replace("127.0.0.1:7101", "nowhere"),
                "node[0].address",
            ),
            (MINIMAL.replace("id = 1", "id = 0"), "node[0].id"),
            (format!("{MINIMAL}\n[chunking]\nmin = 3\n"), "chunking"),
            (
                format!("{MINIMAL}\n[replication]\ncopies = 2\n"),
                "replication.copies",
            ),
            (
                format!("{MINIMAL}\n[timeouts]\nheartbeat_ms = 600\n"),
                "timeouts.election_min_ms",
            ),
            (
                MINIMAL.replace("cluster = \"t\"", "cluster = \"a b\""),
                "`cluster`",
            ),
            (
                MINIMAL.replace("api = ", "peer_id = \"nope\"\napi = "),
                "node[0].peer_id",
            ),
            ("cluster = \"t\"\n".to_string(), "`node`"),
        ];
        for (text, key) in cases {
            let err = must_fail(&text);
            assert!(err.contains(key), "expected {key} in: {err}");
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let two = format!("{MINIMAL}{}", MINIMAL.replace("cluster = \"t\"", ""));
        assert!(must_fail(&two).contains("duplicate node id 1"));
        let same_port = format!(
            "{MINIMAL}{}",
            MINIMAL
                .replace("cluster = \"t\"", "")
                .replace("id = 1", "id = 2")
                .replace("7201", "7202")
        );
        assert!(must_fail(&same_port).contains("already used"));
    }

    #[test]
    fn missing_key_is_named() {
        let err = must_fail("cluster = \"t\"\n[[node]]\nid = 1\napi = \"127.0.0.1:1\"\n");
        assert!(err.contains("address"), "{err}");
    }
}
