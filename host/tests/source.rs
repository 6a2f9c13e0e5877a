//! The change-stream side against a real replica set: include/exclude lists, skipped
//! operations and user stages pushed to the server; start positions for a pipeline without a
//! checkpoint; the `stop` invalidation policy; a capture list from a CSV file.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bson::doc;
use futures::StreamExt;
use support::{json, Harness, InProcess, DB, STREAM};
use tidegate_testkit::wait_until;

/// `(collection, n)` of every message, in stream order.
fn seen(messages: &[async_nats::jetstream::message::StreamMessage]) -> Vec<(String, i64)> {
    messages
        .iter()
        .map(|m| {
            let event = json(m);
            (
                event["ns"]["coll"].as_str().unwrap_or_default().to_string(),
                event["fullDocument"]["n"]
                    .as_i64()
                    .or(event["documentKey"]["_id"].as_i64())
                    .unwrap_or(-1),
            )
        })
        .collect()
}

/// A database-wide pipeline with `extra` keys in its `[[pipeline]]` table.
fn database_config(h: &Harness, extra: &str) -> String {
    h.config("", "")
        .replace("collections = [\"orders\"]\n", "")
        .replace(
            "full_document = \"update-lookup\"",
            &format!("full_document = \"update-lookup\"\n{extra}"),
        )
}

/// Include (literal and regex), exclude, skipped operations and a user `$match` are applied
/// by the server: only what they let through is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_user_stages_are_pushed_down() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = database_config(
        &h,
        r#"include = ["shop.orders", "/^shop\\.log_/"]
exclude = ["shop.log_secret"]
skip_operations = ["delete"]
stages = [{ "$match" = { "fullDocument.hidden" = { "$ne" = true } } }]"#,
    );
    let path = h.write_config("scopes.toml", &config)?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    let db = h.mongo.client().await?.database(DB);
    let coll = |name: &str| db.collection::<bson::Document>(name);
    coll("orders").insert_one(doc! { "_id": 1, "n": 1 }).await?;
    coll("orders")
        .insert_one(doc! { "_id": 2, "n": 2, "hidden": true })
        .await?;
    coll("log_a").insert_one(doc! { "_id": 3, "n": 3 }).await?;
    coll("log_secret")
        .insert_one(doc! { "_id": 4, "n": 4 })
        .await?;
    coll("other").insert_one(doc! { "_id": 5, "n": 5 }).await?;
    coll("orders").delete_one(doc! { "_id": 1 }).await?;
    coll("orders")
        .update_one(doc! { "_id": 2 }, doc! { "$set": { "hidden": false } })
        .await?;
    let messages = h.wait_settled(STREAM, 3, Duration::from_secs(120)).await?;
    running.stop().await?;
    assert_eq!(
        seen(&messages),
        [
            ("orders".to_string(), 1),
            ("log_a".to_string(), 3),
            ("orders".to_string(), 2)
        ],
        "hidden insert, log_secret, other and the delete stay out"
    );
    assert_eq!(json(&messages[2])["operationType"], "update");
    Ok(())
}

