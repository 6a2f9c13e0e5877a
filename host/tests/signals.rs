//! Debezium-style signal documents against a real replica set, written as Debezium's
//! documentation writes them (its MongoDB, Kafka and signalling pages, with its example
//! names replaced by this test's and the MongoDB page's missing `:` after
//! `"data-collections"` restored): each is acted on as documented, or refused with a WARN
//! line and counted in `tidegate_signals_total`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bson::{doc, Document};
use support::{header, http_get, json, Harness, DB, STREAM};
use tidegate_testkit::{free_port, wait_until, ChildProcess};

/// A pipeline on database `shop` (collections `items`, `products` and the signal
/// collection), with the metrics endpoint at the returned address.
fn signals_config(h: &Harness, extra: &str) -> (String, String) {
    let address = format!("127.0.0.1:{}", free_port());
    let config = h
        .config("", "")
        .replace("collections = [\"orders\"]\n", "")
        .replace(
            "full_document = \"update-lookup\"",
            &format!(
                "full_document = \"update-lookup\"\nsignal_collection = \"shop.signals\"\n\
                 include = [\"shop.items\", \"shop.products\"]\n{extra}"
            ),
        );
    (
        format!("{config}\n[http]\naddress = \"{address}\"\n"),
        address,
    )
}

/// 100 products, every tenth one blue.
async fn products(h: &Harness) -> anyhow::Result<()> {
    let docs: Vec<Document> = (0..100)
        .map(|n| doc! { "_id": n, "color": if n % 10 == 0 { "blue" } else { "red" } })
        .collect();
    h.mongo
        .client()
        .await?
        .database(DB)
        .collection::<Document>("products")
        .insert_many(docs)
        .await?;
    Ok(())
}

/// One snapshot read: `(collection, _id, color)`.
type Read = (String, i64, String);

