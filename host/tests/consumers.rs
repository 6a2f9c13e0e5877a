//! The consumer examples of docs/consumers.md (`examples/consumers/`), run against a real
//! pipeline: the nats-py, nats.js (Node) and async-nats consumers each see every inserted
//! document once, in order, with the stream's message ids, and continue where they stopped;
//! the browser page's module follows a stream over NATS's WebSocket listener as the read-only
//! user of the documented server config, who can read and nothing else.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bson::doc;
use support::{header, Harness, InProcess, STREAM};
use tidegate_testkit::{
    consumers_node_modules, free_port, nats_py_path, repo_root, MongoReplicaSet, NatsServer,
};

/// Inserts documents `{_id: n, seq: n}` for `n` in `range`.
async fn insert(h: &Harness, range: std::ops::Range<i64>) {
    let docs: Vec<bson::Document> = range.map(|n| doc! { "_id": n, "seq": n }).collect();
    h.collection()
        .await
        .unwrap()
        .insert_many(docs)
        .await
        .unwrap();
}

/// Runs an example to completion (it exits after `--count` events) and returns the JSON
/// lines it printed.
async fn run_example(what: &str, mut cmd: tokio::process::Command) -> Vec<serde_json::Value> {
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 180 s"))
        .unwrap_or_else(|err| panic!("cannot run {what}: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| {
                panic!("{what} printed a line that is not JSON ({err}): {line}")
            })
        })
        .collect()
}

/// Asserts that `lines` are the stream's `expected` messages (id, sequence, subject) with
/// document keys `keys`, in order, each once.
fn assert_saw(
    what: &str,
    lines: &[serde_json::Value],
    expected: &[async_nats::jetstream::message::StreamMessage],
    keys: std::ops::Range<i64>,
) {
    let seen: Vec<i64> = lines
        .iter()
        .map(|l| l["documentKey"]["_id"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(seen, keys.collect::<Vec<_>>(), "{what}: document keys");
    for (line, message) in lines.iter().zip(expected) {
        assert_eq!(
            line["id"].as_str(),
            header(message, "Nats-Msg-Id").as_deref(),
            "{what}: message id of {line}"
        );
        assert_eq!(line["seq"].as_u64(), Some(message.sequence), "{what}");
        assert_eq!(line["subject"].as_str(), Some(message.subject.as_str()));
        assert_eq!(line["operation"].as_str(), Some("insert"), "{what}");
    }
}

fn python(nats: &str, count: usize, state: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(repo_root().join("examples/consumers/python/consume.py"))
        .args(["--server", nats, "--stream", STREAM, "--filter", "cdc.>"])
        .args(["--durable", "py", "--count", &count.to_string()])
        .arg("--state")
        .arg(state)
        .env("PYTHONPATH", nats_py_path().expect("nats-py installed"));
    cmd
}

fn node(nats: &str, count: usize) -> tokio::process::Command {
    consumers_node_modules().expect("nats.js installed (scripts/install-deps.sh)");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(repo_root().join("examples/consumers/node/consume.mjs"))
        .args(["--server", nats, "--stream", STREAM, "--filter", "cdc.>"])
        .args(["--durable", "js", "--count", &count.to_string()]);
    cmd
}

fn rust(nats: &str, count: usize) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(rust_example());
    cmd.args(["--server", nats, "--stream", STREAM, "--filter", "cdc.>"])
        .args(["--durable", "rs", "--count", &count.to_string()]);
    cmd
}

/// The async-nats example's binary, `target/<profile>/examples/consume`: `cargo test` builds
/// examples with the tests; when only this test file was built (or the binary is older than
/// its source), it is built here.
fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/consumers-… → target/<profile>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target folder");
    let example = profile_dir.join("examples/consume");
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let source = repo_root().join("examples/consumers/rust/consume.rs");
    if modified(&example).is_none() || modified(&example) < modified(&source) {
        let release = profile_dir.ends_with("release");
        let mut cargo =
            std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        cargo.args(["build", "--quiet", "-p", "tidegate", "--example", "consume"]);
        if release {
            cargo.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cargo.env("CARGO_TARGET_DIR", target);
        }
        let status = cargo.status().expect("run cargo build --example consume");
        assert!(status.success(), "cargo build --example consume failed");
    }
    example
}

