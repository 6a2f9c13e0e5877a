//! First contact with misconfigured servers, through the real binary: each error names the
//! problem and the server, says what to do, appears once, and a pipeline that keeps
//! retrying stops promptly on SIGINT.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use tidegate_testkit::{
    free_port, mongod_path, nats_server_path, wait_until, ChildProcess, NatsServer,
};

/// SIGINT, for `ChildProcess::signal`.
const SIGINT: i32 = 2;

/// A one-pipeline config for `nats` and `mongo`, sink stream `ORDERS` on `cdc.>`.
fn config(nats: &str, mongo: &str) -> String {
    format!(
        r#"
[nats]
url = "{nats}"

[[pipeline]]
id = "orders"
mongodb_uri = "{mongo}"
database = "shop"
collections = ["orders"]

[pipeline.sink]
stream = "ORDERS"
subject_prefix = "cdc"
"#
    )
}

/// Runs `tidegate run` on `text`; the folder holds the config file.
fn spawn(text: &str) -> anyhow::Result<(ChildProcess, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tidegate.toml");
    std::fs::write(&path, text)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidegate"));
    cmd.arg("run").arg("--config").arg(&path);
    Ok((ChildProcess::spawn(cmd)?, dir))
}

/// Waits until something accepts TCP connections on `port`.
async fn listening(what: &str, port: u16) -> anyhow::Result<()> {
    wait_until(what, Duration::from_secs(60), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
}

/// A standalone mongod (no replica set) on a free port.
async fn standalone_mongod() -> anyhow::Result<(ChildProcess, u16, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let mut cmd = Command::new(mongod_path()?);
    cmd.args([
        "--bind_ip",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--dbpath",
    ])
    .arg(dir.path());
    let child = ChildProcess::spawn(cmd)?;
    listening("standalone mongod", port).await?;
    Ok((child, port, dir))
}

/// Waits for the process to fail (exit code 1), and returns its log.
async fn failed(child: &mut ChildProcess) -> anyhow::Result<String> {
    let status = child.wait_exit(Duration::from_secs(120)).await?;
    let log = child.log();
    assert_eq!(status.code(), Some(1), "{log}");
    Ok(log)
}

/// SIGINT stops a pipeline that is still retrying its first contact; it exits cleanly.
async fn stops_on_sigint(child: &mut ChildProcess) -> anyhow::Result<()> {
    child.signal(SIGINT)?;
    let status = child.wait_exit(Duration::from_secs(60)).await?;
    assert!(status.success(), "{}", child.log());
    Ok(())
}

fn assert_once(log: &str, needle: &str) {
    assert_eq!(log.matches(needle).count(), 1, "{needle:?} once in:\n{log}");
}

/// A NATS server without JetStream: the error says so, names the server, tells how to
/// enable it — not "requested JetStream resource does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_disabled_is_named() -> anyhow::Result<()> {
    let port = free_port();
    let mut cmd = Command::new(nats_server_path()?);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let _nats = ChildProcess::spawn(cmd)?;
    listening("nats-server without JetStream", port).await?;
    let (mut child, _dir) = spawn(&config(
        &format!("nats://127.0.0.1:{port}"),
        "mongodb://127.0.0.1:1/",
    ))?;
    let log = failed(&mut child).await?;
    assert_once(
        &log,
        &format!("JetStream is not enabled on the NATS server at 127.0.0.1:{port}"),
    );
    assert!(log.contains("-js"), "{log}");
    assert!(!log.contains("does not exist"), "{log}");
    Ok(())
}

/// Another stream already owns the pipeline's subjects: the error names it and its
/// subjects, and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_stream_is_named() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "EVERYTHING".into(),
        subjects: vec!["cdc.>".into(), "audit.>".into()],
        ..Default::default()
    })
    .await?;
    let (mut child, _dir) = spawn(&config(&nats.url(), "mongodb://127.0.0.1:1/"))?;
    let log = failed(&mut child).await?;
    assert_once(
        &log,
        "stream 'EVERYTHING' (subjects [cdc.>, audit.>]) already takes",
    );
    assert!(log.contains("Set sink.stream"), "{log}");
    Ok(())
}

