//! Cases 1 and 2: the dataset replicated from node 1 to nodes 2 and 3, then
//! the edit set re-synced, for synod, rsync (with and without `--fsync`)
//! and Syncthing. Each tool's clock starts when the files appear in its
//! source (a rename; rsync's when the clients start) and stops at the
//! tool's own "done" signal; every receiving folder is then hashed against
//! the expected files, outside the clock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::dataset::{drop_into, verify_folder, Dataset, Edited, Expected};
use super::procs::{free_port, Procs};
use super::rsync::{self, Transfer};
use super::syncthing::SyncthingCluster;
use super::{empty_data, synod, Measurement, Plan, Unit, CASE_DELTA, CASE_INITIAL};

pub const SYNOD: &str = synod::NAME;
pub const RSYNC_FSYNC: &str = "rsync --fsync";
pub const RSYNC: &str = "rsync";
pub const SYNCTHING: &str = "Syncthing";

/// Metric name of the bytes node `id` received.
pub fn received_by(id: u64) -> String {
    format!("received by node {id}")
}

/// What one phase measured: wall time and bytes received per receiver.
#[derive(Debug)]
struct Phase {
    time: Duration,
    received: [u64; 2],
}

fn record(out: &mut Vec<Measurement>, case: &str, tool: &str, p: &Phase) {
    Measurement::record(
        out,
        case,
        tool,
        "wall time",
        Unit::Seconds,
        p.time.as_secs_f64(),
    );
    for (i, b) in p.received.iter().enumerate() {
        Measurement::record(
            out,
            case,
            tool,
            &received_by(i as u64 + 2),
            Unit::Bytes,
            *b as f64,
        );
    }
}

/// One run of cases 1 and 2 for every tool, under `run_dir`.
pub fn run_once(
    run_dir: &Path,
    synod_bin: &Path,
    plan: &Plan,
    data: &Dataset,
    edited: &Edited,
    out: &mut Vec<Measurement>,
    notes: &mut Vec<String>,
) -> Result<()> {
    for tool in [SYNOD, RSYNC_FSYNC, RSYNC, SYNCTHING] {
        let dir = run_dir.join(tool.replace([' ', '-'], ""));
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        eprintln!("{}: cases 1+2, {tool}", run_dir.display());
        let result = match tool {
            SYNOD => synod_phases(&dir, synod_bin, plan, data, edited, notes),
            RSYNC_FSYNC => rsync_phases(&dir, true, plan, data, edited),
            RSYNC => rsync_phases(&dir, false, plan, data, edited),
            _ => syncthing_phases(&dir, plan, data, edited),
        }
        .with_context(|| format!("cases 1 and 2 with {tool}"));
        empty_data(&dir);
        let [initial, delta] = result?;
        record(out, CASE_INITIAL, tool, &initial);
        record(out, CASE_DELTA, tool, &delta);
    }
    Ok(())
}

fn verify_receivers(folders: &[PathBuf], expected: &Expected) -> Result<()> {
    for f in folders {
        verify_folder(f, expected)?;
    }
    Ok(())
}

/// For synod, whose "done" is a watermark: verifies the receivers, and if
/// they do not hold every file yet, keeps checking for up to 60 s and
/// returns a finding (a watermark that ran ahead of the disk).
fn verify_after_watermark(
    folders: &[PathBuf],
    expected: &Expected,
    what: &str,
) -> Result<Option<String>> {
    let first = match verify_receivers(folders, expected) {
        Ok(()) => return Ok(None),
        Err(e) => format!("{e:#}"),
    };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        if verify_receivers(folders, expected).is_ok() {
            return Ok(Some(format!(
                "synod, {what}: the receivers' watermark passed the last commit {:.1} s before every file was on disk ({first})",
                t0.elapsed().as_secs_f64()
            )));
        }
    }
    verify_receivers(folders, expected).with_context(|| {
        format!("synod, {what}: the watermark passed the last commit, but 60 s later a receiver still lacks files (first check: {first})")
    })?;
    Ok(None)
}

