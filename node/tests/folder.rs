//! Folder sync with real processes and real folders: edits made directly
//! in a node's folder reach every other node.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{io, random_bytes, TestCluster};

fn cluster() -> TestCluster {
    // A short rescan interval backs up the watcher in tests.
    TestCluster::start_with_timeouts(3, "rescan_ms = 1500")
}

fn conflict_copies(folder: &Path, dir: &str, stem: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(folder.join(dir))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{stem}.sync-conflict-")))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn create_edit_rename_delete_in_a_folder_are_mirrored() {
    let c = cluster();
    let f1 = c.folder(1);
    std::fs::create_dir_all(f1.join("docs")).unwrap();
    let v1 = random_bytes(300_000, 1);
    std::fs::write(f1.join("docs/a.bin"), &v1).unwrap();
    std::fs::set_permissions(
        f1.join("docs/a.bin"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    std::fs::File::options()
        .write(true)
        .open(f1.join("docs/a.bin"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    for id in [2, 3] {
        c.must_see_file(id, "docs/a.bin", &v1);
        let p = c.folder(id).join("docs/a.bin");
        assert_eq!(mtime(&p), when, "node {id}: mtime carried");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640,
            "node {id}: mode carried"
        );
    }
    // Edit in place.
    let mut v2 = v1.clone();
    v2[150_000..150_100].copy_from_slice(&[7u8; 100]);
    std::fs::write(f1.join("docs/a.bin"), &v2).unwrap();
    for id in [2, 3] {
        c.must_see_file(id, "docs/a.bin", &v2);
    }
    // Rename: no content moves.
    let fetched_before: Vec<u64> = [2, 3]
        .iter()
        .map(|&id| c.metrics(id)["bytes_fetched"].as_u64().unwrap())
        .collect();
    std::fs::rename(f1.join("docs/a.bin"), f1.join("docs/b.bin")).unwrap();
    for id in [2, 3] {
        c.must_see_file(id, "docs/b.bin", &v2);
        c.must_not_see_file(id, "docs/a.bin");
    }
    for (k, &id) in [2, 3].iter().enumerate() {
        let after = c.metrics(id)["bytes_fetched"].as_u64().unwrap();
        assert_eq!(
            after, fetched_before[k],
            "node {id} fetched bytes for a rename"
        );
    }
    // Delete.
    std::fs::remove_file(f1.join("docs/b.bin")).unwrap();
    for id in [2, 3] {
        c.must_not_see_file(id, "docs/b.bin");
    }
    let listed = c.client(1).list("docs/").unwrap();
    assert_eq!(listed["entries"].as_array().unwrap().len(), 0, "{listed}");
}

#[test]
fn simultaneous_edits_leave_the_winner_and_one_conflict_copy_everywhere() {
    let c = cluster();
    let base = random_bytes(50_000, 10);
    std::fs::write(c.folder(1).join("shared.txt"), &base).unwrap();
    for id in [2, 3] {
        c.must_see_file(id, "shared.txt", &base);
    }
    let a = random_bytes(60_000, 11);
    let b = random_bytes(70_000, 12);
    std::fs::write(c.folder(1).join("shared.txt"), &a).unwrap();
    std::fs::write(c.folder(2).join("shared.txt"), &b).unwrap();
    // Every node ends with the winner at the path and the loser beside it.
    must_keep_both(&c, "shared", &a, &b);
    // All three agree on which edit won.
    let winners: BTreeSet<Vec<u8>> = (1..=3)
        .map(|id| std::fs::read(c.folder(id).join("shared.txt")).unwrap())
        .collect();
    assert_eq!(winners.len(), 1);
}

/// Two nodes create the same new path at once: whichever way each learns
/// of the other (a commit over its unscanned file, or a conflict at its
/// own commit), neither file is lost.
#[test]
fn simultaneous_creates_of_a_new_path_leave_the_winner_and_one_conflict_copy_everywhere() {
    let c = cluster();
    let a = random_bytes(30_000, 21);
    let b = random_bytes(40_000, 22);
    std::fs::write(c.folder(1).join("fresh.txt"), &a).unwrap();
    std::fs::write(c.folder(2).join("fresh.txt"), &b).unwrap();
    must_keep_both(&c, "fresh", &a, &b);
}

/// Waits until every node has one of `a` and `b` at `<stem>.txt` and the
/// other in one conflict copy beside it.
fn must_keep_both(c: &TestCluster, stem: &str, a: &[u8], b: &[u8]) {
    c.must_retry("one winner and one conflict copy on every node", || {
        for id in 1..=3 {
            let f = c.folder(id);
            let copies = conflict_copies(&f, "", stem);
            let main =
                std::fs::read(f.join(format!("{stem}.txt"))).map_err(|e| io(e.to_string()))?;
            if copies.len() != 1 {
                return Err(io(format!("node {id}: conflict copies {copies:?}")));
            }
            let copy = std::fs::read(f.join(&copies[0])).map_err(|e| io(e.to_string()))?;
            if !((main == a && copy == b) || (main == b && copy == a)) {
                return Err(io(format!("node {id}: winner/copy are not the two files")));
            }
        }
        Ok(())
    });
}

#[test]
fn an_editor_style_save_is_one_change() {
    let c = cluster();
    let f1 = c.folder(1);
    let v1 = random_bytes(20_000, 20);
    std::fs::write(f1.join("notes.txt"), &v1).unwrap();
    for id in [2, 3] {
        c.must_see_file(id, "notes.txt", &v1);
    }
    let committed = c.metrics(1)["writes_committed"].as_u64().unwrap();
    // Write a temp file, fsync, rename it over the original.
    let v2 = random_bytes(21_000, 21);
    std::fs::write(f1.join(".notes.txt.tmp-81723"), &v2).unwrap();
    std::fs::rename(f1.join(".notes.txt.tmp-81723"), f1.join("notes.txt")).unwrap();
    for id in [2, 3] {
        c.must_see_file(id, "notes.txt", &v2);
    }
    // Give a second commit time to show up if there were one.
    std::thread::sleep(Duration::from_secs(3));
    let after = c.metrics(1)["writes_committed"].as_u64().unwrap();
    assert_eq!(
        after - committed,
        1,
        "the save became {} commits",
        after - committed
    );
    let listed = c.client(1).list("").unwrap();
    let names: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["notes.txt"]);
}

#[test]
fn an_edit_made_without_quorum_is_committed_when_the_others_return() {
    let mut c = cluster();
    let v1 = random_bytes(40_000, 30);
    std::fs::write(c.folder(1).join("offline.txt"), &v1).unwrap();
    for id in [2, 3] {
        c.must_see_file(id, "offline.txt", &v1);
    }
    c.kill_node(2);
    c.kill_node(3);
    let v2 = random_bytes(45_000, 31);
    std::fs::write(c.folder(1).join("offline.txt"), &v2).unwrap();
    std::fs::write(c.folder(1).join("new-offline.txt"), b"made while alone").unwrap();
    c.must_retry("the edits to be listed as pending", || {
        let s = c.client(1).get_json("/v1/status")?;
        let pending: BTreeSet<String> = s["pending"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["path"].as_str().unwrap().to_string())
            .collect();
        if pending.contains("offline.txt") && pending.contains("new-offline.txt") {
            Ok(())
        } else {
            Err(io(format!("pending {pending:?}")))
        }
    });
    c.start_node(2);
    c.start_node(3);
    for id in [2, 3] {
        c.must_see_file(id, "offline.txt", &v2);
        c.must_see_file(id, "new-offline.txt", b"made while alone");
    }
    c.must_retry("the journal to empty", || {
        let s = c.client(1).get_json("/v1/status")?;
        if s["pending_count"] == 0 {
            Ok(())
        } else {
            Err(io(format!("pending {}", s["pending"])))
        }
    });
}

/// The leader renames a file while alone: the rename is appended to its log
/// but gets no answer in time, and the user edits the renamed file. Whether
/// the rename commits once the others return (still in the leader's log) or
/// not (a new leader dropped it), the outcome is one rename and one edit:
/// the new name with the new bytes everywhere, and no conflict copy.
#[test]
fn an_edit_after_an_unanswered_rename_is_an_edit_of_the_renamed_file() {
    let mut c = cluster();
    let v1 = random_bytes(40_000, 40);
    std::fs::write(c.folder(1).join("d5"), &v1).unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "d5", &v1);
    }
    let l = c.leader();
    let others: Vec<usize> = (1..=3).filter(|&i| i != l).collect();
    for &id in &others {
        c.kill_node(id);
    }
    let folder = c.folder(l);
    std::fs::rename(folder.join("d5"), folder.join("d0")).unwrap();
    c.must_retry("the rename to wait in the journal", || {
        let s = c.client(l).get_json("/v1/status")?;
        let listed = s["pending"]
            .as_array()
            .is_some_and(|p| p.iter().any(|e| e["path"] == "d0"));
        if listed {
            Ok(())
        } else {
            Err(io(format!("pending {}", s["pending"])))
        }
    });
    // Edited in place: same inode, new bytes.
    let v2 = random_bytes(47_000, 41);
    std::fs::write(folder.join("d0"), &v2).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    for &id in &others {
        c.start_node(id);
    }
    for id in 1..=3 {
        c.must_see_file(id, "d0", &v2);
        c.must_not_see_file(id, "d5");
    }
    c.must_retry("the journal to empty", || {
        let s = c.client(l).get_json("/v1/status")?;
        if s["pending_count"] == 0 {
            Ok(())
        } else {
            Err(io(format!("pending {}", s["pending"])))
        }
    });
    for id in 1..=3 {
        assert_eq!(
            conflict_copies(&c.folder(id), "", "d0"),
            Vec::<String>::new(),
            "node {id}"
        );
        assert_eq!(
            std::fs::read(c.folder(id).join("d0")).unwrap(),
            v2,
            "node {id}"
        );
    }
}

