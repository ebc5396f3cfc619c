//! Bad input and hostile conditions in a node's folder: each is reported,
//! loses nothing, and leaves the daemon running.

mod common;

use std::process::Command;

use futures::future::BoxFuture;

use common::{io, random_bytes, TestCluster};

fn cluster() -> TestCluster {
    TestCluster::start_with_timeouts(3, "rescan_ms = 1500")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

#[test]
fn a_symlink_out_of_the_folder_is_not_synced_nor_written_through() {
    let c = cluster();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), c.folder(2).join("evil")).unwrap();
    std::fs::write(c.folder(1).join("ok.txt"), b"fine").unwrap();
    c.must_see_file(3, "ok.txt", b"fine");
    // Node 2's link is reported and never committed.
    c.must_retry("the link to be reported", || {
        if c.log(2).contains("points outside the folder") {
            Ok(())
        } else {
            Err(io("not reported yet".into()))
        }
    });
    let listed = c.client(1).list("").unwrap();
    assert!(
        !listed.to_string().contains("evil"),
        "the link was committed: {listed}"
    );
    // A committed path under the link's name lands inside the folder.
    let payload = random_bytes(10_000, 60);
    std::fs::create_dir_all(c.folder(1).join("evil")).unwrap();
    std::fs::write(c.folder(1).join("evil/payload.bin"), &payload).unwrap();
    c.must_see_file(2, "evil/payload.bin", &payload);
    assert!(c
        .folder(2)
        .join("evil")
        .symlink_metadata()
        .unwrap()
        .is_dir());
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "something was written outside the folder"
    );
    // The link itself was kept, under a conflict name.
    let kept = std::fs::read_dir(c.folder(2))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("evil.sync-conflict-")
                && e.file_type().unwrap().is_symlink()
        });
    assert!(kept, "the local link was lost");
}

#[test]
fn an_unwritable_folder_is_reported_and_heals() {
    if !is_root() {
        eprintln!("skipped: needs root for chattr");
        return;
    }
    let c = cluster();
    let locked = c.folder(2).join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    let chattr = |flag: &str| {
        let out = Command::new("chattr").arg(flag).arg(&locked).output();
        matches!(out, Ok(o) if o.status.success())
    };
    if !chattr("+i") {
        eprintln!("skipped: this filesystem has no immutable flag");
        return;
    }
    let data = random_bytes(50_000, 61);
    std::fs::create_dir_all(c.folder(1).join("locked")).unwrap();
    std::fs::write(c.folder(1).join("locked/a.bin"), &data).unwrap();
    c.must_see_file(3, "locked/a.bin", &data);
    // Node 2 cannot write it: it says so, keeps serving, and retries.
    c.must_retry("node 2 to report the failure", || {
        let m = c.metrics(2);
        if m["materialize_errors"].as_u64().unwrap_or(0) > 0 {
            Ok(())
        } else {
            Err(io("no error reported yet".into()))
        }
    });
    assert!(c.client(2).status().is_ok(), "node 2 stopped answering");
    assert!(chattr("-i"));
    c.must_see_file(2, "locked/a.bin", &data);
}

#[test]
fn a_full_disk_is_reported_loses_nothing_and_heals() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let mut c = cluster();
    // Node 2's folder on a 2 MiB tmpfs.
    c.kill_node(2);
    let folder = c.folder(2);
    std::fs::create_dir_all(&folder).unwrap();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&folder)
        .status()
        .unwrap();
    assert!(mount.success(), "mounting a tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(folder.clone());
    c.start_node(2);
    let big = random_bytes(5_000_000, 62);
    std::fs::write(c.folder(1).join("big.bin"), &big).unwrap();
    c.must_see_file(3, "big.bin", &big);
    c.must_retry("node 2 to report the full disk", || {
        if c.metrics(2)["materialize_errors"].as_u64().unwrap_or(0) > 0 {
            Ok(())
        } else {
            Err(io("no error reported yet".into()))
        }
    });
    assert!(c.client(2).status().is_ok(), "node 2 stopped answering");
    assert!(
        !folder.join("big.bin").exists(),
        "a partial file is visible"
    );
    // Room again: it catches up.
    let grow = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&folder)
        .status()
        .unwrap();
    assert!(grow.success());
    c.must_see_file(2, "big.bin", &big);
}

