//! End-to-end tests: three real `synod` processes on loopback.

mod common;

use common::{random_bytes, TestCluster};

#[test]
fn a_put_appears_byte_identical_everywhere() {
    let c = TestCluster::start(3);
    let data = random_bytes(3_000_000, 1);
    let r = c.client(1).put("docs/report.bin", &data[..], None).unwrap();
    assert!(r["version"].as_u64().unwrap() > 0);
    for id in 1..=3 {
        c.must_see_file(id, "docs/report.bin", &data);
    }
    // Read back through another node's API.
    let mut out = Vec::new();
    c.client(3).cat("docs/report.bin", &mut out).unwrap();
    assert_eq!(out, data);
    // An empty file is a file too.
    c.client(2).put("empty", &b""[..], None).unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "empty", b"");
    }
    // Versions that overtake each other leave no upload behind.
    for i in 0..5u64 {
        c.client(1)
            .put("docs/report.bin", &random_bytes(10_000, 100 + i)[..], None)
            .unwrap();
    }
    for id in 1..=3 {
        c.must_see_file(id, "docs/report.bin", &random_bytes(10_000, 104));
        let tmp = c.folder(id).join(".synod/tmp");
        c.must_retry(&format!("node {id} to drop its temp files"), || {
            let left = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
            if left == 0 {
                Ok(())
            } else {
                Err(common::io(format!("{left} temp files left")))
            }
        });
    }
}

#[test]
fn a_small_put_travels_in_the_log_and_outlives_its_writer() {
    let mut c = TestCluster::start(3);
    let writer = (c.leader() % 3) + 1; // a follower: its proposal is forwarded
                                       // Until a node has learnt the membership it cannot count on a quorum:
                                       // its first write may push content instead.
    c.client(writer).put("warm-up", &b"x"[..], None).unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "warm-up", b"x");
    }
    let before: Vec<u64> = (1..=3).map(|id| moved(&c, id)).collect();
    let small: Vec<Vec<u8>> = (0..20u64)
        .map(|i| random_bytes(100 + 200 * i as usize, i))
        .collect();
    for (i, data) in small.iter().enumerate() {
        c.client(writer)
            .put(&format!("small/{i}"), &data[..], None)
            .unwrap();
    }
    for id in 1..=3 {
        for (i, data) in small.iter().enumerate() {
            c.must_see_file(id, &format!("small/{i}"), data);
        }
        assert_eq!(
            moved(&c, id),
            before[id - 1],
            "node {id}: small files came in the log, not as chunk transfers"
        );
    }
    // Answered means durable on a quorum: the writer may die at once.
    let last = random_bytes(4096, 99);
    c.client(writer).put("small/last", &last[..], None).unwrap();
    c.kill_node(writer);
    for id in (1..=3).filter(|&id| id != writer) {
        c.must_see_file(id, "small/last", &last);
    }
}

#[test]
fn with_a_copy_on_every_node_small_files_are_pushed_before_the_commit() {
    let c = TestCluster::start_with(3, "[replication]\ncopies = 3\n");
    let data = random_bytes(1000, 7);
    c.client(1).put("small", &data[..], None).unwrap();
    // The commit alone would reach only a quorum: the content was pushed.
    for id in 2..=3 {
        assert!(
            moved(&c, id) >= data.len() as u64,
            "node {id} got the content pushed"
        );
        c.must_see_file(id, "small", &data);
    }
}

