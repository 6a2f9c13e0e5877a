//! A real single-node MongoDB replica set.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::ClientOptions;

use crate::process::ChildProcess;
use crate::{free_port, mongod_path, tail_file, tcp_accepts, temp_dir};

/// Replica set name used by [`MongoReplicaSet`].
const REPL_SET: &str = "rs0";
/// How long start-up may take before it is reported as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Fresh starts retry with another port this many times when the port was taken meanwhile.
const START_ATTEMPTS: usize = 5;
/// mongod's exit code when it cannot listen (EXIT_NET_ERROR).
const EXIT_NET_ERROR: i32 = 48;
/// `AlreadyInitialized`, returned by `replSetInitiate` on an initiated node.
const ALREADY_INITIALIZED: i32 = 23;

/// A real `mongod` running as the single-node replica set `rs0` on a free loopback port, with its
/// data in a temporary directory.
///
/// Dropping it kills `mongod` with `SIGKILL`, reaps it and removes the directory.
pub struct MongoReplicaSet {
    /// Declared before `dir` so the process dies before its directory is removed.
    proc: Option<ChildProcess>,
    port: u16,
    oplog_mb: u32,
    mongod: PathBuf,
    dir: tempfile::TempDir,
}

impl MongoReplicaSet {
    /// Starts `mongod` as a fresh single-node replica set with a 128 MB oplog, initiates it and
    /// waits (up to 30 s) until it is a writable primary.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_oplog_mb(128).await
    }

    /// Like [`MongoReplicaSet::start`], with an oplog of `oplog_mb` megabytes (`--oplogSize`).
    /// A small oplog rolls over quickly, e.g. to test resuming from a token that has fallen off.
    pub async fn start_with_oplog_mb(oplog_mb: u32) -> anyhow::Result<Self> {
        let mongod = mongod_path()?;
        let mut attempt = 1;
        loop {
            let mut rs = Self {
                proc: None,
                port: free_port(),
                oplog_mb,
                mongod: mongod.clone(),
                dir: temp_dir("tidegate-mongod-")?,
            };
            std::fs::create_dir_all(rs.db_path())
                .with_context(|| format!("creating mongod dbpath {}", rs.db_path().display()))?;
            rs.spawn()?;
            match rs.wait_ready(true).await {
                Ok(()) => return Ok(rs),
                Err(e) if attempt < START_ATTEMPTS && rs.lost_port_race() => {
                    attempt += 1;
                    drop(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connection string: `mongodb://127.0.0.1:P/?replicaSet=rs0&directConnection=true`.
    pub fn uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?replicaSet={REPL_SET}&directConnection=true",
            self.port
        )
    }

    /// Port `mongod` listens on (stays the same across [`MongoReplicaSet::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path of `mongod.log` (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mongod.log")
    }

    /// A new driver client for [`MongoReplicaSet::uri`].
    pub async fn client(&self) -> anyhow::Result<mongodb::Client> {
        mongodb::Client::with_uri_str(self.uri())
            .await
            .with_context(|| format!("creating a MongoDB client for {}", self.describe()))
    }

    /// Kills `mongod` with `SIGKILL` and reaps it (an unclean shutdown: the next start recovers
    /// from the journal). The data directory is kept. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    /// Starts `mongod` again on the same port and data directory (killing it first if it is still
    /// running) and waits until it is a writable primary again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready(false).await.with_context(|| {
            format!(
                "restarting mongod on the same port {} (another process may have taken it)",
                self.port
            )
        })
    }

    fn db_path(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("mongod.stdout.log")
    }

    fn describe(&self) -> String {
        format!(
            "mongod {} on port {} (log {})",
            self.mongod.display(),
            self.port,
            self.log_path().display()
        )
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.mongod);
        cmd.arg("--replSet")
            .arg(REPL_SET)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind_ip")
            .arg("127.0.0.1")
            .arg("--dbpath")
            .arg(self.db_path())
            .arg("--wiredTigerCacheSizeGB")
            .arg("0.25")
            .arg("--oplogSize")
            .arg(self.oplog_mb.to_string())
            .arg("--logpath")
            .arg(self.log_path())
            .arg("--logappend")
            // No /tmp/mongodb-P.sock left behind after SIGKILL; no FTDC files and threads.
            .arg("--nounixsocket")
            .arg("--setParameter")
            .arg("diagnosticDataCollectionEnabled=false");
        let proc = ChildProcess::spawn_logged(cmd, &self.stdout_path())
            .with_context(|| self.describe())?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Whether the last start failed because the port was taken after [`free_port`] chose it.
    fn lost_port_race(&self) -> bool {
        let Some(proc) = &self.proc else { return false };
        let exited_net =
            matches!(proc.try_status(), Ok(Some(s)) if s.code() == Some(EXIT_NET_ERROR));
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        exited_net || log.contains("Address already in use")
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

    /// Fails with the logs if `mongod` has exited.
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

    /// Waits until `mongod` accepts connections, optionally runs `replSetInitiate`, then waits
    /// until `hello` reports `isWritablePrimary`.
    async fn wait_ready(&self, initiate: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let timed_out = |stage: &str, last: &str| {
            self.start_error(format!(
                "not ready after {READY_TIMEOUT:?} ({stage}; last error: {last})"
            ))
        };

        while !tcp_accepts(self.port).await {
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(timed_out(
                    "waiting for a TCP connection",
                    "connection refused",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let mut opts = ClientOptions::parse(format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.port
        ))
        .await
        .map_err(|e| self.start_error(format!("parsing the direct connection string: {e}")))?;
        opts.server_selection_timeout = Some(Duration::from_secs(2));
        opts.connect_timeout = Some(Duration::from_secs(1));
        let client = mongodb::Client::with_options(opts)
            .map_err(|e| self.start_error(format!("creating a direct client: {e}")))?;
        let admin = client.database("admin");

        if initiate {
            let config = doc! {
                "replSetInitiate": {
                    "_id": REPL_SET,
                    "members": [{ "_id": 0, "host": format!("127.0.0.1:{}", self.port) }],
                }
            };
            loop {
                let last = match admin.run_command(config.clone()).await {
                    Ok(_) => break,
                    Err(e) => match *e.kind {
                        ErrorKind::Command(ref c) if c.code == ALREADY_INITIALIZED => break,
                        _ => e.to_string(),
                    },
                };
                self.check_running()?;
                if Instant::now() >= deadline {
                    return Err(timed_out("running replSetInitiate", &last));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        loop {
            let last = match admin.run_command(doc! { "hello": 1 }).await {
                Ok(reply) if is_writable_primary(&reply) => break,
                Ok(reply) => format!("hello replied {reply}"),
                Err(e) => e.to_string(),
            };
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(timed_out("waiting for isWritablePrimary", &last));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client.shutdown().immediate(true).await;
        Ok(())
    }
}

fn is_writable_primary(hello: &Document) -> bool {
    matches!(hello.get_bool("isWritablePrimary"), Ok(true))
}

impl Drop for MongoReplicaSet {
    fn drop(&mut self) {
        self.kill();
        // `dir` (a TempDir) is removed when the fields are dropped, after this.
    }
}
