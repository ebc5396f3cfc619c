use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use synod_consensus::{
    open_stores, raft_config, Answer, Command, Entry, Expect, NsPath, Request, RequestId, SynodRaft,
};
use synod_merkle::Hash;
use synod_transport::messages::ForwardResponse;
use synod_transport::{peer_of, P2pRaftNetwork};

use crate::common::*;

struct RaftNode {
    net: TestNode,
    raft: SynodRaft,
}

async fn must_start_raft(id: u64, net: TestNode, dir: &std::path::Path) -> RaftNode {
    must_start_raft_with(id, net, dir, raft_config("transport-test").unwrap()).await
}

async fn must_start_raft_with(
    id: u64,
    net: TestNode,
    dir: &std::path::Path,
    config: openraft::Config,
) -> RaftNode {
    let (log, sm) = open_stores(&dir.join(format!("node-{id}")), "transport-test").unwrap();
    assert!(
        config.snapshot_max_chunk_size <= synod_transport::raft_network::max_snapshot_chunk_size()
    );
    let network = P2pRaftNetwork::new(net.handle.clone(), id);
    let raft = SynodRaft::new(id, Arc::new(config), network, log, sm)
        .await
        .unwrap();
    net.handle.register_raft(raft.clone());
    assert!(net.services.raft.set(raft.clone()).is_ok());
    RaftNode { net, raft }
}

fn put(serial: u64, path: &str) -> Request {
    let entry = Entry::file(serial, Hash::of(path.as_bytes()), 1);
    Request {
        commands: vec![(
            RequestId { client: 7, serial },
            Command::put(&NsPath::parse(path).unwrap(), entry, Expect::Any),
        )],
    }
}