/// Without a checkpoint, `start_at` (a cluster time) and `start_after_token` start the
/// stream in the past; a checkpoint, once written, wins over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_positions_reach_into_the_past() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let orders = h.collection().await?;
    // A change stream of our own gives the cluster time and tokens of the events.
    let mut watch = orders.watch().await?;
    for n in 0..5 {
        orders.insert_one(doc! { "n": n }).await?;
    }
    let mut events = Vec::new();
    while events.len() < 5 {
        if let Some(event) = watch.next().await {
            events.push(event?);
        }
    }
    let first_time = events[0].cluster_time.expect("cluster time");
    let token_of_2 =
        serde_json::to_string(&bson::serialize_to_bson(&events[2].id)?.into_relaxed_extjson())?;

    // start_at the first event's cluster time: all five.
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        &format!(
            "full_document = \"update-lookup\"\nstart_at = \"{}.{}\"",
            first_time.time, first_time.increment
        ),
    );
    let path = h.write_config("start-at.toml", &config)?;
    let running = InProcess::start(&path)?;
    let messages = h.wait_settled(STREAM, 5, Duration::from_secs(120)).await?;
    running.stop().await?;
    let numbers: Vec<i64> = seen(&messages).into_iter().map(|(_, n)| n).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4]);

    // start_after_token of event 2, on a fresh pipeline id and stream: events 3 and 4.
    let config = h
        .config("", "")
        .replace(
            "full_document = \"update-lookup\"",
            &format!("full_document = \"update-lookup\"\nstart_after_token = '{token_of_2}'"),
        )
        .replace("id = \"orders\"", "id = \"orders-token\"")
        .replace("stream = \"ORDERS\"", "stream = \"FROM_TOKEN\"")
        .replace("subject_prefix = \"cdc\"", "subject_prefix = \"tok\"");
    let path = h.write_config("start-token.toml", &config)?;
    let running = InProcess::start(&path)?;
    let messages = h
        .wait_settled("FROM_TOKEN", 2, Duration::from_secs(120))
        .await?;
    running.stop().await?;
    let numbers: Vec<i64> = seen(&messages).into_iter().map(|(_, n)| n).collect();
    assert_eq!(numbers, [3, 4]);
    Ok(())
}

/// `on_invalidate = "stop"`: the drop is published, then the pipeline stops with an error
/// naming the namespace and the policy, and stops at the same place after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_policy_stop_stops_clearly_every_time() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        "full_document = \"update-lookup\"\non_invalidate = \"stop\"",
    );
    let path = h.write_config("stop.toml", &config)?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let orders = h.collection().await?;
    orders.insert_one(doc! { "n": 1 }).await?;
    orders.drop().await?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("shop.orders was dropped or renamed"), "{log}");
    assert!(log.contains("on_invalidate = \"stop\""), "{log}");
    let messages = h.wait_settled(STREAM, 2, Duration::from_secs(120)).await?;
    let operations: Vec<String> = messages
        .iter()
        .map(|m| {
            json(m)["operationType"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        operations,
        ["insert", "drop"],
        "the invalidate itself is not published"
    );

    let mut again = h.spawn_binary(&path)?;
    let status = again.wait_exit(Duration::from_secs(120)).await?;
    assert_eq!(status.code(), Some(1), "{}", again.log());
    assert!(again.log().contains("on_invalidate = \"stop\""));
    assert_eq!(
        h.messages(STREAM).await?.len(),
        2,
        "nothing new on the restart"
    );
    Ok(())
}

/// While NATS is away the checkpoint stands still and the oplog moves on fast: tidegate logs
/// an error before the checkpoint is overwritten, with the projected headroom and the lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_near_the_oplog_edge_is_warned_about() -> anyhow::Result<()> {
    let mongo = tidegate_testkit::MongoReplicaSet::start_with_oplog_mb(1).await?;
    let mut h = Harness::start().await?;
    h.mongo = mongo;
    let config = h.config("", "").replace(
        "interval_ms = 200",
        "interval_ms = 200\noplog_check_interval_ms = 500",
    );
    let path = h.write_config("window.toml", &config)?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let orders = h.collection().await?;
    orders.insert_one(doc! { "n": 0 }).await?;
    h.wait_settled(STREAM, 1, Duration::from_secs(120)).await?;
    h.nats.stop();
    // ~100 KB every 250 ms: the 1 MB oplog's window shrinks to a few seconds while the
    // checkpoint stays where NATS left it.
    let blob = "z".repeat(100_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !tidegate
        .log()
        .contains("the oplog overwrites the checkpointed position")
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no warning: {}",
            tidegate.log()
        );
        orders.insert_one(doc! { "blob": &blob }).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = tidegate.log();
    assert!(log.contains("headroom_s="), "{log}");
    assert!(log.contains("lag_s="), "{log}");
    tidegate.kill9();
    Ok(())
}

