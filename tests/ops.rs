//! The operations endpoint against a running binary and real servers: health, readiness
//! (including while NATS is down), Prometheus metrics parsed by a real text-format parser,
//! the JSON status and the status page; none of them reveals a connection string.

mod support;

use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use support::{http_get, write_range, Harness, SIGTERM, STREAM};
use tidegate_testkit::{free_port, wait_until};

/// The value of `name{pipeline="orders"}` in a scrape.
fn sample<'a>(scrape: &'a Scrape, name: &str) -> Option<&'a Value> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("pipeline") == Some("orders"))
        .map(|s| &s.value)
}

fn number(value: Option<&Value>) -> f64 {
    match value {
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        other => panic!("not a number: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_status_of_a_running_binary() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let address = format!("127.0.0.1:{}", free_port());
    let plugins = r#"
[[pipeline.plugins]]
name = "op-filter"
config = { operations = "insert" }
"#;
    let config = format!(
        "{}\n[http]\naddress = \"{address}\"\n",
        h.config(plugins, "")
    );
    let path = h.write_config("tidegate.toml", &config)?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;

    assert_eq!(http_get(&address, "/healthz").await?, (200, "ok\n".into()));
    let coll = h.collection().await?;
    write_range(coll.clone(), 0, 100, 50, Duration::ZERO).await?;
    coll.delete_one(bson::doc! { "seq": 0 }).await?;
    h.wait_settled(STREAM, 100, Duration::from_secs(120))
        .await?;
    // The checkpoint interval is 200 ms; let one pass after the last ack.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (status, ready) = http_get(&address, "/readyz").await?;
    assert_eq!((status, ready.as_str()), (200, "ready\n"));

    let (status, text) = http_get(&address, "/metrics").await?;
    assert_eq!(status, 200);
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    assert_eq!(number(sample(&scrape, "tidegate_events_read_total")), 101.0);
    assert_eq!(
        number(sample(&scrape, "tidegate_events_filtered_total")),
        1.0
    );
    assert_eq!(
        number(sample(&scrape, "tidegate_messages_published_total")),
        100.0
    );
    assert_eq!(
        number(sample(&scrape, "tidegate_events_dead_lettered_total")),
        0.0
    );
    assert_eq!(number(sample(&scrape, "tidegate_pipeline_running")), 1.0);
    let age = number(sample(&scrape, "tidegate_checkpoint_age_seconds"));
    assert!((0.0..5.0).contains(&age), "checkpoint age {age}");
    let lag = number(sample(&scrape, "tidegate_lag_seconds"));
    assert!((0.0..30.0).contains(&lag), "lag {lag}");
    match sample(&scrape, "tidegate_publish_latency_seconds") {
        Some(Value::Histogram(buckets)) => {
            let total = buckets.last().map(|b| b.count).unwrap_or_default();
            assert_eq!(total, 100.0, "one observation per published message");
        }
        other => panic!("publish latency is not a histogram: {other:?}"),
    }
    // The op-filter plugin saw every event (100 inserts and the delete it dropped).
    let plugin = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("plugin") == Some("op-filter"))
            .map(|s| &s.value)
    };
    assert_eq!(number(plugin("tidegate_plugin_calls_total")), 101.0);
    assert_eq!(number(plugin("tidegate_plugin_failures_total")), 0.0);
    assert!(number(plugin("tidegate_plugin_fuel_total")) > 0.0);
    match plugin("tidegate_plugin_call_seconds") {
        Some(Value::Histogram(buckets)) => {
            assert_eq!(buckets.last().map(|b| b.count), Some(101.0));
        }
        other => panic!("plugin call time is not a histogram: {other:?}"),
    }
    assert!(matches!(
        sample(&scrape, "tidegate_end_to_end_lag_seconds"),
        Some(Value::Histogram(_))
    ));

    // The oplog's ends are read every few seconds: the position is well inside them.
    wait_until(
        "oplog headroom in /metrics",
        Duration::from_secs(120),
        || {
            let address = address.clone();
            async move {
                let Ok((_, text)) = http_get(&address, "/metrics").await else {
                    return false;
                };
                let Ok(scrape) = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))) else {
                    return false;
                };
                sample(&scrape, "tidegate_oplog_window_seconds").is_some()
                    && sample(&scrape, "tidegate_oplog_headroom_seconds").is_some()
            }
        },
    )
    .await?;
    let (_, text) = http_get(&address, "/metrics").await?;
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let window = number(sample(&scrape, "tidegate_oplog_window_seconds"));
    let headroom = number(sample(&scrape, "tidegate_oplog_headroom_seconds"));
    assert!(
        window >= 0.0 && headroom >= window * 0.5,
        "headroom {headroom} of {window}"
    );
    assert_eq!(http_get(&address, "/readyz").await?.0, 200);

    let (status, json) = http_get(&address, "/status").await?;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json)?;
    let pipeline = &json["pipelines"][0];
    assert_eq!(pipeline["labels"]["pipeline"], "orders");
    assert_eq!(pipeline["state"], "running");
    assert_eq!(pipeline["counts"]["published"], 100);
    assert_eq!(pipeline["plugins"][0]["name"], "op-filter");
    assert_eq!(pipeline["plugins"][0]["world"], "filter");
    assert_eq!(
        pipeline["plugins"][0]["sha256"].as_str().map(str::len),
        Some(64)
    );
    assert!(pipeline["position"]["last_msg_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("orders:")));

    let (status, page) = http_get(&address, "/").await?;
    assert_eq!(status, 200);
    assert!(page.contains("<td>orders</td><td>running</td>"), "{page}");
    assert_eq!(http_get(&address, "/nope").await?.0, 404);

    // No endpoint reveals where the servers are or how to log in.
    for body in [&text, &page, &json.to_string()] {
        assert!(!body.contains("mongodb://"));
        assert!(!body.contains(&h.nats.url()));
        assert!(!body.contains(&format!(":{}", h.nats.port())));
    }

    // NATS away: not ready, and says why; back: ready again.
    h.nats.stop();
    wait_until("/readyz reports NATS down", Duration::from_secs(120), || {
        let address = address.clone();
        async move {
            matches!(http_get(&address, "/readyz").await, Ok((503, body)) if body.contains("NATS"))
        }
    })
    .await?;
    assert_eq!(
        http_get(&address, "/healthz").await?.0,
        200,
        "alive while NATS is down"
    );
    h.nats.start_again().await?;
    wait_until("/readyz ready again", Duration::from_secs(120), || {
        let address = address.clone();
        async move { matches!(http_get(&address, "/readyz").await, Ok((200, _))) }
    })
    .await?;

    tidegate.signal(SIGTERM)?;
    let status = tidegate.wait_exit(Duration::from_secs(120)).await?;
    assert!(status.success(), "{}", tidegate.log());
    Ok(())
}