async fn must_leader(nodes: &BTreeMap<u64, RaftNode>, not: Option<u64>) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let leaders: Vec<u64> = nodes
            .iter()
            .filter_map(|(id, n)| {
                let m = n.raft.metrics().borrow().clone();
                (m.current_leader == Some(*id)).then_some(*id)
            })
            .collect();
        if let [l] = leaders[..] {
            if Some(l) != not {
                return l;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three Raft nodes over three swarms, meshed, initialized, with a leader.
async fn must_start_cluster(dir: &std::path::Path) -> (BTreeMap<u64, RaftNode>, u64) {
    let n1 = must_start_node(local_config()).await;
    let n2 = must_start_node(local_config()).await;
    let n3 = must_start_node(local_config()).await;
    must_mesh(&[&n1, &n2, &n3]).await;
    let membership = members(&[(1, &n1), (2, &n2), (3, &n3)]);
    for info in membership.values() {
        peer_of(info).unwrap();
    }
    let mut nodes = BTreeMap::new();
    for (id, net) in [(1, n1), (2, n2), (3, n3)] {
        nodes.insert(id, must_start_raft(id, net, dir).await);
    }
    tracing::info!("--- initialize and elect over libp2p");
    nodes[&1].raft.initialize(membership).await.unwrap();
    let leader = must_leader(&nodes, None).await;
    (nodes, leader)
}

fn must_ok(answers: &[Answer]) {
    assert_eq!(answers.len(), 1);
    assert!(matches!(answers[0], Answer::Ok { .. }), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_commit_forward_and_fail_over() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, leader) = must_start_cluster(dir.path()).await;
    tracing::info!(leader, "elected");

    tracing::info!("--- commit writes on the leader");
    for i in 0..20 {
        let r = nodes[&leader]
            .raft
            .client_write(put(i, &format!("dir/file-{i}")))
            .await
            .unwrap();
        must_ok(&r.data.answers);
    }
    // Once connected, the leader's RPCs travel over kept streams.
    let over_streams = nodes[&leader]
        .net
        .handle
        .metrics()
        .raft_stream_rpcs
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        over_streams >= 20,
        "{over_streams} raft RPCs of the leader went over kept streams"
    );

    tracing::info!("--- a follower forwards a write to the leader");
    let follower = *nodes.keys().find(|id| **id != leader).unwrap();
    let leader_peer = nodes[&leader].net.peer;
    let resp = nodes[&follower]
        .net
        .handle
        .forward_write(leader_peer, put(100, "forwarded"))
        .await
        .unwrap();
    let ForwardResponse::Done(resp) = resp else {
        panic!("{resp:?}")
    };
    must_ok(&resp.answers);
    // The leader hands out a read index covering that write.
    let resp = nodes[&follower]
        .net
        .handle
        .read_index(leader_peer)
        .await
        .unwrap();
    let ForwardResponse::ReadIndex(read_index) = resp else {
        panic!("{resp:?}")
    };
    assert!(
        read_index >= 20,
        "read index {read_index} is below the commits made"
    );
    // Forwarded to a follower, the answer names the leader.
    let other = *nodes
        .keys()
        .find(|id| **id != leader && **id != follower)
        .unwrap();
    let resp = nodes[&follower]
        .net
        .handle
        .forward_write(nodes[&other].net.peer, put(101, "misdirected"))
        .await
        .unwrap();
    assert_eq!(
        resp,
        ForwardResponse::NotLeader {
            leader: Some(leader)
        }
    );

    let last = nodes[&leader]
        .raft
        .metrics()
        .borrow()
        .last_applied
        .unwrap()
        .index;
    for n in nodes.values() {
        n.raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(last), "replicated")
            .await
            .unwrap();
    }

    tracing::info!("--- drop the leader's swarm");
    let old = nodes.remove(&leader).unwrap();
    old.net.handle.shutdown().await;
    old.raft.shutdown().await.unwrap();
    drop(old);
    let started = std::time::Instant::now();
    let new_leader = must_leader(&nodes, Some(leader)).await;
    tracing::info!(new_leader, after = ?started.elapsed(), "new leader");
    for i in 200..205 {
        let r = nodes[&new_leader]
            .raft
            .client_write(put(i, &format!("after/{i}")))
            .await
            .unwrap();
        must_ok(&r.data.answers);
    }
    let last = nodes[&new_leader]
        .raft
        .metrics()
        .borrow()
        .last_applied
        .unwrap()
        .index;
    for n in nodes.values() {
        n.raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(last), "replicated after failover")
            .await
            .unwrap();
    }
    for n in nodes.values() {
        n.raft.shutdown().await.unwrap();
        n.net.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_chunk_traffic_does_not_cause_an_election() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = must_start_cluster(dir.path()).await;
    let followers: Vec<u64> = nodes.keys().copied().filter(|id| *id != leader).collect();
    let term = nodes[&leader].raft.metrics().borrow().current_term;

    // 64 distinct 1 MiB chunks on every node; fetched over and over.
    let mut ids = Vec::new();
    for i in 0..64u8 {
        let bytes = vec![i; 1 << 20];
        for n in nodes.values() {
            n.net.services.add_chunk(bytes.clone());
        }
        ids.push(synod_merkle::Hash::of(&bytes));
    }
    let total: u64 = 256 << 20;
    tracing::info!("--- 2 x 256 MiB of chunk fetches: follower <- leader and leader <- follower");
    let fetch = |from: u64, by: u64| {
        let handle = nodes[&by].net.handle.clone();
        let peer = nodes[&from].net.peer;
        let ids = ids.clone();
        async move {
            use futures::stream::{self, StreamExt, TryStreamExt};
            // 2 MiB per request, the batch size the sync engine uses.
            let batches = (total >> 20) as usize / 2;
            stream::iter(0..batches)
                .map(|b| {
                    let want: Vec<_> = (0..2).map(|k| ids[(b * 2 + k) % ids.len()]).collect();
                    let handle = handle.clone();
                    async move { handle.fetch_chunks(peer, &want).await }
                })
                .buffer_unordered(16)
                .try_fold(0u64, |n, got| async move {
                    Ok(n + got
                        .iter()
                        .map(|c| c.as_ref().map_or(0, |c| c.len() as u64))
                        .sum::<u64>())
                })
                .await
        }
    };
    let started = std::time::Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    // Meanwhile, commits keep flowing: each needs AppendEntries round trips.
    let writes = async {
        let mut worst = Duration::ZERO;
        let mut serial = 1000;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let t = std::time::Instant::now();
            let r = nodes[&leader]
                .raft
                .client_write(put(serial, "during-bulk"))
                .await
                .unwrap();
            must_ok(&r.data.answers);
            worst = worst.max(t.elapsed());
            serial += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (worst, serial - 1000)
    };
    let bulk = async {
        let r = tokio::join!(fetch(leader, followers[0]), fetch(followers[1], leader));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let ((a, b), (worst, writes)) = tokio::join!(bulk, writes);
    assert_eq!(a.unwrap(), total);
    assert_eq!(b.unwrap(), total);
    tracing::info!(took = ?started.elapsed(), writes, worst_commit = ?worst, "bulk done");
    // Well under the 400 ms minimum election timeout.
    assert!(
        worst < Duration::from_millis(300),
        "a commit took {worst:?} during bulk traffic"
    );

    // A write still commits promptly, and nobody started an election.
    let r = nodes[&leader]
        .raft
        .client_write(put(1, "after-bulk"))
        .await
        .unwrap();
    must_ok(&r.data.answers);
    for (id, n) in &nodes {
        let m = n.raft.metrics().borrow().clone();
        assert_eq!(
            m.current_term, term,
            "node {id} saw an election during bulk traffic"
        );
        assert_eq!(m.current_leader, Some(leader), "node {id} lost the leader");
    }
    for n in nodes.values() {
        n.raft.shutdown().await.unwrap();
        n.net.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_is_fed_a_snapshot_in_parts() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let config = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        // Several parts per snapshot, so the parts really are streamed.
        snapshot_max_chunk_size: 1024,
        ..raft_config("transport-test").unwrap()
    };
    let n1 = must_start_node(local_config()).await;
    let n2 = must_start_node(local_config()).await;
    must_mesh(&[&n1, &n2]).await;
    let membership = members(&[(1, &n1)]);
    let learner_info = members(&[(2, &n2)]).remove(&2).unwrap();
    let leader = must_start_raft_with(1, n1, dir.path(), config.clone()).await;
    let learner = must_start_raft_with(2, n2, dir.path(), config).await;
    leader.raft.initialize(membership).await.unwrap();
    leader
        .raft
        .wait(Some(Duration::from_secs(10)))
        .current_leader(1, "leader")
        .await
        .unwrap();
    for i in 0..40 {
        let r = leader
            .raft
            .client_write(put(i, &format!("snap/{i:03}")))
            .await
            .unwrap();
        must_ok(&r.data.answers);
    }
    tracing::info!("--- wait for a snapshot and a purged log");
    let m = leader
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some() && m.purged.is_some(),
            "snapshot built, log purged",
        )
        .await
        .unwrap();
    let snap = m.snapshot.unwrap().index;
    let last = m.last_applied.unwrap().index;

    tracing::info!("--- add a learner: only a snapshot can catch it up");
    leader
        .raft
        .add_learner(2, learner_info, false)
        .await
        .unwrap();
    learner
        .raft
        .wait(Some(Duration::from_secs(20)))
        .applied_index_at_least(Some(last), "learner caught up")
        .await
        .unwrap();
    let m = learner.raft.metrics().borrow().clone();
    // The learner's snapshot is the leader's: it came over /synod/raft/1 in parts.
    assert!(
        m.snapshot.is_some_and(|s| s.index >= snap),
        "caught up by snapshot: {m:?}"
    );
    leader.raft.shutdown().await.unwrap();
    learner.raft.shutdown().await.unwrap();
}
