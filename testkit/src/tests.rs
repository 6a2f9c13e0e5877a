//! Self-tests: the harness really starts working servers.

use std::time::{Duration, Instant};

use futures::StreamExt;
use mongodb::bson::{doc, Document};
use mongodb::change_stream::event::OperationType;

use crate::{ChildProcess, MongoReplicaSet, NatsServer};

/// Proves that [`MongoReplicaSet`] is a real, writable replica set: change streams (which need a
/// replica set) deliver an insert, and after a `SIGKILL` and [`MongoReplicaSet::restart`] on the
/// same port and data directory the acknowledged writes are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_replica_set_change_stream_and_restart() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut rs = MongoReplicaSet::start().await?;
    eprintln!(
        "mongod fresh start (incl. replSetInitiate) took {:?}",
        t0.elapsed()
    );

    let client = rs.client().await?;
    let coll = client.database("selftest").collection::<Document>("docs");
    coll.insert_one(doc! { "_id": 1, "v": "before watch" })
        .await?;

    let mut stream = coll.watch().await?;
    coll.insert_one(doc! { "_id": 2, "v": "watched" }).await?;
    let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("change stream ended"))??;
    assert_eq!(event.operation_type, OperationType::Insert);
    let full = event
        .full_document
        .ok_or_else(|| anyhow::anyhow!("insert event without fullDocument"))?;
    assert_eq!(full.get_i32("_id")?, 2);
    drop(stream);
    client.shutdown().immediate(true).await;

    let port = rs.port();
    rs.kill();
    let t0 = Instant::now();
    rs.restart().await?;
    eprintln!("mongod restart after SIGKILL took {:?}", t0.elapsed());
    assert_eq!(rs.port(), port);

    let client = rs.client().await?;
    let coll = client.database("selftest").collection::<Document>("docs");
    assert_eq!(coll.count_documents(doc! {}).await?, 2);
    client.shutdown().immediate(true).await;
    Ok(())
}

/// Proves that [`NatsServer`] runs JetStream with message de-duplication (`Nats-Msg-Id`), and that
/// its file store survives [`NatsServer::stop`] + [`NatsServer::start_again`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_dedup_and_restart() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut nats = NatsServer::start().await?;
    eprintln!("nats-server fresh start took {:?}", t0.elapsed());

    let client = nats.client().await?;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SELFTEST".into(),
        subjects: vec!["selftest.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;

    let mut acks = Vec::new();
    for _ in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "msg-1");
        let ack = js
            .publish_with_headers("selftest.a", headers, "payload".into())
            .await?
            .await?;
        acks.push(ack);
    }
    assert!(!acks[0].duplicate, "first publish must not be a duplicate");
    assert!(
        acks[1].duplicate,
        "second publish with the same Nats-Msg-Id must be"
    );
    assert_eq!(acks[0].sequence, acks[1].sequence);
    client.drain().await?;

    let port = nats.port();
    let t0 = Instant::now();
    nats.stop();
    eprintln!("nats-server SIGTERM stop took {:?}", t0.elapsed());
    let t0 = Instant::now();
    nats.start_again().await?;
    eprintln!("nats-server start_again took {:?}", t0.elapsed());
    assert_eq!(nats.port(), port);

    let client = nats.client().await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("SELFTEST").await?;
    assert_eq!(stream.info().await?.state.messages, 1);
    client.drain().await?;
    Ok(())
}

/// Proves that [`ChildProcess`] captures stdout and stderr, delivers signals, reports the exit
/// status, and that `wait_for_log` fails fast (with the log) when the process exits.
#[tokio::test]
async fn child_process_log_signal_exit() -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("echo to-stdout; echo to-stderr >&2; trap 'echo got-term; exit 3' TERM; while :; do sleep 0.05; done");
    let mut child = ChildProcess::spawn(cmd)?;
    child
        .wait_for_log("to-stderr", Duration::from_secs(10))
        .await?;
    assert!(child.log().contains("to-stdout"));
    child.signal(libc::SIGTERM)?;
    let status = child.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(3));
    assert!(child.log().contains("got-term"));
    let err = child
        .wait_for_log("never printed", Duration::from_secs(10))
        .await
        .expect_err("the process has exited");
    assert!(
        format!("{err}").contains("got-term"),
        "error quotes the log: {err}"
    );
    assert!(
        child.signal(libc::SIGTERM).is_err(),
        "no signals to a reaped child"
    );
    Ok(())
}

/// Proves that [`crate::plugin_dir`] runs `scripts/build-plugins.sh` and finds `.wasm` components.
/// (The first run in a fresh cache compiles the guest plugins, ~1 min.)
#[test]
fn plugin_dir_holds_components() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = crate::plugin_dir()?;
    eprintln!("plugin_dir() took {:?}: {}", t0.elapsed(), dir.display());
    let wasm = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
        .count();
    assert!(wasm > 0, "no .wasm files in {}", dir.display());
    // Cached: the second call does not run the script again.
    let t0 = Instant::now();
    assert_eq!(crate::plugin_dir()?, dir);
    assert!(t0.elapsed() < Duration::from_millis(100));
    Ok(())
}