fn synod_phases(
    dir: &Path,
    synod_bin: &Path,
    plan: &Plan,
    data: &Dataset,
    edited: &Edited,
    findings: &mut Vec<String>,
) -> Result<[Phase; 2]> {
    let mut cluster = synod::start_loopback(dir, synod_bin)?;
    let folder = |id: u64| dir.join(format!("node{id}/folder"));
    let receivers = [folder(2), folder(3)];
    let stage = dir.join("stage");
    let wire = |c: &_| -> Result<[u64; 2]> { Ok([synod::wire_in(c, 2)?, synod::wire_in(c, 3)?]) };

    data.link_into(&stage)?;
    let w0 = wire(&cluster)?;
    let t0 = Instant::now();
    drop_into(&stage, &folder(1))?;
    synod::wait_replicated(
        &mut cluster,
        &data.files,
        &Default::default(),
        &[],
        &[2, 3],
        plan.sync_limit(),
    )?;
    let time = t0.elapsed();
    let w1 = wire(&cluster)?;
    findings.extend(verify_after_watermark(
        &receivers,
        &data.files,
        CASE_INITIAL,
    )?);
    let initial = Phase {
        time,
        received: [w1[0] - w0[0], w1[1] - w0[1]],
    };

    let before = synod::committed(&cluster)?;
    edited.stage(&stage)?;
    let t0 = Instant::now();
    edited.apply(&stage, &folder(1))?;
    synod::wait_replicated(
        &mut cluster,
        &edited.after,
        &before,
        &edited.written,
        &[2, 3],
        plan.sync_limit(),
    )?;
    let time = t0.elapsed();
    let w2 = wire(&cluster)?;
    findings.extend(verify_after_watermark(
        &receivers,
        &edited.after,
        CASE_DELTA,
    )?);
    // Each drop is a loss that halves a sender's window: a slow case 1
    // with drops points at the kernel's buffers, not at synod's work.
    for id in [1, 2, 3] {
        let drops = synod::udp_drops(&cluster, id)?;
        if drops > 0 {
            findings.push(format!(
                "synod, cases 1–2: node {id}'s kernel dropped {drops} datagrams at its QUIC socket for want of receive buffer (see net.core.rmem_max)"
            ));
        }
    }
    cluster.stop();
    Ok([
        initial,
        Phase {
            time,
            received: [w2[0] - w1[0], w2[1] - w1[1]],
        },
    ])
}

fn rsync_phases(
    dir: &Path,
    fsync: bool,
    plan: &Plan,
    data: &Dataset,
    edited: &Edited,
) -> Result<[Phase; 2]> {
    let mut procs = Procs::new(dir);
    let source = dir.join("source");
    data.link_into(&source)?;
    let mut transfers = Vec::new();
    let mut receivers = Vec::new();
    for id in [2u64, 3] {
        let dest = dir.join(format!("node{id}"));
        let d = rsync::start_daemon(
            &mut procs,
            dir,
            &format!("rsyncd-node{id}"),
            &[],
            "127.0.0.1",
            free_port()?,
            &dest,
        )?;
        transfers.push(Transfer {
            wrap: Vec::new(),
            from: format!("{}/", source.display()),
            to: d.url,
            extra: if fsync {
                vec!["--fsync".into()]
            } else {
                Vec::new()
            },
            log: dir.join(format!("logs/rsync-node{id}.log")),
        });
        receivers.push(dest);
    }
    let (time, stats) = rsync::run_parallel(&transfers, plan.sync_limit())?;
    verify_receivers(&receivers, &data.files)?;
    let initial = Phase {
        time,
        received: [stats[0].sent, stats[1].sent],
    };
    let stage = dir.join("stage");
    edited.stage(&stage)?;
    edited.apply(&stage, &source)?;
    let (time, stats) = rsync::run_parallel(&transfers, plan.sync_limit())?;
    verify_receivers(&receivers, &edited.after)?;
    procs.stop();
    Ok([
        initial,
        Phase {
            time,
            received: [stats[0].sent, stats[1].sent],
        },
    ])
}

fn syncthing_phases(
    dir: &Path,
    plan: &Plan,
    data: &Dataset,
    edited: &Edited,
) -> Result<[Phase; 2]> {
    let mut st = SyncthingCluster::start(dir)?;
    let folder = |i: usize| st.nodes[i].folder.clone();
    let receivers = [folder(1), folder(2)];
    let source = folder(0);
    let stage = dir.join("stage");
    let bytes =
        |st: &SyncthingCluster| -> Result<[u64; 2]> { Ok([st.bytes_in(1)?, st.bytes_in(2)?]) };

    data.link_into(&stage)?;
    let b0 = bytes(&st)?;
    let t0 = Instant::now();
    drop_into(&stage, &source)?;
    st.sync_from_node1(plan.sync_limit())?;
    let time = t0.elapsed();
    let b1 = bytes(&st)?;
    verify_receivers(&receivers, &data.files)?;
    let initial = Phase {
        time,
        received: [b1[0] - b0[0], b1[1] - b0[1]],
    };

    edited.stage(&stage)?;
    let t0 = Instant::now();
    edited.apply(&stage, &source)?;
    st.sync_from_node1(plan.sync_limit())?;
    let time = t0.elapsed();
    let b2 = bytes(&st)?;
    verify_receivers(&receivers, &edited.after)?;
    st.stop();
    Ok([
        initial,
        Phase {
            time,
            received: [b2[0] - b1[0], b2[1] - b1[1]],
        },
    ])
}