/// Nothing listens at the MongoDB address: a readable warning naming the host and the cause
/// (not the driver's topology dump), retried; SIGINT stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_mongodb_is_named_and_sigint_stops_the_retries() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let port = free_port();
    let (mut child, _dir) = spawn(&config(
        &nats.url(),
        &format!("mongodb://127.0.0.1:{port}/"),
    ))?;
    child
        .wait_for_log(
            &format!("no usable MongoDB server at 127.0.0.1:{port}: connection refused"),
            Duration::from_secs(60),
        )
        .await?;
    let log = child.log();
    assert!(
        log.lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .all(|l| !l.contains("Topology:")),
        "a warning dumps the driver's topology:\n{log}"
    );
    stops_on_sigint(&mut child).await
}

/// A standalone server with `replicaSet=` in the URI: the warning names the set and says
/// the server is not its primary (a standalone, say); SIGINT stops the retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_with_a_replica_set_name_is_named() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (_mongod, port, _data) = standalone_mongod().await?;
    let (mut child, _dir) = spawn(&config(
        &nats.url(),
        &format!("mongodb://127.0.0.1:{port}/?replicaSet=rs0"),
    ))?;
    child
        .wait_for_log(
            "sets replicaSet=rs0, but no server there is a primary of a replica set",
            Duration::from_secs(60),
        )
        .await?;
    assert!(child.log().contains(&format!("127.0.0.1:{port}")));
    stops_on_sigint(&mut child).await
}

/// A standalone server with a plain URI: change streams cannot work; the error says so
/// once, readably, with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_server_fails_once_and_readably() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (_mongod, port, _data) = standalone_mongod().await?;
    let (mut child, _dir) = spawn(&config(
        &nats.url(),
        &format!("mongodb://127.0.0.1:{port}/"),
    ))?;
    let log = failed(&mut child).await?;
    assert_once(&log, "change streams need a replica set");
    assert!(log.contains("--replSet"), "{log}");
    assert!(!log.contains("RawDocumentBuf"), "{log}");
    Ok(())
}

/// Nothing listens at the NATS address: the waiting line says why and what to check;
/// SIGINT stops the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_nats_port_is_named() -> anyhow::Result<()> {
    let port = free_port();
    let (mut child, _dir) = spawn(&config(
        &format!("nats://127.0.0.1:{port}"),
        "mongodb://127.0.0.1:1/",
    ))?;
    child
        .wait_for_log(
            "waiting for NATS: IO error: nothing that speaks NATS",
            Duration::from_secs(60),
        )
        .await?;
    let named = format!("servers=nats://127.0.0.1:{port}");
    assert!(
        child
            .log()
            .lines()
            .any(|line| line.contains("waiting for NATS") && line.contains(&named)),
        "the waiting line names the server ({named}):\n{}",
        child.log()
    );
    stops_on_sigint(&mut child).await
}

/// NATS refuses the credentials: the waiting line says so and names the config section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_authorization_failure_is_named() -> anyhow::Result<()> {
    let nats = NatsServer::start_with_config(
        "authorization { user: tidegate, password: s3cret }",
        std::sync::Arc::new(|| {
            async_nats::ConnectOptions::with_user_and_password("tidegate".into(), "s3cret".into())
        }),
    )
    .await?;
    let (mut child, _dir) = spawn(&config(&nats.url(), "mongodb://127.0.0.1:1/"))?;
    child
        .wait_for_log(
            "authorization violation: the server refused the credentials; check [nats.auth]",
            Duration::from_secs(60),
        )
        .await?;
    stops_on_sigint(&mut child).await
}
