//! Faults, against real servers: tidegate killed with SIGKILL over and over, NATS restarted,
//! MongoDB restarted, and a graceful SIGTERM. After each, the stream must hold every event
//! exactly once and in change-stream order.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use anyhow::Context as _;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bson::doc;
use support::{
    assert_exactly_once_in_order, json, write_range, Harness, InProcess, SIGTERM, STREAM,
};

/// The issue's core promise: tidegate SIGKILLed again and again while 10,000 events are
/// written, restarted each time, and the stream ends with every event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_repeatedly_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    const TOTAL: i64 = 10_000;
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "redact"
config = { fields = "email" }
"#;
    let path = h.write_config("tidegate.toml", &h.config(plugins, ""))?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;

    let writer = tokio::spawn(write_range(
        h.collection().await?,
        0,
        TOTAL,
        50,
        Duration::from_millis(25),
    ));
    // Kill at irregular intervals while the writer runs.
    let mut kills = 0;
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    while !writer.is_finished() || kills < 6 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(300 + rng % 500)).await;
        tidegate.kill9();
        kills += 1;
        tidegate = h.spawn_binary(&path)?;
        if kills >= 20 {
            break;
        }
    }
    writer.await??;
    let messages = h
        .wait_settled(STREAM, TOTAL as u64, Duration::from_secs(180))
        .await?;
    tidegate.signal(SIGTERM)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    assert!(
        status.success(),
        "clean exit after SIGTERM: {status:?}\n{}",
        tidegate.log()
    );
    assert!(kills >= 6, "tidegate was killed {kills} times");
    assert_exactly_once_in_order(&messages, TOTAL);
    assert!(messages
        .iter()
        .all(|m| json(m)["fullDocument"]["email"] == "[redacted]"));
    Ok(())
}

/// NATS goes away mid-stream and comes back: tidegate retries with backoff, drops nothing,
/// and the ordering chain (`Nats-Expected-Last-Msg-Id`) keeps the stream in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_stream_loses_nothing() -> anyhow::Result<()> {
    const TOTAL: i64 = 3_000;
    let mut h = Harness::start().await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let messages = write_through_nats_outage(&mut h, &path, TOTAL).await?;
    assert_exactly_once_in_order(&messages, TOTAL);
    Ok(())
}

