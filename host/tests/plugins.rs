//! The first-party plugins (`match`, `map`, `redact`, `encode`) through the host, end to end
//! against a real MongoDB replica set and a real JetStream: configured as an operator would in
//! TOML, built from source by `scripts/build-plugins.sh`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bson::doc;
use support::{assert_dead_letter, header, json, Harness};

/// `match` keeps exactly the events its query selects: operation set, a comparison, `$in`,
/// a `$regex`, and an `$or` that lets deletes through although they carry no document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_keeps_what_the_query_selects() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "match"
[pipeline.plugins.config]
operations = "insert,delete"
where = '''{"$or": [
  {"operationType": "delete"},
  {"fullDocument.total": {"$gte": 100}, "fullDocument.status": {"$in": ["paid", "sent"]}},
  {"fullDocument.email": {"$regex": "@VIP\\.example$", "$options": "i"}}
]}'''
"#;
    let messages = h
        .relay(plugins, "", 4, |coll| async move {
            coll.insert_one(doc! { "_id": 1, "total": 150, "status": "paid" })
                .await?; // kept
            coll.insert_one(doc! { "_id": 2, "total": 99, "status": "paid" })
                .await?;
            coll.insert_one(doc! { "_id": 3, "total": 500, "status": "open" })
                .await?;
            coll.insert_one(doc! { "_id": 4, "email": "a@vip.example" })
                .await?; // kept
            coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "total": 1000 } })
                .await?;
            coll.delete_one(doc! { "_id": 2 }).await?; // kept
            coll.insert_one(doc! { "_id": 5, "total": 100.5, "status": "sent" })
                .await?; // kept
            Ok(())
        })
        .await?;
    let got: Vec<(String, i64)> = messages
        .iter()
        .map(|m| {
            let body = json(m);
            (
                body["operationType"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                body["documentKey"]["_id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let want = [("insert", 1), ("insert", 4), ("delete", 2), ("insert", 5)];
    let want: Vec<(String, i64)> = want.iter().map(|(o, i)| (o.to_string(), *i)).collect();
    assert_eq!(got, want);
    Ok(())
}

/// `map` projects a polymorphic collection: one mapping per `kind`, dotted paths renamed,
/// a subject per mapping; updates (with the looked-up document) are mapped too, and a
/// document of an unknown kind is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_projects_each_variant_to_its_subject() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "map"
[pipeline.plugins.config]
discriminator = "kind"
variants = '''{
  "post":    {"fields": "_id -> id, author.id -> userId, title", "subject": "cdc.posts.{operation}"},
  "comment": {"fields": {"_id": "id", "post.id": "postId", "text": "body"}, "subject": "cdc.comments.{operation}"}
}'''
"#;
    let messages = h
        .relay(plugins, "", 4, |coll| async move {
            coll.insert_one(
                doc! { "_id": 1, "kind": "post", "author": { "id": 7, "name": "Ada" }, "title": "Hi", "draft": true },
            )
            .await?;
            coll.insert_one(doc! { "_id": 2, "kind": "comment", "post": { "id": 1 }, "text": "Nice" })
                .await?;
            coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "title": "Hello", "draft": false } })
                .await?;
            coll.insert_one(doc! { "_id": 3, "kind": "like" }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 4);
    let post = &messages[0];
    assert_eq!(post.subject.as_str(), "cdc.posts.insert");
    assert_eq!(
        json(post)["fullDocument"],
        serde_json::json!({"id": 1, "userId": 7, "title": "Hi"})
    );
    assert_eq!(
        json(post)["documentKey"]["_id"],
        1,
        "the key is never mapped"
    );
    assert_eq!(header(post, "X-Map-Variant").as_deref(), Some("post"));
    let comment = &messages[1];
    assert_eq!(comment.subject.as_str(), "cdc.comments.insert");
    assert_eq!(
        json(comment)["fullDocument"],
        serde_json::json!({"id": 2, "postId": 1, "body": "Nice"})
    );
    let update = &messages[2];
    assert_eq!(update.subject.as_str(), "cdc.posts.update");
    let body = json(update);
    assert_eq!(
        body["updateDescription"]["updatedFields"],
        serde_json::json!({"title": "Hello"})
    );
    assert_eq!(body["fullDocument"]["title"], "Hello");
    assert!(body["fullDocument"].get("draft").is_none());
    assert_dead_letter(&messages[3], "plugin-error");
    assert!(header(&messages[3], "Tidegate-Error")
        .unwrap_or_default()
        .contains("\"like\""));
    Ok(())
}

/// Contract 0.2's payload replacement, end to end: `map` with `payload = "csv"` publishes
/// each record as one CSV line with its own `Content-Type`, on the event's subject, with the
/// event's id and routing headers; an event without a document (a delete without pre-image)
/// is published as the event; and a payload over the server's `max_payload` is dead-lettered
/// (`output-too-large`), never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_publishes_records_as_csv_payloads() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "map"
# Room for the 1.2 MB record, so that the payload's size, not a limit of the call, is what
# refuses it.
limits = { fuel_per_call = 20000000000, memory_mib = 128, timeout_ms = 30000 }
[pipeline.plugins.config]
fields = "_id -> id, name, address.city -> city, at"
payload = "csv"
"#;
    // Over NATS's default max_payload (1 MiB), well under MongoDB's 16 MiB.
    let big = "x".repeat(1_200_000);
    let messages = h
        .relay(plugins, "", 4, |coll| async move {
            coll.insert_one(doc! {
                "_id": 1,
                "name": "Doe, \"Jane\"",
                "address": { "city": "Lyon", "zip": "69001" },
                "at": bson::DateTime::from_millis(1_704_164_645_678),
                "secret": "not in the record",
            })
            .await?;
            coll.insert_one(doc! { "_id": 2, "name": "Ada" }).await?;
            coll.delete_one(doc! { "_id": 2 }).await?;
            coll.insert_one(doc! { "_id": 3, "name": big }).await?;
            Ok(())
        })
        .await?;
    assert_eq!(messages.len(), 4);
    let first = &messages[0];
    assert_eq!(first.subject.as_str(), "cdc.shop.orders.insert");
    assert_eq!(
        std::str::from_utf8(&first.payload)?,
        "1,\"Doe, \"\"Jane\"\"\",Lyon,2024-01-02T03:04:05.678Z\n",
        "the published bytes are the plugin's CSV line"
    );
    assert_eq!(
        header(first, "Content-Type").as_deref(),
        Some("text/csv; header=absent")
    );
    assert_eq!(
        header(first, "Tidegate-Operation").as_deref(),
        Some("insert")
    );
    assert_eq!(header(first, "Tidegate-Key").as_deref(), Some("1"));
    assert!(header(first, "Nats-Msg-Id")
        .unwrap_or_default()
        .ends_with(":0"));
    assert_eq!(std::str::from_utf8(&messages[1].payload)?, "2,Ada,,\n");
    let delete = &messages[2];
    assert_eq!(delete.subject.as_str(), "cdc.shop.orders.delete");
    assert_eq!(
        json(delete)["operationType"],
        "delete",
        "no document, no record: the event itself is published"
    );
    assert!(header(delete, "Content-Type")
        .unwrap_or_default()
        .starts_with("application/json"));
    assert_dead_letter(&messages[3], "output-too-large");
    Ok(())
}

/// `redact` replaces, drops, masks and hashes by path — in the document and in an update's
/// fields — and the hash is stable, so equal values still join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redact_replaces_drops_masks_and_hashes() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "redact"
[pipeline.plugins.config]
fields = "name"
drop = "ssn,address.street"
mask = "card"
hash = "email"
hash-key = "test-key-0123456789"
"#;
    let messages = h
        .relay(plugins, "", 3, |coll| async move {
            coll.insert_one(doc! {
                "_id": 1, "name": "Ada", "ssn": "123-45-6789", "card": "4111111111111111",
                "email": "ada@example.com", "address": { "street": "1 Main St", "city": "Paris" },
            })
            .await?;
            coll.insert_one(doc! { "_id": 2, "email": "ada@example.com" })
                .await?;
            coll.update_one(
                doc! { "_id": 1 },
                doc! { "$set": { "ssn": "999", "card": "5500000000000004" } },
            )
            .await?;
            Ok(())
        })
        .await?;
    let first = json(&messages[0]);
    let d = &first["fullDocument"];
    assert_eq!(d["name"], "[redacted]");
    assert!(d.get("ssn").is_none());
    assert_eq!(d["address"], serde_json::json!({"city": "Paris"}));
    assert_eq!(d["card"], "************1111");
    let hash = d["email"].as_str().unwrap_or_default();
    assert_eq!(hash.len(), 64);
    assert_ne!(hash, "ada@example.com");
    assert_eq!(header(&messages[0], "X-Redacted").as_deref(), Some("5"));
    assert_eq!(
        json(&messages[1])["fullDocument"]["email"],
        hash,
        "stable hash"
    );
    let update = json(&messages[2]);
    let fields = &update["updateDescription"]["updatedFields"];
    assert_eq!(fields, &serde_json::json!({"card": "************0004"}));
    Ok(())
}

