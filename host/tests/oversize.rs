//! Events over MongoDB's 16 MiB limit (`pipeline.oversize`), against real servers: an update
//! of a ~10 MiB document with pre- and post-images makes a ~30 MiB event, which MongoDB
//! cannot return whole (BSONObjectTooLarge). Small events come before and after it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bson::doc;
use support::{assert_dead_letter, header, json, Harness, InProcess, COLL, DB, SIGTERM, STREAM};
use tidegate_testkit::{MongoReplicaSet, NatsServer};

/// Size of the large document's string field.
const BIG: usize = 10 * 1024 * 1024;

/// The largest payload nats-server accepts, so that a reassembled ~30 MiB event fits.
const LARGE_NATS: &str = "max_payload: 67108864";

/// The standard pipeline with pre- and post-images required and `oversize = "<policy>"`.
fn config(h: &Harness, policy: &str) -> String {
    h.config("", "").replace(
        "full_document = \"update-lookup\"",
        &format!(
            "full_document = \"required\"\nfull_document_before_change = \"required\"\n\
             oversize = \"{policy}\""
        ),
    )
}

/// Creates `shop.orders` with pre- and post-images and the large document `{_id: "big"}`
/// (before tidegate starts, so its insert is not part of the test).
async fn prepare(h: &Harness) -> anyhow::Result<()> {
    let client = h.mongo.client().await?;
    client
        .database(DB)
        .run_command(doc! {
            "create": COLL,
            "changeStreamPreAndPostImages": { "enabled": true },
        })
        .await?;
    h.collection()
        .await?
        .insert_one(doc! { "_id": "big", "big": "a".repeat(BIG) })
        .await?;
    Ok(())
}

/// Writes the small event 1, the oversize update, and the small event 2.
async fn write_around_oversize(h: &Harness) -> anyhow::Result<()> {
    let orders = h.collection().await?;
    orders.insert_one(doc! { "_id": 1, "n": 1 }).await?;
    orders
        .update_one(
            doc! { "_id": "big" },
            doc! { "$set": { "big": "b".repeat(BIG) } },
        )
        .await?;
    orders.insert_one(doc! { "_id": 2, "n": 2 }).await?;
    Ok(())
}

/// `(operationType, documentKey._id)` of every message, in stream order.
fn keys(messages: &[async_nats::jetstream::message::StreamMessage]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            let event = json(m);
            (
                event["operationType"].as_str().unwrap_or_default().into(),
                event["documentKey"]["_id"].to_string(),
            )
        })
        .collect()
}

/// Asserts that `event` is the whole oversize update: both images and the update itself.
fn assert_whole_update(event: &serde_json::Value) {
    assert_eq!(event["operationType"], "update");
    assert_eq!(event["documentKey"]["_id"], "big");
    let text = |v: &serde_json::Value| v.as_str().map(|s| (s.len(), s.chars().next()));
    assert_eq!(text(&event["fullDocument"]["big"]), Some((BIG, Some('b'))));
    assert_eq!(
        text(&event["fullDocumentBeforeChange"]["big"]),
        Some((BIG, Some('a')))
    );
    assert_eq!(
        text(&event["updateDescription"]["updatedFields"]["big"]),
        Some((BIG, Some('b')))
    );
    assert!(event.get("splitEvent").is_none(), "{}", event["splitEvent"]);
}