#[test]
fn a_large_write_to_three_voters_leaves_the_writer_once() {
    let mut c = TestCluster::start(4);
    let data = random_bytes(64 << 20, 5);
    let size = data.len() as u64;
    c.client(1).put("big.bin", &data[..], None).unwrap();
    // Pushed in stripes, each peer copying the others' from them: racing
    // whole pushes to three peers would have sent it three times.
    let pushed = c.metrics(1)["bytes_pushed"].as_u64().unwrap();
    eprintln!("writer pushed {pushed} bytes of a {size}-byte file to three peers");
    assert!(
        pushed >= size && pushed < size + size / 8,
        "writer pushed {pushed} bytes, expected about one copy ({size})"
    );
    for id in 2..=4 {
        let m = c.metrics(id);
        let (got_pushed, copied) = (
            m["bytes_received_pushed"].as_u64().unwrap(),
            m["bytes_fetched"].as_u64().unwrap(),
        );
        eprintln!("node {id}: {got_pushed} bytes pushed, {copied} copied from its peers");
        assert!(
            got_pushed > size / 6 && copied > size / 2,
            "node {id} got {got_pushed} pushed and {copied} copied, expected a third and two thirds"
        );
    }
    // Every voter that answered got the content before the answer, not
    // only the two a majority needs: the writer may die at once.
    c.kill_node(1);
    for id in 2..=4 {
        c.must_see_file(id, "big.bin", &data);
        // Its chunks were staged where they belong in the file, so placing
        // it moved that file instead of writing the bytes a second time.
        let placed = c.metrics(id)["files_placed_as_staged"].as_u64().unwrap();
        assert_eq!(placed, 1, "node {id} placed big.bin from its staged file");
    }
}

#[test]
fn a_large_file_staged_on_its_holders_survives_them_being_killed() {
    let mut c = TestCluster::start(4);
    let data = random_bytes(64 << 20, 8);
    c.client(1).put("big.bin", &data[..], None).unwrap();
    // At once, the writer last: whoever has not placed the file yet holds
    // it only in its staged file (bytes and list), with no writer left to
    // fetch from. Restarted, each must end with the whole file.
    for id in [2, 3, 4, 1] {
        c.kill_node(id);
    }
    for id in 2..=4 {
        c.start_node(id);
    }
    for id in 2..=4 {
        c.must_see_file(id, "big.bin", &data);
        let m = c.metrics(id);
        eprintln!(
            "node {id} after its restart: {} placed as staged, {} chunk bytes fetched",
            m["files_placed_as_staged"], m["bytes_fetched"]
        );
    }
}

#[test]
fn a_large_write_is_striped_past_a_dead_voter() {
    let mut c = TestCluster::start(4);
    c.kill_node(4);
    let data = random_bytes(64 << 20, 6);
    let size = data.len() as u64;
    // Node 4 does not answer which chunks it lacks: the stripes go to
    // nodes 2 and 3, once, and the write does not wait for node 4.
    c.must_retry("a put with node 4 down", || {
        c.client(1).put("big.bin", &data[..], None)
    });
    let pushed = c.metrics(1)["bytes_pushed"].as_u64().unwrap();
    assert!(
        pushed >= size && pushed < size + size / 8,
        "writer pushed {pushed} bytes, expected one copy ({size})"
    );
    for id in 2..=3 {
        c.must_see_file(id, "big.bin", &data);
    }
    c.start_node(4);
    c.must_see_file(4, "big.bin", &data);
}

#[test]
fn an_edit_in_a_large_file_moves_only_changed_chunks() {
    let c = TestCluster::start(3);
    let mut data = random_bytes(64 << 20, 2);
    c.client(1).put("big.bin", &data[..], None).unwrap();
    for id in 2..=3 {
        c.must_see_file(id, "big.bin", &data);
    }
    let before: Vec<(u64, u64, u64)> = (2..=3)
        .map(|id| (moved(&c, id), manifests(&c, id), rebuilt(&c, id)))
        .collect();
    // Overwrite 100 bytes in the middle.
    let mid = data.len() / 2;
    data[mid..mid + 100].copy_from_slice(&[0xAB; 100]);
    c.client(1).put("big.bin", &data[..], None).unwrap();
    for id in 2..=3 {
        c.must_see_file(id, "big.bin", &data);
    }
    for (k, id) in (2..=3).enumerate() {
        let delta = moved(&c, id) - before[k].0;
        let listed = manifests(&c, id) - before[k].1;
        eprintln!(
            "node {id} received {delta} chunk bytes and {listed} manifest bytes for a 100-byte edit of a 64 MiB file"
        );
        // The changed chunk travels as a delta against the one it replaces.
        assert!(
            delta < 4 << 10,
            "node {id} received {delta} bytes, expected a delta < 4 KiB"
        );
        assert!(
            rebuilt(&c, id) - before[k].2 >= 1,
            "node {id} rebuilt no chunk"
        );
        // The whole manifest (about 1,000 ids) is 36 KiB: a patch of the
        // version the node holds carries the few new ids.
        assert!(
            listed < 4 << 10,
            "node {id} received {listed} manifest bytes, expected a patch < 4 KiB"
        );
    }
}

