//! Progress of long operations: counters the daemon publishes (lock-free,
//! no terminal anywhere), a reader that counts bytes as they are consumed,
//! and the indicatif rendering the CLI does when stderr is a terminal.
//! Nothing here prints unless [`stderr_is_terminal`] said yes.

use std::io::{self, IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// Whether progress bars may be drawn: stderr is a terminal and the user
/// did not turn them off with `SYNOD_NO_PROGRESS`.
pub fn stderr_is_terminal() -> bool {
    io::stderr().is_terminal() && std::env::var_os("SYNOD_NO_PROGRESS").is_none()
}

/// Wraps a reader and reports every read to `on_read`: the bytes it
/// returned, `0` once at the end of the input.
#[derive(Debug)]
pub struct CountingReader<R, F> {
    inner: R,
    on_read: F,
    total: u64,
    at_end: bool,
}

impl<R: Read, F: FnMut(u64, bool)> CountingReader<R, F> {
    /// `on_read(total_so_far, at_end)` runs after each read that returned
    /// data, and once more when the input ends.
    pub fn new(inner: R, on_read: F) -> Self {
        CountingReader {
            inner,
            on_read,
            total: 0,
            at_end: false,
        }
    }

    /// Bytes read so far.
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl<R: Read, F: FnMut(u64, bool)> Read for CountingReader<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.total += n as u64;
            (self.on_read)(self.total, false);
        } else if !buf.is_empty() && !self.at_end {
            self.at_end = true;
            (self.on_read)(self.total, true);
        }
        Ok(n)
    }
}

/// The progress of the scan under way, published by the scanner. Only the
/// first scan after start is shown to a user (`first_done` ends it).
#[derive(Debug, Default)]
pub struct ScanProgress {
    /// Regular files found by the walk of the current scan.
    files_found: AtomicU64,
    /// Of them, new or changed: to be chunked and hashed.
    files_to_hash: AtomicU64,
    bytes_to_hash: AtomicU64,
    /// Chunked (or given up on) so far in this scan.
    files_hashed: AtomicU64,
    bytes_hashed: AtomicU64,
    /// The walk of the first scan has finished.
    listed: AtomicBool,
    /// The first scan after start has finished.
    first_done: AtomicBool,
}

/// A copy of [`ScanProgress`], as `/v1/status` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanProgressReport {
    pub files_found: u64,
    pub files_to_hash: u64,
    pub bytes_to_hash: u64,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub listed: bool,
    pub first_done: bool,
}

impl ScanProgress {
    /// A scan listed `found` files, of which `to_hash` (sizes) are new or
    /// changed. Restarts the hashed counters.
    pub fn planned(&self, found: usize, to_hash: impl IntoIterator<Item = u64>) {
        let (n, bytes) = to_hash
            .into_iter()
            .fold((0u64, 0u64), |(n, b), s| (n + 1, b + s));
        self.files_hashed.store(0, Ordering::Relaxed);
        self.bytes_hashed.store(0, Ordering::Relaxed);
        self.files_found.store(found as u64, Ordering::Relaxed);
        self.files_to_hash.store(n, Ordering::Relaxed);
        self.bytes_to_hash.store(bytes, Ordering::Relaxed);
        self.listed.store(true, Ordering::Release);
    }