/// `required` pre-images on a collection that does not record them: a clear error at start
/// that says how to enable them; once enabled, before-images flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_images_are_checked_at_start() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let db = h.mongo.client().await?.database(DB);
    db.create_collection("orders").await?;
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        "full_document = \"update-lookup\"\nfull_document_before_change = \"required\"",
    );
    let path = h.write_config("images.toml", &config)?;
    let mut tidegate = h.spawn_binary(&path)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("changeStreamPreAndPostImages on shop.orders"),
        "{log}"
    );
    assert!(log.contains("collMod"), "{log}");

    db.run_command(
        doc! { "collMod": "orders", "changeStreamPreAndPostImages": { "enabled": true } },
    )
    .await?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    let orders = h.collection().await?;
    orders.insert_one(doc! { "_id": 1, "n": 1 }).await?;
    orders
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "n": 2 } })
        .await?;
    let messages = h.wait_settled(STREAM, 2, Duration::from_secs(120)).await?;
    running.stop().await?;
    assert_eq!(json(&messages[1])["fullDocumentBeforeChange"]["n"], 1);
    assert_eq!(json(&messages[1])["fullDocument"]["n"], 2);
    Ok(())
}

/// `snapshot = "initial"`: documents that existed before the first start are published as
/// `snapshot-read` events in `_id` order, then the changes made after the snapshot began,
/// each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_then_stream_without_gap() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let orders = h.collection().await?;
    let docs: Vec<bson::Document> = (0..2500).map(|n| doc! { "_id": n, "n": n }).collect();
    orders.insert_many(docs).await?;
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        // A user stage on documents must not keep the snapshot from finding its collections.
        "full_document = \"update-lookup\"\nsnapshot = \"initial\"\nsnapshot_chunk_size = 700\n\
         stages = [{ \"$match\" = { \"fullDocument.n\" = { \"$gte\" = -1 } } }]",
    );
    // A pipeline id of its own (metrics are per process) and the endpoint, for progress.
    let address = format!("127.0.0.1:{}", tidegate_testkit::free_port());
    let config = config.replace("id = \"orders\"", "id = \"initial\"")
        + &format!("\n[http]\naddress = \"{address}\"\n");
    let path = h.write_config("snapshot.toml", &config)?;
    let running = InProcess::start(&path)?;
    h.wait_for_messages(STREAM, 2500, Duration::from_secs(120))
        .await?;
    let (_, metrics) = support::http_get(&address, "/metrics").await?;
    assert!(
        metrics.contains("tidegate_snapshot_documents_total{pipeline=\"initial\"} 2500"),
        "{metrics}"
    );
    orders.insert_one(doc! { "_id": 2500, "n": 2500 }).await?;
    orders
        .update_one(doc! { "_id": 0 }, doc! { "$set": { "n": -1 } })
        .await?;
    let messages = h
        .wait_settled(STREAM, 2502, Duration::from_secs(120))
        .await?;
    running.stop().await?;
    assert_eq!(messages.len(), 2502);
    for (i, m) in messages[..2500].iter().enumerate() {
        let event = json(m);
        assert_eq!(event["operationType"], "read", "{event}");
        assert_eq!(event["fullDocument"]["n"].as_i64(), Some(i as i64));
    }
    assert_eq!(json(&messages[2500])["operationType"], "insert");
    assert_eq!(json(&messages[2501])["operationType"], "update");
    Ok(())
}