/// The snapshot reads published so far, grouped by snapshot (the id in `Nats-Msg-Id`, in
/// order of first appearance): `(collection, _id, color)` each.
async fn reads_by_snapshot(h: &Harness) -> anyhow::Result<Vec<Vec<Read>>> {
    let mut groups: Vec<(String, Vec<Read>)> = Vec::new();
    for m in h.messages(STREAM).await? {
        let event = json(&m);
        if event["operationType"] != "read" {
            continue;
        }
        let id = header(&m, "Nats-Msg-Id").unwrap_or_default();
        let snapshot = id.split('.').nth(1).unwrap_or_default().to_string();
        let read = (
            event["ns"]["coll"].as_str().unwrap_or_default().to_string(),
            event["documentKey"]["_id"].as_i64().unwrap_or(-1),
            event["fullDocument"]["color"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        match groups.iter_mut().find(|(s, _)| *s == snapshot) {
            Some((_, reads)) => reads.push(read),
            None => groups.push((snapshot, vec![read])),
        }
    }
    Ok(groups.into_iter().map(|(_, reads)| reads).collect())
}

/// The snapshot reads once the stream holds every one the source has queued so far.
///
/// The source logs a chunk (`done=N`: the snapshot's documents queued, this chunk
/// included) and a snapshot's end (`documents=N`) when it hands the reads to the plugin
/// chain, before they are published; on a busy machine the stream can be several chunks
/// behind that line. This waits until snapshot number `snapshot` (0 for the first) holds
/// the count on the log's last line containing `needle`.
async fn published_reads(
    h: &Harness,
    child: &ChildProcess,
    snapshot: usize,
    needle: &str,
) -> anyhow::Result<Vec<Vec<Read>>> {
    let log = child.log();
    let line = log
        .lines()
        .rfind(|l| l.contains(needle))
        .ok_or_else(|| anyhow::anyhow!("no {needle:?} in the log:\n{log}"))?;
    let queued: usize = ["done=", "documents="]
        .iter()
        .find_map(|field| line.split(field).nth(1))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no count on {line:?}"))?;
    wait_until(
        &format!("{queued} reads of snapshot {snapshot} in the stream"),
        Duration::from_secs(120),
        || async {
            reads_by_snapshot(h)
                .await
                .is_ok_and(|reads| reads.get(snapshot).map_or(0, Vec::len) >= queued)
        },
    )
    .await?;
    reads_by_snapshot(h).await
}

/// `tidegate_signals_total{…,outcome="<outcome>"}`.
async fn signals_counted(address: &str, outcome: &str) -> anyhow::Result<Option<u64>> {
    let (_, text) = http_get(address, "/metrics").await?;
    let needle = format!("outcome=\"{outcome}\"}} ");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tidegate_signals_total{"))
        .find_map(|l| l.split_once(&needle).map(|(_, n)| n.trim().to_string()))
        .and_then(|n| n.parse().ok()))
}

/// Waits until the log holds `needle` `n` times.
async fn wait_for_count(child: &ChildProcess, needle: &str, n: usize) -> anyhow::Result<()> {
    wait_until(
        &format!("{n} × {needle:?} in the log"),
        Duration::from_secs(120),
        || async { child.log().matches(needle).count() >= n },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nlog:\n{}", child.log()))
}

/// Every form of `execute-snapshot` Debezium documents for MongoDB: `data` as a sub-document
/// and as a JSON string, `type` in upper case, `additional-conditions` (a relaxed and a
/// strict JSON filter: only the 10 blue products are read), a regular expression and a
/// quoted name in `data-collections`; a `log` signal; and the refusals — a misspelt signal
/// type, the removed `additional-condition`, a collection outside the scope, a second
/// snapshot while one runs — each a WARN line and a count, none silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_snapshot_in_every_documented_form() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    products(&h).await?;
    let (config, address) = signals_config(&h, "snapshot_chunk_size = 30");
    let path = h.write_config("signals.toml", &config)?;
    let child = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    assert_eq!(signals_counted(&address, "accepted").await?, Some(0));
    assert_eq!(signals_counted(&address, "refused").await?, Some(0));
    assert_eq!(signals_counted(&address, "invalid").await?, Some(0));
    let signals = h
        .mongo
        .client()
        .await?
        .database(DB)
        .collection::<Document>("signals");

    // Each accepted one runs to its end before the next is sent.
    let accepted: Vec<Document> = vec![
        // MongoDB connector page (db.debeziumSignal.insert), data as a sub-document.
        doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["shop.products"], "type": "incremental" } },
        // Signalling page's Kafka value, data as the JSON string a signal table holds.
        doc! { "type": "execute-snapshot",
        "data": "{\"data-collections\": [\"shop.products\"], \"type\": \"INCREMENTAL\"}" },
        // With additional-conditions, the filter in the shell's relaxed syntax.
        doc! { "type": "execute-snapshot", "data": "{\"data-collections\": [\"shop.products\"], \
        \"type\": \"INCREMENTAL\", \"additional-conditions\": [{\"data-collection\": \
        \"shop.products\" ,\"filter\":\"{color: 'blue'}\"}]}" },
        // A regular expression.
        doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["shop\\.prod.*"], "type": "incremental" } },
        // A quoted name, a strict JSON filter, the MongoDB page's `data-collections` key
        // inside additional-conditions.
        doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["\"shop\".\"products\""], "type": "incremental",
        "additional-conditions": [
            { "data-collections": "shop.products", "filter": "{\"color\": \"blue\"}" }] } },
    ];
    for (n, signal) in accepted.into_iter().enumerate() {
        signals.insert_one(signal).await?;
        wait_for_count(&child, "incremental snapshot done", n + 1).await?;
    }
    signals
        .insert_one(doc! { "type": "log", "data": { "message": "Signal message at offset {}" } })
        .await?;
    wait_for_count(&child, "signal log: Signal message at offset ", 1).await?;

    let refused = [
        doc! { "type": "execute-snapshots", "data": { "data-collections": ["shop.products"] } },
        doc! { "type": "execute-snapshot", "data": { "data-collections": ["shop.products"],
        "additional-condition": "color='blue'" } },
        doc! { "type": "execute-snapshot", "data": { "data-collections": ["shop.nothing"] } },
        doc! { "type": "execute-snapshot", "data": { "data-collections": ["shop.products"],
        "additional-conditions": [{ "data-collection": "shop.products",
            "filter": "color='blue' AND brand='MyBrand'" }] } },
    ];
    for signal in refused {
        signals.insert_one(signal).await?;
    }
    wait_for_count(&child, "signal refused", 4).await?;
    let log = child.log();
    for reason in [
        "unknown signal type 'execute-snapshots'",
        "`additional-condition` (a single SQL condition",
        "no collection in this pipeline's scope matches data-collections [\"shop.nothing\"]",
        "is not a MongoDB query document",
    ] {
        assert!(log.contains(reason), "no WARN saying {reason:?}:\n{log}");
    }
    assert!(
        log.lines()
            .filter(|l| l.contains("signal refused"))
            .all(|l| l.contains("WARN")),
        "refusals are warnings:\n{log}"
    );

    let reads = published_reads(&h, &child, 4, "incremental snapshot done").await?;
    let sizes: Vec<usize> = reads.iter().map(Vec::len).collect();
    assert_eq!(sizes, [100, 100, 10, 100, 10], "reads per snapshot");
    for filtered in [&reads[2], &reads[4]] {
        assert!(
            filtered.iter().all(|(_, _, color)| color == "blue"),
            "{filtered:?}"
        );
    }
    assert!(
        h.messages(STREAM)
            .await?
            .iter()
            .all(|m| json(m)["ns"]["coll"] != "signals"),
        "signal documents are never published"
    );
    assert_eq!(signals_counted(&address, "accepted").await?, Some(6));
    assert_eq!(signals_counted(&address, "invalid").await?, Some(3));
    assert_eq!(signals_counted(&address, "refused").await?, Some(1));
    Ok(())
}