#[test]
fn an_edit_in_a_small_file_moves_as_a_delta() {
    let c = TestCluster::start(3);
    let mut data = random_bytes(100 << 10, 5);
    c.client(1).put("notes.bin", &data[..], None).unwrap();
    for id in 2..=3 {
        c.must_see_file(id, "notes.bin", &data);
    }
    let before: Vec<(u64, u64)> = (2..=3).map(|id| (moved(&c, id), rebuilt(&c, id))).collect();
    let mid = data.len() / 2;
    data[mid..mid + 100].copy_from_slice(&[0xCD; 100]);
    c.client(1).put("notes.bin", &data[..], None).unwrap();
    for id in 2..=3 {
        c.must_see_file(id, "notes.bin", &data);
    }
    for (k, id) in (2..=3).enumerate() {
        let delta = moved(&c, id) - before[k].0;
        eprintln!("node {id} received {delta} bytes for a 100-byte edit of a 100 KiB file");
        assert!(
            rebuilt(&c, id) - before[k].1 >= 1,
            "node {id} rebuilt no chunk"
        );
        // A 100 KiB file is cut into ~32 KiB chunks, and the one or two a
        // peer lacks travel as deltas against the ones they replace.
        assert!(
            delta <= 2 << 10,
            "node {id} received {delta} bytes, expected deltas of at most 2 KiB"
        );
    }
}

#[test]
fn a_node_that_missed_an_edit_fetches_the_changed_chunk_as_a_delta() {
    let mut c = TestCluster::start(3);
    let mut data = random_bytes(8 << 20, 7);
    c.client(1).put("log.bin", &data[..], None).unwrap();
    c.must_see_file(3, "log.bin", &data);
    c.kill_node(3);
    // Two copies of three: the edit commits without node 3.
    data.splice(0..0, [0x5A; 100]);
    c.client(1).put("log.bin", &data[..], None).unwrap();
    c.start_node(3);
    c.must_see_file(3, "log.bin", &data);
    // Its counters started at zero with the restart.
    let (delta, rebuilt) = (moved(&c, 3), rebuilt(&c, 3));
    eprintln!("node 3 fetched {delta} bytes and rebuilt {rebuilt} chunks for 100 bytes inserted at the start of an 8 MiB file");
    assert!(rebuilt >= 1, "node 3 rebuilt no chunk");
    assert!(
        delta < 4 << 10,
        "node 3 fetched {delta} bytes, expected a delta < 4 KiB"
    );
}

/// Encoded manifest bytes pushed to a node.
fn manifests(c: &TestCluster, id: usize) -> u64 {
    c.metrics(id)["manifest_bytes_received"].as_u64().unwrap()
}

/// Chunk bytes a node received, fetched or pushed whole or as deltas.
fn moved(c: &TestCluster, id: usize) -> u64 {
    let m = c.metrics(id);
    [
        "bytes_fetched",
        "bytes_received_pushed",
        "delta_bytes_received",
    ]
    .iter()
    .map(|k| m[*k].as_u64().unwrap())
    .sum()
}

/// Chunks a node rebuilt from pushed deltas.
fn rebuilt(c: &TestCluster, id: usize) -> u64 {
    c.metrics(id)["chunks_rebuilt"].as_u64().unwrap()
}

