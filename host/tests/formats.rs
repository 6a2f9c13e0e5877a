//! Payload formats, routing headers, `{key}` subjects and stream settings, end to end against
//! real servers: each format for a snapshot read, insert, update, replace and delete, read
//! the way its consumers read it (a Debezium consumer parses `after` from its string); the
//! routing headers on every message, and refused when a plugin sets one; "latest value per
//! document" with `{key}` and `max_msgs_per_subject = 1`, keys that look alike included.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bson::{doc, Document};
use serde_json::{json, Value};
use support::{header, InProcess, DB};
use tidegate_testkit::wait_until;

/// One pipeline of a shared config: collection, stream and prefix all named `name`.
struct Lane {
    name: &'static str,
    sink: &'static str,
    plugins: &'static str,
}

impl Lane {
    fn toml(&self, mongo: &str) -> String {
        format!(
            r#"
[[pipeline]]
id = "{name}"
mongodb_uri = "{mongo}"
database = "{DB}"
collections = ["{name}"]
full_document = "when-available"
full_document_before_change = "when-available"
snapshot = "initial"

[pipeline.sink]
stream = "{stream}"
subject_prefix = "{name}"
{sink}

[pipeline.checkpoint]
interval_ms = 200

{plugins}
"#,
            name = self.name,
            stream = self.name.to_uppercase(),
            sink = self.sink,
            plugins = self.plugins,
        )
    }
}

/// `Tidegate-Cluster-Time` as (seconds, increment).
fn cluster_time(message: &StreamMessage) -> (i64, i64) {
    let text = header(message, "Tidegate-Cluster-Time").expect("cluster time header");
    let (t, i) = text.split_once('.').expect("seconds.increment");
    (t.parse().unwrap(), i.parse().unwrap())
}

fn body(message: &StreamMessage) -> Value {
    serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
        panic!(
            "payload of {} is not JSON ({e}): {:?}",
            message.subject,
            String::from_utf8_lossy(&message.payload)
        )
    })
}

/// A JSON string field holding JSON, parsed (what a Debezium consumer does with `after`).
fn parsed(value: &Value) -> Value {
    serde_json::from_str(
        value
            .as_str()
            .unwrap_or_else(|| panic!("not a string: {value}")),
    )
    .unwrap()
}

