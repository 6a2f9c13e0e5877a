//! A real JetStream-enabled NATS server.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use crate::process::ChildProcess;
use crate::{free_port, nats_server_path, tail_file, tcp_accepts, temp_dir};

/// How long start-up may take before it is reported as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`NatsServer::stop`] waits after `SIGTERM` before it sends `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Fresh starts retry with another port this many times when the port was taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// A real `nats-server` with JetStream on a free loopback port, its store in a temporary
/// directory.
///
/// Dropping it kills the server with `SIGKILL`, reaps it and removes the directory.
pub struct NatsServer {
    /// Declared before `dir` so the process dies before its directory is removed.
    proc: Option<ChildProcess>,
    port: u16,
    binary: PathBuf,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server -js` and waits (up to 20 s) until a client can connect and read its
    /// JetStream account info.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = nats_server_path()?;
        let mut attempt = 1;
        loop {
            let mut server = Self {
                proc: None,
                port: free_port(),
                binary: binary.clone(),
                dir: temp_dir("tidegate-nats-")?,
            };
            server.spawn()?;
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < START_ATTEMPTS && server.lost_port_race() => {
                    attempt += 1;
                    drop(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Client URL: `nats://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Port the server listens on (stays the same across [`NatsServer::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path of `nats.log` (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// JetStream store directory (`-sd`), kept across [`NatsServer::stop`].
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// A new client connected to [`NatsServer::url`].
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("connecting to {}", self.describe()))
    }

    /// Stops the server gracefully: `SIGTERM`, up to 5 s to exit, then `SIGKILL`. Keeps the
    /// store directory. Does nothing if it is not running. Blocks the calling thread.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            if proc.signal(libc::SIGTERM).is_ok() {
                proc.wait_exit_blocking(STOP_GRACE);
            }
            proc.kill9();
        }
    }

    /// Starts the server again on the same port with the same store directory (stopping it first
    /// if it is still running) and waits until it is ready.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()?;
        self.wait_ready().await.with_context(|| {
            format!(
                "starting nats-server again on the same port {} (another process may have taken it)",
                self.port
            )
        })
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("nats.stdout.log")
    }

    fn describe(&self) -> String {
        format!(
            "nats-server {} on port {} (log {})",
            self.binary.display(),
            self.port,
            self.log_path().display()
        )
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-l")
            .arg(self.log_path());
        let proc = ChildProcess::spawn_logged(cmd, &self.stdout_path())
            .with_context(|| self.describe())?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Whether the last start failed because the port was taken after [`free_port`] chose it.
    fn lost_port_race(&self) -> bool {
        let exited = matches!(
            self.proc.as_ref().map(|p| p.try_status()),
            Some(Ok(Some(_)))
        );
        let mut logs = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        logs.push_str(&std::fs::read_to_string(self.stdout_path()).unwrap_or_default());
        exited && logs.to_ascii_lowercase().contains("address already in use")
    }

    /// Error for a failed start, quoting the logs.
    fn start_error(&self, what: impl std::fmt::Display) -> anyhow::Error {
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
    fn check_running(&self) -> anyhow::Result<()> {
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

    /// Waits until the port accepts TCP connections and a client can read the JetStream account.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !tcp_accepts(self.port).await {
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(self.start_error(format!(
                    "not accepting TCP connections after {READY_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            let last = match self.try_jetstream().await {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(self.start_error(format!(
                    "JetStream not ready after {READY_TIMEOUT:?} (last error: {last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_jetstream(&self) -> anyhow::Result<()> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .connect(self.url())
            .await
            .context("connecting")?;
        let js = async_nats::jetstream::new(client.clone());
        let account = tokio::time::timeout(Duration::from_secs(2), js.query_account()).await;
        // Best effort: the connection is only a probe.
        let _ = client.drain().await;
        account
            .context("JetStream account info timed out")?
            .context("JetStream account info")?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
        // `dir` (a TempDir) is removed when the fields are dropped, after this.
    }
}
