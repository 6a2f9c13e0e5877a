//! `tidegate tail`: the real binary follows a running pipeline's stream and prints each
//! message as it is stored; its start options and subject filter pick the right messages; an
//! unknown pipeline, a missing stream and an unreachable NATS are refused with what to do,
//! never showing a secret.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use bson::doc;
use support::{header, Harness, InProcess, STREAM};
use tidegate_testkit::{wait_until, ChildProcess, NatsServer};

/// `tidegate tail <args> --config <config>`, run to its end (bounded).
async fn tail(args: &[&str], config: &Path) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidegate"));
    cmd.arg("tail")
        .args(args)
        .arg("--config")
        .arg(config)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("tidegate tail finished within 60 s")
        .expect("run tidegate tail")
}

/// The `--compact` lines of `text` (stderr lines are not JSON).
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn keys(lines: &[serde_json::Value]) -> Vec<i64> {
    lines
        .iter()
        .map(|l| l["payload"]["documentKey"]["_id"].as_i64().unwrap_or(-1))
        .collect()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `tail` prints documents inserted after it started, as they are stored, with the
/// stream's sequence, message id and headers; `--from-start`, `--last`, `--since` and
/// `--subject` choose where it starts and what it shows; the default output is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_messages_as_they_are_stored() {
    let h = Harness::start().await.unwrap();
    let path = h.write_config("tidegate.toml", &h.config("", "")).unwrap();
    let running = InProcess::start(&path).unwrap();
    h.wait_ready().await.unwrap();
    let coll = h.collection().await.unwrap();
    coll.insert_one(doc! { "_id": 0 }).await.unwrap();
    h.wait_for_messages(STREAM, 1, Duration::from_secs(120))
        .await
        .unwrap();

    // Live: started before the inserts, shows only what comes after it (not document 0).
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"));
    cmd.args(["tail", "orders", "--compact", "--config"])
        .arg(&path);
    let live = ChildProcess::spawn(cmd).unwrap();
    live.wait_for_log("following stream 'ORDERS'", Duration::from_secs(60))
        .await
        .unwrap();
    for n in 1..4 {
        coll.insert_one(doc! { "_id": n }).await.unwrap();
    }
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();
    wait_until("tail printed 4 messages", Duration::from_secs(60), || {
        let n = json_lines(&live.log()).len();
        async move { n >= 4 }
    })
    .await
    .unwrap();
    let printed = json_lines(&live.log());
    let stored = h.messages(STREAM).await.unwrap();
    assert_eq!(keys(&printed), vec![1, 2, 3, 1], "{}", live.log());
    for (line, message) in printed.iter().zip(&stored[1..]) {
        assert_eq!(line["seq"].as_u64(), Some(message.sequence));
        assert_eq!(line["subject"].as_str(), Some(message.subject.as_str()));
        assert_eq!(
            line["id"].as_str(),
            header(message, "Nats-Msg-Id").as_deref()
        );
        assert_eq!(
            line["headers"]["Tidegate-Pipeline"].as_str(),
            Some("orders")
        );
        assert!(line["headers"].get("Nats-Expected-Last-Msg-Id").is_none());
    }
    assert_eq!(
        printed[3]["subject"].as_str(),
        Some("cdc.shop.orders.delete")
    );
    drop(live);

    // Where to start, and which subjects.
    let out = tail(
        &["orders", "--from-start", "--count", "5", "--compact"],
        &path,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(keys(&json_lines(&stdout(&out))), vec![0, 1, 2, 3, 1]);
    let out = tail(
        &["orders", "--last", "2", "--count", "2", "--compact"],
        &path,
    )
    .await;
    assert_eq!(
        keys(&json_lines(&stdout(&out))),
        vec![3, 1],
        "{}",
        stderr(&out)
    );
    let out = tail(
        &["orders", "--since", "1h", "--count", "5", "--compact"],
        &path,
    )
    .await;
    assert_eq!(keys(&json_lines(&stdout(&out))), vec![0, 1, 2, 3, 1]);
    let inserts = ["--subject", "cdc.*.*.insert", "--compact"];
    let out = tail(
        &[&["orders", "--last", "2", "--count", "2"], &inserts[..]].concat(),
        &path,
    )
    .await;
    assert_eq!(
        keys(&json_lines(&stdout(&out))),
        vec![2, 3],
        "{}",
        stderr(&out)
    );
    // More than the filter selects: all of them, then new ones (none here: bounded by --count).
    let out = tail(
        &["orders", "--last", "50", "--count", "5", "--compact"],
        &path,
    )
    .await;
    assert_eq!(keys(&json_lines(&stdout(&out))), vec![0, 1, 2, 3, 1]);

    // The readable form: a header line per message, its headers, the payload pretty-printed.
    let out = tail(&["orders", "--last", "1", "--count", "1"], &path).await;
    let text = stdout(&out);
    assert!(
        text.starts_with("--- cdc.shop.orders.delete  #5  "),
        "{text}"
    );
    assert!(text.contains("\nNats-Msg-Id: orders:"), "{text}");
    assert!(text.contains("\"operationType\": \"delete\""), "{text}");
    running.stop().await.unwrap();
}

/// A config for `tail`'s refusals: a pipeline with two tenants and one without.
fn tenants_config(nats_url: &str) -> String {
    format!(
        r#"
[nats]
url = "{nats_url}"

[[pipeline]]
id = "shop"
mongodb_uri = "mongodb://127.0.0.1:1/?replicaSet=rs0"
database = "shop"
[[pipeline.tenant]]
id = "acme"
namespaces = ["shop.acme"]
[pipeline.tenant.sink]
stream = "ACME"
subject_prefix = "acme"
[[pipeline.tenant]]
id = "globex"
namespaces = ["shop.globex"]
[pipeline.tenant.sink]
stream = "GLOBEX"
subject_prefix = "globex"

[[pipeline]]
id = "orders"
mongodb_uri = "mongodb://127.0.0.1:1/?replicaSet=rs0"
database = "shop"
[pipeline.sink]
stream = "ORDERS"
subject_prefix = "cdc"
"#
    )
}

/// Unknown pipelines (with the known ones listed), a pipeline with tenants (with its units
/// listed), a subject outside the pipeline's, a missing stream and an unreachable NATS are
/// each refused with a message that says what to do; a password in the URL never shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_refusals_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await.unwrap();
    let path = dir.path().join("tidegate.toml");
    std::fs::write(&path, tenants_config(&nats.url())).unwrap();

    let out = tail(&["nope"], &path).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no pipeline 'nope'")
            && stderr(&out).contains("shop.acme, shop.globex, orders"),
        "{}",
        stderr(&out)
    );
    let out = tail(&["shop"], &path).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("has tenants") && stderr(&out).contains("shop.acme, shop.globex"),
        "{}",
        stderr(&out)
    );
    let out = tail(&["orders", "--subject", "other.>"], &path).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("under 'cdc.>'"), "{}", stderr(&out));
    let out = tail(&["orders", "--since", "yesterday"], &path).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--since yesterday"),
        "{}",
        stderr(&out)
    );

    // A tenant unit by its own name: its stream does not exist yet.
    let out = tail(&["shop.acme"], &path).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stream 'ACME' of pipeline 'shop.acme' does not exist"),
        "{}",
        stderr(&out)
    );
    // Once it exists (created here as `tidegate run` would), the tenant's stream is followed.
    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ACME".into(),
        subjects: vec!["acme.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish(
        "acme.shop.acme.insert",
        r#"{"documentKey":{"_id":7}}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let out = tail(
        &["shop.acme", "--from-start", "--count", "1", "--compact"],
        &path,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(keys(&json_lines(&stdout(&out))), vec![7]);

    // Nothing listens on port 1; the password in the URL is never shown.
    let unreachable = tenants_config("nats://tidegate:s3cr3t-pw@127.0.0.1:1");
    std::fs::write(&path, unreachable).unwrap();
    let out = tail(&["orders"], &path).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t-pw"), "the password leaked: {err}");
}
