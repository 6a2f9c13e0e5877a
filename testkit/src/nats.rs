//! A real JetStream-enabled NATS server.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::nats_server_path;
use crate::server::{start_fresh, Server, ServerProcess};

/// How long start-up may take before it is reported as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`NatsServer::stop`] waits after `SIGTERM` before it sends `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A real `nats-server` with JetStream on a free loopback port, its store in a temporary
/// directory.
///
/// Dropping it kills the server with `SIGKILL`, reaps it and removes the directory.
pub struct NatsServer {
    server: ServerProcess,
    /// Extra `nats-server -c` configuration (auth, TLS), if any.
    config: Option<String>,
    /// How clients (the readiness probe, [`NatsServer::client`]) connect.
    options: ClientOptions,
}

/// Makes the connect options a client of this server needs (credentials, TLS).
pub type ClientOptions = Arc<dyn Fn() -> async_nats::ConnectOptions + Send + Sync>;

impl NatsServer {
    /// Starts `nats-server -js` and waits (up to 120 s) until a client can connect and read its
    /// JetStream account info.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_config("", Arc::new(async_nats::ConnectOptions::new)).await
    }

    /// Like [`NatsServer::start`], with `config` (nats-server configuration text, e.g. an
    /// `authorization` or `tls` block; the command line still sets the port and JetStream)
    /// and clients connecting with `options()`.
    pub async fn start_with_config(config: &str, options: ClientOptions) -> anyhow::Result<Self> {
        let binary = nats_server_path()?;
        start_fresh(|| {
            Ok(Self {
                server: ServerProcess::new("nats-server", binary.clone(), "nats")?,
                config: (!config.is_empty()).then(|| config.to_string()),
                options: options.clone(),
            })
        })
        .await
    }

    /// Client URL: `nats://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// Port the server listens on (stays the same across [`NatsServer::start_again`]).
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Path of `nats.log` (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.server.log_path()
    }

    /// JetStream store directory (`-sd`), kept across [`NatsServer::stop`].
    pub fn store_dir(&self) -> PathBuf {
        self.server.dir().join("js")
    }

    /// A new client connected to [`NatsServer::url`].
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        (self.options)()
            .connect(self.url())
            .await
            .with_context(|| format!("connecting to {}", self.server.describe()))
    }

    /// Stops the server gracefully: `SIGTERM`, up to 5 s to exit, then `SIGKILL`. Keeps the
    /// store directory. Does nothing if it is not running. Blocks the calling thread.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.server.take() {
            if proc.signal(libc::SIGTERM).is_ok() {
                proc.wait_exit_blocking(STOP_GRACE);
            }
            proc.kill9();
        }
    }

    /// Kills the server with `SIGKILL` (no clean shutdown: JetStream recovers its store on the
    /// next start) and reaps it. Keeps the store directory. Does nothing if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.server.take() {
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
                self.port()
            )
        })
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.server.binary());
        if let Some(config) = &self.config {
            let path = self.server.dir().join("nats.conf");
            std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
            cmd.arg("-c").arg(path);
        }
        cmd.arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port().to_string())
            .arg("-l")
            .arg(self.log_path());
        self.server.spawn(cmd)
    }

    /// Waits until the port accepts TCP connections and a client can read the JetStream account.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        self.server
            .wait_tcp(deadline, || {
                self.server.start_error(format!(
                    "not accepting TCP connections after {READY_TIMEOUT:?}"
                ))
            })
            .await?;
        loop {
            let last = match self.try_jetstream().await {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            self.server.check_running()?;
            if Instant::now() >= deadline {
                return Err(self.server.start_error(format!(
                    "JetStream not ready after {READY_TIMEOUT:?} (last error: {last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_jetstream(&self) -> anyhow::Result<()> {
        let client = (self.options)()
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

impl Server for NatsServer {
    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready().await
    }

    /// nats-server exits after logging "address already in use" (in either log, in any case).
    fn lost_port_race(&self) -> bool {
        let exited = self.server.exit_status().is_some();
        let mut logs = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        logs.push_str(&std::fs::read_to_string(self.server.stdout_path()).unwrap_or_default());
        exited && logs.to_ascii_lowercase().contains("address already in use")
    }
}