/// `encode` publishes arrays and nested documents as strings and the types JSON cannot hold
/// as plain JSON; the document key keeps its ObjectId.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_stringifies_arrays_documents_and_special_types() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = r#"
[[pipeline.plugins]]
name = "encode"
[pipeline.plugins.config]
arrays = "string"
documents = "string"
special = "string"
ejson = "canonical"
"#;
    let oid = bson::oid::ObjectId::parse_str("65a1b2c3d4e5f60718293a4b")?;
    let messages = h
        .relay(plugins, "", 1, |coll| async move {
            coll.insert_one(doc! {
                "_id": oid,
                "tags": ["a", 1_i32],
                "author": { "id": 7_i32 },
                "at": bson::DateTime::from_millis(1_704_164_645_678),
                "big": 9_007_199_254_740_993_i64,
            })
            .await?;
            Ok(())
        })
        .await?;
    let body = json(&messages[0]);
    let d = &body["fullDocument"];
    assert_eq!(d["_id"], "65a1b2c3d4e5f60718293a4b");
    assert_eq!(d["tags"], r#"["a",{"$numberInt":"1"}]"#);
    assert_eq!(d["author"], r#"{"id":{"$numberInt":"7"}}"#);
    assert_eq!(d["at"], "2024-01-02T03:04:05.678Z");
    assert_eq!(d["big"], 9_007_199_254_740_993_i64);
    assert_eq!(
        body["documentKey"]["_id"]["$oid"],
        "65a1b2c3d4e5f60718293a4b"
    );
    Ok(())
}

/// The C example plugin (`examples/c-filter`, built from source by
/// `scripts/build-examples.sh`) runs in a pipeline like any other: events on `tmp_`
/// collections are dropped, the rest published in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_guest_filters_through_the_host() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = format!(
        r#"
[[pipeline.plugins]]
name = "c-filter"
file = "{}"
config = {{ skip-prefix = "tmp_" }}
"#,
        example("c-filter").await?
    );
    let text = h.config(&plugins, "").replace(
        r#"collections = ["orders"]"#,
        r#"collections = ["orders", "tmp_orders"]"#,
    );
    let path = h.write_config("tidegate.toml", &text)?;
    let running = support::InProcess::start(&path)?;
    h.wait_ready().await?;
    let db = h.mongo.client().await?.database(support::DB);
    let (orders, scratch) = (
        db.collection::<bson::Document>("orders"),
        db.collection::<bson::Document>("tmp_orders"),
    );
    orders.insert_one(doc! { "_id": 1 }).await?;
    scratch.insert_one(doc! { "_id": 2 }).await?;
    orders.insert_one(doc! { "_id": 3 }).await?;
    scratch.delete_one(doc! { "_id": 2 }).await?;
    orders.delete_one(doc! { "_id": 1 }).await?;
    let messages = h
        .wait_settled(support::STREAM, 3, std::time::Duration::from_secs(120))
        .await?;
    running.stop().await?;
    let got: Vec<(String, i64)> = messages
        .iter()
        .map(|m| {
            (
                m.subject.to_string(),
                json(m)["documentKey"]["_id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let want = [
        ("cdc.shop.orders.insert", 1),
        ("cdc.shop.orders.insert", 3),
        ("cdc.shop.orders.delete", 1),
    ];
    let want: Vec<(String, i64)> = want.iter().map(|(s, i)| (s.to_string(), *i)).collect();
    assert_eq!(got, want);
    Ok(())
}

/// The path of an example plugin built by `scripts/build-examples.sh`.
async fn example(name: &str) -> anyhow::Result<String> {
    let dir = tokio::task::spawn_blocking(tidegate_testkit::examples_dir).await??;
    Ok(dir.join(format!("{name}.wasm")).display().to_string())
}

/// The Python example (`examples/python-filter`, componentize-py, WASI imported but nothing
/// granted) keeps big orders and deletes, through the host like any plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_guest_filters_through_the_host() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = format!(
        r#"
[[pipeline.plugins]]
name = "min-total"
file = "{}"
config = {{ min-total = "100" }}
"#,
        example("python-filter").await?
    );
    let messages = h
        .relay(&plugins, "", 3, |coll| async move {
            coll.insert_one(doc! { "_id": 1, "total": 150 }).await?;
            coll.insert_one(doc! { "_id": 2, "total": 50 }).await?;
            coll.insert_one(doc! { "_id": 3, "total": 5_000_000_000_i64 })
                .await?;
            coll.delete_one(doc! { "_id": 2 }).await?;
            Ok(())
        })
        .await?;
    let got: Vec<(String, i64)> = messages
        .iter()
        .map(|m| {
            (
                m.subject.to_string(),
                json(m)["documentKey"]["_id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let want = [
        ("cdc.shop.orders.insert", 1),
        ("cdc.shop.orders.insert", 3),
        ("cdc.shop.orders.delete", 2),
    ];
    let want: Vec<(String, i64)> = want.iter().map(|(s, i)| (s.to_string(), *i)).collect();
    assert_eq!(got, want);
    Ok(())
}

/// The JavaScript example (`examples/js-transform`, componentize-js) routes each event by a
/// document field to its own subject with a header, through the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_guest_routes_through_the_host() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = format!(
        r#"
[[pipeline.plugins]]
name = "route-by-field"
file = "{}"
config = {{ subject-prefix = "cdc.regions" }}
"#,
        example("js-transform").await?
    );
    let messages = h
        .relay(&plugins, "", 3, |coll| async move {
            coll.insert_one(doc! { "_id": 1, "region": "eu" }).await?;
            coll.insert_one(doc! { "_id": 2, "region": "us.east" })
                .await?;
            coll.insert_one(doc! { "_id": 3 }).await?;
            Ok(())
        })
        .await?;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "cdc.regions.eu",
            "cdc.regions.us_east",
            "cdc.shop.orders.insert"
        ]
    );
    assert_eq!(header(&messages[0], "X-Route").as_deref(), Some("eu"));
    assert_eq!(header(&messages[2], "X-Route"), None);
    assert_eq!(
        json(&messages[1])["fullDocument"]["region"],
        "us.east",
        "payload untouched"
    );
    Ok(())
}

