//! Syncthing: three instances on loopback, one shared folder, devices and
//! addresses configured statically; global and local discovery, relays,
//! NAT traversal, usage reporting, crash reporting and upgrades off; fsync
//! left at its default (on). The source is scanned by `POST /rest/db/scan`
//! when the files are in place (the watcher is off, so no scan it started
//! can make that call return early with the change not yet seen). Keys come from `syncthing generate`; the whole
//! `config.xml` is then written by [`config_xml`].
//!
//! Completion is Syncthing's own: node 1's `GET /rest/db/completion` for
//! each receiving device at 100 % with nothing left to pull or delete, and
//! that device's own `GET /rest/db/status` idle, nothing needed, its view
//! of the folder equal to node 1's files and bytes.
//! Bytes on the wire are its `GET /rest/system/connections` totals
//! (`inBytesTotal` of each receiving node, all connections).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::procs::{free_port, run_bounded, wait_for, Procs};

pub const FOLDER_ID: &str = "synod-bench";

/// One instance's identity and addresses.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub home: PathBuf,
    pub folder: PathBuf,
    pub listen: String,
    pub gui: String,
    pub api_key: String,
}

/// The complete `config.xml` of instance `me` of `all`.
pub fn config_xml(version: u32, all: &[Instance], me: usize) -> String {
    let this = &all[me];
    let mut s = format!("<configuration version=\"{version}\">\n");
    s.push_str(&format!(
        "    <folder id=\"{FOLDER_ID}\" label=\"bench\" path=\"{}\" type=\"sendreceive\" rescanIntervalS=\"3600\" fsWatcherEnabled=\"false\" ignorePerms=\"false\" autoNormalize=\"true\">\n",
        this.folder.display()
    ));
    for d in all {
        s.push_str(&format!("        <device id=\"{}\"></device>\n", d.id));
    }
    s.push_str("        <disableFsync>false</disableFsync>\n        <minDiskFree unit=\"%\">0</minDiskFree>\n    </folder>\n");
    for (i, d) in all.iter().enumerate() {
        s.push_str(&format!(
            "    <device id=\"{}\" name=\"node{}\" compression=\"metadata\" introducer=\"false\">\n        <address>tcp://{}</address>\n    </device>\n",
            d.id,
            i + 1,
            d.listen
        ));
    }
    s.push_str(&format!(
        "    <gui enabled=\"true\" tls=\"false\">\n        <address>{}</address>\n        <apikey>{}</apikey>\n    </gui>\n",
        this.gui, this.api_key
    ));
    s.push_str(&format!(
        "    <options>\n        <listenAddress>tcp://{}</listenAddress>\n        <globalAnnounceEnabled>false</globalAnnounceEnabled>\n        <localAnnounceEnabled>false</localAnnounceEnabled>\n        <relaysEnabled>false</relaysEnabled>\n        <natEnabled>false</natEnabled>\n        <urAccepted>-1</urAccepted>\n        <urSeen>3</urSeen>\n        <crashReportingEnabled>false</crashReportingEnabled>\n        <autoUpgradeIntervalH>0</autoUpgradeIntervalH>\n        <startBrowser>false</startBrowser>\n        <reconnectionIntervalS>1</reconnectionIntervalS>\n        <setLowPriority>false</setLowPriority>\n        <minHomeDiskFree unit=\"%\">0</minHomeDiskFree>\n    </options>\n</configuration>\n",
        this.listen
    ));
    s
}

/// Device id and config version from a generated `config.xml`.
pub fn read_generated(xml: &str) -> Option<(String, u32)> {
    let version = xml
        .split("<configuration version=\"")
        .nth(1)?
        .split('"')
        .next()?
        .parse()
        .ok()?;
    let id = xml.split("<device id=\"").nth(1)?.split('"').next()?;
    Some((id.to_string(), version))
}

/// Three running instances.
#[derive(Debug)]
pub struct SyncthingCluster {
    pub nodes: Vec<Instance>,
    procs: Procs,
    agent: ureq::Agent,
}

