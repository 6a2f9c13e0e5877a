//! The quick-start demo: starts a throw-away MongoDB replica set and NATS server, runs the
//! real `tidegate` binary on `examples/quickstart/tidegate.toml`, writes a few customer
//! documents, and prints what arrives on NATS. Exits non-zero if the expected messages do
//! not arrive, so CI running it proves the quick start still works.
//!
//! Run it with `scripts/demo.sh` (which installs the servers and builds everything first).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bson::doc;
use futures::StreamExt;
use tidegate_testkit::{plugin_dir, repo_root, ChildProcess, MongoReplicaSet, NatsServer};

const SIGTERM: i32 = 15;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let tidegate_bin = sibling_binary("tidegate")?;
    let config = repo_root().join("examples/quickstart/tidegate.toml");

    step("building the example plugins (op-filter, redact)");
    let plugins = tokio::task::spawn_blocking(plugin_dir).await??;
    println!("   components in {}", plugins.display());

    step("starting a MongoDB replica set and a NATS server with JetStream");
    let (mongo, nats) = tokio::try_join!(MongoReplicaSet::start(), NatsServer::start())?;
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