/// For every first-party plugin: a config whose only mistake is a misspelt key, that key,
/// and what the error must list as known.
const TYPOS: &[(&str, &str, &str, &str)] = &[
    (
        "op-filter",
        "operation = \"insert\"",
        "operation",
        "`operations`",
    ),
    (
        "redact",
        "fields = \"name\", feilds = \"email\"",
        "feilds",
        "`fields`",
    ),
    (
        "match",
        "operations = \"insert\", wher = \"{}\"",
        "wher",
        "`where`",
    ),
    ("map", "feilds = \"_id\"", "feilds", "`fields`"),
    ("encode", "arays = \"string\"", "arays", "`arrays`"),
    ("fanout", "copys = \"2\"", "copys", "`copies`"),
    ("faulty", "fail-int = \"true\"", "fail-int", "`fail-init`"),
    (
        "snoop",
        "verbose = \"true\"",
        "verbose",
        "takes no config keys",
    ),
];

/// Every first-party plugin refuses a config key it does not know, in `init`: `tidegate
/// check` fails (exit 1) naming the plugin and the key, and listing the keys it knows. (A
/// misspelt `redact` key would publish the field in clear; `op-filter`'s `operation=` would
/// keep deletes.)
#[test]
fn misspelt_plugin_keys_fail_check() -> anyhow::Result<()> {
    let plugins = tidegate_testkit::plugin_dir()?;
    for (plugin, config, unknown, listed) in TYPOS {
        assert_check_refuses_key(
            &plugins,
            &format!("name = \"{plugin}\""),
            plugin,
            config,
            unknown,
            listed,
        )?;
    }
    Ok(())
}