/// A crash in the middle of a snapshot: the restart resumes after the last checkpointed
/// chunk instead of starting over, and the stream holds every document exactly once.
///
/// The first run is held to 2000 events a second by a quota, so the kill lands mid-snapshot
/// however fast the machine runs the snapshot and however slowly it runs this test; the
/// second run, without the quota, finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_resumes_after_a_crash() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let orders = h.collection().await?;
    let total = 60_000;
    for start in (0..total).step_by(5000) {
        let docs: Vec<bson::Document> = (start..start + 5000)
            .map(|n| doc! { "_id": n, "n": n, "pad": "x".repeat(100) })
            .collect();
        orders.insert_many(docs).await?;
    }
    let snapshot =
        "full_document = \"update-lookup\"\nsnapshot = \"initial\"\nsnapshot_chunk_size = 500";
    let config = h
        .config("", "")
        .replace("full_document = \"update-lookup\"", snapshot);
    let throttled = config.replace(
        snapshot,
        &format!("{snapshot}\nquota = {{ events_per_sec = 2000.0 }}"),
    );
    assert_ne!(throttled, config, "the quota must reach the config");
    let mut first = h.spawn_binary(&h.write_config("throttled.toml", &throttled)?)?;
    let client = h.nats_client().await?;
    wait_until("5000 messages", Duration::from_secs(120), || {
        let client = client.clone();
        async move { tidegate_testkit::stream_len(&client, STREAM).await >= 5000 }
    })
    .await?;
    first.kill9();
    let at_crash = tidegate_testkit::stream_len(&client, STREAM).await;
    assert!(
        at_crash < total as u64,
        "the crash came too late: {at_crash}"
    );

    let path = h.write_config("snapshot.toml", &config)?;
    let mut second = h.spawn_binary(&path)?;
    second
        .wait_for_log(
            "resuming the snapshot where it stopped",
            Duration::from_secs(120),
        )
        .await?;
    let messages = h
        .wait_settled(STREAM, total as u64, Duration::from_secs(120))
        .await?;
    second.signal(support::SIGTERM)?;
    second.wait_exit(Duration::from_secs(120)).await?;
    let numbers: Vec<i64> = messages
        .iter()
        .map(|m| json(m)["fullDocument"]["n"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(
        numbers,
        (0..total).collect::<Vec<_>>(),
        "each document once, in order"
    );
    // Resumed, not restarted: the second run's first chunk starts past the first ones.
    let log = second.log();
    let first_chunk_done = log
        .lines()
        .find(|l| l.contains("snapshot chunk"))
        .and_then(|l| l.split("done=").nth(1))
        .and_then(|d| d.split_whitespace().next())
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(first_chunk_done > 1000, "restarted from scratch: {log}");
    Ok(())
}

/// An incremental snapshot started by one signal document while the pipeline streams:
/// every existing document is published, documents changed meanwhile never appear stale
/// after their newer change, the signal and watermark documents are never published, and the
/// stream ends at the collection's current state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_snapshot_by_signal_is_never_stale() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let db = h.mongo.client().await?.database(DB);
    let items = db.collection::<bson::Document>("items");
    let total = 3000;
    let docs: Vec<bson::Document> = (0..total).map(|n| doc! { "_id": n, "v": 0 }).collect();
    items.insert_many(docs).await?;
    let config = database_config(
        &h,
        "signal_collection = \"shop.signals\"\nsnapshot_chunk_size = 250\n\
         include = [\"shop.items\"]",
    );
    let path = h.write_config("incremental.toml", &config)?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;

    // Updates race the snapshot, as fast as they go, on the first chunk's documents and on
    // a spread of others: some land between a chunk's read and its closing watermark.
    let writer = {
        let items = items.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut i = 0;
            while started.elapsed() < Duration::from_secs(3) {
                let id = if i % 2 == 0 {
                    i % 250
                } else {
                    (i * 37) % total
                };
                items
                    .update_one(doc! { "_id": id }, doc! { "$inc": { "v": 1 } })
                    .await?;
                i += 1;
            }
            anyhow::Ok(())
        })
    };
    db.collection::<bson::Document>("signals")
        .insert_one(doc! {
            "type": "execute-snapshot",
            "data": { "data-collections": ["shop.items"], "type": "incremental" },
        })
        .await?;
    writer.await??;
    // Every document read or changed: at least `total` reads minus the changed ones, plus
    // 300 updates; wait until the stream is quiet.
    let client = h.nats_client().await?;
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = tidegate_testkit::stream_len(&client, STREAM).await;
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let messages = h.messages(STREAM).await?;
    running.stop().await?;

    let mut seen: std::collections::BTreeMap<i64, Vec<(String, i64)>> = Default::default();
    for m in &messages {
        let event = json(m);
        assert_eq!(
            event["ns"]["coll"], "items",
            "only items are published: {event}"
        );
        let id = event["documentKey"]["_id"].as_i64().unwrap_or(-1);
        let v = event["fullDocument"]["v"].as_i64().unwrap_or(-1);
        let op = event["operationType"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        seen.entry(id).or_default().push((op, v));
    }
    assert_eq!(seen.len(), total as usize, "every document appears");
    let mut cursor = items.find(doc! {}).await?;
    while let Some(doc) = futures::TryStreamExt::try_next(&mut cursor).await? {
        let id = i64::from(doc.get_i32("_id")?);
        let current = i64::from(doc.get_i32("v")?);
        let history = &seen[&id];
        let versions: Vec<i64> = history.iter().map(|(_, v)| *v).collect();
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "document {id} went back in time: {history:?}"
        );
        assert_eq!(
            versions.last(),
            Some(&current),
            "document {id}: {history:?}"
        );
        let reads = history.iter().filter(|(op, _)| op == "read").count();
        assert!(reads <= 1, "document {id} read twice: {history:?}");
    }
    Ok(())
}

