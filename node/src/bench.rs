//! `synod bench`: replication speed and bytes moved on a 3-node loopback
//! cluster of real `synod` processes.
//!
//! Phase 1 puts a seeded dataset (one large file and many small ones)
//! through node 1's API and times until nodes 2 and 3 hold every commit on
//! disk. Phase 2 applies a small edit set (bytes inserted at the start of
//! the large file, small files modified, deleted and added) and times the
//! re-sync. Bytes moved are counted by each receiving node at the framing
//! layer of the peer protocols.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

use crate::client::Client;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Size of the large file, in MiB.
    pub big_mib: u64,
    /// Number of small files (1–256 KiB each).
    pub small_files: usize,
    pub seed: u64,
    /// Where the cluster and dataset live, kept afterwards (default: a
    /// temporary directory, removed).
    pub dir: Option<PathBuf>,
    /// Concurrent uploads to node 1.
    pub clients: usize,
    /// Instead of the replication phases: scale of folder sync with this
    /// many small files dropped into node 1's folder while it is down.
    pub scan_files: Option<usize>,
}

/// Counters of one receiving node.
#[derive(Debug, Clone, Copy, Default)]
struct Moved {
    wire_in: u64,
    chunk_bytes: u64,
}

#[derive(Debug)]
struct Phase {
    name: &'static str,
    bytes: u64,
    ops: usize,
    upload: Duration,
    total: Duration,
    moved: Vec<Moved>,
}

/// One operation of a phase, run against node 1.
#[derive(Debug, Clone)]
enum Op {
    Put { local: PathBuf, path: String },
    Delete { path: String },
}