/// `stop-snapshot` naming a collection drops it from the running snapshot (the others go
/// on), without `data-collections` it stops everything; `pause-snapshot` holds a running one
/// and `resume-snapshot` lets it finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_pause_and_resume() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    products(&h).await?;
    let db = h.mongo.client().await?.database(DB);
    let items: Vec<Document> = (0..20_000).map(|n| doc! { "_id": n }).collect();
    db.collection::<Document>("items")
        .insert_many(items)
        .await?;
    let (config, _) = signals_config(&h, "snapshot_chunk_size = 20");
    let path = h.write_config("signals.toml", &config)?;
    let child = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let signals = db.collection::<Document>("signals");

    // items (read first) is dropped by a stop naming it; products still is read whole.
    signals
        .insert_one(doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["shop.items", "shop.products"], "type": "incremental" } })
        .await?;
    wait_for_count(&child, "incremental snapshot chunk", 3).await?;
    signals
        .insert_one(doc! { "type": "stop-snapshot",
        "data": "{\"data-collections\": [\"shop.items\"], \"type\": \"INCREMENTAL\"}" })
        .await?;
    wait_for_count(&child, "incremental snapshot done", 1).await?;
    let reads = published_reads(&h, &child, 0, "incremental snapshot done").await?;
    let items_read = reads[0].iter().filter(|(c, ..)| c == "items").count();
    let products_read = reads[0].iter().filter(|(c, ..)| c == "products").count();
    assert!(items_read < 20_000, "items went on: {items_read}");
    assert_eq!(products_read, 100);

    // Paused after a chunk, resumed, finished.
    signals
        .insert_one(doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["shop.items"], "type": "incremental" } })
        .await?;
    signals
        .insert_one(doc! { "type": "pause-snapshot" })
        .await?;
    wait_for_count(&child, "incremental snapshot paused by a signal", 1).await?;
    wait_for_count(&child, "incremental snapshot paused after its chunk", 1).await?;
    let paused_at = published_reads(&h, &child, 1, "incremental snapshot chunk").await?[1].len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        reads_by_snapshot(&h).await?.get(1).map_or(0, Vec::len),
        paused_at,
        "a paused snapshot reads nothing"
    );
    assert!(paused_at < 20_000, "paused too late to tell: {paused_at}");
    signals
        .insert_one(doc! { "type": "resume-snapshot" })
        .await?;
    wait_for_count(&child, "incremental snapshot done", 2).await?;
    let reads = published_reads(&h, &child, 1, "incremental snapshot done").await?;
    assert_eq!(reads[1].len(), 20_000);

    // Stopped whole.
    signals
        .insert_one(doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["shop.items"], "type": "incremental" } })
        .await?;
    wait_for_count(&child, "incremental snapshot chunk", 12).await?;
    signals
        .insert_one(doc! { "type": "stop-snapshot", "data": { "type": "incremental" } })
        .await?;
    wait_for_count(&child, "incremental snapshot stopped by a signal", 1).await?;
    // A stop with nothing running is refused, not ignored.
    signals
        .insert_one(doc! { "type": "stop-snapshot", "data": { "type": "incremental" } })
        .await?;
    wait_for_count(&child, "no incremental snapshot is running", 1).await?;
    Ok(())
}