/// `fail` (the default): the pipeline stops once, with an error naming the event and the
/// settings that fix it, instead of retrying forever; the event before it is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_stops_with_an_error_naming_the_event() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    prepare(&h).await?;
    let path = h.write_config("fail.toml", &config(&h, "fail"))?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    write_around_oversize(&h).await?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("an event over 16 MiB stopped the stream"),
        "{log}"
    );
    assert!(log.contains("update on shop.orders"), "{log}");
    assert!(log.contains("document key {\"_id\":\"big\"}"), "{log}");
    assert!(
        log.contains("oversize = \\\"split\\\"") || log.contains("oversize = \"split\""),
        "{log}"
    );
    assert!(
        !log.contains("resuming after the last event read"),
        "no retry: {log}"
    );
    // Read again once to name the event, then reported once, as the binary reports any
    // fatal error.
    assert_eq!(log.matches("reading up to it again").count(), 1, "{log}");
    assert_eq!(log.matches("stopped the stream").count(), 1, "{log}");
    let messages = h.wait_settled(STREAM, 1, Duration::from_secs(30)).await?;
    assert_eq!(keys(&messages), [("insert".into(), "1".into())]);

    // A restart stops at the same event, the one before it neither lost nor repeated.
    let mut again = h.spawn_binary(&path)?;
    let status = again.wait_exit(Duration::from_secs(120)).await?;
    let log = again.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("document key {\"_id\":\"big\"}"), "{log}");
    let messages = h.wait_settled(STREAM, 1, Duration::from_secs(30)).await?;
    assert_eq!(keys(&messages), [("insert".into(), "1".into())]);
    Ok(())
}

/// `skip`: the event becomes a stub on the dead-letter subject (reason `oversize`, its size,
/// its identity but none of its documents), and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_dead_letters_a_stub_and_goes_on() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    prepare(&h).await?;
    let path = h.write_config("skip.toml", &config(&h, "skip"))?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    write_around_oversize(&h).await?;
    let messages = h.wait_settled(STREAM, 3, Duration::from_secs(120)).await?;
    running.stop().await?;
    assert_eq!(
        keys(&messages),
        [
            ("insert".into(), "1".into()),
            ("update".into(), "\"big\"".into()),
            ("insert".into(), "2".into()),
        ]
    );
    let stub = &messages[1];
    assert_dead_letter(stub, "oversize");
    let size: i64 = header(stub, "Tidegate-Event-Size")
        .unwrap_or_default()
        .parse()?;
    assert!(size > 3 * BIG as i64, "{size}");
    let event = json(stub);
    assert_eq!(event["ns"]["coll"], COLL);
    assert!(event["clusterTime"].is_object(), "{event}");
    assert!(event["id"].is_string(), "{event}");
    for stripped in [
        "fullDocument",
        "fullDocumentBeforeChange",
        "updateDescription",
    ] {
        assert!(event.get(stripped).is_none(), "{stripped}: {event}");
    }
    Ok(())
}

/// `split`, with a NATS server that takes ~30 MiB messages: the fragments are reassembled
/// into the one event, published whole between the events around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_reassembles_the_event() -> anyhow::Result<()> {
    let (mongo, nats) = tokio::try_join!(
        MongoReplicaSet::start(),
        NatsServer::start_with_config(LARGE_NATS, Arc::new(async_nats::ConnectOptions::new))
    )?;
    let h = Harness::start_on(mongo, nats).await?;
    prepare(&h).await?;
    let path = h.write_config("split.toml", &config(&h, "split"))?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    write_around_oversize(&h).await?;
    let messages = h.wait_settled(STREAM, 3, Duration::from_secs(120)).await?;
    running.stop().await?;
    assert_eq!(
        keys(&messages),
        [
            ("insert".into(), "1".into()),
            ("update".into(), "\"big\"".into()),
            ("insert".into(), "2".into()),
        ]
    );
    assert_whole_update(&json(&messages[1]));
    Ok(())
}

