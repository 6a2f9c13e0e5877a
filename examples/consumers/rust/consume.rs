//! Reads a tidegate pipeline's stream with a durable pull consumer (async-nats).
//!
//! Prints one JSON line per change event it processes (stream sequence, message id, subject,
//! operation, document key), acknowledging each one after processing it. The durable consumer
//! keeps its position on the server, so a restart continues after the last acknowledged
//! message. Heartbeats are acknowledged and skipped; dead letters are reported on stderr.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 cargo run --release -p tidegate --example consume -- \
//!     --stream SHOP --filter 'cdc.>'
//! ```
//!
//! It is a cargo example of the `tidegate` package only so that CI builds (and runs) it with
//! the workspace's async-nats; it uses nothing of tidegate. In a project of your own, depend on
//! `async-nats`, `tokio`, `futures`, `serde_json`, `anyhow` and `clap`.
//! See docs/consumers.md for what the stream holds and how to choose a filter and a start.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use clap::Parser;
use futures::StreamExt;

#[derive(Parser)]
struct Args {
    /// NATS URL (default: $NATS_URL, else nats://127.0.0.1:4222).
    #[arg(long)]
    server: Option<String>,
    /// The pipeline's `sink.stream`.
    #[arg(long, default_value = "SHOP")]
    stream: String,
    /// Subjects to read, e.g. `cdc.shop.customers.*`.
    #[arg(long, default_value = "cdc.>")]
    filter: String,
    /// Durable consumer name: the server remembers what it acknowledged.
    #[arg(long, default_value = "example-rust")]
    durable: String,
    /// Exit after processing this many events.
    #[arg(long)]
    count: Option<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = args
        .server
        .clone()
        .or_else(|| std::env::var("NATS_URL").ok())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(&server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&args.stream)
        .await
        .with_context(|| format!("stream {}", args.stream))?;
    // Created on first use, bound to afterwards: the server keeps its position.
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &args.durable,
            consumer::pull::Config {
                durable_name: Some(args.durable.clone()),
                filter_subject: args.filter.clone(),
                deliver_policy: consumer::DeliverPolicy::All, // a new consumer starts at the oldest
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30), // unacknowledged for 30 s: delivered again
                max_ack_pending: 1,                // one at a time: strict stream order
                ..Default::default()
            },
        )
        .await
        .context("creating the consumer")?;
    eprintln!(
        "consuming {} ({}) as '{}'",
        args.stream, args.filter, args.durable
    );
    let mut messages = consumer.messages().await?;
    let mut processed = 0;
    while args.count.is_none_or(|count| processed < count) {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message.map_err(|err| anyhow::anyhow!(err))?;
        let seq = message
            .info()
            .map_err(|err| anyhow::anyhow!(err))?
            .stream_sequence;
        // (Well-known names such as `Nats-Msg-Id` are looked up by their constant.)
        let header = |name: &str| {
            let headers = message.headers.as_ref()?;
            let value = match name {
                "Nats-Msg-Id" => headers.get(async_nats::header::NATS_MESSAGE_ID),
                _ => headers.get(name),
            };
            value.map(|v| v.as_str().to_string())
        };
        if message.subject.ends_with(".heartbeat") {
            // The pipeline is alive; nothing to process.
        } else if message.subject.ends_with(".dead-letter") {
            eprintln!(
                "dead letter #{seq}: {}: {}",
                header("Tidegate-Error-Kind").unwrap_or_default(),
                header("Tidegate-Error").unwrap_or_default()
            );
        } else {
            let event: serde_json::Value =
                serde_json::from_slice(&message.payload).unwrap_or(serde_json::Value::Null);
            let line = serde_json::json!({
                "seq": seq,
                "id": header("Nats-Msg-Id"),
                "subject": message.subject.as_str(),
                "operation": header("Tidegate-Operation").or_else(|| event["operationType"].as_str().map(String::from)),
                "documentKey": event["documentKey"],
            });
            println!("{line}");
            processed += 1;
        }
        // (`double_ack` would also wait for the server to confirm each one.)
        message.ack().await.map_err(|err| anyhow::anyhow!(err))?;
    }
    // Acks are plain publishes: send the last ones before exiting, or they are redelivered.
    js.client().flush().await?;
    Ok(())
}
