//! The happy paths, end to end against a real MongoDB replica set and a real JetStream:
//! events go through filter and transform plugins and land with the right subjects, ids,
//! headers and payloads.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bson::doc;
use support::{assert_dead_letter, header, json, Harness, InProcess, COLL, DB, STREAM};

/// Insert, update, replace and delete flow through a filter and a transform: subjects follow
/// the template, ids are `<pipeline>:<event id>:<output>`, the transform's header is present,
/// the redacted field is redacted, and relaxed EJSON keeps the change-stream shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_events_flow_through_filter_and_transform() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "op-filter"
config = { operations = "insert,update,replace,delete" }

[[pipeline.plugins]]
name = "redact"
config = { fields = "email" }
"#;
    let harness = &h;
    let messages = h
        .relay(plugins, "", 4, |coll| async move {
            coll.insert_one(doc! { "_id": 1, "email": "a@example.com", "total": 10_i64 })
                .await?;
            coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "total": 11_i64 } })
                .await?;
            // The update's fullDocument is looked up when the stream reads it: wait until it
            // is published, or the lookup may find the replacement or nothing at all.
            harness
                .wait_for_messages(STREAM, 2, Duration::from_secs(120))
                .await?;
            coll.replace_one(
                doc! { "_id": 1 },
                doc! { "email": "b@example.com", "total": 12_i64 },
            )
            .await?;
            coll.delete_one(doc! { "_id": 1 }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 4, "exactly four events");
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "cdc.shop.orders.insert",
            "cdc.shop.orders.update",
            "cdc.shop.orders.replace",
            "cdc.shop.orders.delete"
        ]
    );
    for m in &messages {
        let body = json(m);
        let id = body["id"].as_str().expect("id in payload");
        assert_eq!(header(m, "Nats-Msg-Id"), Some(format!("orders:{id}:0")));
        assert_eq!(header(m, "Tidegate-Pipeline").as_deref(), Some("orders"));
        assert!(
            header(m, "X-Redacted").is_some(),
            "redact plugin header on {}",
            m.subject
        );
        assert_eq!(body["ns"]["db"], "shop");
        assert_eq!(body["documentKey"]["_id"], 1);
    }
    let insert = json(&messages[0]);
    assert_eq!(insert["operationType"], "insert");
    assert_eq!(insert["fullDocument"]["email"], "[redacted]");
    assert_eq!(insert["fullDocument"]["total"], 10);
    let update = json(&messages[1]);
    assert_eq!(update["updateDescription"]["updatedFields"]["total"], 11);
    assert_eq!(
        update["fullDocument"]["email"], "[redacted]",
        "update-lookup document redacted too"
    );
    let replace = json(&messages[2]);
    assert_eq!(replace["fullDocument"]["total"], 12);
    assert!(
        json(&messages[3]).get("fullDocument").is_none(),
        "deletes carry no document"
    );
    Ok(())
}