/// Runs tidegate in-process on `config` while `total` events are written, stopping NATS
/// for 3 s shortly after the writes begin; returns the stream once it holds `total`.
async fn write_through_nats_outage(
    h: &mut Harness,
    config: &std::path::Path,
    total: i64,
) -> anyhow::Result<Vec<StreamMessage>> {
    let running = InProcess::start(config)?;
    h.wait_ready().await?;
    let writer = tokio::spawn(write_range(
        h.collection().await?,
        0,
        total,
        30,
        Duration::from_millis(20),
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    h.nats.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.nats.start_again().await?;
    writer.await??;
    let messages = h
        .wait_settled(STREAM, total as u64, Duration::from_secs(120))
        .await?;
    running.stop().await?;
    Ok(messages)
}

/// MongoDB is killed and restarted mid-stream: the change stream resumes after the last
/// token read, and nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_restart_resumes_from_last_token() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    write_range(h.collection().await?, 0, 500, 50, Duration::ZERO).await?;
    h.wait_for_messages(STREAM, 500, Duration::from_secs(120))
        .await?;
    h.mongo.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.mongo.restart().await?;
    write_range(h.collection().await?, 500, 1000, 50, Duration::ZERO).await?;
    let messages = h
        .wait_settled(STREAM, 1000, Duration::from_secs(120))
        .await?;
    running.stop().await?;
    assert_exactly_once_in_order(&messages, 1000);
    Ok(())
}

/// SIGTERM drains, checkpoints (here in MongoDB) and exits 0; events written while tidegate
/// is down are published after the restart, after the earlier ones, with no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_checkpoints_in_mongodb_and_restart_continues() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = h.config("", "").replace(
        "[pipeline.checkpoint]\ninterval_ms = 200",
        "[pipeline.checkpoint]\ninterval_ms = 60000\nstore = \"mongodb\"",
    );
    let path = h.write_config("tidegate.toml", &config)?;
    let mut tidegate = h.spawn_binary(&path)?;
    tidegate
        .wait_for_log("change stream open", Duration::from_secs(120))
        .await?;
    let coll = h.collection().await?;
    write_range(coll.clone(), 0, 100, 100, Duration::ZERO).await?;
    h.wait_for_messages(STREAM, 100, Duration::from_secs(120))
        .await?;
    tidegate.signal(SIGTERM)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    assert!(
        status.success(),
        "exit 0 after SIGTERM: {status:?}\n{}",
        tidegate.log()
    );
    assert!(
        tidegate.log().contains("tidegate stopped cleanly"),
        "{}",
        tidegate.log()
    );

    // The 60 s interval never fired: this checkpoint was written by the drain.
    let saved = h
        .mongo
        .client()
        .await?
        .database("tidegate")
        .collection::<bson::Document>("checkpoints")
        .find_one(doc! { "_id": "orders" })
        .await?
        .expect("checkpoint document written on shutdown");
    assert!(saved
        .get_str("lastMsgId")
        .unwrap_or_default()
        .starts_with("orders:"));

    write_range(coll, 100, 200, 100, Duration::ZERO).await?;
    let mut tidegate = h.spawn_binary(&path)?;
    let messages = h
        .wait_settled(STREAM, 200, Duration::from_secs(120))
        .await?;
    tidegate.signal(SIGTERM)?;
    tidegate.wait_exit(Duration::from_secs(120)).await?;
    assert!(
        tidegate.log().contains("resuming after checkpoint"),
        "{}",
        tidegate.log()
    );
    assert_exactly_once_in_order(&messages, 200);
    Ok(())
}

/// NATS not up yet when tidegate starts: it waits (saying so) instead of failing, and
/// relays normally once NATS appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_at_start_is_waited_for() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    h.nats.stop();
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let running = InProcess::start(&path)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.nats.start_again().await?;
    h.wait_ready().await?;
    write_range(h.collection().await?, 0, 50, 50, Duration::ZERO).await?;
    let messages = h.wait_settled(STREAM, 50, Duration::from_secs(120)).await?;
    running.stop().await?;
    assert_exactly_once_in_order(&messages, 50);
    Ok(())
}

/// Like the NATS restart above, but the stream forgets message ids after 1 s, so by the time
/// tidegate re-publishes, deduplication alone could no longer catch messages that were stored
/// but whose acks were lost. The `Nats-Expected-Last-Msg-Id` chain must still keep the stream
/// exactly-once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_with_short_duplicate_window_stays_exactly_once() -> anyhow::Result<()> {
    const TOTAL: i64 = 2_000;
    let mut h = Harness::start().await?;
    h.create_stream(&["cdc.>"], Duration::from_secs(1)).await?;
    let path = h.write_config("tidegate.toml", &h.config("", "duplicate_window_secs = 1"))?;
    let messages = write_through_nats_outage(&mut h, &path, TOTAL).await?;
    assert_exactly_once_in_order(&messages, TOTAL);
    Ok(())
}