/// The C, Python and JavaScript examples (contract 0.1, no SDK) refuse a misspelt key too,
/// with the SDK's wording: they are what `tidegate plugin new` scaffolds.
#[test]
fn example_guests_refuse_misspelt_keys() -> anyhow::Result<()> {
    let plugins = tidegate_testkit::plugin_dir()?;
    let examples = tidegate_testkit::examples_dir()?;
    for (example, config, unknown, listed) in [
        (
            "c-filter",
            "skip-prefx = \"scratch_\"",
            "skip-prefx",
            "`skip-prefix`",
        ),
        (
            "python-filter",
            "min-totl = \"5\"",
            "min-totl",
            "`min-total`",
        ),
        (
            "js-transform",
            "subject-prefix = \"cdc.regions\", feild = \"region\"",
            "feild",
            "`subject-prefix`, `field`",
        ),
    ] {
        let file = examples.join(format!("{example}.wasm"));
        let plugin = format!("name = \"{example}\"\nfile = \"{}\"", file.display());
        assert_check_refuses_key(&plugins, &plugin, example, config, unknown, listed)?;
    }
    Ok(())
}

/// Runs `tidegate check` on one pipeline whose only plugin is `plugin` (its TOML `name` and
/// maybe `file` lines) with `config`, and asserts that it fails naming the plugin `name`, the
/// `unknown` key and the `listed` known ones.
fn assert_check_refuses_key(
    plugin_dir: &std::path::Path,
    plugin: &str,
    name: &str,
    config: &str,
    unknown: &str,
    listed: &str,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tidegate.toml");
    let text = format!(
        r#"
plugin_dir = "{}"
[nats]
url = "nats://127.0.0.1:1"
[[pipeline]]
id = "p"
mongodb_uri = "mongodb://127.0.0.1:1/?replicaSet=rs0"
database = "d"
[pipeline.sink]
stream = "S"
subject_prefix = "cdc"
[[pipeline.plugins]]
{plugin}
config = {{ {config} }}
"#,
        plugin_dir.display()
    );
    std::fs::write(&path, text)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {err}");
    assert!(err.contains(&format!("plugin '{name}'")), "{name}: {err}");
    assert!(
        err.contains(&format!("unknown config key `{unknown}`")),
        "{name}: {err}"
    );
    assert!(err.contains(listed), "{name}: {err}");
    Ok(())
}