/// Whether process `pid` holds `path` open (its descriptors, as
/// `/proc/<pid>/fd` shows them).
fn holds_open(pid: u32, path: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|e| e.ok())
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
        })
        .unwrap_or(false)
}

/// A sparse file of `len` bytes (no disk used, but every byte must be read
/// and hashed: chunking it takes a while) with an mtime old enough that the
/// scanner takes it at once.
fn sparse_settled_file(path: &std::path::Path, len: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60))
        .unwrap();
}

/// Waits (bounded) until node `id` has `path` open: the scanner is reading
/// it. Deterministic: the file is big enough that chunking it lasts far
/// longer than one look at `/proc`.
fn wait_until_chunking(c: &TestCluster, id: usize, path: &std::path::Path) {
    let pid = c.pid(id).unwrap();
    let deadline = std::time::Instant::now() + common::SETTLE;
    while !holds_open(pid, path) {
        assert!(
            std::time::Instant::now() < deadline,
            "node {id} never opened {}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn events(c: &TestCluster, id: usize) -> serde_json::Value {
    c.client(id).get_json("/v1/events").unwrap()["events"].clone()
}

#[test]
fn a_file_that_vanishes_or_shrinks_while_it_is_chunked_is_never_committed_half_read() {
    let c = cluster();
    const BIG: u64 = 4 << 30;
    // Deleted while the scanner reads it.
    let doomed = c.folder(1).join("doomed.bin");
    sparse_settled_file(&doomed, BIG);
    wait_until_chunking(&c, 1, &doomed);
    std::fs::remove_file(&doomed).unwrap();
    std::fs::write(c.folder(1).join("bystander.txt"), b"still synced").unwrap();
    c.must_retry("the vanished file to be reported", || {
        let log = c.log(1);
        let reported = log
            .lines()
            .any(|l| l.contains("doomed.bin") && l.contains("vanished while it was read"));
        let evented = events(&c, 1).as_array().unwrap().iter().any(|e| {
            e["kind"] == "not_committed"
                && e["subject"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("doomed.bin: ") && s.contains("vanished"))
        });
        if reported && evented {
            Ok(())
        } else {
            Err(io(format!("log {reported}, event {evented}")))
        }
    });
    for id in 2..=3 {
        c.must_see_file(id, "bystander.txt", b"still synced");
    }

    // Truncated while the scanner reads it: only what the file finally
    // holds is committed, never the bytes read before it shrank.
    let shrunk = c.folder(1).join("shrunk.bin");
    sparse_settled_file(&shrunk, BIG);
    wait_until_chunking(&c, 1, &shrunk);
    std::fs::write(&shrunk, b"small at last").unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "shrunk.bin", b"small at last");
    }

    // The daemon kept running and kept scanning; the vanished file exists
    // nowhere and the shrunk one only in its final form.
    std::fs::write(c.folder(1).join("after.txt"), b"later edit").unwrap();
    for id in 2..=3 {
        c.must_see_file(id, "after.txt", b"later edit");
    }
    for id in 1..=3 {
        let listed = c.client(id).list("").unwrap();
        let names: Vec<(&str, u64)> = listed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["path"].as_str().unwrap(), e["size"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            names,
            [("after.txt", 10), ("bystander.txt", 12), ("shrunk.bin", 13)],
            "node {id}"
        );
        assert!(!c.folder(id).join("doomed.bin").exists(), "node {id}");
    }
    let committed = c.metrics(1)["writes_committed"].as_u64().unwrap();
    assert_eq!(committed, 3, "one commit per surviving file");
}

/// Serves nothing: the impostor below only sends.
struct NoServices;

