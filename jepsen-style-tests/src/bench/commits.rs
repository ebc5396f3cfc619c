//! Case 4, metadata commits: closed-loop clients (each sends its next write
//! when the last one is answered) against synod's `PUT /v1/files/<path>`
//! and etcd's `put`, both at their Raft leader; commits/s and latency
//! percentiles over a fixed window after a warm-up.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::etcd::{self, EtcdCluster};
use super::stats::percentile;
use super::synod;
use super::Measurement;

/// Bytes of every value written.
pub const VALUE_BYTES: usize = 128;

/// What one load window measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// Runs `clients` closed-loop clients for `warmup + window`; `make` gives
/// each client its write function (`seq` → result).
pub fn run_load<F, W>(clients: usize, warmup: Duration, window: Duration, make: F) -> Result<Load>
where
    F: Fn(usize) -> W + Sync,
    W: FnMut(u64) -> Result<()>,
{
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let per_client: Vec<(Vec<Duration>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let stop = &stop;
                let make = &make;
                s.spawn(move || {
                    let mut write = make(c);
                    let mut lat = Vec::new();
                    let mut errors = 0u64;
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let ok = write(seq).is_ok();
                        let t1 = Instant::now();
                        seq += 1;
                        // Only writes that started and ended inside the window.
                        if t0 >= measure_from && t1 <= end {
                            if ok {
                                lat.push(t1 - t0);
                            } else {
                                errors += 1;
                            }
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        let out = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect();
        stop.store(true, Ordering::Relaxed);
        out
    });
    let errors = per_client.iter().map(|(_, e)| e).sum();
    let mut all: Vec<Duration> = per_client.into_iter().flat_map(|(l, _)| l).collect();
    all.sort_unstable();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
    Ok(Load {
        per_second: all.len() as f64 / window.as_secs_f64(),
        p50_ms: ms(percentile(&all, 0.50)),
        p99_ms: ms(percentile(&all, 0.99)),
        errors,
    })
}

/// Longest wait, after a load, for every folder to hold what it committed.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(300);

/// The client counts of case 4.
pub const CLIENTS: [usize; 2] = [1, 64];

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
}

/// One run of case 4 for both systems; pushes samples into `out`.
pub fn run_once(
    dir: &Path,
    synod_bin: &Path,
    window: Duration,
    out: &mut Vec<Measurement>,
) -> Result<()> {
    let value = vec![b'v'; VALUE_BYTES];
    let warmup = Duration::from_millis(500).min(window / 2);

    let mut cluster = synod::start_loopback(&dir.join("synod"), synod_bin)?;
    let leader = cluster
        .leader()
        .and_then(|l| cluster.node(l))
        .map(|n| n.api.clone());
    let Some(leader) = leader else {
        cluster.stop();
        bail!("the synod cluster has no leader");
    };
    let mut results = Vec::new();
    // Files are written into the folders behind the commits, at a lower
    // priority: how long every folder takes to hold them all is reported.
    let mut catch_up = Vec::new();
    for clients in CLIENTS {
        let load = run_load(clients, warmup, window, |c| {
            let a = agent();
            let leader = leader.clone();
            let value = &value;
            move |seq: u64| -> Result<()> {
                let url = format!("http://{leader}/v1/files/commits/c{clients}-{c}/k{seq}");
                a.put(&url).send_bytes(value)?;
                Ok(())
            }
        });
        results.push(("synod", clients, load));
        let t = Instant::now();
        let waited = synod::wait_materialized(&mut cluster, &[1, 2, 3], t + CATCH_UP_LIMIT);
        catch_up.push((clients, waited.map(|()| t.elapsed())));
    }
    cluster.stop();

    let mut etcd = EtcdCluster::start(&dir.join("etcd"))?;
    let leader = etcd.leader();
    let leader = match leader {
        Ok(l) => l,
        Err(e) => {
            etcd.stop();
            return Err(e);
        }
    };
    for clients in CLIENTS {
        let load = run_load(clients, warmup, window, |c| {
            let a = agent();
            let leader = leader.clone();
            let value = &value;
            move |seq: u64| etcd::put(&a, &leader, &format!("c{clients}-{c}/k{seq}"), value)
        });
        results.push(("etcd", clients, load));
    }
    etcd.stop();

    for (clients, waited) in catch_up {
        let s = if clients == 1 { "" } else { "s" };
        Measurement::record(
            out,
            super::CASE_COMMITS,
            synod::NAME,
            &format!("all folders written, after {clients} client{s}"),
            super::Unit::Seconds,
            waited?.as_secs_f64(),
        );
    }
    for (tool, clients, load) in results {
        let load = load?;
        let case = super::CASE_COMMITS;
        let s = if clients == 1 { "" } else { "s" };
        let push = |out: &mut Vec<Measurement>, metric: String, unit, v: f64| {
            Measurement::record(out, case, tool, &metric, unit, v);
        };
        push(
            out,
            format!("commits/s, {clients} client{s}"),
            super::Unit::PerSecond,
            load.per_second,
        );
        push(
            out,
            format!("p50 latency, {clients} client{s}"),
            super::Unit::Millis,
            load.p50_ms,
        );
        push(
            out,
            format!("p99 latency, {clients} client{s}"),
            super::Unit::Millis,
            load.p99_ms,
        );
        if load.errors > 0 {
            push(
                out,
                format!("failed writes, {clients} client{s}"),
                super::Unit::Count,
                load.errors as f64,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_counts_only_the_window() {
        let load = run_load(
            2,
            Duration::from_millis(20),
            Duration::from_millis(100),
            |_| {
                |_seq| -> Result<()> {
                    std::thread::sleep(Duration::from_millis(5));
                    Ok(())
                }
            },
        )
        .expect("load");
        assert_eq!(load.errors, 0);
        assert!(load.per_second > 0.0);
        assert!(load.p50_ms >= 5.0 && load.p99_ms >= load.p50_ms, "{load:?}");
    }

    #[test]
    fn failures_are_counted_not_timed() {
        let load = run_load(1, Duration::ZERO, Duration::from_millis(50), |_| {
            |_seq| -> Result<()> {
                std::thread::sleep(Duration::from_millis(2));
                bail!("refused")
            }
        })
        .expect("load");
        assert!(load.errors > 0);
        assert_eq!(load.per_second, 0.0);
        assert!(load.p50_ms.is_nan());
    }
}
