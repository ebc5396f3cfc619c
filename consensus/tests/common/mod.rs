//! Shared helpers of the multi-node tests.
#![allow(dead_code)]

use std::time::Duration;

use synod_consensus::testing::TestCluster;
use synod_consensus::{Answer, Command, Entry, Expect, NsPath, Proposer, ProposerConfig};
use synod_merkle::Hash;

pub const T: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn")
            }),
        )
        .with_test_writer()
        .try_init();
}

pub fn p(s: &str) -> NsPath {
    NsPath::parse(s).expect("valid test path")
}

pub fn file(n: u64) -> Entry {
    Entry::file(n, Hash::of(&n.to_le_bytes()), 1)
}

pub fn proposer_on(c: &TestCluster, id: u64) -> Proposer {
    let n = c.node(id).expect("node running");
    // A fresh client id per proposer: request ids (client, serial) must never repeat.
    Proposer::spawn(
        n.raft.clone(),
        rand::random::<u64>(),
        ProposerConfig::default(),
    )
}

pub async fn must_put(pr: &Proposer, path: &str, n: u64, expect: Expect) -> Answer {
    pr.propose(Command::put(&p(path), file(n), expect))
        .await
        .expect("proposal answered")
}

pub fn version_of(a: &Answer) -> u64 {
    match a {
        Answer::Ok { version } => *version,
        other => panic!("expected Ok, got {other:?}"),
    }
}

/// Every node in `ids` holds the same namespace and root as the first one.
pub fn must_agree(c: &TestCluster, ids: &[u64]) {
    let first = c.node(ids[0]).expect("node");
    let all = first.view.all().expect("read namespace");
    let root = first.view.namespace_root();
    for id in &ids[1..] {
        let n = c.node(*id).expect("node");
        assert_eq!(
            n.view.all().expect("read namespace"),
            all,
            "namespace of node {id} differs from node {}",
            ids[0]
        );
        assert_eq!(n.view.namespace_root(), root, "root of node {id} differs");
    }
}

/// The highest applied index among `ids`.
pub fn max_applied(c: &TestCluster, ids: &[u64]) -> u64 {
    ids.iter()
        .map(|id| c.node(*id).expect("node").view.applied_index())
        .max()
        .unwrap_or(0)
}

/// Runs the ignored test `name` of this test binary alone in a child
/// process (to be killed), with `env` set to `dir`; stdout piped.
pub fn spawn_test_child(name: &str, env: &str, dir: &std::path::Path) -> std::process::Child {
    let exe = std::env::current_exe().expect("test binary");
    std::process::Command::new(exe)
        .args(["--ignored", "--exact", name, "--nocapture"])
        .env(env, dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child")
}