/// `tidegate run` with a misspelt `redact` key stops at start (exit 1, naming the key)
/// instead of running and publishing the field in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misspelt_plugin_key_stops_run() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = "[[pipeline.plugins]]\nname = \"redact\"\nconfig = { fields = \"name\", feilds = \"email\" }\n";
    let path = h.write_config("tidegate.toml", &h.config(plugins, ""))?;
    let mut tidegate = h.spawn_binary(&path)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    let log = tidegate.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("plugin 'redact'") && log.contains("unknown config key `feilds`"),
        "{log}"
    );
    Ok(())
}

/// `map` takes its mapping from a `config_file` beside the config (JSON, with `variants` as
/// plain JSON rather than JSON in a string) and `unmatched` from the inline `config`;
/// SIGHUP re-reads the file and the new mapping applies from the next event. A key the
/// plugin does not know, given in the file, fails `tidegate check` like one given inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_takes_its_mapping_from_a_file() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let mapping = |fields: serde_json::Value, subject: &str| {
        serde_json::json!({
            "discriminator": "kind",
            "variants": { "post": { "fields": fields, "subject": subject } },
        })
        .to_string()
    };
    let file = h.dir.path().join("map.json");
    std::fs::write(
        &file,
        mapping(
            serde_json::json!({"_id": "id", "author.id": "userId"}),
            "cdc.posts.{operation}",
        ),
    )?;
    let plugins = "[[pipeline.plugins]]\nname = \"map\"\nconfig_file = \"map.json\"\n\
                   config = { unmatched = \"drop\" }\n";
    let path = h.write_config("map.toml", &h.config(plugins, ""))?;
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut child = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let coll = h.collection().await?;
    coll.insert_one(doc! { "_id": 1, "kind": "post", "author": { "id": 7 }, "title": "Hi" })
        .await?;
    coll.insert_one(doc! { "_id": 2, "kind": "like" }).await?; // unmatched: dropped
    let messages = h
        .wait_settled(support::STREAM, 1, Duration::from_secs(120))
        .await?;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].subject.as_str(), "cdc.posts.insert");
    assert_eq!(
        json(&messages[0])["fullDocument"],
        serde_json::json!({"id": 1, "userId": 7})
    );

    std::fs::write(
        &file,
        mapping(
            serde_json::json!("_id -> id, title"),
            "cdc.articles.{operation}",
        ),
    )?;
    child.signal(1)?;
    child
        .wait_for_log("plugin chain reloaded", Duration::from_secs(120))
        .await?;
    coll.insert_one(doc! { "_id": 3, "kind": "post", "author": { "id": 8 }, "title": "Yo" })
        .await?;
    let messages = h
        .wait_settled(support::STREAM, 2, Duration::from_secs(120))
        .await?;
    child.signal(support::SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1].subject.as_str(), "cdc.articles.insert");
    assert_eq!(
        json(&messages[1])["fullDocument"],
        serde_json::json!({"id": 3, "title": "Yo"})
    );

    std::fs::write(&file, r#"{"feilds": "_id"}"#)?;
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown config key `feilds`"), "{err}");
    Ok(())
}