/// The publisher on its own, against a real stream that forgets ids after 1 s: messages
/// stored before a restart (but never acknowledged to tidegate) are re-published after the
/// duplicate window has passed. The stream refuses them with "wrong last msg ID", and the
/// publisher counts them as stored instead of storing them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_skips_stored_messages_after_the_duplicate_window() -> anyhow::Result<()> {
    use tidegate::model::Position;
    use tidegate::sink::{EventMessages, Publisher};
    let h = Harness::start().await?;
    h.create_stream(&["cdc.>"], Duration::from_secs(1)).await?;
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let (token, message) = (support::numbered_token, support::numbered_message);
    // Before the "crash": 0 acknowledged and checkpointed, 1 and 2 stored but never acked.
    support::store_numbered(&js, 0..3).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let config = tidegate::Config::parse(&h.config("", ""), std::path::Path::new("."), |_| None)
        .map_err(anyhow::Error::msg)?;
    let start = Position {
        token: token(0)?,
        last_msg_id: Some(message(0).msg_id),
        snapshot: None,
    };
    let mut publisher = Publisher::new(
        js,
        "p",
        &config.pipelines[0].sink,
        Some(start),
        tidegate::ha::fence::Fence::none(),
    );
    for n in 1..4 {
        publisher
            .push(EventMessages {
                messages: vec![message(n)],
                token: token(n)?,
                snapshot: None,
                commit_unix_ms: None,
            })
            .await;
    }
    while !publisher.is_idle() {
        let result = publisher.next_ack().await;
        publisher.handle_ack(result).await;
    }
    let stored: Vec<String> = h
        .messages(STREAM)
        .await?
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(stored, ["event 0", "event 1", "event 2", "event 3"]);
    assert_eq!(
        publisher.position().map(|p| p.last_msg_id.clone()),
        Some(Some(message(3).msg_id))
    );
    Ok(())
}

/// A message framed to fit `max_payload` with the usual allowance for its predecessor's id
/// follows one whose id is far longer (on a stream shared by tenants, another tenant's): named
/// in `Nats-Expected-Last-Msg-Id`, that id would push it past `max_payload` and make the
/// server close the connection, on every retry. The publisher sends it without the header
/// instead: both are stored, promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_predecessor_id_never_pushes_a_message_past_max_payload() -> anyhow::Result<()> {
    use tidegate::sink::{EventMessages, Publisher};
    let h = Harness::start().await?;
    h.create_stream(&["cdc.>"], Duration::from_secs(120))
        .await?;
    let client = h.nats_client().await?;
    let max_payload = client.server_info().max_payload;
    let js = async_nats::jetstream::new(client);
    let config = tidegate::Config::parse(&h.config("", ""), std::path::Path::new("."), |_| None)
        .map_err(anyhow::Error::msg)?;
    let mut publisher = Publisher::new(
        js,
        "p",
        &config.pipelines[0].sink,
        None,
        tidegate::ha::fence::Fence::none(),
    );
    let mut long = support::numbered_message(1);
    long.msg_id = format!("p:{}:0", "7".repeat(1500));
    let mut full = support::numbered_message(2);
    // Exactly max_payload as the framer counts it, with 512 bytes for the predecessor's id.
    let line = |name: &str, len: usize| name.len() + 2 + len + 2;
    let headers =
        12 + line("Nats-Msg-Id", full.msg_id.len()) + line("Nats-Expected-Last-Msg-Id", 512);
    full.payload = vec![b'x'; max_payload - full.subject.len() - headers].into();
    for (n, message) in [(1, long), (2, full)] {
        publisher
            .push(EventMessages {
                messages: vec![message],
                token: support::numbered_token(n)?,
                snapshot: None,
                commit_unix_ms: None,
            })
            .await;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while !publisher.is_idle() {
            let result = publisher.next_ack().await;
            publisher.handle_ack(result).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the near-limit message was never stored"))?;
    let stored = h.messages(STREAM).await?;
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[1].payload.len() + headers,
        max_payload - stored[1].subject.len()
    );
    Ok(())
}

