//! The lab network: one namespace per node (`slab-nN`, address 10.77.0.1N on
//! its `eth0`), veth pairs (`slab-vN` on the host side) joined by the bridge
//! `slab-br` (10.77.0.1, the lab's own address). All traffic stays on that
//! bridge and inside the namespaces.
//!
//! Faults are installed inside the receiving node's namespace: an nftables
//! table `inet synodlab` with an input chain (dropping on input loses packets
//! silently; an output drop would make `send` fail with EPERM), and `tc`
//! qdiscs on the node's `eth0`. Rules in the namespaces also keep clear of
//! the host's own nftables hooks, which bridged traffic traverses when
//! `br_netfilter` is loaded. Setup first removes anything a previous run
//! left, so a run killed half way never trips the next one.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const BRIDGE: &str = "slab-br";
pub const NS_PREFIX: &str = "slab-n";
pub const VETH_PREFIX: &str = "slab-v";
pub const LAB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// Name of node `id`'s namespace.
pub fn namespace(id: u64) -> String {
    format!("{NS_PREFIX}{id}")
}

/// Address of node `id` inside its namespace.
pub fn node_addr(id: u64) -> Ipv4Addr {
    let last = u8::try_from(10 + id).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 77, 0, last)
}

/// Runs a command, returning stdout; stderr becomes the error.
pub fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    run_with_input(program, args, None)
}

fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String, NetError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| NetError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `program args` inside node `id`'s namespace.
pub fn in_ns(id: u64, program: &str, args: &[&str]) -> Result<String, NetError> {
    let ns = namespace(id);
    let mut full = vec!["netns", "exec", ns.as_str(), program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Removes every namespace, veth and bridge a lab run may have left.
pub fn clean() -> Result<Vec<String>, NetError> {
    let mut removed = Vec::new();
    let list = run("ip", &["netns", "list"]).unwrap_or_default();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(NS_PREFIX) {
            run("ip", &["netns", "del", name])?;
            removed.push(format!("namespace {name}"));
        }
    }
    let links = run("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "12: slab-v1@if3: <...>": the name is the second field.
        let name = line
            .split(':')
            .nth(1)
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .unwrap_or_default();
        if name == BRIDGE || name.starts_with(VETH_PREFIX) {
            // A veth whose namespace was just deleted may already be going.
            if run("ip", &["link", "del", &name]).is_ok() {
                removed.push(format!("link {name}"));
            }
        }
    }
    // Deleted veths linger for about a second; wait until they are gone so
    // the next setup can reuse the names.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let links = run("ip", &["-o", "link", "show"]).unwrap_or_default();
        if !links.contains(VETH_PREFIX) && !links.contains(BRIDGE) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(removed)
}

/// Creates the bridge and one namespace per node (ids `1..=nodes`).
pub fn setup(nodes: u64) -> Result<(), NetError> {
    clean()?;
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run("ip", &["addr", "add", "10.77.0.1/24", "dev", BRIDGE])?;
    run("ip", &["link", "set", BRIDGE, "up"])?;
    for id in 1..=nodes {
        let ns = namespace(id);
        let veth = format!("{VETH_PREFIX}{id}");
        let addr = format!("{}/24", node_addr(id));
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run("ip", &["link", "set", &veth, "master", BRIDGE, "up"])?;
        in_ns(id, "ip", &["link", "set", "lo", "up"])?;
        in_ns(id, "ip", &["addr", "add", &addr, "dev", "eth0"])?;
        in_ns(id, "ip", &["link", "set", "eth0", "up"])?;
        nft(
            id,
            "table inet synodlab {\n chain input {\n  type filter hook input priority 0; policy accept;\n }\n}\n",
        )?;
    }
    Ok(())
}

fn nft(id: u64, script: &str) -> Result<(), NetError> {
    let ns = namespace(id);
    run_with_input(
        "ip",
        &["netns", "exec", &ns, "nft", "-f", "-"],
        Some(script),
    )?;
    Ok(())
}

/// Node `id` drops every packet from `sources` (other nodes).
pub fn drop_from(id: u64, sources: &[u64]) -> Result<(), NetError> {
    let mut script = String::from("flush chain inet synodlab input\n");
    if !sources.is_empty() {
        let set: Vec<String> = sources.iter().map(|s| node_addr(*s).to_string()).collect();
        script.push_str(&format!(
            "add rule inet synodlab input ip saddr {{ {} }} drop\n",
            set.join(", ")
        ));
    }
    nft(id, &script)
}

/// Node `id` drops `percent`% of the packets from other nodes at random
/// (the lab's own API traffic from the bridge address is spared).
pub fn random_loss(id: u64, percent: u8) -> Result<(), NetError> {
    nft(
        id,
        &format!(
            "flush chain inet synodlab input\nadd rule inet synodlab input ip saddr 10.77.0.0/24 ip saddr != {LAB_ADDR} numgen random mod 100 < {percent} drop\n"
        ),
    )
}

/// Removes node `id`'s packet filters.
pub fn heal(id: u64) -> Result<(), NetError> {
    nft(id, "flush chain inet synodlab input\n")
}

/// Caps node `id`'s outgoing bandwidth with a token bucket.
pub fn cap_bandwidth(id: u64, rate: &str) -> Result<(), NetError> {
    in_ns(
        id,
        "tc",
        &[
            "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kbit",
            "latency", "400ms",
        ],
    )?;
    Ok(())
}

/// Limits node `id`'s link to `rate` both ways: a token bucket on its
/// `eth0` (what it sends) and on its host-side veth (what it receives),
/// with a burst large enough for fast rates (`32kbit` would cap them).
pub fn limit_link(id: u64, rate: &str) -> Result<(), NetError> {
    let tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "100ms"];
    let mut inside = vec!["qdisc", "replace", "dev", "eth0", "root"];
    inside.extend_from_slice(&tbf);
    in_ns(id, "tc", &inside)?;
    let veth = format!("{VETH_PREFIX}{id}");
    let mut host = vec!["qdisc", "replace", "dev", veth.as_str(), "root"];
    host.extend_from_slice(&tbf);
    run("tc", &host)?;
    Ok(())
}

