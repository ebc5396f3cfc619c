//! Bad input and hostile conditions in a node's folder: each is reported,
//! loses nothing, and leaves the daemon running.

mod common;

use std::process::Command;

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