/// The checkpoint has fallen out of a tiny oplog while tidegate was stopped: it refuses to
/// start with an error that says so (ChangeStreamHistoryLost), instead of silently skipping
/// the lost events or stalling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_lost_from_the_oplog_is_a_clear_error() -> anyhow::Result<()> {
    let mongo = tidegate_testkit::MongoReplicaSet::start_with_oplog_mb(1).await?;
    let mut h = Harness::start().await?;
    h.mongo = mongo;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    write_range(h.collection().await?, 0, 10, 10, Duration::ZERO).await?;
    h.wait_settled(STREAM, 10, Duration::from_secs(120)).await?;
    running.stop().await?;

    // The newest oplog entry now: everything up to it has been published and checkpointed.
    let oplog = h
        .mongo
        .client()
        .await?
        .database("local")
        .collection::<bson::Document>("oplog.rs");
    let newest = |first: bool| {
        let oplog = oplog.clone();
        async move {
            let order = if first { 1 } else { -1 };
            let entry = oplog
                .find_one(doc! {})
                .sort(doc! { "$natural": order })
                .await?;
            anyhow::Ok(entry.and_then(|e| e.get_timestamp("ts").ok()))
        }
    };
    let stopped_at = newest(false).await?.context("oplog has entries")?;

    // ~40 MB of changes through a 1 MB oplog while tidegate is down, until the server has
    // truncated past the checkpoint (truncation is asynchronous).
    let coll = h.collection().await?;
    let blob = "y".repeat(100_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let docs: Vec<bson::Document> = (0..20).map(|i| doc! { "i": i, "blob": &blob }).collect();
        coll.insert_many(docs).await?;
        if newest(true)
            .await?
            .is_some_and(|oldest| oldest > stopped_at)
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the 1 MB oplog was never truncated past the checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut tidegate = h.spawn_binary(&path)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("no longer in the oplog"), "{log}");
    assert!(log.contains("ChangeStreamHistoryLost"), "{log}");
    assert!(log.contains("the oldest oplog entry is"), "{log}");

    // snapshot = "when-needed": the same lost checkpoint (copied to a pipeline of its own)
    // leads to a new snapshot of what the collection holds now, then streaming.
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let kv = js.get_key_value("tidegate-checkpoints").await?;
    let lost = kv.get(support::PIPELINE).await?.context("checkpoint")?;
    kv.put("resnap", lost).await?;
    let resnap = h
        .config("", "")
        .replace("id = \"orders\"", "id = \"resnap\"")
        .replace("stream = \"ORDERS\"", "stream = \"RESNAP\"")
        .replace("subject_prefix = \"cdc\"", "subject_prefix = \"resnap\"")
        .replace(
            "full_document = \"update-lookup\"",
            "full_document = \"update-lookup\"\nsnapshot = \"when-needed\"",
        );
    let resnap_path = h.write_config("resnap.toml", &resnap)?;
    let held = h.collection().await?.count_documents(doc! {}).await?;
    let mut tidegate = h.spawn_binary(&resnap_path)?;
    tidegate
        .wait_for_log("taking a new snapshot", Duration::from_secs(120))
        .await?;
    let messages = h
        .wait_settled("RESNAP", held, Duration::from_secs(120))
        .await?;
    assert_eq!(messages.len() as u64, held, "every document once");
    assert!(messages.iter().all(|m| json(m)["operationType"] == "read"));
    tidegate.signal(SIGTERM)?;
    tidegate.wait_exit(Duration::from_secs(120)).await?;

    // on_history_lost = "latest": resumes from now, says so loudly, and publishes what
    // follows (the ~40 MB written while it was down are skipped, as the policy says).
    let latest = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        "full_document = \"update-lookup\"\non_history_lost = \"latest\"",
    );
    let path = h.write_config("latest.toml", &latest)?;
    let before = h.messages(STREAM).await?.len() as u64;
    let mut tidegate = h.spawn_binary(&path)?;
    tidegate
        .wait_for_log("capture resumes from now", Duration::from_secs(120))
        .await?;
    tidegate
        .wait_for_log("change stream open", Duration::from_secs(120))
        .await?;
    write_range(h.collection().await?, 1000, 1005, 5, Duration::ZERO).await?;
    let messages = h
        .wait_settled(STREAM, before + 5, Duration::from_secs(120))
        .await?;
    assert_eq!(
        messages.len() as u64,
        before + 5,
        "only what came after the restart"
    );
    tidegate.signal(SIGTERM)?;
    tidegate.wait_exit(Duration::from_secs(120)).await?;
    Ok(())
}