/// A `blocking` snapshot pauses the stream: every change written after the signal is
/// published after the snapshot's last read, none is lost, and each document is read once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_snapshot_pauses_the_stream() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let db = h.mongo.client().await?.database(DB);
    let items = db.collection::<Document>("items");
    let existing: Vec<Document> = (0..5000).map(|n| doc! { "_id": n, "n": -1 }).collect();
    items.insert_many(existing).await?;
    let (config, _) = signals_config(&h, "snapshot_chunk_size = 100");
    let path = h.write_config("signals.toml", &config)?;
    let child = h.spawn_binary(&path)?;
    h.wait_ready().await?;

    // A writer inserting numbered documents before, during and after the snapshot.
    let written = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (items, written, stop) = (items.clone(), written.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                items
                    .insert_one(doc! { "_id": 100_000 + n, "n": n })
                    .await?;
                n += 1;
                written.store(n, std::sync::atomic::Ordering::SeqCst);
            }
            anyhow::Ok(n)
        })
    };
    wait_until("writes before the signal", Duration::from_secs(60), || {
        let written = written.clone();
        async move { written.load(std::sync::atomic::Ordering::SeqCst) >= 20 }
    })
    .await?;
    db.collection::<Document>("signals")
        .insert_one(doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["shop.items"], "type": "blocking" } })
        .await?;
    // Writes numbered above this one began after the signal was committed. (The write
    // numbered `after_signal` itself may have been in flight, and committed, before it.)
    let after_signal = written.load(std::sync::atomic::Ordering::SeqCst);
    wait_for_count(&child, "snapshot done; streaming from where it began", 1).await?;
    wait_until("writes after the snapshot", Duration::from_secs(60), || {
        let written = written.clone();
        async move { written.load(std::sync::atomic::Ordering::SeqCst) >= after_signal + 20 }
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let total = writer.await??;
    // The stream keeps order: once the last write is published, everything before it is.
    let h = &h;
    wait_until(
        "the last write published",
        Duration::from_secs(120),
        || async move {
            h.messages(STREAM).await.is_ok_and(|all| {
                all.iter().rev().any(|m| {
                    let event = json(m);
                    event["operationType"] == "insert"
                        && event["fullDocument"]["n"].as_i64() == Some(total - 1)
                })
            })
        },
    )
    .await?;
    let messages = h.wait_settled(STREAM, 1, Duration::from_secs(10)).await?;

    let mut last_read = None;
    let mut inserts: Vec<(usize, i64)> = Vec::new();
    let mut read_ids = std::collections::BTreeMap::<i64, usize>::new();
    for (at, m) in messages.iter().enumerate() {
        let event = json(m);
        match event["operationType"].as_str() {
            Some("read") => {
                last_read = Some(at);
                *read_ids
                    .entry(event["documentKey"]["_id"].as_i64().unwrap_or(-1))
                    .or_default() += 1;
            }
            Some("insert") => inserts.push((at, event["fullDocument"]["n"].as_i64().unwrap_or(-1))),
            other => panic!("unexpected event {other:?}: {event}"),
        }
    }
    let last_read = last_read.expect("the snapshot published reads");
    let numbers: Vec<i64> = inserts.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        numbers,
        (0..total).collect::<Vec<_>>(),
        "every write once, in order"
    );
    for (at, n) in &inserts {
        if *n > after_signal {
            assert!(
                *at > last_read,
                "write {n} (after the signal) published mid-snapshot"
            );
        }
    }
    assert!(
        (0..5000).all(|id| read_ids.get(&id) == Some(&1)),
        "each document read once"
    );
    assert!(read_ids.values().all(|n| *n == 1), "no document read twice");
    let log = child.log();
    assert!(
        log.contains("blocking snapshot started by a signal: [shop.items]"),
        "{log}"
    );
    Ok(())
}

/// Streamkap's setup: the signal collection in a database of its own, the pipeline scoped to
/// one collection of another. Signals work; the signal documents and the database's other
/// collections are never published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_collection_in_another_database() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let client = h.mongo.client().await?;
    let orders = client.database(DB).collection::<Document>("orders");
    let existing: Vec<Document> = (0..20).map(|n| doc! { "_id": n }).collect();
    orders.insert_many(existing).await?;
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        "full_document = \"updateLookup\"\nsignal_collection = \"streamkap.streamkap_signal\"",
    );
    let path = h.write_config("streamkap.toml", &config)?;
    let child = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    client
        .database("streamkap")
        .collection::<Document>("streamkap_signal")
        .insert_one(doc! { "type": "execute-snapshot", "data": {
        "data-collections": ["shop.orders"], "type": "incremental" } })
        .await?;
    wait_for_count(&child, "incremental snapshot done", 1).await?;
    client
        .database(DB)
        .collection::<Document>("other")
        .insert_one(doc! { "_id": "not in scope" })
        .await?;
    orders.insert_one(doc! { "_id": 20 }).await?;
    let messages = h.wait_settled(STREAM, 21, Duration::from_secs(60)).await?;
    let seen: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            let event = json(m);
            (
                event["ns"]["coll"].as_str().unwrap_or_default().to_string(),
                event["operationType"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 21, "{seen:?}");
    assert!(
        seen[..20]
            .iter()
            .all(|(c, op)| c == "orders" && op == "read"),
        "{seen:?}"
    );
    assert_eq!(seen[20], ("orders".to_string(), "insert".to_string()));
    Ok(())
}
