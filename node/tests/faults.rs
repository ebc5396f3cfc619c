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
