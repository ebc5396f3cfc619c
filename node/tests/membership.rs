//! Membership through the CLI: a learner receives everything and serves
//! chunks without voting; a removed node stops being served.

mod common;

use common::{io, random_bytes, TestCluster};

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "synod failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_learner_receives_everything_is_promoted_and_a_removed_node_is_cut_off() {
    let mut c = TestCluster::start(3);
    let before = random_bytes(400_000, 50);
    c.client(1).put("early.bin", &before[..], None).unwrap();

    let (id, addr, peer) = c.start_extra_node();
    let listed = ok(c.cli(&["cluster", "add-learner", &id.to_string(), &addr, &peer]));
    assert!(listed.contains("learner"), "{listed}");
    // Everything committed before and after reaches the learner.
    c.must_see_file(id, "early.bin", &before);
    let after = random_bytes(300_000, 51);
    c.client(2).put("later.bin", &after[..], None).unwrap();
    c.must_see_file(id, "later.bin", &after);
    let members = ok(c.cli(&["cluster", "members"]));
    assert!(
        members
            .lines()
            .any(|l| l.contains(&format!("node {id}")) && l.contains("learner")),
        "{members}"
    );
    let s = c.client(id).status().unwrap();
    assert_eq!(s["role"], "learner", "{s}");
    assert!(!s["voters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == id as u64));

    // A voter that lost its copy can fetch from the learner.
    ok(c.cli(&["cluster", "promote", &id.to_string()]));
    c.must_retry("four voters", || {
        let s = c.client(1).status()?;
        if s["voters"].as_array().map_or(0, |v| v.len()) == 4 {
            Ok(())
        } else {
            Err(io(format!("voters {}", s["voters"])))
        }
    });

    // Remove node 3: it is no longer a member, and no longer served.
    ok(c.cli(&["cluster", "remove", "3"]));
    c.must_retry("node 3 out of the membership", || {
        let s = c.client(1).status()?;
        let v = s["voters"].as_array().unwrap();
        if v.len() == 3 && !v.iter().any(|x| x == 3) {
            Ok(())
        } else {
            Err(io(format!("voters {v:?}")))
        }
    });
    let last = random_bytes(200_000, 52);
    c.client(1)
        .put("after-remove.bin", &last[..], None)
        .unwrap();
    c.must_see_file(id, "after-remove.bin", &last);
    // Node 3 never gets it: the others refuse it and send it nothing.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(!c.folder(3).join("after-remove.bin").exists());
    // Errors name the problem.
    let out = c.cli(&["cluster", "remove", "9"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("member 9"),
        "{out:?}"
    );
}
