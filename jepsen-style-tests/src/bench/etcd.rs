//! etcd: a 3-member cluster on loopback (fsync on, etcd's default), driven
//! through its JSON gateway (`POST /v3/kv/put`) by the same HTTP client
//! that drives synod's API.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::procs::{free_port, wait_for, Procs};

/// Standard base64 (etcd's gateway encodes bytes fields so).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The command line of member `i` (0-based) of a cluster whose members
/// listen on `peers` and serve clients on `clients`.
pub fn member_args(dir: &Path, i: usize, clients: &[u16], peers: &[u16]) -> Vec<String> {
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(j, p)| format!("e{}=http://127.0.0.1:{p}", j + 1))
        .collect();
    let client = format!("http://127.0.0.1:{}", clients[i]);
    let peer = format!("http://127.0.0.1:{}", peers[i]);
    vec![
        format!("--name=e{}", i + 1),
        format!("--data-dir={}", dir.join(format!("e{}", i + 1)).display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster={}", initial.join(",")),
        "--initial-cluster-token=synod-bench".into(),
        "--initial-cluster-state=new".into(),
        "--log-level=warn".into(),
        "--logger=zap".into(),
    ]
}

/// Three running members.
#[derive(Debug)]
pub struct EtcdCluster {
    /// Client endpoints `127.0.0.1:port`.
    pub endpoints: Vec<String>,
    procs: Procs,
}

impl EtcdCluster {
    pub fn start(dir: &Path) -> Result<EtcdCluster> {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let mut procs = Procs::new(dir);
        for i in 0..3 {
            let mut cmd = Command::new("etcd");
            cmd.args(member_args(dir, i, &clients, &peers));
            procs.spawn(
                &format!("etcd e{}", i + 1),
                cmd,
                &dir.join(format!("logs/etcd-e{}.log", i + 1)),
            )?;
        }
        let endpoints: Vec<String> = clients.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        wait_for(
            "etcd cluster healthy",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                procs.check_alive()?;
                for e in &endpoints {
                    let v: Value = agent
                        .get(&format!("http://{e}/health"))
                        .call()?
                        .into_json()?;
                    if v["health"] != "true" {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )?;
        Ok(EtcdCluster { endpoints, procs })
    }

    /// The leader's client endpoint.
    pub fn leader(&self) -> Result<String> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        wait_for(
            "etcd leader",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                for e in &self.endpoints {
                    let v: Value = agent
                        .post(&format!("http://{e}/v3/maintenance/status"))
                        .send_json(json!({}))?
                        .into_json()?;
                    let me = v["header"]["member_id"].as_str().unwrap_or("");
                    if !me.is_empty() && v["leader"].as_str() == Some(me) {
                        return Ok(Some(e.clone()));
                    }
                }
                Ok(None)
            },
        )
    }

    pub fn stop(&mut self) {
        self.procs.stop();
    }
}

/// `PUT key = value` through the gateway.
pub fn put(agent: &ureq::Agent, endpoint: &str, key: &str, value: &[u8]) -> Result<()> {
    agent
        .post(&format!("http://{endpoint}/v3/kv/put"))
        .send_json(json!({ "key": base64(key.as_bytes()), "value": base64(value) }))
        .with_context(|| format!("etcd put {key} at {endpoint}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn members_know_the_whole_cluster() {
        let a = member_args(Path::new("/r"), 1, &[1, 2, 3], &[11, 12, 13]);
        assert!(a.contains(&"--name=e2".to_string()));
        assert!(a.contains(&"--data-dir=/r/e2".to_string()));
        assert!(a.contains(&"--listen-client-urls=http://127.0.0.1:2".to_string()));
        assert!(a.contains(
            &"--initial-cluster=e1=http://127.0.0.1:11,e2=http://127.0.0.1:12,e3=http://127.0.0.1:13"
                .to_string()
        ));
        assert!(!a.iter().any(|x| x.contains("unsafe-no-fsync")));
    }
}
