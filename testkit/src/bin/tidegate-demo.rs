//! The quick-start demo: starts a throw-away MongoDB replica set and NATS server, runs the
//! real `tidegate` binary on `examples/quickstart/tidegate.toml`, writes a few customer
//! documents, and prints what arrives on NATS. Exits non-zero if the expected messages do
//! not arrive, so CI running it proves the quick start still works.
//!
//! Run it with `scripts/demo.sh` (which installs the servers and builds everything first).
//! With `--keep-running` (`scripts/demo.sh --keep-running`) it then stays up, writing a
//! customer every two seconds, for the consumer examples of docs/consumers.md to read (NATS
//! also listens for WebSockets then, for the live page), until Ctrl-C.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bson::doc;
use futures::StreamExt;
use tidegate_testkit::{plugin_dir, repo_root, ChildProcess, MongoReplicaSet, NatsServer};

const SIGTERM: i32 = 15;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let keep_running = std::env::args().any(|arg| arg == "--keep-running");
    let tidegate_bin = sibling_binary("tidegate")?;
    let config = repo_root().join("examples/quickstart/tidegate.toml");

    step("building the example plugins (op-filter, redact)");
    let plugins = tokio::task::spawn_blocking(plugin_dir).await??;
    println!("   components in {}", plugins.display());

    step("starting a MongoDB replica set and a NATS server with JetStream");
    let ws_port = tidegate_testkit::free_port();
    let nats_config = match keep_running {
        true => format!("websocket {{ port: {ws_port}, no_tls: true }}"),
        false => String::new(),
    };
    let (mongo, nats) = tokio::try_join!(
        MongoReplicaSet::start(),
        NatsServer::start_with_config(&nats_config, Arc::new(async_nats::ConnectOptions::new))
    )?;
    println!("   mongod      {}", mongo.uri());
    println!("   nats-server {}", nats.url());

    step("starting tidegate on examples/quickstart/tidegate.toml");
    let mut cmd = std::process::Command::new(&tidegate_bin);
    cmd.arg("run").arg("--config").arg(&config);
    cmd.env("TIDEGATE_NATS_URL", nats.url());
    cmd.env("TIDEGATE_PIPELINE_SHOP_MONGODB_URI", mongo.uri());
    let mut tidegate = ChildProcess::spawn(cmd)?;
    tidegate
        .wait_for_log("change stream open", Duration::from_secs(30))
        .await?;

    let client = nats.client().await?;
    let mut live = client.subscribe("cdc.>").await?;
    client.flush().await?;

    step("writing to shop.customers: 3 inserts, 1 update, 1 replace, 1 delete");
    let customers = mongo
        .client()
        .await?
        .database("shop")
        .collection::<bson::Document>("customers");
    customers
        .insert_many([
            doc! { "_id": 1, "name": "Ada", "email": "ada@example.com", "tier": "gold" },
            doc! { "_id": 2, "name": "Grace", "email": "grace@example.com", "tier": "silver" },
            doc! { "_id": 3, "name": "Linus", "email": "linus@example.com", "tier": "bronze" },
        ])
        .await?;
    customers
        .update_one(doc! { "_id": 2 }, doc! { "$set": { "tier": "gold" } })
        .await?;
    customers
        .replace_one(
            doc! { "_id": 3 },
            doc! { "name": "Linus T.", "email": "lt@example.com", "tier": "gold" },
        )
        .await?;
    customers.delete_one(doc! { "_id": 1 }).await?;

    step("messages arriving on NATS (the delete is filtered out, e-mails are redacted)");
    let expected = 5;
    let mut received = 0;
    while received < expected {
        let message = tokio::time::timeout(Duration::from_secs(20), live.next())
            .await
            .context("timed out waiting for messages from tidegate")?
            .context("subscription closed")?;
        received += 1;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&message.payload)?;
        println!("\n   subject {}", message.subject);
        println!("   msg-id  {}…", id.chars().take(40).collect::<String>());
        let shown = serde_json::json!({
            "operationType": body["operationType"],
            "documentKey": body["documentKey"],
            "fullDocument": body["fullDocument"],
            "updateDescription": body["updateDescription"],
        });
        for line in serde_json::to_string_pretty(&shown)?.lines() {
            println!("   {line}");
        }
    }
    // Nothing else (the delete) should follow.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(1500), live.next()).await {
        bail!("unexpected extra message on {}", extra.subject);
    }

    drop(live);
    if keep_running {
        keep_writing(&customers, &nats.url(), ws_port).await?;
    }

    step("stopping tidegate with SIGTERM (drains and checkpoints)");
    tidegate.signal(SIGTERM)?;
    let status = tidegate.wait_exit(Duration::from_secs(30)).await?;
    for line in tidegate
        .log()
        .lines()
        .filter(|l| l.contains("summary") || l.contains("stopped"))
    {
        println!("   {line}");
    }
    if !status.success() {
        bail!("tidegate exited with {status}:\n{}", tidegate.log());
    }
    println!("\ndemo ok: {received} messages published, 1 delete filtered, e-mails redacted");
    Ok(())
}

/// `--keep-running`: says how to read the stream, then updates a customer every two seconds
/// until Ctrl-C.
async fn keep_writing(
    customers: &mongodb::Collection<bson::Document>,
    nats_url: &str,
    ws_port: u16,
) -> anyhow::Result<()> {
    step(
        "running until Ctrl-C, updating a customer every 2 s; read the stream (docs/consumers.md):",
    );
    println!("   export NATS_URL={nats_url} TIDEGATE_NATS_URL={nats_url}");
    println!("   tidegate tail shop --config examples/quickstart/tidegate.toml --from-start");
    println!("   PYTHONPATH=~/.cache/tidegate/nats-py-2.16.0 python3 examples/consumers/python/consume.py");
    println!("   node examples/consumers/node/consume.mjs");
    println!("   cargo run --release -p tidegate --example consume");
    println!("   live page: python3 -m http.server -d examples/consumers/browser 8000, then open");
    println!("   http://127.0.0.1:8000/?server=ws://127.0.0.1:{ws_port}&stream=SHOP&start=all");
    let mut visits = 0_i64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        visits += 1;
        customers
            .update_one(doc! { "_id": 2 }, doc! { "$set": { "visits": visits } })
            .await?;
    }
}

fn step(what: &str) {
    println!("\n== {what}");
}

/// A binary built next to this one (`cargo build --release --workspace --bins`).
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable has no folder")?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release -p tidegate` (scripts/demo.sh does)",
            path.display()
        );
    }
    Ok(path)
}
