//! A cluster of real `synod` processes on loopback, for integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use synod_node::bench::{free_loopback_port, Proto};
use synod_node::client::{Client, ClientError};

/// How long any convergence may take before a test gives up (a liveness
/// bound, not a speed check).
pub const SETTLE: Duration = Duration::from_secs(90);

#[derive(Debug)]
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub apis: Vec<String>,
    /// The configuration each node runs with.
    node_configs: Vec<PathBuf>,
    children: Vec<Option<Child>>,
}

fn free_udp_port() -> u16 {
    free_loopback_port(Proto::Udp).unwrap()
}

fn free_tcp_port() -> u16 {
    free_loopback_port(Proto::Tcp).unwrap()
}

impl TestCluster {
    /// Writes a config for `n` nodes and starts them all, initialized.
    pub fn start(n: usize) -> TestCluster {
        Self::start_with(n, "")
    }

    pub fn start_with(n: usize, extra: &str) -> TestCluster {
        Self::start_inner(n, "", extra)
    }

    /// `timeouts`: extra lines of the `[timeouts]` table.
    pub fn start_with_timeouts(n: usize, timeouts: &str) -> TestCluster {
        Self::start_inner(n, timeouts, "")
    }

    fn start_inner(n: usize, timeouts: &str, extra: &str) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "cluster = \"test\"\nfolder = \"./node{{id}}/folder\"\ndata_dir = \"./node{{id}}/state\"\n\
             [timeouts]\nheartbeat_ms = 200\nelection_min_ms = 1000\nelection_max_ms = 2000\nwrite_ms = 15000\n{timeouts}\n\
             [limits]\nmax_upload_bytes = 100000000\n{extra}\n"
        );
        let mut apis = Vec::new();
        for id in 1..=n {
            let api = format!("127.0.0.1:{}", free_tcp_port());
            text.push_str(&format!(
                "[[node]]\nid = {id}\naddress = \"127.0.0.1:{}\"\napi = \"{api}\"\n",
                free_udp_port()
            ));
            apis.push(api);
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text).unwrap();
        for id in 1..=n {
            init_node(&config, id);
        }
        let mut c = TestCluster {
            dir,
            node_configs: vec![config.clone(); n],
            config,
            apis,
            children: (0..n).map(|_| None).collect(),
        };
        for id in 1..=n {
            c.start_node(id);
        }
        c.must_retry("cluster init", || {
            c.client(1)
                .post_json("/v1/cluster/init", serde_json::json!({}))
        });
        c.must_retry("leader election", || {
            let s = c.client(1).status()?;
            if s["leader"].is_u64() && s["voters"].as_array().map_or(0, |v| v.len()) == n {
                Ok(())
            } else {
                Err(ClientError::Io {
                    url: "status".into(),
                    message: "no leader yet".into(),
                })
            }
        });
        c
    }

    pub fn start_node(&mut self, id: usize) {
        let log = std::fs::File::create(self.dir.path().join(format!("node{id}.log"))).unwrap();
        // Run from the configuration's directory and name it relatively, as
        // a user does: the folder paths it resolves are then relative too.
        let config = &self.node_configs[id - 1];
        let child = Command::new(env!("CARGO_BIN_EXE_synod"))
            .current_dir(config.parent().unwrap())
            .arg("--config")
            .arg(config.file_name().unwrap())
            .args(["run", "--node", &id.to_string()])
            .env(
                "RUST_LOG",
                "info,synod_node=debug,openraft=warn,libp2p=warn",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[id - 1] = Some(child);
    }

    /// Starts one more node that is not a member: its own configuration
    /// lists every node, the others' does not list it. Returns its id and
    /// peer id.
    pub fn start_extra_node(&mut self) -> (usize, String, String) {
        let id = self.apis.len() + 1;
        let api = format!("127.0.0.1:{}", free_tcp_port());
        let quic = format!("127.0.0.1:{}", free_udp_port());
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(&format!(
            "[[node]]\nid = {id}\naddress = \"{quic}\"\napi = \"{api}\"\n"
        ));
        let config = self.dir.path().join(format!("cluster-{id}.toml"));
        std::fs::write(&config, text).unwrap();
        let peer = init_node(&config, id);
        self.apis.push(api);
        self.node_configs.push(config);
        self.children.push(None);
        self.start_node(id);
        (id, quic, peer)
    }

    /// Runs the `synod` CLI against this cluster's configuration.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_synod"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill_node(&mut self, id: usize) {
        if let Some(mut c) = self.children[id - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id of node `id`, if it runs.
    pub fn pid(&self, id: usize) -> Option<u32> {
        self.children[id - 1].as_ref().map(Child::id)
    }

    /// The data directory of node `id`.
    pub fn data_dir(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node{id}/state"))
    }

    pub fn client(&self, id: usize) -> Client {
        Client::new(&self.apis[id - 1])
    }

    pub fn folder(&self, id: usize) -> PathBuf {
        self.dir.path().join(format!("node{id}/folder"))
    }

    pub fn log(&self, id: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }

    pub fn leader(&self) -> usize {
        for id in 1..=self.apis.len() {
            if self.children[id - 1].is_none() {
                continue;
            }
            if let Ok(s) = self.client(id).status() {
                if let Some(l) = s["leader"].as_u64() {
                    if s["role"] == "leader" || l as usize != id {
                        return l as usize;
                    }
                }
            }
        }
        panic!("no node knows a leader");
    }

    pub fn metrics(&self, id: usize) -> Value {
        self.client(id).status().unwrap()["metrics"].clone()
    }

    /// Retries `f` until it succeeds or [`SETTLE`] passes.
    pub fn must_retry<T>(&self, what: &str, mut f: impl FnMut() -> Result<T, ClientError>) -> T {
        let deadline = Instant::now() + SETTLE;
        loop {
            match f() {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => {
                    self.dump_logs();
                    panic!("{what}: gave up after {SETTLE:?}: {e}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Waits until `path` in node `id`'s folder holds exactly `content`.
    pub fn must_see_file(&self, id: usize, path: &str, content: &[u8]) {
        let p = self.folder(id).join(path);
        self.must_retry(
            &format!("node {id} to hold {path}"),
            || match std::fs::read(&p) {
                Ok(b) if b == content => Ok(()),
                Ok(b) => Err(io(format!(
                    "{} has {} bytes, want {}",
                    p.display(),
                    b.len(),
                    content.len()
                ))),
                Err(e) => Err(io(format!("{}: {e}", p.display()))),
            },
        );
    }

    pub fn must_not_see_file(&self, id: usize, path: &str) {
        let p = self.folder(id).join(path);
        self.must_retry(&format!("node {id} to drop {path}"), || {
            if p.exists() {
                Err(io(format!("{} still exists", p.display())))
            } else {
                Ok(())
            }
        });
    }

    pub fn dump_logs(&self) {
        for id in 1..=self.apis.len() {
            let log = self.log(id);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- node {id} log (last lines) ----");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

pub fn io(message: String) -> ClientError {
    ClientError::Io {
        url: "check".into(),
        message,
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `synod init` of node `id`; returns the peer id it prints.
fn init_node(config: &Path, id: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_synod"))
        .arg("--config")
        .arg(config)
        .args(["init", "--node", &id.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().fill(&mut out);
    out
}

pub fn write_local(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}