pub fn bench(opts: &BenchOptions) -> Result<()> {
    ensure!(opts.clients > 0, "--clients must be at least 1");
    let tmp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("synod-bench-")
                .tempdir()
                .context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    println!("synod bench in {}", dir.display());
    if let Some(n) = opts.scan_files {
        return scan_scale(&dir, n);
    }
    let source = dir.join("source");
    let data = Dataset::generate(&source, opts)?;
    println!(
        "dataset: {} files, {:.1} MiB (one {} MiB file + {} small files), seed {}",
        data.files.len(),
        data.bytes as f64 / MIB,
        opts.big_mib,
        opts.small_files,
        opts.seed
    );
    let mut cluster = BenchCluster::start(&dir)?;
    let result = run_phases(&mut cluster, &source, data, opts);
    cluster.stop();
    let phases = result?;
    print_report(&phases);
    if opts.dir.is_some() {
        println!("kept {}", dir.display());
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

fn run_phases(
    cluster: &mut BenchCluster,
    source: &Path,
    mut data: Dataset,
    opts: &BenchOptions,
) -> Result<Vec<Phase>> {
    let ops: Vec<Op> = data
        .files
        .iter()
        .map(|(path, _)| Op::Put {
            local: source.join(path),
            path: path.clone(),
        })
        .collect();
    let initial = cluster.timed_phase("initial replication", ops, data.bytes, opts.clients)?;
    cluster.verify(source, &data.files)?;

    let (edit_ops, edit_bytes) = data.edit(source, opts.seed)?;
    let resync = cluster.timed_phase("re-sync after edits", edit_ops, edit_bytes, opts.clients)?;
    cluster.verify(source, &data.files)?;
    Ok(vec![initial, resync])
}

fn print_report(phases: &[Phase]) {
    println!();
    println!("| phase | ops | payload | upload to node 1 | until nodes 2+3 hold all | MB/s | moved to node 2 | moved to node 3 | chunk bytes node 2 / 3 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for p in phases {
        let mbps = p.bytes as f64 / 1e6 / p.total.as_secs_f64();
        println!(
            "| {} | {} | {:.1} MiB | {:.2} s | {:.2} s | {:.0} | {} | {} | {} / {} |",
            p.name,
            p.ops,
            p.bytes as f64 / MIB,
            p.upload.as_secs_f64(),
            p.total.as_secs_f64(),
            mbps,
            human(p.moved[0].wire_in),
            human(p.moved[1].wire_in),
            human(p.moved[0].chunk_bytes),
            human(p.moved[1].chunk_bytes),
        );
    }
    println!();
    println!("MB/s = payload / time until nodes 2 and 3 hold every commit on disk (fsynced).");
    println!("moved = bytes of every peer protocol a node received, framing included, QUIC/TLS overhead not.");
}

fn human(b: u64) -> String {
    if b >= 10 << 20 {
        format!("{:.1} MiB", b as f64 / MIB)
    } else if b >= 10 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// The files of the benchmark, as (cluster path, size).
#[derive(Debug)]
struct Dataset {
    files: Vec<(String, u64)>,
    bytes: u64,
    small: usize,
}

impl Dataset {
    fn generate(source: &Path, opts: &BenchOptions) -> Result<Dataset> {
        std::fs::create_dir_all(source.join("small"))
            .with_context(|| format!("creating {}", source.display()))?;
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut files = Vec::new();
        let big = opts.big_mib << 20;
        write_random(&source.join("big.bin"), big, &mut rng)?;
        files.push(("big.bin".to_string(), big));
        for i in 0..opts.small_files {
            let size = rng.gen_range(1024..=256 * 1024);
            let path = format!("small/{i:05}.bin");
            write_random(&source.join(&path), size, &mut rng)?;
            files.push((path, size));
        }
        let bytes = files.iter().map(|(_, s)| s).sum();
        Ok(Dataset {
            files,
            bytes,
            small: opts.small_files,
        })
    }

    /// Applies the edit set to the source files and returns the operations
    /// that carry it to the cluster, with their payload bytes.
    fn edit(&mut self, source: &Path, seed: u64) -> Result<(Vec<Op>, u64)> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_ed17);
        let mut ops = Vec::new();
        let mut bytes = 0;
        // 100 bytes inserted at the start of the large file.
        let big = source.join("big.bin");
        let shifted = source.join("big.bin.new");
        {
            let mut head = [0u8; 100];
            rng.fill_bytes(&mut head);
            let mut out = std::fs::File::create(&shifted)?;
            out.write_all(&head)?;
            std::io::copy(&mut std::fs::File::open(&big)?, &mut out)?;
            out.sync_all()?;
        }
        std::fs::rename(&shifted, &big)?;
        self.files[0].1 += 100;
        bytes += self.files[0].1;
        ops.push(Op::Put {
            local: big,
            path: "big.bin".into(),
        });
        let n = self.small;
        ensure!(n >= 20, "the edit set needs at least 20 small files");
        // 10 modified in the middle, 5 deleted, 5 added.
        for i in 0..10 {
            let idx = 1 + i * (n / 20);
            let (path, size) = self.files[idx].clone();
            let local = source.join(&path);
            let mut content = std::fs::read(&local)?;
            let at = (size as usize / 2).saturating_sub(50);
            let end = (at + 100).min(content.len());
            rng.fill_bytes(&mut content[at..end]);
            std::fs::write(&local, &content)?;
            bytes += size;
            ops.push(Op::Put { local, path });
        }
        let mut deleted = Vec::new();
        for i in 0..5 {
            // From the second half: never one of the modified files.
            let idx = 1 + n / 2 + i * (n / 20);
            deleted.push(idx);
            ops.push(Op::Delete {
                path: self.files[idx].0.clone(),
            });
        }
        deleted.sort_unstable();
        for idx in deleted.into_iter().rev() {
            let (path, _) = self.files.remove(idx);
            std::fs::remove_file(source.join(path))?;
        }
        for i in 0..5 {
            let size = rng.gen_range(1024..=256 * 1024);
            let path = format!("small/added-{i}.bin");
            let local = source.join(&path);
            write_random(&local, size, &mut rng)?;
            self.files.push((path.clone(), size));
            bytes += size;
            ops.push(Op::Put { local, path });
        }
        Ok((ops, bytes))
    }
}

fn write_random(path: &Path, size: u64, rng: &mut StdRng) -> Result<()> {
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// A socket type, for [`free_loopback_port`].
#[derive(Debug, Clone, Copy)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A loopback port free right now and not handed out before by this
/// process (TCP and UDP alike): the kernel may give one number twice in a
/// row, and one configuration must not name a port twice.
pub fn free_loopback_port(proto: Proto) -> std::io::Result<u16> {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = match proto {
            Proto::Tcp => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
            Proto::Udp => UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port(),
        };
        if GIVEN.lock().expect("port set lock poisoned").insert(port) {
            return Ok(port);
        }
    }
}

/// Three `synod run` children on loopback.
struct BenchCluster {
    dir: PathBuf,
    children: Vec<(u64, Child)>,
    apis: Vec<String>,
    folders: Vec<PathBuf>,
}

impl BenchCluster {
    fn start(dir: &Path) -> Result<BenchCluster> {
        let mut text = String::from(
            "cluster = \"bench\"\nfolder = \"./node{id}/folder\"\ndata_dir = \"./node{id}/state\"\n",
        );
        let mut apis = Vec::new();
        let mut folders = Vec::new();
        for id in 1..=3u64 {
            let udp = free_loopback_port(Proto::Udp).context("binding a loopback port")?;
            let api = format!(
                "127.0.0.1:{}",
                free_loopback_port(Proto::Tcp).context("binding a loopback port")?
            );
            text.push_str(&format!(
                "[[node]]\nid = {id}\naddress = \"127.0.0.1:{udp}\"\napi = \"{api}\"\n"
            ));
            apis.push(api);
            folders.push(dir.join(format!("node{id}/folder")));
        }
        let config = dir.join("cluster.toml");
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        for id in 1..=3u64 {
            crate::daemon::init_identity(&dir.join(format!("node{id}/state")))?;
        }
        let mut cluster = BenchCluster {
            dir: dir.to_path_buf(),
            children: Vec::new(),
            apis,
            folders,
        };
        for id in 1..=3u64 {
            match cluster.spawn(id) {
                Ok(c) => cluster.children.push((id, c)),
                Err(e) => {
                    cluster.stop();
                    return Err(e);
                }
            }
        }
        if let Err(e) = cluster.wait_ready() {
            cluster.stop();
            return Err(e);
        }
        Ok(cluster)
    }

    fn spawn(&self, id: u64) -> Result<Child> {
        let exe = std::env::current_exe().context("locating the synod binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{id}.log")))?;
        Command::new(&exe)
            .arg("--config")
            .arg(self.dir.join("cluster.toml"))
            .args(["run", "--node", &id.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {id}"))
    }

    fn stop_node(&mut self, id: u64) {
        if let Some(i) = self.children.iter().position(|(n, _)| *n == id) {
            let mut one = vec![self.children.remove(i)];
            crate::up::stop(&mut one);
        }
    }

    fn start_node(&mut self, id: u64) -> Result<()> {
        let child = self.spawn(id)?;
        self.children.push((id, child));
        Ok(())
    }

    /// A memory figure of node `id` from /proc (VmRSS, VmHWM), in KiB.
    fn rss_kib(&self, id: u64, field: &str) -> Result<u64> {
        let (_, child) = self
            .children
            .iter()
            .find(|(n, _)| *n == id)
            .context("node not running")?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field} in /proc status"))
    }

    fn client(&self, id: usize) -> Client {
        Client::new(&self.apis[id - 1])
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut initialized = false;
        loop {
            for (id, c) in self.children.iter_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "node {id} exited during start-up ({status}); see {}",
                        self.dir.join(format!("node{id}.log")).display()
                    );
                }
            }
            if !initialized {
                initialized = self
                    .client(1)
                    .post_json("/v1/cluster/init", serde_json::json!({}))
                    .is_ok();
            }
            if initialized {
                let ready = (1..=3).all(|id| {
                    self.client(id).status().is_ok_and(|s| {
                        s["leader"].is_u64() && s["voters"].as_array().is_some_and(|v| v.len() == 3)
                    })
                });
                if ready {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the cluster did not come up within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn moved(&self, id: usize) -> Result<Moved> {
        let s = self.client(id).status()?;
        let m = &s["metrics"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        Ok(Moved {
            wire_in: n(&s["wire"]["bytes_in"]),
            chunk_bytes: n(&m["bytes_fetched"]) + n(&m["bytes_received_pushed"]),
        })
    }

    /// Runs `ops` against node 1 with `clients` workers, then waits until
    /// nodes 2 and 3 hold every commit.
    fn timed_phase(
        &mut self,
        name: &'static str,
        ops: Vec<Op>,
        bytes: u64,
        clients: usize,
    ) -> Result<Phase> {
        let before = [self.moved(2)?, self.moved(3)?];
        let count = ops.len();
        let queue = Mutex::new(VecDeque::from(ops));
        let last = Mutex::new(0u64);
        let start = Instant::now();
        let api = self.apis[0].clone();
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = (0..clients)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        let client = Client::new(&api);
                        loop {
                            let op = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                            let Some(op) = op else { return Ok(()) };
                            let answer = match &op {
                                Op::Put { local, path } => client
                                    .put_file(local, path, None)
                                    .with_context(|| format!("putting {path}"))?,
                                Op::Delete { path } => client
                                    .delete(path, None)
                                    .with_context(|| format!("deleting {path}"))?,
                            };
                            let v = answer["version"].as_u64().unwrap_or(0);
                            let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
                            *l = (*l).max(v);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| anyhow::anyhow!("an upload worker panicked"))??;
            }
            Ok(())
        })?;
        let upload = start.elapsed();
        let target = *last.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + Duration::from_secs(1800);
        for id in [2, 3] {
            loop {
                let w = self.client(id).status()?["watermark"].as_u64().unwrap_or(0);
                if w >= target {
                    break;
                }
                for (nid, c) in self.children.iter_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        bail!("node {nid} exited during the benchmark ({status})");
                    }
                }
                ensure!(
                    Instant::now() < deadline,
                    "node {id} did not catch up within 30 minutes"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let total = start.elapsed();
        let after = [self.moved(2)?, self.moved(3)?];
        let moved = before
            .iter()
            .zip(after.iter())
            .map(|(b, a)| Moved {
                wire_in: a.wire_in - b.wire_in,
                chunk_bytes: a.chunk_bytes - b.chunk_bytes,
            })
            .collect();
        Ok(Phase {
            name,
            bytes,
            ops: count,
            upload,
            total,
            moved,
        })
    }

    /// Every file on nodes 2 and 3 hashes like its source (not timed).
    fn verify(&self, source: &Path, files: &[(String, u64)]) -> Result<()> {
        for (path, _) in files {
            let want = hash_file(&source.join(path))?;
            for folder in &self.folders[1..] {
                let got = hash_file(&folder.join(path))
                    .with_context(|| format!("verifying {path} in {}", folder.display()))?;
                ensure!(
                    got == want,
                    "{path} in {} differs from its source",
                    folder.display()
                );
            }
        }
        let expected = files.len();
        for folder in &self.folders[1..] {
            let got = count_files(folder)?;
            ensure!(
                got == expected,
                "{} holds {got} files, expected {expected}",
                folder.display()
            );
        }
        Ok(())
    }

    fn stop(&mut self) {
        crate::up::stop(&mut self.children);
    }
}