/// One workload through the same work done by contract 0.1 plugins only, and by a chain
/// mixing 0.1 and 0.2 plugins (0.2 after a 0.1 transform, 0.1 after a 0.2 one, a 0.2 filter
/// first): the published documents, subjects and plugin headers are identical, and the
/// untouched int64 keeps its type through the 0.2 edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_0_1_and_0_2_plugins_share_a_chain() -> anyhow::Result<()> {
    let chain = |v: [String; 4]| {
        format!(
            r#"
[[pipeline.plugins]]
name = "op-filter"
file = "{0}op-filter.wasm"
config = {{ operations = "insert,update" }}

[[pipeline.plugins]]
name = "mask"
file = "{1}redact.wasm"
config = {{ mask = "phone", mask-keep = "2" }}

[[pipeline.plugins]]
name = "redact"
file = "{2}redact.wasm"
config = {{ fields = "email,lines.card", drop = "secret" }}

[[pipeline.plugins]]
name = "fanout"
file = "{3}fanout.wasm"
config = {{ copies = "1" }}
"#,
            v[0], v[1], v[2], v[3]
        )
    };
    let mut runs = Vec::new();
    for versions in [["0.1"; 4], ["0.2", "0.1", "0.2", "0.1"]] {
        let h = Harness::start().await?;
        let dir = |v: &str| match v {
            "0.1" => format!("{}/v0.1/", h.plugins.display()),
            _ => format!("{}/", h.plugins.display()),
        };
        let plugins = chain(versions.map(dir));
        let plugins = plugins.as_str();
        let messages = h
            .relay(
                plugins,
                r#"encoding = "canonical-json""#,
                3,
                |coll| async move {
                    coll.insert_one(doc! {
                        "_id": 1, "email": "a@b.c", "phone": "0612345678", "secret": "s",
                        "big": 7_i64, "lines": [{ "card": "4111", "n": 1 }, { "card": "5500" }],
                    })
                    .await?;
                    coll.update_one(
                        doc! { "_id": 1 },
                        doc! { "$set": { "email": "x@y.z", "n": 2 } },
                    )
                    .await?;
                    coll.insert_one(doc! { "_id": 2, "name": "plain" }).await?;
                    // Filtered out. It deletes the last document, not the updated one: the
                    // update's looked-up fullDocument would be null whenever the stream reads
                    // the update after this delete, which made the comparison flaky.
                    coll.delete_one(doc! { "_id": 2 }).await?;
                    Ok(())
                },
            )
            .await?;
        runs.push(messages);
    }
    let shape = |m: &async_nats::jetstream::message::StreamMessage| {
        let body = json(m);
        (
            m.subject.to_string(),
            body["operationType"].clone(),
            body["documentKey"].clone(),
            body["fullDocument"].clone(),
            body["updateDescription"].clone(),
            header(m, "X-Redacted"),
            header(m, "X-Copy"),
        )
    };
    let (only_0_1, mixed) = (&runs[0], &runs[1]);
    assert_eq!(only_0_1.len(), 3);
    assert_eq!(
        only_0_1.iter().map(shape).collect::<Vec<_>>(),
        mixed.iter().map(shape).collect::<Vec<_>>()
    );
    // Canonical EJSON: every value's BSON type shows. The int64 the plugins left alone is
    // still an int64 (a type-losing round trip would make it an int32).
    let full = &json(&mixed[0])["fullDocument"];
    assert_eq!(full["email"], "[redacted]");
    assert_eq!(full["phone"], "********78");
    assert_eq!(full["lines"][0]["card"], "[redacted]");
    assert_eq!(full["lines"][1]["card"], "[redacted]");
    assert_eq!(
        full["lines"][0]["n"],
        serde_json::json!({"$numberInt": "1"})
    );
    assert_eq!(full["big"], serde_json::json!({"$numberLong": "7"}));
    assert!(full.get("secret").is_none(), "{full}");
    Ok(())
}