/// A crash in the middle of an incremental snapshot: the restart continues from the
/// checkpointed chunk (not from scratch), and each document is read once; a stop-snapshot
/// signal ends a running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_snapshot_resumes_after_a_crash_and_stops_on_signal() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let db = h.mongo.client().await?.database(DB);
    let items = db.collection::<bson::Document>("items");
    let total: i32 = 60_000;
    for start in (0..total).step_by(10_000) {
        let docs: Vec<bson::Document> = (start..start + 10_000)
            .map(|n| doc! { "_id": n, "v": 0 })
            .collect();
        items.insert_many(docs).await?;
    }
    // Throttled (never dropped) to 3000 events a second, so that the 60,000 documents take
    // about 20 s whatever the machine's speed: the crash and the stop signal below must land
    // while a snapshot runs, and unthrottled a fast machine published all of them between two
    // looks at the stream.
    let config = database_config(
        &h,
        "signal_collection = \"shop.signals\"\nsnapshot_chunk_size = 200\n\
         include = [\"shop.items\"]\nquota = { events_per_sec = 3000.0 }",
    );
    let path = h.write_config("incremental.toml", &config)?;
    let mut first = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let signals = db.collection::<bson::Document>("signals");
    signals
        .insert_one(doc! {
            "type": "execute-snapshot",
            "data": { "data-collections": ["shop.items"], "type": "incremental" },
        })
        .await?;
    h.wait_for_messages(STREAM, 5000, Duration::from_secs(120))
        .await?;
    first.kill9();
    let at_crash = h.messages(STREAM).await?.len();
    assert!(at_crash < total as usize, "the crash came too late");

    let mut second = h.spawn_binary(&path)?;
    let messages = h
        .wait_settled(STREAM, total as u64, Duration::from_secs(120))
        .await?;
    let mut ids: Vec<i64> = messages
        .iter()
        .map(|m| json(m)["documentKey"]["_id"].as_i64().unwrap_or(-1))
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..i64::from(total)).collect::<Vec<_>>(),
        "each document once"
    );
    let log = second.log();
    assert!(log.contains("incremental snapshot done"), "{log}");
    assert!(
        !log.contains("incremental snapshot started"),
        "resumed, not restarted: {log}"
    );

    // A new snapshot, stopped by a signal soon after it starts.
    signals
        .insert_one(doc! {
            "type": "execute-snapshot",
            "data": { "data-collections": ["shop.items"], "type": "incremental" },
        })
        .await?;
    second
        .wait_for_log("incremental snapshot chunk", Duration::from_secs(120))
        .await?;
    signals.insert_one(doc! { "type": "stop-snapshot" }).await?;
    second
        .wait_for_log(
            "incremental snapshot stopped by a signal",
            Duration::from_secs(120),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = h.messages(STREAM).await?.len();
    assert!(
        after < 2 * total as usize,
        "the stopped snapshot went on: {after} messages"
    );
    second.signal(support::SIGTERM)?;
    second.wait_exit(Duration::from_secs(120)).await?;
    Ok(())
}