impl SyncthingCluster {
    /// Generates keys and config under `dir`, starts three instances, and
    /// waits until every pair is connected and every folder idle.
    pub fn start(dir: &Path) -> Result<SyncthingCluster> {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}/logs", dir.display()))?;
        let mut nodes = Vec::new();
        let mut version = 0;
        for i in 1..=3 {
            let home = dir.join(format!("node{i}/home"));
            let folder = dir.join(format!("node{i}/folder"));
            std::fs::create_dir_all(folder.join(".stfolder"))
                .with_context(|| format!("creating {}", folder.display()))?;
            let mut cmd = Command::new("syncthing");
            cmd.arg("generate")
                .arg(format!("--home={}", home.display()))
                .env("STNODEFAULTFOLDER", "1");
            let log = dir.join(format!("logs/generate-node{i}.log"));
            let (status, _) = run_bounded(cmd, Duration::from_secs(60), &log)?;
            ensure!(
                status.success(),
                "syncthing generate failed; see {}",
                log.display()
            );
            let xml = std::fs::read_to_string(home.join("config.xml"))
                .with_context(|| format!("reading {}", home.display()))?;
            let (id, v) = read_generated(&xml)
                .with_context(|| format!("no device id in {}/config.xml", home.display()))?;
            version = v;
            nodes.push(Instance {
                id,
                home,
                folder,
                listen: format!("127.0.0.1:{}", free_port()?),
                gui: format!("127.0.0.1:{}", free_port()?),
                api_key: format!("synod-bench-key-{i}"),
            });
        }
        for (i, n) in nodes.iter().enumerate() {
            let path = n.home.join("config.xml");
            std::fs::write(&path, config_xml(version, &nodes, i))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let mut procs = Procs::new(dir);
        for (i, n) in nodes.iter().enumerate() {
            let mut cmd = Command::new("syncthing");
            cmd.arg("serve")
                .arg(format!("--home={}", n.home.display()))
                .args(["--no-browser", "--no-restart", "--no-upgrade"])
                .env("STNORESTART", "1")
                .env("STNOUPGRADE", "1")
                .env("STNODEFAULTFOLDER", "1");
            procs.spawn(
                &format!("syncthing node{}", i + 1),
                cmd,
                &dir.join(format!("logs/syncthing-node{}.log", i + 1)),
            )?;
        }
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build();
        let mut c = SyncthingCluster {
            nodes,
            procs,
            agent,
        };
        wait_for(
            "Syncthing instances connected and idle",
            Duration::from_secs(90),
            Duration::from_millis(200),
            || {
                c.procs.check_alive()?;
                for i in 0..3 {
                    let conns = c.get(i, "/rest/system/connections")?;
                    let connected = conns["connections"]
                        .as_object()
                        .map(|m| m.values().filter(|v| v["connected"] == true).count())
                        .unwrap_or(0);
                    let state = c.get(i, &format!("/rest/db/status?folder={FOLDER_ID}"))?;
                    if connected < 2 || state["state"] != "idle" {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )?;
        Ok(c)
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.nodes[i].gui)
    }

    pub fn get(&self, i: usize, path: &str) -> Result<Value> {
        let url = self.url(i, path);
        self.agent
            .get(&url)
            .set("X-API-Key", &self.nodes[i].api_key)
            .call()
            .with_context(|| format!("GET {url}"))?
            .into_json()
            .with_context(|| format!("decoding {url}"))
    }

    /// `POST /rest/db/scan` on node `i` (returns when the scan is done).
    pub fn scan(&self, i: usize) -> Result<()> {
        let url = self.url(i, &format!("/rest/db/scan?folder={FOLDER_ID}"));
        self.agent
            .post(&url)
            .set("X-API-Key", &self.nodes[i].api_key)
            .call()
            .with_context(|| format!("POST {url}"))?;
        Ok(())
    }

    /// Bytes node `i` has received over all its connections.
    pub fn bytes_in(&self, i: usize) -> Result<u64> {
        let v = self.get(i, "/rest/system/connections")?;
        v["total"]["inBytesTotal"]
            .as_u64()
            .context("no total.inBytesTotal in /rest/system/connections")
    }

    /// Whether node 1 sees device `i` at 100 % with nothing to pull or
    /// delete.
    pub fn complete(&self, i: usize) -> Result<bool> {
        let v = self.get(
            0,
            &format!(
                "/rest/db/completion?folder={FOLDER_ID}&device={}",
                self.nodes[i].id
            ),
        )?;
        let done = v["completion"].as_f64() == Some(100.0)
            && v["needBytes"].as_u64() == Some(0)
            && v["needItems"].as_u64().unwrap_or(0) == 0
            && v["needDeletes"].as_u64().unwrap_or(0) == 0;
        if !done {
            return Ok(false);
        }
        // Node 1's answer alone can say 100 % before the device has heard
        // of the change; so the device must also know node 1's whole
        // folder (same files and bytes), hold all of it, and be idle.
        let source = self.get(0, &format!("/rest/db/status?folder={FOLDER_ID}"))?;
        let own = self.get(i, &format!("/rest/db/status?folder={FOLDER_ID}"))?;
        Ok(own["globalBytes"] == source["localBytes"]
            && own["globalFiles"] == source["localFiles"]
            && own["inSyncBytes"] == own["globalBytes"]
            && own["needTotalItems"].as_u64() == Some(0)
            && own["state"] == "idle")
    }

    /// Scans node 1 and waits until both receivers are complete.
    pub fn sync_from_node1(&mut self, limit: Duration) -> Result<()> {
        self.scan(0)?;
        let deadline = std::time::Instant::now() + limit;
        for i in 1..3 {
            loop {
                self.procs.check_alive()?;
                if self.complete(i)? {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    bail!("Syncthing node {} not complete within {limit:?}", i + 1);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        self.procs.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances() -> Vec<Instance> {
        (1..=3)
            .map(|i| Instance {
                id: format!("DEV{i}"),
                home: PathBuf::from(format!("/b/node{i}/home")),
                folder: PathBuf::from(format!("/b/node{i}/folder")),
                listen: format!("127.0.0.1:2200{i}"),
                gui: format!("127.0.0.1:2838{i}"),
                api_key: format!("key{i}"),
            })
            .collect()
    }

    #[test]
    fn config_is_static_and_private() {
        let all = instances();
        let xml = config_xml(36, &all, 1);
        assert!(xml.starts_with("<configuration version=\"36\">"), "{xml}");
        assert!(xml.contains("path=\"/b/node2/folder\""), "{xml}");
        for i in 1..=3 {
            assert!(xml.contains(&format!("<address>tcp://127.0.0.1:2200{i}</address>")));
            assert!(xml.contains(&format!("<device id=\"DEV{i}\"></device>")));
        }
        for off in [
            "globalAnnounceEnabled",
            "localAnnounceEnabled",
            "relaysEnabled",
            "natEnabled",
            "startBrowser",
            "crashReportingEnabled",
            "disableFsync",
        ] {
            assert!(
                xml.contains(&format!("<{off}>false</{off}>")),
                "{off}: {xml}"
            );
        }
        assert!(xml.contains("<urAccepted>-1</urAccepted>"));
        assert!(xml.contains("<listenAddress>tcp://127.0.0.1:22002</listenAddress>"));
        assert!(xml.contains("<apikey>key2</apikey>"));
        assert!(!xml.contains("dynamic"));
    }

    #[test]
    fn generated_config_gives_id_and_version() {
        let xml = "<configuration version=\"36\">\n    <folder id=\"default\">\n        <device id=\"AAA-BBB\" introducedBy=\"\">";
        assert_eq!(read_generated(xml), Some(("AAA-BBB".to_string(), 36)));
        assert_eq!(read_generated("<x/>"), None);
    }
}