/// A filter drops what it is told to: only inserts survive `operations = "insert"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_drops_events() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "op-filter"
config = { operations = "insert" }
"#;
    let messages = h
        .relay(plugins, "", 6, |coll| async move {
            for i in 0..5 {
                coll.insert_one(doc! { "_id": i }).await?;
                coll.update_one(doc! { "_id": i }, doc! { "$set": { "x": 1 } })
                    .await?;
                coll.delete_one(doc! { "_id": i }).await?;
            }
            coll.insert_one(doc! { "_id": "last" }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 6);
    assert!(messages
        .iter()
        .all(|m| m.subject.as_str() == "cdc.shop.orders.insert"));
    assert_eq!(json(&messages[5])["documentKey"]["_id"], "last");
    Ok(())
}

/// A transform that fans out publishes every output, in order, each with its own id
/// (`…:0`, `…:1`, `…:2`), its own subject and header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_fans_out() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "fanout"
config = { copies = "3", subject-prefix = "cdc.copies" }
"#;
    let messages = h
        .relay(plugins, "", 3, |coll| async move {
            coll.insert_one(doc! { "_id": 7 }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 3);
    let id = json(&messages[0])["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m.subject.as_str(), format!("cdc.copies.copy{i}"));
        assert_eq!(header(m, "X-Copy"), Some(i.to_string()));
        assert_eq!(header(m, "Nats-Msg-Id"), Some(format!("orders:{id}:{i}")));
        assert_eq!(json(m)["documentKey"]["_id"], 7);
    }
    Ok(())
}

/// A plugin error and a plugin trap each send the original event to the dead-letter subject
/// with the plugin and reason in headers; the events after them still flow, and a trapped
/// plugin gets a fresh instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_failures_are_dead_lettered_and_the_pipeline_continues() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "faulty"
"#;
    let messages = h
        .relay(plugins, "", 5, |coll| async move {
            coll.insert_one(doc! { "_id": 1 }).await?;
            coll.insert_one(doc! { "_id": 2, "fail": true }).await?;
            coll.insert_one(doc! { "_id": 3 }).await?;
            coll.insert_one(doc! { "_id": 4, "trap": true }).await?;
            coll.insert_one(doc! { "_id": 5 }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 5);
    let keys: Vec<i64> = messages
        .iter()
        .map(|m| json(m)["documentKey"]["_id"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(keys, [1, 2, 3, 4, 5], "order kept, dead letters in place");
    let failed = &messages[1];
    assert_dead_letter(failed, "plugin-error");
    assert_eq!(header(failed, "Tidegate-Plugin").as_deref(), Some("faulty"));
    assert!(header(failed, "Tidegate-Error")
        .unwrap_or_default()
        .contains("asked to fail"));
    assert_eq!(
        json(failed)["fullDocument"]["fail"],
        true,
        "original event is the payload"
    );
    assert_dead_letter(&messages[3], "trap");
    for i in [0, 2, 4] {
        assert_eq!(messages[i].subject.as_str(), "cdc.shop.orders.insert");
    }
    Ok(())
}

/// With no plugins and `encoding = "canonical-json"`, BSON types survive exactly (int64 vs
/// int32, dates), and `bson` encoding yields a BSON document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encodings_preserve_types() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let path = h.write_config(
        "tidegate.toml",
        &h.config("", "encoding = \"canonical-json\""),
    )?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    h.collection()
        .await?
        .insert_one(
            doc! { "_id": 1, "small": 5_i64, "when": bson::DateTime::from_millis(86_400_000) },
        )
        .await?;
    let messages = h
        .wait_for_messages(STREAM, 1, Duration::from_secs(120))
        .await?;
    running.stop().await?;
    let body = json(&messages[0]);
    assert_eq!(body["fullDocument"]["small"]["$numberLong"], "5");
    assert_eq!(
        body["fullDocument"]["when"]["$date"]["$numberLong"],
        "86400000"
    );
    assert_eq!(
        header(&messages[0], "Content-Type").as_deref(),
        Some("application/json; ejson=canonical")
    );
    Ok(())
}

/// Changes made in a multi-document transaction carry the session id and transaction number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_details_are_published() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    let client = h.mongo.client().await?;
    let coll = client.database(DB).collection::<bson::Document>(COLL);
    coll.insert_one(doc! { "_id": 0 }).await?; // creates the collection outside the transaction
    let mut session = client.start_session().await?;
    session.start_transaction().await?;
    coll.insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await?;
    coll.insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await?;
    session.commit_transaction().await?;
    let messages = h.wait_settled(STREAM, 3, Duration::from_secs(120)).await?;
    running.stop().await?;
    assert_eq!(messages.len(), 3);
    assert!(json(&messages[0]).get("txnNumber").is_none());
    for m in &messages[1..] {
        let body = json(m);
        assert!(body["txnNumber"].as_i64().is_some(), "{body}");
        assert!(body["lsid"]["id"].is_object(), "{body}");
    }
    Ok(())
}

/// Dropping the watched collection publishes the drop and the invalidate, and capture goes on
/// (`startAfter`) when the collection is re-created: nothing stops silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_continues_after_the_collection_is_dropped() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let running = InProcess::start(&path)?;
    h.wait_ready().await?;
    let coll = h.collection().await?;
    coll.insert_one(doc! { "_id": "before" }).await?;
    coll.drop().await?;
    h.wait_for_messages(STREAM, 3, Duration::from_secs(120))
        .await?;
    coll.insert_one(doc! { "_id": "after" }).await?;
    let messages = h.wait_settled(STREAM, 4, Duration::from_secs(120)).await?;
    running.stop().await?;
    let ops: Vec<String> = messages
        .iter()
        .map(|m| json(m)["operationType"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(ops, ["insert", "drop", "invalidate", "insert"]);
    assert_eq!(messages[2].subject.as_str(), "cdc.shop.orders.invalidate");
    assert_eq!(json(&messages[3])["documentKey"]["_id"], "after");
    Ok(())
}

/// Three pipelines in one process, one per scope: a list of collections, a whole database and
/// the whole deployment. Each sees exactly its scope, on its own stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_scopes_collection_list_database_and_deployment() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let pipeline = |id: &str, stream: &str, prefix: &str, scope: &str| {
        format!(
            "[[pipeline]]\nid = \"{id}\"\nmongodb_uri = \"{}\"\n{scope}\n\
             [pipeline.sink]\nstream = \"{stream}\"\nsubject_prefix = \"{prefix}\"\n\
             [pipeline.checkpoint]\ninterval_ms = 200\n",
            h.mongo.uri()
        )
    };
    let config = format!(
        "[nats]\nurl = \"{}\"\n{}{}{}",
        h.nats.url(),
        pipeline(
            "list",
            "LIST",
            "list",
            "database = \"shop\"\ncollections = [\"a\", \"b\"]"
        ),
        pipeline("db", "DB", "db", "database = \"shop\""),
        pipeline("all", "ALL", "all", ""),
    );
    let path = h.write_config("tidegate.toml", &config)?;
    let running = InProcess::start(&path)?;
    let js = async_nats::jetstream::new(h.nats_client().await?);
    tidegate_testkit::wait_until("three checkpoints", Duration::from_secs(120), || {
        let js = js.clone();
        async move {
            let Ok(kv) = js.get_key_value("tidegate-checkpoints").await else {
                return false;
            };
            for key in ["list", "db", "all"] {
                if !matches!(kv.get(key).await, Ok(Some(_))) {
                    return false;
                }
            }
            true
        }
    })
    .await?;
    let client = h.mongo.client().await?;
    for (db, coll) in [("shop", "a"), ("shop", "b"), ("shop", "c"), ("other", "a")] {
        client
            .database(db)
            .collection::<bson::Document>(coll)
            .insert_one(doc! { "from": format!("{db}.{coll}") })
            .await?;
    }
    let all = h.wait_settled("ALL", 4, Duration::from_secs(120)).await?;
    let db = h.wait_settled("DB", 3, Duration::from_secs(120)).await?;
    let list = h.wait_settled("LIST", 2, Duration::from_secs(120)).await?;
    running.stop().await?;
    let subjects = |ms: &[async_nats::jetstream::message::StreamMessage]| -> Vec<String> {
        ms.iter().map(|m| m.subject.to_string()).collect()
    };
    assert_eq!(
        subjects(&list),
        ["list.shop.a.insert", "list.shop.b.insert"]
    );
    assert_eq!(
        subjects(&db),
        ["db.shop.a.insert", "db.shop.b.insert", "db.shop.c.insert"]
    );
    assert_eq!(
        subjects(&all),
        [
            "all.shop.a.insert",
            "all.shop.b.insert",
            "all.shop.c.insert",
            "all.other.a.insert"
        ]
    );
    Ok(())
}

/// An event larger than the NATS server's `max_payload` (1 MiB by default) cannot block the
/// stream: it is dead-lettered as `too-large` with its documents left out (its key still
/// identifies it), and the next event flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_is_dead_lettered_without_blocking() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let messages = h
        .relay("", "", 2, |coll| async move {
            coll.insert_one(doc! { "_id": "big", "blob": "x".repeat(1_500_000) })
                .await?;
            coll.insert_one(doc! { "_id": "small" }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 2);
    let big = &messages[0];
    assert_dead_letter(big, "too-large");
    assert_eq!(json(big)["documentKey"]["_id"], "big");
    assert!(json(big).get("fullDocument").is_none());
    assert_eq!(messages[1].subject.as_str(), "cdc.shop.orders.insert");
    Ok(())
}

/// A transform that names a subject outside the pipeline's prefix is not silently rewritten
/// or published elsewhere: the event is dead-lettered as `invalid-output`, naming the subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_subject_outside_the_prefix_is_dead_lettered() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "fanout"
config = { copies = "1", subject-prefix = "elsewhere" }
"#;
    let messages = h
        .relay(plugins, "", 1, |coll| async move {
            coll.insert_one(doc! { "_id": 1 }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 1);
    assert_dead_letter(&messages[0], "invalid-output");
    let error = header(&messages[0], "Tidegate-Error").unwrap_or_default();
    assert!(error.contains("elsewhere.copy0"), "{error}");
    Ok(())
}

/// A plugin stuck in a loop is stopped by its fuel budget (deterministic) or, with fuel to
/// spare, by its wall-clock deadline; either way the event is dead-lettered with that reason,
/// the stuck instance is replaced, and the next event flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_plugin_is_stopped_by_fuel_or_deadline() -> anyhow::Result<()> {
    for (limits, kind) in [
        ("{ fuel_per_call = 2000000 }", "out-of-fuel"),
        (
            "{ fuel_per_call = 1000000000000, timeout_ms = 200 }",
            "deadline",
        ),
    ] {
        let h = Harness::start().await?;
        let plugins = format!("[[pipeline.plugins]]\nname = \"faulty\"\nlimits = {limits}\n");
        let messages = h
            .relay(&plugins, "", 2, |coll| async move {
                coll.insert_one(doc! { "_id": 1, "spin": true }).await?;
                coll.insert_one(doc! { "_id": 2 }).await?;
                Ok(())
            })
            .await?;
        assert_eq!(messages.len(), 2);
        assert_dead_letter(&messages[0], kind);
        assert_eq!(messages[1].subject.as_str(), "cdc.shop.orders.insert");
    }
    Ok(())
}

/// A plugin that allocates without limit hits its instance's memory cap: the call traps with
/// reason `memory`, the event is dead-lettered, and a fresh instance serves the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_stopped_by_the_memory_cap() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = "[[pipeline.plugins]]\nname = \"faulty\"\nlimits = { memory_mib = 16 }\n";
    let messages = h
        .relay(plugins, "", 2, |coll| async move {
            coll.insert_one(doc! { "_id": 1, "bomb": true }).await?;
            coll.insert_one(doc! { "_id": 2 }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 2);
    assert_dead_letter(&messages[0], "memory");
    assert_eq!(messages[1].subject.as_str(), "cdc.shop.orders.insert");
    Ok(())
}

/// A deployment-wide pipeline that checkpoints into MongoDB does not watch its own
/// checkpoint writes (which would otherwise be published, checkpointed and published again,
/// forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_scope_ignores_its_own_mongodb_checkpoints() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = format!(
        "[nats]\nurl = \"{}\"\n[[pipeline]]\nid = \"all\"\nmongodb_uri = \"{}\"\n\
         [pipeline.sink]\nstream = \"ALL\"\nsubject_prefix = \"all\"\n\
         [pipeline.checkpoint]\nstore = \"mongodb\"\ninterval_ms = 100\n",
        h.nats.url(),
        h.mongo.uri()
    );
    let path = h.write_config("tidegate.toml", &config)?;
    let mut tidegate = h.spawn_binary(&path)?;
    tidegate
        .wait_for_log("change stream open", Duration::from_secs(120))
        .await?;
    let coll = h.collection().await?;
    for i in 0..3 {
        coll.insert_one(doc! { "_id": i }).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    h.wait_for_messages("ALL", 3, Duration::from_secs(120))
        .await?;
    // Several checkpoint intervals pass: a feedback loop would keep adding messages.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = h.messages("ALL").await?;
    tidegate.signal(support::SIGTERM)?;
    tidegate.wait_exit(Duration::from_secs(120)).await?;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "all.shop.orders.insert",
            "all.shop.orders.insert",
            "all.shop.orders.insert"
        ]
    );
    let saved = h
        .mongo
        .client()
        .await?
        .database("tidegate")
        .collection::<bson::Document>("checkpoints")
        .count_documents(doc! {})
        .await?;
    assert_eq!(saved, 1, "the checkpoint itself was written");
    Ok(())
}