/// The three formats, each on its own pipeline and collection (with pre- and post-images):
/// a document there before the start is snapshot-read, then one document is inserted,
/// updated (`$set` and `$unset`), replaced and deleted. Every message carries the routing
/// headers; the change-event lane runs `faulty`, and its output that sets `Tidegate-Key`
/// itself is dead-lettered like any other reserved header; the full-document lane runs
/// `redact`, whose output is what gets published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_format_end_to_end() -> anyhow::Result<()> {
    let h = support::Harness::start().await?;
    let lanes = [
        Lane {
            name: "ce",
            sink: "",
            plugins: "[[pipeline.plugins]]\nname = \"faulty\"\n",
        },
        Lane {
            name: "dbz",
            sink: "format = \"debezium\"",
            plugins: "",
        },
        Lane {
            name: "fd",
            sink: "format = \"full-document\"",
            plugins: "[[pipeline.plugins]]\nname = \"redact\"\nconfig = { fields = \"email\" }\n",
        },
    ];
    let client = h.mongo.client().await?;
    let db = client.database(DB);
    let mut text = format!(
        "plugin_dir = \"{}\"\n\n[nats]\nurl = \"{}\"\nack_timeout_ms = 2000\n",
        h.plugins.display(),
        h.nats.url()
    );
    for lane in &lanes {
        db.run_command(
            doc! { "create": lane.name, "changeStreamPreAndPostImages": { "enabled": true } },
        )
        .await?;
        db.collection::<Document>(lane.name)
            .insert_one(doc! { "_id": 0, "name": "zero", "email": "z@example.com" })
            .await?;
        text.push_str(&lane.toml(&h.mongo.uri()));
    }
    let started_ms = bson::DateTime::now().timestamp_millis();
    let running = InProcess::start(&h.write_config("formats.toml", &text)?)?;
    h.wait_checkpoints(&["ce", "dbz", "fd"]).await?;
    // The first checkpoint is the start position, saved before the snapshot reads: writing
    // before the snapshot has read `_id: 0` (and so closed its one-batch cursor) would let it
    // read `_id: 1` as well, an overlap every snapshot may have but this test does not count.
    for lane in &lanes {
        h.wait_for_messages(&lane.name.to_uppercase(), 1, Duration::from_secs(180))
            .await?;
    }
    for lane in &lanes {
        let coll = db.collection::<Document>(lane.name);
        coll.insert_one(doc! { "_id": 1, "name": "a", "email": "a@example.com", "n": 1 })
            .await?;
        coll.update_one(
            doc! { "_id": 1 },
            doc! { "$set": { "name": "b" }, "$unset": { "n": "" } },
        )
        .await?;
        coll.replace_one(
            doc! { "_id": 1 },
            doc! { "name": "c", "email": "c@example.com" },
        )
        .await?;
        coll.delete_one(doc! { "_id": 1 }).await?;
    }
    db.collection::<Document>("ce")
        .insert_one(doc! { "_id": 2, "reserved_header": "Tidegate-Key" })
        .await?;
    let mut all = Vec::new();
    for (lane, expected) in lanes.iter().zip([6, 5, 5]) {
        let stream = lane.name.to_uppercase();
        all.push(
            h.wait_settled(&stream, expected, Duration::from_secs(180))
                .await?,
        );
        assert_eq!(
            all.last().map(Vec::len),
            Some(expected as usize),
            "{}",
            lane.name
        );
    }
    running.stop().await?;
    let read_before_ms = bson::DateTime::now().timestamp_millis();

    // Routing headers, the same on every lane.
    for (lane, messages) in lanes.iter().zip(&all) {
        let ops: Vec<String> = messages
            .iter()
            .map(|m| header(m, "Tidegate-Operation").unwrap_or_default())
            .collect();
        let mut want = vec!["read", "insert", "update", "replace", "delete"];
        if lane.name == "ce" {
            want.push("insert");
        }
        assert_eq!(ops, want, "{}", lane.name);
        let keys: Vec<Option<String>> =
            messages.iter().map(|m| header(m, "Tidegate-Key")).collect();
        assert_eq!(
            keys[..5],
            [
                Some("0".into()),
                Some("1".into()),
                Some("1".into()),
                Some("1".into()),
                Some("1".into())
            ]
        );
        for message in messages {
            assert_eq!(
                header(message, "Tidegate-Namespace").as_deref(),
                Some(format!("shop.{}", lane.name).as_str())
            );
        }
        assert_eq!(
            header(&messages[0], "Tidegate-Cluster-Time"),
            None,
            "a read has none"
        );
        for message in &messages[1..5] {
            assert!(cluster_time(message).0 * 1000 >= started_ms - 1000);
        }
    }

    // change-event: the server's event, `id`, and `tsMs` from wallTime (a read: its read time).
    let ce = &all[0];
    for message in &ce[..5] {
        assert_eq!(
            header(message, "Content-Type").as_deref(),
            Some("application/json; ejson=relaxed")
        );
    }
    let read = body(&ce[0]);
    assert_eq!(read["operationType"], "read");
    assert_eq!(
        read["fullDocument"],
        json!({ "_id": 0, "name": "zero", "email": "z@example.com" })
    );
    let read_ms = read["tsMs"].as_i64().expect("tsMs on a read");
    assert!((started_ms..=read_before_ms).contains(&read_ms), "{read}");
    for message in &ce[1..5] {
        let event = body(message);
        let wall = event["wallTime"]["$date"].as_str().expect("wallTime");
        let wall = bson::DateTime::parse_rfc3339_str(wall)?.timestamp_millis();
        assert_eq!(event["tsMs"], wall, "{event}");
        let (t, i) = cluster_time(message);
        assert_eq!(
            event["clusterTime"]["$timestamp"],
            json!({ "t": t, "i": i })
        );
        assert!(
            event["id"].is_string() && event.get("_id").is_none(),
            "{event}"
        );
    }
    assert_eq!(
        body(&ce[2])["updateDescription"]["removedFields"],
        json!(["n"])
    );
    let dead = &ce[5];
    assert_eq!(dead.subject.as_str(), "ce.dead-letter");
    assert_eq!(
        header(dead, "Tidegate-Error-Kind").as_deref(),
        Some("invalid-output")
    );
    let error = header(dead, "Tidegate-Error").unwrap_or_default();
    assert!(
        error.contains("header 'Tidegate-Key' is reserved"),
        "{error}"
    );
    assert_eq!(header(dead, "Tidegate-Key").as_deref(), Some("2"));

    // debezium: parsed the way a Debezium consumer parses it.
    let dbz = &all[1];
    for message in dbz {
        assert_eq!(
            header(message, "Content-Type").as_deref(),
            Some("application/json; ejson=relaxed; format=debezium")
        );
    }
    let envelopes: Vec<Value> = dbz.iter().map(body).collect();
    let ops: Vec<&str> = envelopes
        .iter()
        .map(|e| e["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["r", "c", "u", "u", "d"]);
    let read = &envelopes[0];
    assert_eq!(
        parsed(&read["after"]),
        json!({ "_id": 0, "name": "zero", "email": "z@example.com" })
    );
    assert_eq!(read["source"]["snapshot"], "true");
    assert!((started_ms..=read_before_ms).contains(&read["source"]["ts_ms"].as_i64().unwrap()));
    for (envelope, message) in envelopes.iter().zip(dbz).skip(1) {
        let source = &envelope["source"];
        let (t, i) = cluster_time(message);
        assert_eq!(source["ts_ms"], t * 1000, "{envelope}");
        assert_eq!(source["ord"], i);
        assert_eq!(source["snapshot"], "false");
        assert_eq!(source["connector"], "mongodb");
        assert_eq!(source["name"], "dbz");
        assert_eq!(
            (source["db"].as_str(), source["collection"].as_str()),
            (Some("shop"), Some("dbz"))
        );
        assert!(source["wallTime"].as_i64().unwrap() >= t * 1000);
        assert!(envelope["ts_ms"].as_i64().unwrap() >= t * 1000);
    }
    let inserted = json!({ "_id": 1, "name": "a", "email": "a@example.com", "n": 1 });
    let updated = json!({ "_id": 1, "name": "b", "email": "a@example.com" });
    let replaced = json!({ "_id": 1, "name": "c", "email": "c@example.com" });
    assert_eq!(parsed(&envelopes[1]["after"]), inserted);
    assert!(envelopes[1]["before"].is_null() && envelopes[1]["updateDescription"].is_null());
    let update = &envelopes[2];
    assert_eq!(parsed(&update["before"]), inserted);
    assert_eq!(parsed(&update["after"]), updated);
    assert_eq!(
        parsed(&update["updateDescription"]["updatedFields"]),
        json!({ "name": "b" })
    );
    assert_eq!(update["updateDescription"]["removedFields"], json!(["n"]));
    assert!(update["updateDescription"]["truncatedArrays"].is_null());
    assert_eq!(parsed(&envelopes[3]["after"]), replaced);
    assert_eq!(parsed(&envelopes[3]["before"]), updated);
    assert!(envelopes[3]["updateDescription"].is_null());
    assert_eq!(parsed(&envelopes[4]["before"]), replaced);
    assert!(envelopes[4]["after"].is_null());

    // full-document: the (redacted) document alone; the delete empty.
    let fd = &all[2];
    for message in fd {
        assert_eq!(
            header(message, "Content-Type").as_deref(),
            Some("application/json; ejson=relaxed; format=full-document")
        );
    }
    let docs: Vec<Value> = fd[..4].iter().map(body).collect();
    assert_eq!(
        docs,
        [
            json!({ "_id": 0, "name": "zero", "email": "[redacted]" }),
            json!({ "_id": 1, "name": "a", "email": "[redacted]", "n": 1 }),
            json!({ "_id": 1, "name": "b", "email": "[redacted]" }),
            json!({ "_id": 1, "name": "c", "email": "[redacted]" }),
        ]
    );
    assert!(fd[4].payload.is_empty(), "{:?}", fd[4].payload);
    print_samples(&lanes, &all);
    Ok(())
}

/// Prints one message per format (subject, headers, payload) for `docs/formats.md`.
fn print_samples(lanes: &[Lane], all: &[Vec<StreamMessage>]) {
    for (lane, messages) in lanes.iter().zip(all) {
        let message = &messages[2];
        println!("--- {} ---\nsubject: {}", lane.name, message.subject);
        for (name, values) in message.headers.iter() {
            for value in values {
                println!("{name}: {}", value.as_str());
            }
        }
        println!("{}", String::from_utf8_lossy(&message.payload));
    }
}

/// `{key}` in the subject and `max_msgs_per_subject = 1` keep exactly the latest event of each
/// document, for keys that would collide under a naive escape (`"1"` and `1`, `"a.b"` and
/// `"a_b"`), an ObjectId, a double and a compound `_id`; a key too long for a subject is
/// dead-lettered (and the stream goes on); the created stream has the configured settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_subjects_keep_the_latest_per_document() -> anyhow::Result<()> {
    let h = support::Harness::start().await?;
    let sink = "subject_template = \"{prefix}.{coll}.{key}\"\nmax_msgs_per_subject = 1\n\
                storage = \"memory\"\nreplicas = 1\nmax_age_secs = 3600\nmax_bytes = 50000000";
    let path = h.write_config("keys.toml", &h.config("", sink))?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    let oid = bson::oid::ObjectId::parse_str("5f0c9a0e8e1b2c3d4e5f6a7b")?;
    let ids: Vec<(bson::Bson, &str, &str)> = vec![
        ("1".into(), "s:1", r#""1""#),
        (1.into(), "i:1", "1"),
        ("a.b".into(), "s:a%2Eb", r#""a.b""#),
        ("a_b".into(), "s:a_b", r#""a_b""#),
        (1.5.into(), "d:1%2E5", "1.5"),
        (
            oid.into(),
            "o:5f0c9a0e8e1b2c3d4e5f6a7b",
            r#"{"$oid":"5f0c9a0e8e1b2c3d4e5f6a7b"}"#,
        ),
        (
            doc! { "a": 1, "b": "x" }.into(),
            "x:%7B%22a%22%3A%7B%22%24numberInt%22%3A%221%22%7D%2C%22b%22%3A%22x%22%7D",
            r#"{"a":1,"b":"x"}"#,
        ),
    ];
    let coll = h.collection().await?;
    for (id, _, _) in &ids {
        coll.insert_one(doc! { "_id": id.clone(), "v": 1 }).await?;
    }
    for v in [2, 3] {
        for (id, _, _) in &ids {
            coll.update_one(doc! { "_id": id.clone() }, doc! { "$set": { "v": v } })
                .await?;
        }
    }
    let long_id = "k".repeat(2100);
    coll.insert_one(doc! { "_id": &long_id, "v": 1 }).await?;
    coll.insert_one(doc! { "_id": "last", "v": 1 }).await?;
    let events = ids.len() as u64 * 3 + 2;
    let js = async_nats::jetstream::new(h.nats_client().await?);
    wait_until("every event stored", Duration::from_secs(180), || {
        let js = js.clone();
        async move {
            match js.get_stream(support::STREAM).await {
                Ok(mut stream) => stream
                    .info()
                    .await
                    .is_ok_and(|info| info.state.last_sequence >= events),
                Err(_) => false,
            }
        }
    })
    .await?;
    running.stop().await?;

    let mut stream = js.get_stream(support::STREAM).await?;
    let info = stream.info().await?.clone();
    assert_eq!(info.state.last_sequence, events, "one message per event");
    let config = &info.config;
    assert_eq!(config.max_messages_per_subject, 1);
    assert_eq!(
        config.storage,
        async_nats::jetstream::stream::StorageType::Memory
    );
    assert_eq!(config.max_age, Duration::from_secs(3600));
    assert_eq!(config.max_bytes, 50_000_000);
    assert_eq!(config.num_replicas, 1);

    let messages = h.messages(support::STREAM).await?;
    // One per document, the dead letter, and the last insert.
    assert_eq!(
        messages.len(),
        ids.len() + 2,
        "{:?}",
        messages.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    for (_, token, key) in &ids {
        let subject = format!("cdc.orders.{token}");
        let kept: Vec<&StreamMessage> = messages
            .iter()
            .filter(|m| m.subject.as_str() == subject)
            .collect();
        assert_eq!(kept.len(), 1, "{subject}");
        let event = body(kept[0]);
        assert_eq!(event["operationType"], "update", "{subject}: {event}");
        assert_eq!(event["fullDocument"]["v"], 3, "{subject}: {event}");
        assert_eq!(header(kept[0], "Tidegate-Key").as_deref(), Some(*key));
    }
    let dead = messages
        .iter()
        .find(|m| m.subject.as_str() == "cdc.dead-letter")
        .expect("the long key's dead letter");
    support::assert_dead_letter(dead, "too-large");
    let error = header(dead, "Tidegate-Error").unwrap_or_default();
    assert!(
        error.contains("subject is") && error.contains("at most 2048"),
        "{error}"
    );
    assert_eq!(
        header(dead, "Tidegate-Key"),
        None,
        "a 2 KiB key stays out of the headers"
    );
    assert_eq!(body(dead)["documentKey"]["_id"], long_id.as_str());
    let last = messages.last().expect("messages");
    assert_eq!(last.subject.as_str(), "cdc.orders.s:last");
    Ok(())
}