impl synod_transport::Services for NoServices {
    fn tree_top(
        &self,
        _: synod_transport::PeerId,
        _: synod_merkle::Hash,
    ) -> BoxFuture<'_, Result<Option<(u64, synod_merkle::Hash)>, synod_transport::ServiceError>>
    {
        Box::pin(async { Ok(None) })
    }
    fn tree_nodes(
        &self,
        _: synod_transport::PeerId,
        _: synod_merkle::Hash,
        _: usize,
        _: std::ops::Range<u64>,
    ) -> BoxFuture<'_, Result<Option<Vec<synod_merkle::Hash>>, synod_transport::ServiceError>> {
        Box::pin(async { Ok(None) })
    }
    fn read_chunks(
        &self,
        _: synod_transport::PeerId,
        ids: Vec<synod_merkle::Hash>,
    ) -> BoxFuture<'_, Result<Vec<Option<synod_transport::Bytes>>, synod_transport::ServiceError>>
    {
        Box::pin(async move { Ok(vec![None; ids.len()]) })
    }
    fn store_chunks(
        &self,
        _: synod_transport::PeerId,
        _: Vec<synod_transport::ChunkData>,
    ) -> BoxFuture<'_, Result<(), synod_transport::ServiceError>> {
        Box::pin(async { Ok(()) })
    }
    fn store_manifests(
        &self,
        _: synod_transport::PeerId,
        _: Vec<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), synod_transport::ServiceError>> {
        Box::pin(async { Ok(()) })
    }
    fn missing_chunks(
        &self,
        _: synod_transport::PeerId,
        ids: Vec<synod_merkle::Hash>,
    ) -> BoxFuture<'_, Result<Vec<synod_merkle::Hash>, synod_transport::ServiceError>> {
        Box::pin(async move { Ok(ids) })
    }
    fn forward_write(
        &self,
        _: synod_transport::PeerId,
        _: synod_consensus::Request,
    ) -> BoxFuture<'_, synod_transport::ForwardResponse> {
        Box::pin(async { synod_transport::ForwardResponse::Failed("impostor".into()) })
    }
    fn read_index(
        &self,
        _: synod_transport::PeerId,
    ) -> BoxFuture<'_, synod_transport::ForwardResponse> {
        Box::pin(async { synod_transport::ForwardResponse::Failed("impostor".into()) })
    }
}