/// Heartbeats: tidegate writes its heartbeat document (whose events are never published),
/// the filtered stream's position keeps moving while nothing in scope changes, and heartbeat
/// messages are published at most every `heartbeat_publish_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_move_an_idle_filtered_pipeline() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = database_config(
        &h,
        "include = [\"shop.orders\"]\nheartbeat_collection = \"shop.heartbeats\"\n\
         heartbeat_write_ms = 200\nheartbeat_publish_ms = 700",
    );
    let path = h.write_config("heartbeat.toml", &config)?;
    let started = std::time::Instant::now();
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let kv = js.get_key_value("tidegate-checkpoints").await?;
    let checkpoint = || async { anyhow::Ok(kv.get(support::PIPELINE).await?.unwrap_or_default()) };
    let first = checkpoint().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = checkpoint().await?;
    assert_ne!(first, later, "the idle pipeline's checkpoint moved");

    h.collection().await?.insert_one(doc! { "n": 1 }).await?;
    let is_heartbeat = |m: &StreamMessage| m.subject.as_str() == "cdc.heartbeat";
    wait_until(
        "the insert and two heartbeats published",
        Duration::from_secs(120),
        || async {
            h.messages(STREAM).await.is_ok_and(|ms| {
                ms.iter().filter(|m| is_heartbeat(m)).count() >= 2
                    && ms.iter().any(|m| !is_heartbeat(m))
            })
        },
    )
    .await?;
    // A late heartbeat-write event published now would show here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let messages = h.messages(STREAM).await?;
    let at_most = started.elapsed().as_millis() / 700 + 1;
    running.stop().await?;
    let heartbeats: Vec<_> = messages.iter().filter(|m| is_heartbeat(m)).collect();
    assert!(
        heartbeats.len() as u128 <= at_most,
        "at most one per 700 ms: {} in {} ms",
        heartbeats.len(),
        started.elapsed().as_millis()
    );
    assert_eq!(json(heartbeats[0])["pipeline"], support::PIPELINE);
    let others: Vec<_> = messages
        .iter()
        .filter(|m| m.subject.as_str() != "cdc.heartbeat")
        .map(|m| json(m)["ns"]["coll"].clone())
        .collect();
    assert_eq!(
        others,
        vec![serde_json::json!("orders")],
        "heartbeat writes are never published"
    );
    let beat = h
        .mongo
        .client()
        .await?
        .database(DB)
        .collection::<bson::Document>("heartbeats")
        .find_one(doc! { "_id": support::PIPELINE })
        .await?;
    assert!(beat.is_some_and(|b| b.get_datetime("at").is_ok()));
    Ok(())
}

/// On an interactive terminal a snapshot draws a progress bar (here under `script`, which
/// gives the binary a pseudo-terminal); without one it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_progress_bar_on_a_terminal_only() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let orders = h.collection().await?;
    let docs: Vec<bson::Document> = (0..2500).map(|n| doc! { "_id": n, "n": n }).collect();
    orders.insert_many(docs).await?;
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        "full_document = \"update-lookup\"\nsnapshot = \"always\"\nsnapshot_chunk_size = 500",
    );
    let path = h.write_config("bar.toml", &config)?;
    let typescript = h.dir.path().join("terminal.txt");
    let command = format!(
        "timeout -s TERM 10 {} run --config {}",
        env!("CARGO_BIN_EXE_tidegate"),
        path.display()
    );
    let script_out = typescript.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["-qfec", &command])
            .arg(&script_out)
            .stdin(std::process::Stdio::null())
            .status()
    })
    .await??;
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript)?).into_owned();
    assert!(status.success() || screen.contains("100%"), "{screen}");
    assert!(screen.contains("orders snapshot ["), "{screen}");
    assert!(screen.contains("100% 2500/2500"), "{screen}");

    // Without a terminal: the log lines only.
    let mut plain = h.spawn_binary(&path)?;
    plain
        .wait_for_log("snapshot done", Duration::from_secs(120))
        .await?;
    plain.signal(support::SIGTERM)?;
    plain.wait_exit(Duration::from_secs(120)).await?;
    assert!(!plain.log().contains("snapshot ["), "{}", plain.log());
    Ok(())
}