/// Every example reads all inserted documents once, in stream order, with the stream's ids;
/// run again after more inserts, each reads only the new ones (its durable consumer, and for
/// the Python one its state file, remember where it stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_read_every_event_once_in_order() {
    let h = Harness::start().await.unwrap();
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        "full_document = \"update-lookup\"\nheartbeat_publish_ms = 200",
    );
    assert!(config.contains("heartbeat_publish_ms"));
    let path = h.write_config("tidegate.toml", &config).unwrap();
    let running = InProcess::start(&path).unwrap();
    h.wait_ready().await.unwrap();
    // Heartbeats (every 200 ms while idle) interleave with the events: the examples skip them.
    insert(&h, 0..20).await;
    h.wait_for_messages(STREAM, 20, Duration::from_secs(120))
        .await
        .unwrap();
    let events = |messages: Vec<async_nats::jetstream::message::StreamMessage>| {
        messages
            .into_iter()
            .filter(|m| !m.subject.ends_with(".heartbeat"))
            .collect::<Vec<_>>()
    };
    let nats = h.nats.url();
    let state = h.dir.path().join("python.state");
    let mut stored = events(h.messages(STREAM).await.unwrap());
    while stored.len() < 20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = events(h.messages(STREAM).await.unwrap());
    }

    let py = run_example("the Python example", python(&nats, 20, &state)).await;
    assert_saw("python", &py, &stored, 0..20);
    let js = run_example("the Node example", node(&nats, 20)).await;
    assert_saw("node", &js, &stored, 0..20);
    let rs = run_example("the Rust example", rust(&nats, 20)).await;
    assert_saw("rust", &rs, &stored, 0..20);

    insert(&h, 20..25).await;
    let mut all = events(h.messages(STREAM).await.unwrap());
    while all.len() < 25 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        all = events(h.messages(STREAM).await.unwrap());
    }
    let new = &all[20..];
    let py = run_example("the Python example, again", python(&nats, 5, &state)).await;
    assert_saw("python, again", &py, new, 20..25);
    let js = run_example("the Node example, again", node(&nats, 5)).await;
    assert_saw("node, again", &js, new, 20..25);
    let rs = run_example("the Rust example, again", rust(&nats, 5)).await;
    assert_saw("rust, again", &rs, new, 20..25);
    running.stop().await.unwrap();
}

/// The live page's module (`examples/consumers/browser/live.js`, run from Node over the same
/// WebSocket transport a browser uses) follows a real pipeline's stream through the
/// WebSocket listener of `examples/consumers/browser/nats-websocket.conf`, as its read-only
/// user; that user cannot change the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_page_follows_the_stream_over_websocket_read_only() {
    consumers_node_modules().expect("nats.js installed (scripts/install-deps.sh)");
    let ws_port = free_port();
    let conf =
        std::fs::read_to_string(repo_root().join("examples/consumers/browser/nats-websocket.conf"))
            .unwrap();
    assert!(
        conf.contains("port: 8080"),
        "the documented config listens on 8080"
    );
    let conf = conf.replace("port: 8080", &format!("port: {ws_port}"));
    let tidegate_user = Arc::new(|| {
        async_nats::ConnectOptions::with_user_and_password(
            "tidegate".into(),
            "tidegate-secret".into(),
        )
    });
    let (mongo, nats) = tokio::try_join!(
        MongoReplicaSet::start(),
        NatsServer::start_with_config(&conf, tidegate_user)
    )
    .unwrap();
    let h = Harness::start_on(mongo, nats).await.unwrap();
    // The documented user may read stream SHOP: the pipeline publishes there, as tidegate.
    let url = h
        .nats
        .url()
        .replace("nats://", "nats://tidegate:tidegate-secret@");
    let config = h
        .config("", "")
        .replace(
            &format!("url = \"{}\"", h.nats.url()),
            &format!("url = \"{url}\""),
        )
        .replace(&format!("stream = \"{STREAM}\""), "stream = \"SHOP\"");
    let path = h.write_config("tidegate.toml", &config).unwrap();
    let running = InProcess::start(&path).unwrap();
    h.wait_ready().await.unwrap();
    insert(&h, 0..5).await;
    let stored = h
        .wait_for_messages("SHOP", 5, Duration::from_secs(120))
        .await
        .unwrap();

    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("--experimental-websocket")
        .arg(repo_root().join("examples/consumers/browser/follow-cli.mjs"))
        .args(["--server", &format!("ws://127.0.0.1:{ws_port}")])
        .args(["--user", "viewer", "--pass", "viewer-secret"])
        .args([
            "--stream", "SHOP", "--filter", "cdc.>", "--start", "all", "--count", "5",
        ]);
    let lines = run_example("the live page's module over WebSocket", cmd).await;
    let keys: Vec<i64> = lines
        .iter()
        .map(|l| l["payload"]["documentKey"]["_id"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(keys, vec![0, 1, 2, 3, 4]);
    for (line, message) in lines.iter().zip(&stored) {
        assert_eq!(
            line["id"].as_str(),
            header(message, "Nats-Msg-Id").as_deref()
        );
        assert_eq!(line["seq"].as_u64(), Some(message.sequence));
        assert!(
            line["headers"].get("Nats-Expected-Last-Msg-Id").is_none(),
            "the page hides the ordering chain: {line}"
        );
    }

    // The viewer cannot delete the stream (nor publish: only the listed $JS.API requests).
    let viewer =
        async_nats::ConnectOptions::with_user_and_password("viewer".into(), "viewer-secret".into())
            .request_timeout(Some(Duration::from_secs(3)))
            .connect(h.nats.url())
            .await
            .unwrap();
    let refused = async_nats::jetstream::new(viewer)
        .delete_stream("SHOP")
        .await;
    assert!(refused.is_err(), "the read-only user deleted the stream");
    let js = async_nats::jetstream::new(h.nats_client().await.unwrap());
    assert_eq!(
        js.get_stream("SHOP")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages,
        5,
        "the stream is untouched"
    );
    running.stop().await.unwrap();
}
