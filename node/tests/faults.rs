//! Crash and failover tests with real processes and SIGKILL.

mod common;

use common::{random_bytes, TestCluster};

#[test]
fn a_killed_follower_catches_up_after_restart() {
    let mut c = TestCluster::start(3);
    let leader = c.leader();
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    c.kill_node(follower);
    let mut files = Vec::new();
    for i in 0..5 {
        let data = random_bytes(100_000 + i * 7, 10 + i as u64);
        c.client(leader)
            .put(&format!("while-down/{i}"), &data[..], None)
            .unwrap();
        files.push(data);
    }
    c.client(leader).delete("while-down/0", None).unwrap();
    c.start_node(follower);
    for (i, data) in files.iter().enumerate().skip(1) {
        c.must_see_file(follower, &format!("while-down/{i}"), data);
    }
    c.must_not_see_file(follower, "while-down/0");
    let tmp_left = std::fs::read_dir(c.folder(follower).join(".synod/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp_left, 0);
}

#[test]
fn a_killed_leader_is_replaced_and_writes_resume() {
    let mut c = TestCluster::start(3);
    let old = c.leader();
    let acked = random_bytes(500_000, 20);
    c.client(old).put("before.bin", &acked[..], None).unwrap();
    // Acknowledged, then the writer dies at once.
    c.kill_node(old);
    let survivors: Vec<usize> = (1..=3).filter(|&i| i != old).collect();
    for &id in &survivors {
        c.must_see_file(id, "before.bin", &acked);
    }
    let after = random_bytes(300_000, 21);
    let s = survivors[0];
    c.must_retry("a write after failover", || {
        c.client(s).put("after.bin", &after[..], None)
    });
    assert_ne!(c.leader(), old);
    for &id in &survivors {
        c.must_see_file(id, "after.bin", &after);
    }
    c.start_node(old);
    c.must_see_file(old, "after.bin", &after);
}

/// Every regular file under `folder` outside `.synod/`, as relative paths.
fn files_in(folder: &std::path::Path) -> std::collections::BTreeSet<String> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        out: &mut std::collections::BTreeSet<String>,
    ) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p == root.join(".synod") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    if folder.exists() {
        walk(folder, folder, &mut out);
    }
    out
}

