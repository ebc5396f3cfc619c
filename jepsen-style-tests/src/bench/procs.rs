//! The processes a benchmark starts (rsync daemons, Syncthing, etcd), each
//! with its output in a log file, all ended when their [`Procs`] is
//! stopped or dropped; bounded waits; free loopback ports; tool versions.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Background processes, stopped on drop (SIGTERM, then SIGKILL).
#[derive(Debug, Default)]
pub struct Procs {
    children: Vec<(String, Child)>,
    /// Where every started pid is recorded, for `synod-lab clean`.
    pids: Option<PathBuf>,
}

impl Procs {
    pub fn new(dir: &Path) -> Procs {
        Procs {
            children: Vec::new(),
            pids: Some(dir.join("pids")),
        }
    }

    /// Starts `command` in the background, its stdout and stderr appended
    /// to `log`.
    pub fn spawn(&mut self, name: &str, mut command: Command, log: &Path) -> Result<()> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        if let Some(p) = &self.pids {
            let _ = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .and_then(|mut f| writeln!(f, "{} {name}", child.id()));
        }
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// An error if any process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, c) in &mut self.children {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("{name} exited unexpectedly ({status})");
            }
        }
        Ok(())
    }

    /// SIGTERM all, SIGKILL what is left after 5 s.
    pub fn stop(&mut self) {
        for (_, c) in &self.children {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        crate::cluster::reap(
            self.children.drain(..).map(|(_, c)| c),
            Duration::from_secs(5),
        );
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `check` every `every` until it returns `Some`, for at most
/// `limit`; `what` names the wait in the timeout error.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last_err = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("{what}: not done within {limit:?}; last error: {e:#}"),
                None => bail!("{what}: not done within {limit:?}"),
            }
        }
        std::thread::sleep(every);
    }
}

/// Runs `command` to completion within `limit` (killed after it), its
/// output to `log`; returns the exit status and the output.
pub fn run_bounded(command: Command, limit: Duration, log: &Path) -> Result<(ExitStatus, String)> {
    let desc = format!("{command:?}");
    let mut procs = Procs::default();
    procs.spawn(&desc, command, log)?;
    let (_, mut child) = procs.children.pop().context("spawned")?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{desc} still running after {limit:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Ok((status, text))
}

/// A loopback TCP port free right now and not handed out before by this
/// process: the kernel may give one number twice in a row.
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .context("binding a loopback port")?
            .local_addr()?
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return Ok(port);
        }
    }
}

/// First line `program args` prints, or why it could not run.
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("(no output)")
                .to_string()
        }
        Err(e) => format!("not found ({e})"),
    }
}

/// Whether `program` can be started.
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
