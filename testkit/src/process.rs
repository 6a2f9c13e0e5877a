//! Child processes that are killed on drop and whose output is captured in a log file.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::{tail_file, temp_dir};

/// How many log lines error messages quote.
const TAIL_LINES: usize = 40;

/// A child process (e.g. the tidegate binary) whose stdout and stderr go to a log file, and which
/// is killed with `SIGKILL` and reaped when dropped.
///
/// Standard input is set to `/dev/null`.
pub struct ChildProcess {
    child: Mutex<Child>,
    pid: u32,
    /// Human-readable name for error messages (the program path).
    name: String,
    log_path: PathBuf,
    /// Owns the log file's directory when [`ChildProcess::spawn`] created it.
    _log_dir: Option<tempfile::TempDir>,
}

impl ChildProcess {
    /// Spawns `cmd` with stdout and stderr appended to a fresh log file in a temporary directory
    /// (removed on drop; see [`ChildProcess::log_path`]).
    pub fn spawn(cmd: Command) -> anyhow::Result<Self> {
        let dir = temp_dir("tidegate-child-")?;
        let log_path = dir.path().join("output.log");
        let mut this = Self::spawn_logged(cmd, &log_path)?;
        this._log_dir = Some(dir);
        Ok(this)
    }

    /// Spawns `cmd` with stdout and stderr appended to `log_path` (created if missing). The
    /// caller owns the file's directory.
    pub(crate) fn spawn_logged(mut cmd: Command, log_path: &Path) -> anyhow::Result<Self> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let out = open_log(log_path)?;
        let err = out.try_clone().with_context(|| {
            format!("duplicating the handle of log file {}", log_path.display())
        })?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} (log file {})", log_path.display()))?;
        Ok(Self {
            pid: child.id(),
            child: Mutex::new(child),
            name,
            log_path: log_path.to_path_buf(),
            _log_dir: None,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the file that captures the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_status(&self) -> anyhow::Result<Option<ExitStatus>> {
        self.lock()
            .try_wait()
            .with_context(|| format!("waiting for {} (pid {})", self.name, self.pid))
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`) to the child. Fails if the child has already
    /// exited and been reaped (its pid may have been reused).
    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        // Holding the lock prevents a concurrent reap, so the pid cannot be reused under us: if
        // the child exits between try_wait and kill it stays a zombie with the same pid.
        let mut child = self.lock();
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {} (pid {})", self.name, self.pid))?
        {
            bail!(
                "cannot send signal {sig} to {} (pid {}): it already exited with {status}",
                self.name,
                self.pid
            );
        }
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| anyhow!("pid {} does not fit in pid_t", self.pid))?;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid belongs to our unreaped
        // child (see above).
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(err).with_context(|| {
                format!("sending signal {sig} to {} (pid {})", self.name, self.pid)
            });
        }
        Ok(())
    }

    /// Sends `SIGKILL` and reaps the child. Does nothing if it has already exited.
    pub fn kill9(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        // Errors here mean the process is already gone; nothing left to do.
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits until the child exits, polling every 20 ms; fails after `timeout` (the error quotes
    /// the tail of the log). The child is left running on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) did not exit within {timeout:?}; tail of {}:\n{}",
                    self.name,
                    self.pid,
                    self.log_path.display(),
                    tail_file(&self.log_path, TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Synchronous variant of [`ChildProcess::wait_exit`] for `Drop` and other sync contexts.
    pub(crate) fn wait_exit_blocking(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    /// Everything the child has printed so far (stdout and stderr interleaved, lossily decoded).
    pub fn log(&self) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path.display()),
        }
    }

    /// Waits until the log contains `needle`, polling every 50 ms. Fails early if the child
    /// exits without printing it, and after `timeout`; the error includes the whole log.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Check for exit before reading, so output printed just before exiting is seen.
            let exited = self.try_status()?;
            let log = self.log();
            if log.contains(needle) {
                return Ok(());
            }
            if let Some(status) = exited {
                bail!(
                    "{} (pid {}) exited with {status} without printing {needle:?}; log {}:\n{log}",
                    self.name,
                    self.pid,
                    self.log_path.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) did not print {needle:?} within {timeout:?}; log {}:\n{log}",
                    self.name,
                    self.pid,
                    self.log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn open_log(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))
}