#[test]
fn deletes_and_renames_propagate() {
    let c = TestCluster::start(3);
    let a = random_bytes(200_000, 3);
    c.client(1).put("a.txt", &a[..], None).unwrap();
    c.client(1).put("gone.txt", &b"bye"[..], None).unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "a.txt", &a);
        c.must_see_file(id, "gone.txt", b"bye");
    }
    let fetched_before: Vec<u64> = (1..=3)
        .map(|id| c.metrics(id)["bytes_fetched"].as_u64().unwrap())
        .collect();
    c.client(2).rename("a.txt", "dir/b.txt").unwrap();
    c.client(3).delete("gone.txt", None).unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "dir/b.txt", &a);
        c.must_not_see_file(id, "a.txt");
        c.must_not_see_file(id, "gone.txt");
    }
    for id in 1..=3 {
        let after = c.metrics(id)["bytes_fetched"].as_u64().unwrap();
        assert_eq!(
            after,
            fetched_before[id - 1],
            "node {id}: a rename moved bytes over the network"
        );
    }
    let err = c.client(1).stat("gone.txt").unwrap_err();
    assert_eq!(err.status(), Some(404));
}

#[test]
fn concurrent_conditional_writes_have_one_winner() {
    let c = TestCluster::start(3);
    let r = c.client(1).put("shared.cfg", &b"v1"[..], None).unwrap();
    let v = r["version"].as_u64().unwrap();
    let (c2, c3) = (c.client(2), c.client(3));
    let t2 = std::thread::spawn(move || c2.put("shared.cfg", &b"from node 2"[..], Some(v)));
    let t3 = std::thread::spawn(move || c3.put("shared.cfg", &b"from node 3"[..], Some(v)));
    let results = [t2.join().unwrap(), t3.join().unwrap()];
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.status() == Some(409)))
        .count();
    assert_eq!((ok, conflicts), (1, 1), "results: {results:?}");
    let winner: &[u8] = if results[0].is_ok() {
        b"from node 2"
    } else {
        b"from node 3"
    };
    for id in 1..=3 {
        c.must_see_file(id, "shared.cfg", winner);
    }
}

#[test]
fn bad_requests_get_json_errors_and_change_nothing() {
    let c = TestCluster::start(3);
    let client = c.client(1);
    // Raw request lines, so no client normalizes the path first.
    for bad in [
        "..%2Fx",
        "a/../x",
        ".synod/x",
        "a//b",
        "a%00b",
        "%2Fetc%2Fpasswd",
        "x/..",
    ] {
        let (status, body) = raw_request(&c.apis[0], "PUT", &format!("/v1/files/{bad}"), b"x");
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("\"bad_path\""), "{bad}: {body}");
    }
    // Wrong If-Match on a new path and on an existing one.
    let err = client.put("new.txt", &b"x"[..], Some(41)).unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let v = client.put("new.txt", &b"x"[..], Some(0)).unwrap()["version"]
        .as_u64()
        .unwrap();
    let err = client
        .put("new.txt", &b"y"[..], Some(v + 1000))
        .unwrap_err();
    assert_eq!(err.status(), Some(409));
    let err = client.put("new.txt", &b"y"[..], Some(0)).unwrap_err();
    assert_eq!(err.status(), Some(409), "If-None-Match on an existing path");
    // Oversized body: refused from its Content-Length, before any byte is read.
    let (status, body) = raw_put_header_only(&c.apis[0], "huge.bin", 100_000_001);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"too_large\""), "{body}");
    // Unknown route.
    let err = client.get_json("/v1/nope").unwrap_err();
    assert_eq!(err.status(), Some(404));
    let listing = client.list("").unwrap();
    let paths: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["new.txt"]);
    // Placed: the materializer's own temp file for it is gone.
    c.must_see_file(1, "new.txt", b"x");
    let tmp_left = std::fs::read_dir(c.folder(1).join(".synod/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp_left, 0, "rejected uploads leave no temp files");
    assert!(!c.dir.path().join("x").exists());
}

/// Sends only the headers of a PUT claiming `len` bytes; returns the status
/// and the whole answer.
fn raw_put_header_only(api: &str, path: &str, len: u64) -> (u16, String) {
    raw(api, &format!("PUT /v1/files/{path} HTTP/1.1\r\nHost: {api}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"), b"")
}

/// One HTTP/1.1 request with `body`, the target sent exactly as given.
fn raw_request(api: &str, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {api}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    raw(api, &head, body)
}

fn raw(api: &str, head: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}
