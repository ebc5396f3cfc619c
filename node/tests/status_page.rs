//! The operator's view of a real 3-node cluster: the status page rendered by
//! headless Chromium (Debian's `chromium`), and `/metrics` and `/v1/events`
//! after a write.
//!
//! Without a browser the page test fails and says how to install one;
//! `SYNOD_SKIP_BROWSER=1` skips it on purpose.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use common::TestCluster;

/// Times the page is loaded before the test gives up on it rendering the
/// cluster: a bound on attempts, not on time.
const PAGE_ATTEMPTS: usize = 10;

/// The browser to drive, found on `PATH`.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// The DOM of `url` after the page's scripts ran for 5 s of virtual time.
fn must_dump_dom(browser: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", browser.display()));
    assert!(
        out.status.success(),
        "{} --dump-dom {url} failed: {}",
        browser.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of attribute `name` in the start tag `tag` (as serialized by
/// the browser: `name="value"`).
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// The start tags of the member rows: `<tr … data-member-id=…>`.
fn member_rows(dom: &str) -> Vec<&str> {
    dom.match_indices("<tr ")
        .filter_map(|(i, _)| dom[i..].find('>').map(|end| &dom[i..i + end + 1]))
        .filter(|tag| attr(tag, "data-member-id").is_some())
        .collect()
}

/// Member id → role, as the page rendered them.
fn roles(rows: &[&str]) -> BTreeMap<u64, String> {
    rows.iter()
        .map(|tag| {
            let id = attr(tag, "data-member-id").unwrap().parse().unwrap();
            (id, attr(tag, "data-role").unwrap_or("").to_string())
        })
        .collect()
}

/// Loads node `id`'s page until it shows `members` member rows.
fn must_render_members(c: &TestCluster, browser: &PathBuf, id: usize, members: usize) -> String {
    let url = format!("http://{}/", c.apis[id - 1]);
    for attempt in 1..=PAGE_ATTEMPTS {
        let dom = must_dump_dom(browser, &url);
        if dom.contains("data-loaded=\"true\"") && member_rows(&dom).len() == members {
            return dom;
        }
        eprintln!("node {id}: page not rendered yet (load {attempt})");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    c.dump_logs();
    panic!("node {id}'s status page never showed {members} members in {PAGE_ATTEMPTS} loads");
}

#[test]
fn status_page_shows_three_members_and_one_leader() {
    let Some(browser) = chromium() else {
        if std::env::var("SYNOD_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("SYNOD_SKIP_BROWSER=1: status page test skipped");
            return;
        }
        panic!(
            "no headless browser: install Debian's `chromium` (apt-get install -y chromium; \
             .ci/run does it) or set SYNOD_SKIP_BROWSER=1 to skip this test"
        );
    };
    eprintln!("--- start 3 nodes");
    let c = TestCluster::start(3);
    let leader = c.leader();

    eprintln!("--- node 1's page");
    let dom = must_render_members(&c, &browser, 1, 3);
    let seen = roles(&member_rows(&dom));
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3],
        "members: {seen:?}"
    );
    let leaders: Vec<u64> = seen
        .iter()
        .filter(|(_, r)| *r == "leader")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(leaders, vec![leader as u64], "roles: {seen:?}");
    assert!(
        seen.values().filter(|r| *r == "follower").count() == 2,
        "roles: {seen:?}"
    );
    assert!(dom.contains("id=\"node\">1<"), "the page names its node");

    eprintln!("--- the leader's page: last contact with each follower");
    let dom = must_render_members(&c, &browser, leader, 3);
    let rows = member_rows(&dom);
    assert_eq!(roles(&rows), seen, "both pages agree on the roles");
    for tag in rows
        .iter()
        .filter(|t| attr(t, "data-member-id") != Some(&leader.to_string()))
    {
        let since = attr(tag, "data-last-contact-ms").unwrap_or("");
        assert!(
            since.parse::<u64>().is_ok(),
            "the leader shows when each follower last answered: {tag}"
        );
    }
}

#[test]
fn metrics_and_events_report_a_committed_write() {
    eprintln!("--- start 3 nodes and write one file");
    let c = TestCluster::start(3);
    let leader = c.leader();
    let follower = if leader == 1 { 2 } else { 1 };
    let content = common::random_bytes(300_000, 7);
    c.client(follower)
        .put("report.bin", &content[..], None)
        .unwrap();
    for id in 1..=3 {
        c.must_see_file(id, "report.bin", &content);
    }

    eprintln!("--- /metrics of the writer");
    let text = ureq::get(&format!("http://{}/metrics", c.apis[follower - 1]))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}"))
    };
    let n = follower;
    assert!(
        value(&format!(
            "synod_commit_latency_seconds_count{{node=\"{n}\"}}"
        )) >= 1.0
    );
    assert_eq!(
        value(&format!(
            "synod_commit_latency_seconds_bucket{{node=\"{n}\",le=\"+Inf\"}}"
        )),
        value(&format!(
            "synod_commit_latency_seconds_count{{node=\"{n}\"}}"
        ))
    );
    assert_eq!(
        value(&format!(
            "synod_raft_role{{node=\"{n}\",role=\"follower\"}}"
        )),
        1.0
    );
    assert_eq!(
        value(&format!("synod_raft_leader{{node=\"{n}\"}}")),
        leader as f64
    );
    assert!(value(&format!("synod_materialize_queue_depth{{node=\"{n}\"}}")) >= 0.0);
    assert!(value(&format!("synod_pending_edits{{node=\"{n}\"}}")) >= 0.0);
    assert!(value(&format!("synod_udp_receive_drops{{node=\"{n}\"}}")) >= 0.0);
    // The writer pushed the content to at least one other node.
    let pushed: f64 = text
        .lines()
        .filter(|l| l.starts_with(&format!("synod_peer_chunk_bytes_sent{{node=\"{n}\",peer=")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        pushed >= content.len() as f64,
        "chunk bytes sent per peer: {pushed}\n{text}"
    );

    eprintln!("--- /metrics of the leader");
    let text = ureq::get(&format!("http://{}/metrics", c.apis[leader - 1]))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains(&format!(
            "synod_raft_role{{node=\"{leader}\",role=\"leader\"}} 1\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "synod_peer_last_answer_seconds{{node=\"{leader}\",peer=\"{follower}\"}}"
        )),
        "{text}"
    );

    eprintln!("--- /v1/events on every node");
    for id in 1..=3 {
        let ev = c.client(id).get_json("/v1/events").unwrap();
        let events = ev["events"].as_array().unwrap();
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "materialized" && e["subject"] == "report.bin"),
            "node {id} events: {ev}"
        );
        let after = events.last().unwrap()["seq"].as_u64().unwrap();
        let none = c
            .client(id)
            .get_json(&format!("/v1/events?after={after}"))
            .unwrap();
        assert_eq!(none["events"].as_array().map(Vec::len), Some(0));
    }
}