    /// One planned file was chunked, or given up on, `bytes` long.
    pub fn hashed(&self, bytes: u64) {
        self.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.bytes_hashed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The first scan after start is over.
    pub fn first_scan_done(&self) {
        self.first_done.store(true, Ordering::Release);
    }

    pub fn report(&self) -> ScanProgressReport {
        ScanProgressReport {
            files_found: self.files_found.load(Ordering::Relaxed),
            files_to_hash: self.files_to_hash.load(Ordering::Relaxed),
            bytes_to_hash: self.bytes_to_hash.load(Ordering::Relaxed),
            files_hashed: self.files_hashed.load(Ordering::Relaxed),
            bytes_hashed: self.bytes_hashed.load(Ordering::Relaxed),
            listed: self.listed.load(Ordering::Acquire),
            first_done: self.first_done.load(Ordering::Acquire),
        }
    }
}

/// One line of the initial scan's bar.
fn scan_message(r: &ScanProgressReport) -> String {
    format!(
        "{}/{} files hashed ({} found)",
        r.files_hashed.min(r.files_to_hash),
        r.files_to_hash,
        r.files_found
    )
}

fn spinner(mp: &MultiProgress, msg: String) -> ProgressBar {
    let b = mp.add(ProgressBar::new_spinner());
    b.set_style(
        ProgressStyle::with_template("{spinner} {prefix}{msg} {elapsed}").expect("valid template"),
    );
    b.set_message(msg);
    b.enable_steady_tick(Duration::from_millis(120));
    b
}

/// Draws the first scan of a node as a bar in `mp` until it is done.
/// `poll` returns the node's current progress, or `None` when it cannot be
/// read (the bar then waits). Returns when the first scan is done or
/// `stop()` says so.
pub fn follow_initial_scan(
    mp: &MultiProgress,
    prefix: &str,
    mut poll: impl FnMut() -> Option<ScanProgressReport>,
    stop: impl Fn() -> bool,
) {
    let bar = spinner(
        mp,
        "waiting for the cluster, then listing the folder".into(),
    );
    bar.set_prefix(prefix.to_owned());
    let mut styled = false;
    while !stop() {
        let Some(r) = poll() else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        if r.listed && !styled {
            bar.disable_steady_tick();
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix}initial scan [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            styled = true;
        }
        if r.listed {
            bar.set_length(r.bytes_to_hash);
            bar.set_position(r.bytes_hashed.min(r.bytes_to_hash));
            bar.set_message(scan_message(&r));
        }
        if r.first_done {
            bar.finish_with_message(format!("{}; initial scan done", scan_message(&r)));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.abandon();
}

/// A progress bar of an upload of `len` bytes that turns into a
/// "committing" spinner once the last byte has left. Hidden when stderr is
/// not a terminal.
#[derive(Debug, Clone)]
pub struct UploadBar(ProgressBar);

impl UploadBar {
    pub fn new(len: u64, visible: bool) -> UploadBar {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let b = ProgressBar::with_draw_target(Some(len), target);
        b.set_style(
            ProgressStyle::with_template(
                "upload [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        UploadBar(b)
    }

    /// For [`CountingReader`]: `total` bytes have left; at the end, wait
    /// for the node's answer.
    pub fn on_read(&self, total: u64, at_end: bool) {
        self.0.set_position(total);
        if at_end {
            self.0.set_style(
                ProgressStyle::with_template("{spinner} committing {bytes} {elapsed}")
                    .expect("valid template"),
            );
            self.0.enable_steady_tick(Duration::from_millis(120));
        }
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// A `tracing` writer that keeps log lines from tearing the bars of `mp`:
/// each line is written with the bars cleared, then they are redrawn.
#[derive(Debug, Clone)]
pub struct LogWriter(pub Option<MultiProgress>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            Some(mp) => mp.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Follows the first scan of an in-process node on a thread of its own.
pub fn spawn_initial_scan_bar(
    mp: MultiProgress,
    progress: Arc<crate::metrics::Metrics>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        follow_initial_scan(&mp, "", || Some(progress.scan_progress.report()), || false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counting_reader_counts_every_byte_and_reports_the_end_once() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        {
            let mut r = CountingReader::new(&data[..], |total, end| seen.push((total, end)));
            let mut buf = [0u8; 3000];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            // Reading past the end again reports nothing more.
            assert_eq!(r.read(&mut buf).unwrap(), 0);
            assert_eq!(r.total(), 10_000);
        }
        assert_eq!(out, data, "bytes pass through unchanged");
        assert_eq!(
            seen,
            vec![
                (3000, false),
                (6000, false),
                (9000, false),
                (10_000, false),
                (10_000, true)
            ]
        );
    }

    #[test]
    fn the_counting_reader_passes_errors_through_and_counts_nothing_for_them() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut calls = 0;
        {
            let mut r = CountingReader::new(Failing, |_, _| calls += 1);
            let e = r.read(&mut [0u8; 8]).unwrap_err();
            assert_eq!(e.to_string(), "disk on fire");
            assert_eq!(r.total(), 0);
        }
        assert_eq!(calls, 0);
    }

    #[test]
    fn an_empty_buffer_is_not_the_end_of_the_input() {
        let mut ends = 0;
        let mut s = String::new();
        {
            let mut r = CountingReader::new(&b"abc"[..], |_, end| ends += usize::from(end));
            assert_eq!(r.read(&mut []).unwrap(), 0);
            r.read_to_string(&mut s).unwrap();
        }
        assert_eq!(s, "abc");
        assert_eq!(ends, 1);
    }

    #[test]
    fn scan_progress_restarts_per_scan_and_reports_the_first_done() {
        let p = ScanProgress::default();
        assert!(!p.report().listed);
        p.planned(10, [100, 50]);
        p.hashed(100);
        let r = p.report();
        assert_eq!(
            (r.files_found, r.files_to_hash, r.bytes_to_hash),
            (10, 2, 150)
        );
        assert_eq!((r.files_hashed, r.bytes_hashed), (1, 100));
        assert_eq!(scan_message(&r), "1/2 files hashed (10 found)");
        assert!(r.listed && !r.first_done);
        p.first_scan_done();
        p.planned(10, []);
        let r = p.report();
        assert_eq!((r.files_to_hash, r.files_hashed, r.bytes_hashed), (0, 0, 0));
        assert!(r.first_done);
    }

    #[test]
    fn follow_initial_scan_returns_once_the_first_scan_is_done() {
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
        let mut polls = 0;
        follow_initial_scan(
            &mp,
            "",
            || {
                polls += 1;
                Some(ScanProgressReport {
                    listed: polls > 1,
                    first_done: polls > 2,
                    ..Default::default()
                })
            },
            || false,
        );
        assert_eq!(polls, 3);
    }
}