/// A member sends the leader, over the real transport and its codec,
/// commands whose paths escape the folder. The leader commits them to the
/// Raft log (they reach every follower in AppendEntries), and every state
/// machine refuses them on apply: rejected with the path named, nothing
/// changed, nothing written outside any folder, every daemon still running.
#[test]
fn path_traversal_names_in_commands_from_a_peer_are_rejected_everywhere() {
    use synod_consensus::{Answer, Command, Entry, Expect, Request, RequestId};

    let mut c = cluster();
    std::fs::write(c.folder(1).join("ok.txt"), b"untouched").unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "ok.txt", b"untouched");
    }
    let leader = c.leader();
    let impostor = (1..=3).find(|&i| i != leader).unwrap();
    let cluster_view = c.client(leader).get_json("/v1/cluster").unwrap();
    let leader_info = cluster_view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == leader as u64)
        .unwrap();
    let leader_info: synod_consensus::NodeInfo = synod_consensus::NodeInfo {
        addr: leader_info["addr"].as_str().unwrap().to_owned(),
        peer_id: leader_info["peer_id"].as_str().unwrap().to_owned(),
    };
    let (leader_peer, leader_addr) = synod_transport::peer_of(&leader_info).unwrap();
    let before: Vec<serde_json::Value> = (1..=3).map(|id| c.client(id).status().unwrap()).collect();

    // A member gone bad: node `impostor`'s own key, so the leader lets it in.
    c.kill_node(impostor);
    let key = synod_transport::identity::load_identity(
        &c.data_dir(impostor)
            .join(synod_transport::identity::KEY_FILE),
    )
    .unwrap();
    let outside = tempfile::tempdir().unwrap();
    let absolute = outside.path().join("escaped.txt");
    let absolute = absolute.to_str().unwrap().to_owned();
    let bad_paths = [
        "../../etc/x".to_string(),
        "docs/../../../x".to_string(),
        absolute.clone(),
        ".synod/state/x".to_string(),
    ];
    let entry = Entry::file(9, synod_merkle::Hash::of(b"malicious"), impostor as u64);
    let mut commands: Vec<Command> = bad_paths
        .iter()
        .map(|p| Command::Put {
            path: p.clone(),
            entry: entry.clone(),
            expect: Expect::Any,
        })
        .collect();
    commands.push(Command::Rename {
        from: "ok.txt".into(),
        to: "../ok.txt".into(),
        expect_from: Expect::Any,
        expect_to: Expect::Any,
    });
    let request = Request {
        commands: commands
            .into_iter()
            .enumerate()
            .map(|(i, cmd)| {
                (
                    RequestId {
                        client: 0xbad,
                        serial: i as u64 + 1,
                    },
                    cmd,
                )
            })
            .collect(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let config = synod_transport::TransportConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            ..synod_transport::TransportConfig::default()
        };
        let (handle, _task) =
            synod_transport::start_transport(key, config, std::sync::Arc::new(NoServices))
                .await
                .unwrap();
        handle.set_allowed_peers([leader_peer]).await.unwrap();
        handle
            .add_peer_address(leader_peer, leader_addr)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + common::SETTLE;
        loop {
            match handle.forward_write(leader_peer, request.clone()).await {
                Ok(a) => break a,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("forward failed, retrying: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the leader never answered: {e}"),
            }
        }
    });
    let synod_transport::ForwardResponse::Done(response) = answer else {
        panic!("not applied: {answer:?}");
    };
    let named: Vec<String> = bad_paths
        .iter()
        .cloned()
        .chain(["../ok.txt".to_string()])
        .collect();
    assert_eq!(response.answers.len(), named.len());
    for (a, path) in response.answers.iter().zip(&named) {
        match a {
            Answer::Rejected { reason } => assert!(
                reason.contains(&format!("{path:?}")),
                "{path}: the reason does not name the path: {reason}"
            ),
            other => panic!("{path}: accepted: {other:?}"),
        }
    }
    drop(rt);

    // The rejected commands are in the log: every follower applied (and
    // refused) them too, including the impostor's node once it is back.
    c.start_node(impostor);
    let leader_applied = c.client(leader).status().unwrap()["applied"]
        .as_u64()
        .unwrap();
    assert!(
        leader_applied > before[leader - 1]["applied"].as_u64().unwrap(),
        "the commands never reached the log"
    );
    c.must_retry("every node to apply the rejected commands", || {
        for id in 1..=3 {
            let s = c.client(id).status()?;
            if s["applied"].as_u64() < Some(leader_applied) {
                return Err(io(format!("node {id} applied {}", s["applied"])));
            }
        }
        Ok(())
    });
    for id in 1..=3 {
        let s = c.client(id).status().unwrap();
        assert_eq!(
            s["namespace_root"],
            before[id - 1]["namespace_root"],
            "node {id}: the namespace changed"
        );
        assert_eq!(s["entries"], 1, "node {id}");
        let f = c.folder(id);
        assert_eq!(std::fs::read(f.join("ok.txt")).unwrap(), b"untouched");
        // `../../etc/x` from the folder, `../ok.txt` beside it.
        let node_dir = f.parent().unwrap();
        assert!(!node_dir.join("ok.txt").exists(), "node {id}");
        assert!(
            !node_dir.parent().unwrap().join("etc/x").exists(),
            "node {id}"
        );
        assert!(!f.join(".synod/state/x").exists(), "node {id}");
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "something was written at the absolute path"
    );
    // Everyone still serves and syncs.
    std::fs::write(c.folder(impostor).join("after.txt"), b"fine").unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "after.txt", b"fine");
    }
}