/// Symbolic links (their target is their content) and empty directories
/// travel like files: created, changed and deleted everywhere.
#[test]
fn links_and_empty_directories_are_carried() {
    use std::os::unix::fs::symlink;
    let c = cluster();
    let f1 = c.folder(1);
    std::fs::create_dir_all(f1.join("empty")).unwrap();
    std::fs::create_dir_all(f1.join("nested/deeper")).unwrap();
    std::fs::write(f1.join("target.txt"), b"pointed at").unwrap();
    symlink("target.txt", f1.join("link")).unwrap();
    symlink("nested", f1.join("dlink")).unwrap();
    symlink("../target.txt", f1.join("nested/up")).unwrap();
    let link_of =
        |id: usize, name: &str| -> Result<std::path::PathBuf, synod_node::client::ClientError> {
            let p = c.folder(id).join(name);
            let meta =
                std::fs::symlink_metadata(&p).map_err(|e| io(format!("{}: {e}", p.display())))?;
            if !meta.file_type().is_symlink() {
                return Err(io(format!("{} is not a link", p.display())));
            }
            std::fs::read_link(&p).map_err(|e| io(e.to_string()))
        };
    for id in [2, 3] {
        c.must_see_file(id, "target.txt", b"pointed at");
        c.must_retry(
            &format!("node {id} to hold the links and directories"),
            || {
                for d in ["empty", "nested", "nested/deeper"] {
                    if !c.folder(id).join(d).is_dir() {
                        return Err(io(format!("{d} is not a directory")));
                    }
                }
                for (name, to) in [
                    ("link", "target.txt"),
                    ("dlink", "nested"),
                    ("nested/up", "../target.txt"),
                ] {
                    let got = link_of(id, name)?;
                    if got != Path::new(to) {
                        return Err(io(format!("{name} -> {}, want {to}", got.display())));
                    }
                }
                Ok(())
            },
        );
        // Reading through the link reaches the synced file.
        assert_eq!(
            std::fs::read(c.folder(id).join("link")).unwrap(),
            b"pointed at"
        );
    }
    // Retarget a link, drop an empty directory and a link.
    std::fs::remove_file(f1.join("link")).unwrap();
    symlink("nested/up", f1.join("link")).unwrap();
    std::fs::remove_dir(f1.join("nested/deeper")).unwrap();
    std::fs::remove_file(f1.join("dlink")).unwrap();
    for id in [2, 3] {
        c.must_retry(&format!("node {id} to follow the changes"), || {
            let got = link_of(id, "link")?;
            if got != Path::new("nested/up") {
                return Err(io(format!("link -> {}", got.display())));
            }
            if c.folder(id).join("nested/deeper").exists() {
                return Err(io("nested/deeper still there".into()));
            }
            if std::fs::symlink_metadata(c.folder(id).join("dlink")).is_ok() {
                return Err(io("dlink still there".into()));
            }
            Ok(())
        });
        assert!(c.folder(id).join("empty").is_dir(), "node {id}");
    }
    // The namespace lists what each name is.
    let listing = c
        .client(2)
        .get_json("/v1/files?prefix=")
        .unwrap()
        .to_string();
    assert!(listing.contains("\"symlink\""), "{listing}");
    assert!(listing.contains("\"directory\""), "{listing}");
}