#[test]
fn a_node_killed_at_any_moment_of_catching_up_ends_whole() {
    use std::collections::BTreeMap;
    let mut c = TestCluster::start(3);
    let leader = c.leader();
    let victim = (1..=3).find(|&i| i != leader).unwrap();
    c.kill_node(victim);
    // Every version ever committed per path: a file seen at a kill point
    // must equal one of them, never a mix.
    let mut versions: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let put = |c: &TestCluster,
               versions: &mut BTreeMap<String, Vec<Vec<u8>>>,
               path: &str,
               data: Vec<u8>| {
        c.client(leader).put(path, &data[..], None).unwrap();
        versions.entry(path.to_string()).or_default().push(data);
    };
    for i in 0..30u64 {
        let len = if i % 5 == 0 {
            6_000_000
        } else {
            30_000 + 997 * i as usize
        };
        put(
            &c,
            &mut versions,
            &format!("crash/{i:02}"),
            random_bytes(len, 100 + i),
        );
    }
    put(&c, &mut versions, "crash/00", random_bytes(6_000_100, 200));
    c.client(leader).rename("crash/01", "crash/moved").unwrap();
    versions.insert("crash/moved".into(), versions["crash/01"].clone());
    c.client(leader).delete("crash/02", None).unwrap();

    // Kill the victim at spread-out moments of its catch-up, checking its
    // folder each time it is down.
    for (round, ms) in [250u64, 600, 1000, 1500, 2200].into_iter().enumerate() {
        c.start_node(victim);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        c.kill_node(victim);
        for name in files_in(&c.folder(victim)) {
            let on_disk = std::fs::read(c.folder(victim).join(&name)).unwrap();
            let known = versions
                .get(&name)
                .unwrap_or_else(|| panic!("round {round}: {name} was never committed"));
            assert!(
                known.contains(&on_disk),
                "round {round}: {name} ({} bytes) is torn: it matches no committed version",
                on_disk.len()
            );
        }
        // More work arrives while it is down.
        put(
            &c,
            &mut versions,
            &format!("crash/late-{round}"),
            random_bytes(2_000_000, 300 + round as u64),
        );
    }

    c.start_node(victim);
    let mut want: BTreeMap<String, Vec<u8>> = versions
        .iter()
        .map(|(k, v)| (k.clone(), v.last().unwrap().clone()))
        .collect();
    want.remove("crash/01");
    want.remove("crash/02");
    for (path, data) in &want {
        c.must_see_file(victim, path, data);
    }
    c.must_retry("exactly the committed files", || {
        let have = files_in(&c.folder(victim));
        let expected: std::collections::BTreeSet<String> = want.keys().cloned().collect();
        if have == expected {
            Ok(())
        } else {
            Err(common::io(format!(
                "extra {:?}, missing {:?}",
                have.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&have).collect::<Vec<_>>()
            )))
        }
    });
    let tmp_left = std::fs::read_dir(c.folder(victim).join(".synod/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp_left, 0, "temp files left in the folder");
    // Every node agrees on the namespace.
    let root = c.client(leader).status().unwrap()["namespace_root"].clone();
    c.must_retry("the same namespace root", || {
        let r = c.client(victim).status()?["namespace_root"].clone();
        if r == root {
            Ok(())
        } else {
            Err(common::io(format!("root {r} != {root}")))
        }
    });
}

/// A request body that trickles in, so a kill lands mid-upload.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::thread::sleep(std::time::Duration::from_millis(10));
        let n = buf.len().min(256 * 1024).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn a_writer_killed_mid_upload_commits_nothing_and_leaves_nothing() {
    let mut c = TestCluster::start(3);
    let leader = c.leader();
    let writer = (1..=3).find(|&i| i != leader).unwrap();
    // About 2.3 s of trickling; the kill comes at 0.5 s.
    let body = Trickle {
        data: random_bytes(60_000_000, 400),
        pos: 0,
    };
    let api = c.apis[writer - 1].clone();
    let upload = std::thread::spawn(move || {
        synod_node::client::Client::new(&api).put("cut/big.bin", body, None)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.kill_node(writer);
    let answer = upload.join().unwrap();
    assert!(
        answer.is_err(),
        "the upload cannot have finished: {answer:?}"
    );
    c.start_node(writer);
    c.must_retry("the writer to come back", || c.client(writer).status());
    for id in 1..=3 {
        let s = c.client(id).stat("cut/big.bin");
        assert!(
            matches!(&s, Err(e) if e.status() == Some(404)),
            "node {id}: an interrupted upload is visible: {s:?}"
        );
        assert!(!c.folder(id).join("cut/big.bin").exists());
    }
    let tmp_left = std::fs::read_dir(c.folder(writer).join(".synod/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp_left, 0, "the writer's partial upload was not swept");
}

/// Overwrites `path` in place with `bytes` of the same length and puts its
/// mtime back: inode, size and mtime are as the scanner recorded them, so
/// no edit is seen, but the old bytes are gone.
fn overwrite_unseen(path: &std::path::Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), bytes.len() as u64);
    f.write_all_at(bytes, 0).unwrap();
    f.sync_all().unwrap();
    f.set_modified(mtime).unwrap();
}

#[test]
fn a_file_no_member_can_serve_is_parked_and_the_files_after_it_still_arrive() {
    let mut c = TestCluster::start(3);
    let a = c.leader();
    let others: Vec<usize> = (1..=3).filter(|&i| i != a).collect();
    let (b, late) = (others[0], others[1]);
    c.kill_node(late);
    // Written through `b`: its push to the dead node, still queued in its
    // transport, goes down with it below.
    let lost = random_bytes(100_000, 30);
    let put = c.client(b).put("lost.bin", &lost[..], None).unwrap();
    let lost_version = put["version"].as_u64().unwrap();
    for id in [a, b] {
        c.must_see_file(id, "lost.bin", &lost);
    }
    c.must_retry("the leader's staged copy to be released", || {
        match c.client(a).status()?["staging_bytes"].as_u64() {
            Some(0) => Ok(()),
            other => Err(common::io(format!("staging bytes {other:?}"))),
        }
    });
    // The writer goes down, the other holder's copy is spoiled behind its
    // back: while `b` is down nobody can serve the file.
    c.kill_node(b);
    overwrite_unseen(&c.folder(a).join("lost.bin"), &random_bytes(lost.len(), 31));
    c.start_node(late);
    let after = random_bytes(100_000, 32);
    c.must_retry("a write with the late node back", || {
        c.client(a).put("after.bin", &after[..], None)
    });
    c.must_see_file(late, "after.bin", &after);
    let status = c.client(late).status().unwrap();
    assert_eq!(status["parked_count"], 1, "{status:#}");
    assert_eq!(status["parked"][0]["path"], "lost.bin", "{status:#}");
    assert_eq!(status["parked"][0]["version"], lost_version, "{status:#}");
    // What is on disk is reported as such: not past the parked file.
    let watermark = status["watermark"].as_u64().unwrap();
    assert!(
        watermark < lost_version,
        "watermark {watermark} passed the parked version {lost_version}"
    );
    assert!(!c.folder(late).join("lost.bin").exists());
    // And the files after it are served.
    let mut got = Vec::new();
    c.client(late).cat("after.bin", &mut got).unwrap();
    assert!(
        got == after,
        "after.bin read back through the late node's API"
    );

    // The holder with a good copy returns: the parked file is placed, and
    // the watermark catches up.
    c.start_node(b);
    c.must_see_file(late, "lost.bin", &lost);
    c.must_retry(
        "the parked file to be dropped and the watermark to catch up",
        || {
            let s = c.client(late).status()?;
            let (applied, watermark) = (s["applied"].as_u64(), s["watermark"].as_u64());
            if s["parked_count"] == 0 && watermark == applied {
                Ok(())
            } else {
                Err(common::io(format!(
                    "parked {}, watermark {watermark:?}, applied {applied:?}",
                    s["parked_count"]
                )))
            }
        },
    );
}
