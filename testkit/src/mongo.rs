//! A real single-node MongoDB replica set.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::ClientOptions;

use crate::server::{start_fresh, Server, ServerProcess};
use crate::{mongod_path, old_mongod_path};

/// Replica set name used by [`MongoReplicaSet`].
const REPL_SET: &str = "rs0";
/// How long start-up may take before it is reported as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// mongod's exit code when it cannot listen (EXIT_NET_ERROR).
const EXIT_NET_ERROR: i32 = 48;
/// `AlreadyInitialized`, returned by `replSetInitiate` on an initiated node.
const ALREADY_INITIALIZED: i32 = 23;

/// The oplog size of [`MongoReplicaSet::start`].
const DEFAULT_OPLOG_MB: u32 = 128;

/// A real `mongod` running as the single-node replica set `rs0` on a free loopback port, with its
/// data in a temporary directory.
///
/// Dropping it kills `mongod` with `SIGKILL`, reaps it and removes the directory.
pub struct MongoReplicaSet {
    server: ServerProcess,
    oplog_mb: u32,
}

impl MongoReplicaSet {
    /// Starts `mongod` as a fresh single-node replica set with a 128 MB oplog, initiates it and
    /// waits (up to 120 s) until it is a writable primary.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_oplog_mb(DEFAULT_OPLOG_MB).await
    }

    /// Like [`MongoReplicaSet::start`], with an oplog of `oplog_mb` megabytes (`--oplogSize`).
    /// A small oplog rolls over quickly, e.g. to test resuming from a token that has fallen off.
    /// Below the default size, storage checkpoints every second (`--syncdelay 1`): the server
    /// truncates the oplog only up to its last checkpoint, which otherwise comes once a minute.
    pub async fn start_with_oplog_mb(oplog_mb: u32) -> anyhow::Result<Self> {
        Self::start_binary(mongod_path()?, oplog_mb).await
    }

    /// Like [`MongoReplicaSet::start`], on the "old server" (MongoDB 6.0.5, see
    /// [`crate::old_mongod_path`]), for tests of what needs a newer one.
    pub async fn start_old() -> anyhow::Result<Self> {
        Self::start_binary(old_mongod_path()?, DEFAULT_OPLOG_MB).await
    }

    async fn start_binary(mongod: PathBuf, oplog_mb: u32) -> anyhow::Result<Self> {
        start_fresh(|| {
            let rs = Self {
                server: ServerProcess::new("mongod", mongod.clone(), "mongod")?,
                oplog_mb,
            };
            std::fs::create_dir_all(rs.db_path())
                .with_context(|| format!("creating mongod dbpath {}", rs.db_path().display()))?;
            Ok(rs)
        })
        .await
    }

    /// Connection string: `mongodb://127.0.0.1:P/?replicaSet=rs0&directConnection=true`.
    pub fn uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?replicaSet={REPL_SET}&directConnection=true",
            self.port()
        )
    }

    /// Port `mongod` listens on (stays the same across [`MongoReplicaSet::restart`]).
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Path of `mongod.log` (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.server.log_path()
    }

    /// A new driver client for [`MongoReplicaSet::uri`].
    pub async fn client(&self) -> anyhow::Result<mongodb::Client> {
        mongodb::Client::with_uri_str(self.uri())
            .await
            .with_context(|| format!("creating a MongoDB client for {}", self.server.describe()))
    }

    /// Kills `mongod` with `SIGKILL` and reaps it (an unclean shutdown: the next start recovers
    /// from the journal). The data directory is kept. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.server.take() {
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
                self.port()
            )
        })
    }

    fn db_path(&self) -> PathBuf {
        self.server.dir().join("db")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.server.binary());
        cmd.arg("--replSet")
            .arg(REPL_SET)
            .arg("--port")
            .arg(self.port().to_string())
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
            .arg("diagnosticDataCollectionEnabled=false")
            // configureFailPoint, for tests that hold a command up at a chosen moment.
            .arg("--setParameter")
            .arg("enableTestCommands=1");
        if self.oplog_mb < DEFAULT_OPLOG_MB {
            cmd.arg("--syncdelay").arg("1");
        }
        self.server.spawn(cmd)
    }

    /// Waits until `mongod` accepts connections, optionally runs `replSetInitiate`, then waits
    /// until `hello` reports `isWritablePrimary`.
    async fn wait_ready(&self, initiate: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let timed_out = |stage: &str, last: &str| {
            self.server.start_error(format!(
                "not ready after {READY_TIMEOUT:?} ({stage}; last error: {last})"
            ))
        };

        self.server
            .wait_tcp(deadline, || {
                timed_out("waiting for a TCP connection", "connection refused")
            })
            .await?;

        let mut opts = ClientOptions::parse(format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.port()
        ))
        .await
        .map_err(|e| {
            self.server
                .start_error(format!("parsing the direct connection string: {e}"))
        })?;
        opts.server_selection_timeout = Some(Duration::from_secs(2));
        opts.connect_timeout = Some(Duration::from_secs(1));
        let client = mongodb::Client::with_options(opts).map_err(|e| {
            self.server
                .start_error(format!("creating a direct client: {e}"))
        })?;
        let admin = client.database("admin");

        if initiate {
            let config = doc! {
                "replSetInitiate": {
                    "_id": REPL_SET,
                    "members": [{ "_id": 0, "host": format!("127.0.0.1:{}", self.port()) }],
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
                self.server.check_running()?;
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
            self.server.check_running()?;
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

impl Server for MongoReplicaSet {
    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready(true).await
    }

    /// mongod exits with EXIT_NET_ERROR, or logs "Address already in use".
    fn lost_port_race(&self) -> bool {
        if !self.server.is_spawned() {
            return false;
        }
        let exited_net =
            matches!(self.server.exit_status(), Some(s) if s.code() == Some(EXIT_NET_ERROR));
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        exited_net || log.contains("Address already in use")
    }
}

/// Replica set name used by [`MongoReplicaSet3`].
const REPL_SET_3: &str = "rs3";

/// Three real `mongod` processes on free loopback ports forming the replica set `rs3`, each
/// with its data in a temporary directory: for elections, step-downs and a killed primary.
///
/// Elections are quick (`electionTimeoutMillis` 2000, heartbeats every 500 ms). Dropping it
/// kills every member with `SIGKILL` and removes the directories.
pub struct MongoReplicaSet3 {
    members: Vec<ServerProcess>,
}

impl MongoReplicaSet3 {
    /// Starts three members, initiates the set and waits (up to 120 s) for a writable primary.
    pub async fn start() -> anyhow::Result<Self> {
        let mongod = mongod_path()?;
        let mut members = Vec::new();
        for _ in 0..3 {
            let member = ServerProcess::new("mongod", mongod.clone(), "mongod")?;
            std::fs::create_dir_all(member.dir().join("db"))?;
            members.push(member);
        }
        let mut set = Self { members };
        for i in 0..3 {
            set.spawn(i)?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for member in &set.members {
            member
                .wait_tcp(deadline, || member.start_error("no TCP connection"))
                .await?;
        }
        let hosts: Vec<Document> = set
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| doc! { "_id": i as i32, "host": format!("127.0.0.1:{}", m.port()) })
            .collect();
        let config = doc! {
            "replSetInitiate": {
                "_id": REPL_SET_3,
                "members": hosts,
                "settings": { "electionTimeoutMillis": 2000, "heartbeatIntervalMillis": 500 },
            }
        };
        let admin = direct_client(set.members[0].port())?.database("admin");
        loop {
            let last = match admin.run_command(config.clone()).await {
                Ok(_) => break,
                Err(e) => match *e.kind {
                    ErrorKind::Command(ref c) if c.code == ALREADY_INITIALIZED => break,
                    _ => e.to_string(),
                },
            };
            set.members[0].check_running()?;
            if Instant::now() >= deadline {
                return Err(set.members[0].start_error(format!("replSetInitiate: {last}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        set.wait_primary(None).await?;
        Ok(set)
    }

    /// Connection string naming all three members: `mongodb://h1,h2,h3/?replicaSet=rs3`.
    pub fn uri(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port()))
            .collect();
        format!("mongodb://{}/?replicaSet={REPL_SET_3}", hosts.join(","))
    }

    /// A new driver client for [`MongoReplicaSet3::uri`] that writes with `w: "majority"`.
    pub async fn client(&self) -> anyhow::Result<mongodb::Client> {
        let uri = format!("{}&w=majority", self.uri());
        mongodb::Client::with_uri_str(&uri)
            .await
            .with_context(|| format!("creating a MongoDB client for {uri}"))
    }

    /// The index of the member that is primary now, if one is.
    pub async fn primary(&self) -> Option<usize> {
        for (i, member) in self.members.iter().enumerate() {
            if !member.is_spawned() {
                continue;
            }
            let Ok(client) = direct_client(member.port()) else {
                continue;
            };
            let admin = client.database("admin");
            let hello = admin.run_command(doc! { "hello": 1 });
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(3), hello).await {
                if is_writable_primary(&reply) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Waits (up to 120 s) until a member other than `not` is primary; returns its index.
    pub async fn wait_primary(&self, not: Option<usize>) -> anyhow::Result<usize> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.primary().await {
                Some(i) if Some(i) != not => return Ok(i),
                _ => {}
            }
            if Instant::now() >= deadline {
                anyhow::bail!("no new primary within {READY_TIMEOUT:?} (old: {not:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the primary to step down (`replSetStepDown`, 30 s) and waits for another member
    /// to be elected; returns the new primary's index.
    pub async fn step_down(&self) -> anyhow::Result<usize> {
        let old = self.wait_primary(None).await?;
        let client = direct_client(self.members[old].port())?;
        // The server closes connections as it steps down: the reply may be an error.
        let _ = client
            .database("admin")
            .run_command(doc! { "replSetStepDown": 30, "secondaryCatchUpPeriodSecs": 10 })
            .await;
        self.wait_primary(Some(old)).await
    }

    /// Kills the primary with `SIGKILL`, waits for another member to be elected, and returns
    /// `(killed, new primary)`. The killed member stays down until [`MongoReplicaSet3::revive`].
    pub async fn kill_primary(&mut self) -> anyhow::Result<(usize, usize)> {
        let old = self.wait_primary(None).await?;
        if let Some(mut proc) = self.members[old].take() {
            proc.kill9();
        }
        let new = self.wait_primary(Some(old)).await?;
        Ok((old, new))
    }

    /// Starts member `i` again on its port and data directory (after [`kill_primary`]).
    ///
    /// [`kill_primary`]: MongoReplicaSet3::kill_primary
    pub async fn revive(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut proc) = self.members[i].take() {
            proc.kill9();
        }
        self.spawn(i)?;
        let member = &self.members[i];
        member
            .wait_tcp(Instant::now() + READY_TIMEOUT, || {
                member.start_error("no TCP connection after a restart")
            })
            .await
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &mut self.members[i];
        let mut cmd = Command::new(member.binary());
        cmd.arg("--replSet")
            .arg(REPL_SET_3)
            .arg("--port")
            .arg(member.port().to_string())
            .arg("--bind_ip")
            .arg("127.0.0.1")
            .arg("--dbpath")
            .arg(member.dir().join("db"))
            .arg("--wiredTigerCacheSizeGB")
            .arg("0.25")
            .arg("--oplogSize")
            .arg(DEFAULT_OPLOG_MB.to_string())
            .arg("--logpath")
            .arg(member.log_path())
            .arg("--logappend")
            .arg("--nounixsocket")
            .arg("--setParameter")
            .arg("diagnosticDataCollectionEnabled=false");
        member.spawn(cmd)
    }
}

/// A client talking to the one member on `port` only, failing fast.
fn direct_client(port: u16) -> anyhow::Result<mongodb::Client> {
    let mut opts = ClientOptions::default();
    opts.hosts = vec![mongodb::options::ServerAddress::Tcp {
        host: "127.0.0.1".into(),
        port: Some(port),
    }];
    opts.direct_connection = Some(true);
    opts.server_selection_timeout = Some(Duration::from_secs(2));
    opts.connect_timeout = Some(Duration::from_secs(1));
    Ok(mongodb::Client::with_options(opts)?)
}