/// NFC and NFD spellings of one name are one path: a name written in NFD
/// is respelled in NFC and synced under it; a name present in both
/// spellings on one node is reported and neither file is lost.
#[test]
fn unicode_spellings_of_one_name_are_one_path() {
    let c = cluster();
    let nfd = "cafe\u{301}.txt";
    let nfc = "caf\u{e9}.txt";
    std::fs::write(c.folder(1).join(nfd), b"decomposed").unwrap();
    for id in [2, 3] {
        c.must_see_file(id, nfc, b"decomposed");
    }
    c.must_retry("node 1 to respell the name", || {
        if c.folder(1).join(nfc).exists() && !c.folder(1).join(nfd).exists() {
            Ok(())
        } else {
            Err(io("still spelled in NFD".into()))
        }
    });
    for id in 1..=3 {
        assert!(!c.folder(id).join(nfd).exists(), "node {id}");
    }
    // Both spellings at once on node 2.
    std::fs::write(c.folder(2).join("n\u{303}o"), b"nfd twin").unwrap();
    std::fs::write(c.folder(2).join("\u{f1}o"), b"nfc twin").unwrap();
    for id in [1, 3] {
        c.must_see_file(id, "\u{f1}o", b"nfc twin");
    }
    c.must_retry("the two spellings to be reported", || {
        if c.log(2).contains("two Unicode spellings") {
            Ok(())
        } else {
            Err(io("not reported".into()))
        }
    });
    assert_eq!(
        std::fs::read(c.folder(2).join("n\u{303}o")).unwrap(),
        b"nfd twin"
    );
    assert_eq!(
        std::fs::read(c.folder(2).join("\u{f1}o")).unwrap(),
        b"nfc twin"
    );
}