/// A pipeline configured only by a `collections_file` (rows in two databases, written as a
/// spreadsheet exports them) snapshots and captures exactly the listed collections — not an
/// unlisted collection of a listed database, nor a listed name in another database. SIGHUP
/// re-reads the file: a broken one is refused naming its line, a changed one is reported as
/// needing a restart (the running list stays), and the restart applies it from the
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_file_is_the_capture_list() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let client = h.mongo.client().await?;
    let coll = |db: &str, name: &str| client.database(db).collection::<bson::Document>(name);
    let insert = |db: &'static str, name: &'static str, n: i64| {
        let target = coll(db, name);
        async move { target.insert_one(doc! { "_id": n, "n": n }).await }
    };
    // Before the start: the snapshot reads the listed ones.
    insert("shop", "orders", 1).await?;
    insert("shop", "other", 2).await?;
    insert("crm", "users", 3).await?;
    insert("crm", "orders", 4).await?;
    let list = h.dir.path().join("capture.csv");
    std::fs::write(
        &list,
        "\u{feff}shop,orders\r\n# CRM\r\n \"crm\" , users \r\n\r\n",
    )?;
    let config = h
        .config("", "")
        .replace(
            &format!("database = \"{DB}\"\ncollections = [\"orders\"]\n"),
            "collections_file = \"capture.csv\"\nsnapshot = \"initial\"\n",
        )
        .replace("full_document = \"update-lookup\"\n", "");
    assert!(config.contains("collections_file") && !config.contains("database ="));
    let path = h.write_config("capture.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    // The first checkpoint is the start position, saved before the snapshot reads: a write
    // before the snapshot has read its two documents could be read by it as well as
    // streamed (an overlap every snapshot may have, which this test does not count).
    h.wait_for_messages(STREAM, 2, Duration::from_secs(120))
        .await?;
    insert("shop", "orders", 5).await?;
    insert("shop", "other", 6).await?;
    insert("crm", "users", 7).await?;
    insert("crm", "orders", 8).await?;
    let messages = h.wait_settled(STREAM, 4, Duration::from_secs(120)).await?;
    let listed = |ns: &str, n: i64| (ns.to_string(), n);
    assert_eq!(
        namespaces(&messages),
        [
            listed("crm.users", 3),
            listed("shop.orders", 1),
            listed("shop.orders", 5),
            listed("crm.users", 7)
        ],
        "snapshot reads, then changes, of the listed collections only"
    );

    // A broken file is refused on SIGHUP, naming the file and the line.
    std::fs::write(&list, "shop,orders\nshop,other,extra\n")?;
    child.signal(1)?;
    child
        .wait_for_log("config reload refused", Duration::from_secs(120))
        .await?;
    assert!(
        child.log().contains("capture.csv:2: 3 fields"),
        "{}",
        child.log()
    );
    // A changed list is reported; the running pipeline keeps its list until a restart.
    std::fs::write(&list, "shop,orders\ncrm,users\nshop,other\n")?;
    child.signal(1)?;
    child
        .wait_for_log("restart tidegate to apply them", Duration::from_secs(120))
        .await?;
    insert("shop", "other", 9).await?;
    insert("shop", "orders", 10).await?;
    let messages = h.wait_settled(STREAM, 5, Duration::from_secs(120)).await?;
    assert_eq!(namespaces(&messages)[4..], [listed("shop.orders", 10)]);
    child.signal(support::SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;

    // The restart resumes from the checkpoint with the new list.
    let mut child = h.spawn_binary(&path)?;
    insert("shop", "other", 11).await?;
    let messages = h.wait_settled(STREAM, 6, Duration::from_secs(120)).await?;
    child.signal(support::SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    assert_eq!(
        namespaces(&messages)[4..],
        [listed("shop.orders", 10), listed("shop.other", 11)],
        "shop.other from the checkpoint on; its insert before the restart stays out"
    );
    Ok(())
}

/// `(db.coll, n)` of every message, in stream order.
fn namespaces(messages: &[async_nats::jetstream::message::StreamMessage]) -> Vec<(String, i64)> {
    messages
        .iter()
        .map(|m| {
            let event = json(m);
            let ns = format!(
                "{}.{}",
                event["ns"]["db"].as_str().unwrap_or_default(),
                event["ns"]["coll"].as_str().unwrap_or_default()
            );
            (ns, event["fullDocument"]["n"].as_i64().unwrap_or(-1))
        })
        .collect()
}