/// Removes node `id`'s qdisc (no error if there was none).
pub fn uncap_bandwidth(id: u64) {
    let _ = in_ns(id, "tc", &["qdisc", "del", "dev", "eth0", "root"]);
}

/// Delays node `id`'s outgoing packets by 0..=`max_ms` (uniform jitter)
/// and sends a quarter of them at once, so packets overtake each other
/// (`netem`; see [`netem_available`]). Removed by [`uncap_bandwidth`].
pub fn netem_delay(id: u64, max_ms: u64) -> Result<(), NetError> {
    let half = format!("{}ms", max_ms.div_ceil(2));
    in_ns(
        id,
        "tc",
        &[
            "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", &half, &half, "reorder",
            "25%", "50%",
        ],
    )?;
    Ok(())
}

/// Whether the kernel has `netem` (delay/reorder); probed on node 1's eth0.
pub fn netem_available() -> bool {
    let ok = in_ns(
        1,
        "tc",
        &[
            "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms",
        ],
    )
    .is_ok();
    if ok {
        uncap_bandwidth(1);
    }
    ok
}

/// Whether this process can manage namespaces (root, `ip` and `nft` present).
pub fn preflight() -> Result<(), NetError> {
    run("ip", &["netns", "list"])?;
    run("nft", &["--version"])?;
    run("tc", &["-V"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(node_addr(1).to_string(), "10.77.0.11");
        assert_eq!(node_addr(5).to_string(), "10.77.0.15");
        assert_eq!(namespace(3), "slab-n3");
    }

    /// Needs root, iproute2, nftables and tc; touches the real `slab-*`
    /// names, so it is opt-in: `cargo nextest run -p synod-lab --run-ignored all`.
    #[test]
    #[ignore]
    fn setup_rules_and_clean_round_trip() {
        setup(2).expect("setup");
        let ns = run("ip", &["netns", "list"]).expect("list");
        assert!(ns.contains("slab-n1") && ns.contains("slab-n2"), "{ns}");
        let addr = in_ns(2, "ip", &["-br", "addr"]).expect("addr");
        assert!(addr.contains("10.77.0.12/24"), "{addr}");
        drop_from(1, &[2]).expect("partition");
        let rules = in_ns(1, "nft", &["list", "ruleset"]).expect("rules");
        assert!(
            rules.contains("10.77.0.12") && rules.contains("drop"),
            "{rules}"
        );
        random_loss(2, 25).expect("loss");
        let rules = in_ns(2, "nft", &["list", "ruleset"]).expect("rules");
        assert!(rules.contains("numgen random mod 100 < 25"), "{rules}");
        heal(1).expect("heal");
        let rules = in_ns(1, "nft", &["list", "ruleset"]).expect("rules");
        assert!(!rules.contains("drop"), "{rules}");
        cap_bandwidth(1, "512kbit").expect("tbf");
        let q = in_ns(1, "tc", &["qdisc", "show", "dev", "eth0"]).expect("qdisc");
        assert!(q.contains("tbf"), "{q}");
        uncap_bandwidth(1);
        eprintln!("netem available: {}", netem_available());
        // Idempotent: a second setup over the first works.
        setup(2).expect("setup again");
        clean().expect("clean");
        let ns = run("ip", &["netns", "list"]).expect("list");
        assert!(!ns.contains(NS_PREFIX), "{ns}");
        let links = run("ip", &["-o", "link", "show"]).expect("links");
        assert!(
            !links.contains(BRIDGE) && !links.contains(VETH_PREFIX),
            "{links}"
        );
    }
}