#[test]
fn a_tree_of_files_syncs_and_an_unchanged_rescan_rehashes_nothing() {
    let c = cluster();
    let f1 = c.folder(1);
    let n = 10_000;
    for i in 0..n {
        let dir = f1.join(format!("tree/d{:02}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i:05}.txt")), format!("file {i}\n")).unwrap();
    }
    for id in [2, 3] {
        c.must_see_file(
            id,
            &format!("tree/d{:02}/f{:05}.txt", (n - 1) % 50, n - 1),
            format!("file {}\n", n - 1).as_bytes(),
        );
    }
    c.must_retry("all files everywhere", || {
        for id in [2, 3] {
            let s = c.client(id).status()?;
            // Every file, plus `tree/` and its 50 directories.
            if s["entries"].as_u64() != Some(n as u64 + 51) {
                return Err(io(format!("node {id} has {} entries", s["entries"])));
            }
        }
        Ok(())
    });
    for id in [2, 3] {
        for i in (0..n).step_by(97) {
            c.must_see_file(
                id,
                &format!("tree/d{:02}/f{i:05}.txt", i % 50),
                format!("file {i}\n").as_bytes(),
            );
        }
    }
    let hashed = |id| c.metrics(id)["files_hashed"].as_u64().unwrap();
    let scans = |id| c.metrics(id)["scans_completed"].as_u64().unwrap();
    let before: Vec<(u64, u64)> = (1..=3).map(|id| (hashed(id), scans(id))).collect();
    c.must_retry("two more rescans on every node", || {
        for id in 1..=3 {
            if scans(id) < before[id - 1].1 + 2 {
                return Err(io(format!("node {id} has not rescanned")));
            }
        }
        Ok(())
    });
    for id in 1..=3 {
        assert_eq!(
            hashed(id),
            before[id - 1].0,
            "node {id} rehashed unchanged files"
        );
    }
}