/// `split` with NATS's default 1 MiB `max_payload`: the reassembled event is too large to
/// publish, so it takes the too-large dead-letter path; the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_event_too_large_for_nats_is_dead_lettered() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    prepare(&h).await?;
    // The user's own last stage means `split` too.
    let config = config(&h, "fail").replace(
        "oversize = \"fail\"",
        "stages = [{ \"$changeStreamSplitLargeEvent\" = {} }]",
    );
    let path = h.write_config("split-dl.toml", &config)?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    write_around_oversize(&h).await?;
    let messages = h.wait_settled(STREAM, 3, Duration::from_secs(120)).await?;
    running.stop().await?;
    assert_eq!(keys(&messages)[0], ("insert".into(), "1".into()));
    assert_dead_letter(&messages[1], "too-large");
    assert_eq!(json(&messages[1])["documentKey"]["_id"], "big");
    assert_eq!(keys(&messages)[2], ("insert".into(), "2".into()));
    Ok(())
}

/// `split`, killed (SIGKILL) while holding part of the fragments: MongoDB is made to hold
/// back the next fragment (a failCommand fail point on getMore), so the kill lands inside
/// the event. The restart reads the event again from its first fragment and publishes it
/// whole, once, then the event after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_killed_mid_fragments_resumes_from_the_event_start() -> anyhow::Result<()> {
    let (mongo, nats) = tokio::try_join!(
        MongoReplicaSet::start(),
        NatsServer::start_with_config(LARGE_NATS, Arc::new(async_nats::ConnectOptions::new))
    )?;
    let h = Harness::start_on(mongo, nats).await?;
    prepare(&h).await?;
    let path = h.write_config("split-kill.toml", &config(&h, "split"))?;

    // Run 1 publishes event 1 and stops cleanly: the checkpoint is after it.
    let mut first = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let orders = h.collection().await?;
    orders.insert_one(doc! { "_id": 1, "n": 1 }).await?;
    h.wait_for_messages(STREAM, 1, Duration::from_secs(60))
        .await?;
    first.signal(SIGTERM)?;
    first.wait_exit(Duration::from_secs(60)).await?;

    orders
        .update_one(
            doc! { "_id": "big" },
            doc! { "$set": { "big": "b".repeat(BIG) } },
        )
        .await?;
    orders.insert_one(doc! { "_id": 2, "n": 2 }).await?;

    // Run 2 gets the first fragment(s), then every getMore but the first hangs.
    let admin = h.mongo.client().await?.database("admin");
    admin
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": { "skip": 1 },
            "data": {
                "failCommands": ["getMore"],
                "blockConnection": true,
                "blockTimeMS": 120_000,
            },
        })
        .await?;
    let mut second = h.spawn_binary(&path)?;
    second
        .wait_for_log("(split event); reassembling it", Duration::from_secs(120))
        .await?;
    // Still inside the event: its last fragment is held back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.log().contains("split event reassembled"),
        "{}",
        second.log()
    );
    second.kill9();
    admin
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await?;

    let _third = h.spawn_binary(&path)?;
    let messages = h.wait_settled(STREAM, 3, Duration::from_secs(120)).await?;
    assert_eq!(
        keys(&messages),
        [
            ("insert".into(), "1".into()),
            ("update".into(), "\"big\"".into()),
            ("insert".into(), "2".into()),
        ]
    );
    assert_whole_update(&json(&messages[1]));
    Ok(())
}

/// `split` on MongoDB 6.0.5, which lacks `$changeStreamSplitLargeEvent`: refused at start,
/// naming the server's version and the minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_on_an_old_server_is_refused_at_start() -> anyhow::Result<()> {
    let (mongo, nats) = tokio::try_join!(MongoReplicaSet::start_old(), NatsServer::start())?;
    let h = Harness::start_on(mongo, nats).await?;
    prepare(&h).await?;
    let path = h.write_config("split-old.toml", &config(&h, "split"))?;
    let config = tidegate::Config::load(&path)?;
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        tidegate::run(config, std::future::pending()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("split on 6.0.5 was not refused within 60 s"))?;
    let err = result
        .expect_err("split on 6.0.5 must be refused")
        .to_string();
    assert!(err.contains("this server is 6.0.5"), "{err}");
    assert!(err.contains("6.0.9"), "{err}");
    Ok(())
}
