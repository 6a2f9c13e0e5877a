//! Plumbing shared by the server starters ([`crate::MongoReplicaSet`], [`crate::NatsServer`]): a
//! server binary run on a loopback port, with its logs and data in a temporary directory, and
//! start-up errors that quote those logs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use crate::process::ChildProcess;
use crate::{free_port, tail_file, tcp_accepts, temp_dir};

/// Fresh starts retry with another port this many times when the port was taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// A server that [`start_fresh`] can start on a fresh port.
pub(crate) trait Server {
    /// Spawns the server for the first time and waits until it is ready.
    async fn spawn_and_wait(&mut self) -> anyhow::Result<()>;

    /// Whether the last start failed because the port was taken after [`free_port`] chose it.
    fn lost_port_race(&self) -> bool;
}

/// Starts a server made by `fresh` (each call on a new [`free_port`] and in a new directory),
/// retrying with another one up to [`START_ATTEMPTS`] times in all while the start fails because
/// another process took the port after it was chosen.
pub(crate) async fn start_fresh<S: Server>(
    mut fresh: impl FnMut() -> anyhow::Result<S>,
) -> anyhow::Result<S> {
    let mut attempt = 1;
    loop {
        let mut server = fresh()?;
        match server.spawn_and_wait().await {
            Ok(()) => return Ok(server),
            Err(e) if attempt < START_ATTEMPTS && server.lost_port_race() => {
                attempt += 1;
                drop(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// One server binary on a loopback port, with its files in a temporary directory: the server's
/// own log `<stem>.log`, and `<stem>.stdout.log` capturing its stdout and stderr.
///
/// Dropping it kills the process with `SIGKILL`, reaps it and removes the directory.
pub(crate) struct ServerProcess {
    /// Declared before `dir` so the process dies before its directory is removed.
    proc: Option<ChildProcess>,
    /// What error messages call the server, e.g. `mongod`.
    name: &'static str,
    binary: PathBuf,
    port: u16,
    /// File name stem of the log files.
    stem: &'static str,
    dir: tempfile::TempDir,
}

impl ServerProcess {
    /// A server that is not running yet, on a [`free_port`], with a new temporary directory named
    /// `tidegate-<stem>-…`.
    pub(crate) fn new(
        name: &'static str,
        binary: PathBuf,
        stem: &'static str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            proc: None,
            name,
            binary,
            port: free_port(),
            stem,
            dir: temp_dir(&format!("tidegate-{stem}-"))?,
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }

    /// The temporary directory holding the logs and the server's data.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's own log (appended to across restarts).
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir().join(format!("{}.log", self.stem))
    }

    /// Where the server's stdout and stderr go.
    pub(crate) fn stdout_path(&self) -> PathBuf {
        self.dir().join(format!("{}.stdout.log", self.stem))
    }

    /// Names the server, binary, port and log for error messages.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} {} on port {} (log {})",
            self.name,
            self.binary.display(),
            self.port,
            self.log_path().display()
        )
    }

    /// Spawns `cmd` (the server's command line) with its output appended to
    /// [`ServerProcess::stdout_path`], and keeps the process.
    pub(crate) fn spawn(&mut self, cmd: Command) -> anyhow::Result<()> {
        let proc = ChildProcess::spawn_logged(cmd, &self.stdout_path())
            .with_context(|| self.describe())?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Whether a process has been spawned (and not taken since).
    pub(crate) fn is_spawned(&self) -> bool {
        self.proc.is_some()
    }

    /// The exit status if the process has exited; `None` while it runs, if there is none, or if
    /// its status cannot be read.
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        match self.proc.as_ref().map(ChildProcess::try_status) {
            Some(Ok(status)) => status,
            _ => None,
        }
    }

    /// Takes the process out (to stop it); the directory stays.
    pub(crate) fn take(&mut self) -> Option<ChildProcess> {
        self.proc.take()
    }

    /// Error for a failed start, quoting the logs.
    pub(crate) fn start_error(&self, what: impl std::fmt::Display) -> anyhow::Error {
        let mut msg = format!(
            "{}: {what}\n--- tail of {} ---\n{}",
            self.describe(),
            self.log_path().display(),
            tail_file(&self.log_path(), 30)
        );
        let stdout = tail_file(&self.stdout_path(), 20);
        if stdout != "<empty>" {
            msg.push_str(&format!(
                "\n--- tail of {} ---\n{stdout}",
                self.stdout_path().display()
            ));
        }
        anyhow!(msg)
    }

    /// Fails with the logs if the server has exited.
    pub(crate) fn check_running(&self) -> anyhow::Result<()> {
        let proc = self
            .proc
            .as_ref()
            .ok_or_else(|| self.start_error("not running"))?;
        match proc.try_status() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                Err(self.start_error(format!("exited during start-up with {status}")))
            }
            Err(e) => Err(self.start_error(format!("{e:#}"))),
        }
    }

    /// Waits until the port accepts TCP connections, polling every 50 ms; fails with the logs if
    /// the server exits, and with `timed_out()` once `deadline` has passed.
    pub(crate) async fn wait_tcp(
        &self,
        deadline: Instant,
        timed_out: impl Fn() -> anyhow::Error,
    ) -> anyhow::Result<()> {
        while !tcp_accepts(self.port).await {
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}