#[test]
fn a_file_corrupted_behind_our_back_is_found_and_repaired_by_verify() {
    let c = cluster();
    let good = random_bytes(700_000, 40);
    std::fs::write(c.folder(1).join("precious.bin"), &good).unwrap();
    c.must_see_file(2, "precious.bin", &good);
    // Flip bytes on node 2, keeping size, mtime and inode: the scanner
    // cannot see it, only a rehash can.
    let p = c.folder(2).join("precious.bin");
    let when = mtime(&p);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.write_all_at(b"bit rot!", 350_000).unwrap();
        f.set_modified(when).unwrap();
    }
    assert_ne!(std::fs::read(&p).unwrap(), good);
    let out = c.cli(&["verify", "--node", "2"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 mismatched, 1 repaired"), "{text}");
    assert!(text.contains("precious.bin"), "{text}");
    assert_eq!(std::fs::read(&p).unwrap(), good);
    // The bad copy is kept, not deleted.
    let corrupt = c.folder(2).join(".synod/corrupt");
    assert!(std::fs::read_dir(&corrupt).unwrap().count() == 1);
    // A second run finds nothing; the cluster agrees on one namespace.
    let again = c.cli(&["verify", "--node", "2"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 mismatched"));
    let cluster = c.cli(&["verify", "--cluster"]);
    let text = String::from_utf8_lossy(&cluster.stdout);
    assert!(cluster.status.success(), "{text}");
    assert!(text.contains("3 nodes agree"), "{text}");
}

#[test]
fn files_placed_by_sync_wake_no_scan_but_a_file_moved_onto_them_does() {
    // No periodic rescan within the test: only the watcher wakes a scan.
    let c = TestCluster::start_with_timeouts(3, "rescan_ms = 600000");
    let scans = |id| c.metrics(id)["scans_completed"].as_u64().unwrap();
    c.must_retry("first scans", || {
        if (1..=3).all(|id| scans(id) >= 1) {
            Ok(())
        } else {
            Err(io("first scan not done".into()))
        }
    });
    // Scans woken by the start (the state directory's creation) are done.
    std::thread::sleep(Duration::from_secs(3));
    let before = scans(2);
    for i in 0..20 {
        let body = format!("placed {i}\n");
        c.must_retry("put", || {
            c.client(1).put(&format!("p{i}.txt"), body.as_bytes(), None)
        });
    }
    for i in 0..20 {
        c.must_see_file(2, &format!("p{i}.txt"), format!("placed {i}\n").as_bytes());
    }
    // Past the watcher's debounce: a scan woken by the placements would
    // have run.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        scans(2),
        before,
        "node 2 rescanned for files it placed itself"
    );

    // A file moved onto a placed path (same name, another inode) is a
    // user's edit and must be seen without a periodic rescan.
    let outside = c.folder(2).parent().unwrap().join("outside.txt");
    std::fs::write(&outside, b"moved in by a user\n").unwrap();
    std::fs::rename(&outside, c.folder(2).join("p3.txt")).unwrap();
    for id in [1, 3] {
        c.must_see_file(id, "p3.txt", b"moved in by a user\n");
    }
    // So is a write into a placed file.
    std::fs::write(c.folder(2).join("p4.txt"), b"written in place\n").unwrap();
    for id in [1, 3] {
        c.must_see_file(id, "p4.txt", b"written in place\n");
    }
}

/// A file written through the API into directories nobody has yet: its
/// writer commits the directories with it, so the scanners, which find
/// them on disk once the file is placed, have nothing left to commit and
/// do not race each other for them.
#[test]
fn a_write_into_new_directories_commits_them_with_the_file() {
    let c = cluster();
    let written = c.client(2).put("new/deep/f.txt", &b"hi"[..], None).unwrap();
    let version = written["version"].as_u64().unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "new/deep/f.txt", b"hi");
    }
    // Two scans on every node after the placement.
    let scans = |id| c.metrics(id)["scans_completed"].as_u64().unwrap();
    let before: Vec<u64> = (1..=3).map(scans).collect();
    c.must_retry("two more scans on every node", || {
        match (1..=3).find(|&id| scans(id) < before[id - 1] + 2) {
            None => Ok(()),
            Some(id) => Err(io(format!("node {id} has not scanned twice yet"))),
        }
    });
    for dir in ["new", "new/deep"] {
        let e = c.client(1).stat(dir).unwrap();
        assert_eq!(e["kind"], "directory", "{dir}: {e}");
        assert_eq!(e["origin"], 2, "{dir} is committed by the writer: {e}");
        assert!(
            e["version"].as_u64().unwrap() <= version,
            "{dir} is committed with the file, not after it by a scanner: {e}"
        );
    }
    for id in 1..=3 {
        let log = c.log(id);
        assert!(
            !log.contains("directory lost a race"),
            "node {id} raced for a directory:\n{log}"
        );
    }
}