/// Initial scan of `n` small files, rescan of the unchanged tree, and the
/// daemon's memory, on node 1 of a 3-node cluster.
fn scan_scale(dir: &Path, n: usize) -> Result<()> {
    let mut cluster = BenchCluster::start(dir)?;
    let result = (|| -> Result<()> {
        cluster.stop_node(1);
        let folder = cluster.folders[0].clone();
        for i in 0..n {
            let d = folder.join(format!("scale/d{:03}", i / 1000));
            if i % 1000 == 0 {
                std::fs::create_dir_all(&d)?;
            }
            std::fs::write(d.join(format!("f{i:06}.txt")), format!("small file {i}\n"))?;
        }
        println!("{n} files written to node 1's folder; starting node 1");
        let start = Instant::now();
        cluster.start_node(1)?;
        let deadline = start + Duration::from_secs(3600);
        // Directories are entries too: `scale/` and one per thousand files.
        let entries = (n + n.div_ceil(1000) + 1) as u64;
        let (committed, applied) = loop {
            if let Ok(s) = cluster.client(1).status() {
                if s["entries"].as_u64() == Some(entries) {
                    break (start.elapsed(), s["applied"].as_u64().unwrap_or(0));
                }
            }
            ensure!(
                Instant::now() < deadline,
                "node 1 did not commit its files in an hour"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        for id in [2, 3] {
            while cluster.client(id).status()?["watermark"]
                .as_u64()
                .unwrap_or(0)
                < applied
            {
                ensure!(Instant::now() < deadline, "node {id} did not catch up");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let replicated = start.elapsed();
        let peak = cluster.rss_kib(1, "VmHWM")?;
        // A rescan with nothing changed.
        let m = |k: &str| -> Result<u64> {
            Ok(cluster.client(1).status()?["metrics"][k]
                .as_u64()
                .unwrap_or(0))
        };
        let scans = m("scans_completed")?;
        let hashed = m("files_hashed")?;
        while m("scans_completed")? < scans + 2 {
            ensure!(Instant::now() < deadline, "node 1 did not rescan");
            std::thread::sleep(Duration::from_millis(100));
        }
        let rescan_ms = m("scan_last_ms")?;
        let rehashed = m("files_hashed")? - hashed;
        let at_rest = cluster.rss_kib(1, "VmRSS")?;
        println!();
        println!("| files | initial scan + commit (node 1) | until nodes 2+3 hold all | peak RSS node 1 | rescan, unchanged | files rehashed | RSS at rest |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {n} | {:.1} s | {:.1} s | {:.0} MiB | {rescan_ms} ms | {rehashed} | {:.0} MiB |",
            committed.as_secs_f64(),
            replicated.as_secs_f64(),
            peak as f64 / 1024.0,
            at_rest as f64 / 1024.0
        );
        Ok(())
    })();
    cluster.stop();
    result
}

fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Regular files under `dir`, outside `.synod/`.
fn count_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        if e.file_name() == ".synod" {
            continue;
        }
        let t = e.file_type()?;
        if t.is_dir() {
            n += count_files(&e.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}
