//! The operations endpoint against a running binary and real servers: health, readiness
//! (including while NATS is down), Prometheus metrics parsed by a real text-format parser,
//! the JSON status and the status page; none of them reveals a connection string.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use anyhow::Context;
use prometheus_parse::{Scrape, Value};
use support::{http_get, wat_filter, write_range, Harness, InProcess, PIPELINE, SIGTERM, STREAM};
use tidegate_testkit::{free_port, wait_until, ChildProcess, MongoReplicaSet};

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
    // One end-to-end lag observation per published change (not for the filtered delete),
    // in buckets from a millisecond up.
    match sample(&scrape, "tidegate_end_to_end_lag_seconds") {
        Some(Value::Histogram(buckets)) => {
            assert_eq!(buckets.first().map(|b| b.less_than), Some(0.001));
            assert_eq!(buckets.last().map(|b| b.count), Some(100.0));
        }
        other => panic!("end-to-end lag is not a histogram: {other:?}"),
    }
    // Counters with labels exist at zero before anything happened to them.
    let dead_letters = |plugin: &str, reason: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "tidegate_dead_letters_total"
                    && s.labels.get("plugin") == Some(plugin)
                    && s.labels.get("reason") == Some(reason)
            })
            .map(|s| &s.value)
    };
    assert_eq!(number(dead_letters("op-filter", "out-of-fuel")), 0.0);
    assert_eq!(number(dead_letters("op-filter", "plugin-error")), 0.0);
    assert_eq!(number(dead_letters("", "too-large")), 0.0);

    // The oplog is read every 10 s: its configured size (128 MB), and a projected headroom
    // (after two readings) far above the warning threshold on this fresh, barely used oplog.
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
                sample(&scrape, "tidegate_oplog_max_size_bytes").is_some()
                    && sample(&scrape, "tidegate_oplog_headroom_seconds").is_some()
            }
        },
    )
    .await?;
    let (_, text) = http_get(&address, "/metrics").await?;
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let max = number(sample(&scrape, "tidegate_oplog_max_size_bytes"));
    assert_eq!(max, 128.0 * 1024.0 * 1024.0);
    let size = number(sample(&scrape, "tidegate_oplog_size_bytes"));
    assert!(size > 0.0 && size < max, "oplog size {size}");
    let headroom = number(sample(&scrape, "tidegate_oplog_headroom_seconds"));
    assert!(headroom > 3600.0, "headroom {headroom}");
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
    assert!(page.contains("id=\"unit-orders\""), "{page}");
    assert!(page.contains("data-field=\"state\">running<"), "{page}");
    assert_eq!(http_get(&address, "/nope").await?.0, 404);

    // No endpoint reveals where the servers are or how to log in.
    for body in [&text, &page, &json.to_string()] {
        assert!(!body.contains("mongodb://"));
        assert!(!body.contains(&h.nats.url()));
        assert!(!body.contains(&format!(":{}", h.nats.port())));
    }

    // A flood of connections: 64 are served at once, the next is answered 503 at once (not
    // left to wait for a place); once they close, the endpoint answers again.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(&address).await?);
    }
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(
        &mut tokio::net::TcpStream::connect(&address).await?,
        &mut answer,
    )
    .await?;
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("64 connections are served at once"),
        "{answer}"
    );
    drop(idle);
    wait_until("/healthz answered again", Duration::from_secs(60), || {
        let address = address.clone();
        async move { matches!(http_get(&address, "/healthz").await, Ok((200, _))) }
    })
    .await?;

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

/// `/status` as JSON.
async fn status(address: &str) -> anyhow::Result<serde_json::Value> {
    let (code, body) = http_get(address, "/status").await?;
    anyhow::ensure!(code == 200, "/status answered {code}");
    Ok(serde_json::from_str(&body)?)
}

/// The cluster time (Unix seconds) of the resume token the pipeline's checkpoint in NATS KV
/// holds.
async fn checkpointed_secs(js: &async_nats::jetstream::Context) -> anyhow::Result<i64> {
    let kv = js.get_key_value("tidegate-checkpoints").await?;
    let value = kv.get(PIPELINE).await?.context("no checkpoint")?;
    let record: serde_json::Value = serde_json::from_slice(&value)?;
    let data = record["token"]["_data"].as_str().context("token")?;
    Ok(i64::from_str_radix(
        data.get(2..10).context("short token")?,
        16,
    )?)
}

/// Lines of a tidegate log at WARN or ERROR level that mention the oplog.
fn oplog_alarms(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains("oplog"))
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// An idle pipeline on a fresh replica set (a 128 MB oplog holding a few KB) stays ready,
/// quiet and caught up: lag, `/readyz` and the oplog headroom follow the checkpointed
/// position, which keeps moving while idle (post-batch resume tokens), not the last
/// acknowledged message.
///
/// Before the fix, a few writes followed by silence gave a WARN "past half of the oplog's
/// window" once the silence outlasted the time from the oplog's start to the writes, an
/// ERROR "close to falling out of the oplog" at four times that, a lag growing without bound,
/// and `/readyz` 503 once the oplog's age passed ten times the position's distance from its
/// start. The oplog is checked every 250 ms instead of every 10 s, and the silence lasts just
/// until the checkpoint has moved past all three of those points (at least 30 s, at most
/// 90 s): about a minute instead of the minutes it took in production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pipeline_stays_ready_on_a_fresh_replica_set() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let address = format!("127.0.0.1:{}", free_port());
    let config = h.config("", "").replace(
        "interval_ms = 200",
        "interval_ms = 200\noplog_check_interval_ms = 250",
    );
    let path = h.write_config(
        "idle.toml",
        &format!("{config}\n[http]\naddress = \"{address}\"\n"),
    )?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    write_range(h.collection().await?, 0, 10, 10, Duration::ZERO).await?;
    h.wait_settled(STREAM, 10, Duration::from_secs(30)).await?;

    let (oldest, written) = tidegate::ops::oplog::ends(&h.mongo.client().await?)
        .await
        .map_err(anyhow::Error::msg)?;
    let (oldest, written) = (i64::from(oldest.time), i64::from(written.time));
    let idle = (10 * (written - oldest) + 5).clamp(30, 90);
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let deadline = std::time::Instant::now() + Duration::from_secs(idle as u64 + 120);
    let lag = loop {
        let before = checkpointed_secs(&js).await?;
        let (code, ready) = http_get(&address, "/readyz").await?;
        assert_eq!(
            code,
            200,
            "not ready while idle: {ready}\n{}",
            tidegate.log()
        );
        let json = status(&address).await?;
        let after = checkpointed_secs(&js).await?;
        let unit = &json["pipelines"][0];
        // `/status` shows the position the checkpoint holds, and its lag is measured from it.
        let position = unit["position"]["change_time_unix"]
            .as_i64()
            .context("position")?;
        assert!(
            (before..=after).contains(&position),
            "/status position {position}, KV checkpoint {before}..{after}"
        );
        let lag = unit["lag_seconds"].as_i64().context("lag")?;
        assert!(lag <= unix_now() - before + 1, "lag {lag} s");
        if after >= written + idle {
            break lag;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the checkpoint did not move while idle (at {after}, last write {written})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The lag is small: well under the time since the last write.
    assert!(lag < idle, "lag {lag} s after {idle} s idle");
    let log = tidegate.log();
    assert!(oplog_alarms(&log).is_empty(), "{log}");
    assert_eq!(
        status(&address).await?["pipelines"][0]["oplog"]["level"],
        "ok"
    );

    tidegate.signal(SIGTERM)?;
    assert!(tidegate.wait_exit(Duration::from_secs(30)).await?.success());
    Ok(())
}

/// A 1 MB oplog being filled: tidegate warns when the projected headroom (the oplog's
/// capacity at the current write rate) falls under the thresholds, not before, and logs each
/// change of level once rather than on every check; back to normal once writes stop.
/// (Before the fix it said nothing here at all: a caught-up position always sat at the new end
/// of the "window", however fast the oplog was being overwritten.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_warnings_follow_the_projected_headroom() -> anyhow::Result<()> {
    let mongo = tidegate_testkit::MongoReplicaSet::start_with_oplog_mb(1).await?;
    let (h, mut tidegate, address) = watch_small_oplog(mongo).await?;
    let orders = h.collection().await?;
    let oplog_of = |json: &serde_json::Value| json["pipelines"][0]["oplog"].clone();

    // Slow writes (~4 KB/s: a 1 MB oplog lasts minutes): a projection, and no warning.
    let small = "s".repeat(1000);
    let mut slow_checks = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while slow_checks < 12 {
        orders.insert_one(bson::doc! { "pad": &small }).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let oplog = oplog_of(&status(&address).await?);
        if let Some(headroom) = oplog["headroom_seconds"].as_f64() {
            assert_eq!(oplog["max_bytes"], 1024 * 1024, "the configured maximum");
            assert!(headroom > 60.0, "slow writes: headroom {headroom} s");
            assert_eq!(oplog["level"], "ok");
            slow_checks += 1;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no projection: {oplog}"
        );
    }
    assert!(
        oplog_alarms(&tidegate.log()).is_empty(),
        "{}",
        tidegate.log()
    );

    // Fast writes (~400 KB/s: the whole oplog in under 3 s): an error, logged once.
    let blob = "z".repeat(100_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut error_checks = 0;
    while error_checks < 12 {
        orders.insert_one(bson::doc! { "blob": &blob }).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let oplog = oplog_of(&status(&address).await?);
        if oplog["level"] == "error" {
            let headroom = oplog["headroom_seconds"].as_f64().context("headroom")?;
            assert!(headroom < 20.0 * 1.1, "error at headroom {headroom} s");
            error_checks += 1;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no error level: {oplog}"
        );
    }
    let log = tidegate.log();
    let errors: Vec<&str> = oplog_alarms(&log)
        .into_iter()
        .filter(|l| l.contains(" ERROR "))
        .collect();
    assert_eq!(errors.len(), 1, "one line per change of level: {log}");
    assert!(
        errors[0].contains("overwrites the checkpointed position"),
        "{log}"
    );
    assert!(errors[0].contains("headroom_s="), "{log}");
    assert!(errors[0].contains("oplog_max_mb=1"), "{log}");

    // Writes stop: the rate drops, the headroom recovers, and that is said once too.
    wait_until("oplog level back to ok", Duration::from_secs(60), || {
        let address = address.clone();
        async move {
            matches!(status(&address).await, Ok(json) if json["pipelines"][0]["oplog"]["level"] == "ok")
        }
    })
    .await?;
    let log = tidegate.log();
    assert!(log.contains("oplog headroom back above"), "{log}");
    assert!(oplog_alarms(&log).len() <= 3, "{log}");
    tidegate.kill9();
    Ok(())
}

/// The same 1 MB oplog written as fast, but with a minimum retention of an hour set at run
/// time (`replSetResizeOplog`): MongoDB keeps every entry that long, so the checkpoint is safe
/// for the hour whatever the size says. No alarm, and `/status` shows the retention and an
/// hour's headroom. (Before the retention was read, this raised the error level within
/// seconds: a false alarm on every deployment that sets one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minimum_retention_keeps_the_oplog_alarm_quiet() -> anyhow::Result<()> {
    let mongo = tidegate_testkit::MongoReplicaSet::start_with_oplog_mb(1).await?;
    mongo
        .client()
        .await?
        .database("admin")
        .run_command(bson::doc! { "replSetResizeOplog": 1, "minRetentionHours": 1.0 })
        .await?;
    let (h, mut tidegate, address) = watch_small_oplog(mongo).await?;
    let orders = h.collection().await?;

    // ~400 KB/s, past the oplog's whole size within seconds, for a dozen projections.
    let blob = "z".repeat(100_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut checks = 0;
    let mut written = 0;
    while checks < 12 || written < 40 {
        orders.insert_one(bson::doc! { "blob": &blob }).await?;
        written += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let oplog = status(&address).await?["pipelines"][0]["oplog"].clone();
        if let Some(headroom) = oplog["headroom_seconds"].as_f64() {
            assert_eq!(oplog["min_retention_hours"], 1.0, "{oplog}");
            assert!(
                headroom > 3000.0,
                "headroom {headroom} s under a 1 h retention"
            );
            assert_eq!(oplog["level"], "ok", "{oplog}");
            checks += 1;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no projection: {oplog}"
        );
    }
    let log = tidegate.log();
    assert!(oplog_alarms(&log).is_empty(), "{log}");
    tidegate.kill9();
    Ok(())
}

/// tidegate on `mongo` (a small oplog) checking the oplog every 250 ms, warning under 60 s
/// of headroom and erring under 20 s, ready; with the address of its HTTP endpoint.
async fn watch_small_oplog(
    mongo: MongoReplicaSet,
) -> anyhow::Result<(Harness, ChildProcess, String)> {
    let mut h = Harness::start().await?;
    h.mongo = mongo;
    let address = format!("127.0.0.1:{}", free_port());
    let config = h.config("", "").replace(
        "interval_ms = 200",
        "interval_ms = 200\noplog_check_interval_ms = 250\noplog_warn_headroom_secs = 60\n\
         oplog_error_headroom_secs = 20",
    );
    let path = h.write_config(
        "oplog.toml",
        &format!("{config}\n[http]\naddress = \"{address}\"\n"),
    )?;
    let tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    Ok((h, tidegate, address))
}

/// Runs Debian's Chromium headless on `url` with `action` (`--dump-dom`, or
/// `--screenshot=<file>`), in a throw-away profile, with nothing fetched from the network but
/// the page itself; returns its stdout.
async fn chromium(action: &str, url: &str) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(tidegate_testkit::chromium_path()?);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1100,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(action)
        .arg(url)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .context("chromium did not finish within 120 s")??;
    anyhow::ensure!(
        output.status.success(),
        "chromium {action} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The text of the element marked `data-field="<name>"` inside the card of unit `unit` in a
/// DOM serialised by Chromium, tags stripped and entities decoded.
fn field(dom: &str, unit: &str, name: &str) -> Option<String> {
    let card = &dom[dom.find(&format!("id=\"unit-{unit}\""))?..];
    page_field(&card[..card.find("</section>")?], name)
}

/// The text of the first element marked `data-field="<name>"` in `dom`.
fn page_field(dom: &str, name: &str) -> Option<String> {
    let at = dom.find(&format!("data-field=\"{name}\""))?;
    let open = dom[..at].rfind('<')?;
    let tag: String = dom[open + 1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let body = &dom[at..];
    let body = &body[body.find('>')? + 1..];
    let body = &body[..body.find(&format!("</{tag}>"))?];
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&nbsp;", " ")
            .replace("&amp;", "&"),
    )
}

/// The page, rendered: `/status` before, the DOM, `/status` after, retried until the two
/// `/status` agree on the figures that only move with events (counts, state, last error), so
/// the page's figures can be compared with them exactly.
async fn render(
    address: &str,
) -> anyhow::Result<(serde_json::Value, String, serde_json::Value, f64)> {
    let steady = |j: &serde_json::Value| {
        let u = &j["pipelines"][0];
        (
            u["counts"].clone(),
            u["state"].clone(),
            u["last_error"]["message"].clone(),
        )
    };
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let before = status(address).await?;
        let dom = chromium("--dump-dom", &format!("http://{address}/")).await?;
        let after = status(address).await?;
        if steady(&before) == steady(&after) {
            return Ok((before, dom, after, started.elapsed().as_secs_f64()));
        }
    }
    anyhow::bail!("/status kept changing while the page rendered")
}

/// Where the screenshots of the page are kept after the test, to look at.
fn screenshot_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// The status page in a real browser (Debian's Chromium, headless, offline): it renders, shows
/// per unit its state, last error, snapshot progress, rates, lag, checkpoint age, oplog
/// headroom and two inline SVG graphs, and its figures are those of `/status`. A unit that
/// retries says why, on the page and in `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_and_matches_status() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let address = format!("127.0.0.1:{}", free_port());
    write_range(h.collection().await?, 1000, 1040, 40, Duration::ZERO).await?;
    let config = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        "full_document = \"update-lookup\"\nsnapshot = \"initial\"",
    );
    let path = h.write_config(
        "page.toml",
        &format!("{config}\n[http]\naddress = \"{address}\"\n"),
    )?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_for_messages(STREAM, 40, Duration::from_secs(60))
        .await?;
    write_range(h.collection().await?, 0, 60, 20, Duration::ZERO).await?;
    h.wait_settled(STREAM, 100, Duration::from_secs(60)).await?;
    // Two history samples (5 s apart) give the graphs a line; the oplog's second reading
    // (10 s) a projection.
    wait_until(
        "history and oplog headroom",
        Duration::from_secs(60),
        || {
            let address = address.clone();
            async move {
                let Ok(json) = status(&address).await else {
                    return false;
                };
                let unit = &json["pipelines"][0];
                unit["history"]["events_per_second"]
                    .as_array()
                    .is_some_and(|h| h.len() >= 2)
                    && unit["oplog"]["headroom_seconds"].is_number()
                    && unit["checkpoint_age_seconds"].is_number()
            }
        },
    )
    .await?;

    let (before, dom, after, took) = render(&address).await?;
    let unit = &after["pipelines"][0];
    let on_page =
        |name: &str| field(&dom, PIPELINE, name).unwrap_or_else(|| panic!("{name} missing: {dom}"));
    assert_eq!(on_page("state"), "running");
    assert_eq!(on_page("read"), unit["counts"]["read"].to_string());
    assert_eq!(unit["counts"]["read"], 100);
    assert_eq!(on_page("published"), "100");
    assert_eq!(on_page("dead_lettered"), "0");
    // Rates move with each history sample (every 5 s): the page shows one of the two.
    for name in ["events_per_second", "messages_per_second"] {
        let rate = |j: &serde_json::Value| {
            format!("{:.1}", j["pipelines"][0][name].as_f64().unwrap_or(-1.0))
        };
        let shown = on_page(name);
        assert!(
            shown == rate(&before) || shown == rate(&after),
            "{name}: page {shown}, /status {} then {}",
            rate(&before),
            rate(&after)
        );
    }
    assert!(unit["events_per_second"].as_f64().is_some_and(|r| r > 0.0));
    // The snapshot: 40 documents read, finished.
    assert_eq!(unit["snapshot"]["documents"], 40);
    assert_eq!(unit["snapshot"]["active"], false);
    assert_eq!(on_page("snapshot"), "done: 40 documents");
    // Figures that move with the clock (and drop back when the position moves) lie within
    // the two readings of `/status`, give or take the time the rendering took.
    let within = |name: &str, shown: f64, f: &dyn Fn(&serde_json::Value) -> Option<f64>| {
        let (a, b) = (f(&before), f(&after));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{name} missing from /status");
        };
        let (low, high) = (a.min(b) - took - 1.0, a.max(b) + took + 1.0);
        assert!(
            low <= shown && shown <= high,
            "{name}: page {shown}, /status {a} then {b}"
        );
    };
    let lag: f64 = on_page("lag").trim_end_matches(" s").parse()?;
    within("lag", lag, &|j| j["pipelines"][0]["lag_seconds"].as_f64());
    let age: f64 = on_page("checkpoint_age").trim_end_matches(" s").parse()?;
    within("checkpoint age", age, &|j| {
        j["pipelines"][0]["checkpoint_age_seconds"].as_f64()
    });
    let headroom = on_page("oplog_headroom");
    assert!(
        headroom.starts_with("about ") && headroom.ends_with(" (ok)"),
        "{headroom}"
    );
    assert_eq!(on_page("plugins"), "none");
    assert_eq!(page_field(&dom, "ready").as_deref(), Some("ready"));
    // Two graphs per unit, drawn inline; nothing loaded from elsewhere.
    let card = &dom[dom.find("id=\"unit-orders\"").context("card")?..];
    assert!(card.matches("<svg").count() >= 2, "{dom}");
    assert!(card.contains("<polyline"), "{dom}");
    assert!(
        !dom.contains("<script") && !dom.contains("src=\"http"),
        "{dom}"
    );
    let shot = screenshot_path("status-page.png");
    chromium(
        &format!("--screenshot={}", shot.display()),
        &format!("http://{address}/"),
    )
    .await?;
    assert!(std::fs::read(&shot)?.starts_with(b"\x89PNG"));

    // MongoDB away: the unit retries, and the page and `/status` say why.
    h.mongo.kill();
    wait_until(
        "the unit retrying with a reason",
        Duration::from_secs(90),
        || {
            let address = address.clone();
            async move {
                matches!(status(&address).await, Ok(json)
                if json["pipelines"][0]["state"] == "retrying"
                    && json["pipelines"][0]["last_error"]["message"].is_string())
            }
        },
    )
    .await?;
    let (_, dom, after, _) = render(&address).await?;
    let unit = &after["pipelines"][0];
    assert_eq!(field(&dom, PIPELINE, "state").as_deref(), Some("retrying"));
    let reason = unit["last_error"]["message"].as_str().context("message")?;
    assert!(!reason.is_empty());
    assert_eq!(field(&dom, PIPELINE, "last_error").as_deref(), Some(reason));
    assert_eq!(page_field(&dom, "ready").as_deref(), Some("not ready"));
    assert!(dom.contains("pipeline orders: retrying"), "{dom}");
    assert!(!dom.contains("mongodb://") && !after.to_string().contains("mongodb://"));
    let shot = screenshot_path("status-page-retrying.png");
    chromium(
        &format!("--screenshot={}", shot.display()),
        &format!("http://{address}/"),
    )
    .await?;

    h.mongo.restart().await?;
    wait_until("running again", Duration::from_secs(90), || {
        let address = address.clone();
        async move {
            matches!(status(&address).await, Ok(json) if json["pipelines"][0]["state"] == "running")
        }
    })
    .await?;
    tidegate.signal(SIGTERM)?;
    assert!(tidegate.wait_exit(Duration::from_secs(30)).await?.success());
    Ok(())
}

/// A unit run again in one process on another deployment (a reload moving a pipeline, a
/// tenant added again, the bench's rows on fresh servers) has no position until it loads or
/// writes its checkpoint: the oplog check does not call the earlier run's position lost
/// against the new deployment's younger oplog. The second run holds its tenant (its plugin's
/// `init` traps), so it never loads a checkpoint; before the fix its first oplog check said
/// `lost`, from the first run's position, and logged "older than the oplog's oldest entry"
/// (a thousand such errors at the start of the tenants bench's K = 1000 rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_run_again_elsewhere_keeps_no_stale_position() -> anyhow::Result<()> {
    const UNIT: &str = "moved.t";
    let h = Harness::start().await?;
    let trapping = wat_filter(h.dir.path(), "trap", 1, "", "unreachable", "");
    let config = |mongo: &str, plugin: &str| {
        format!(
            r#"
plugin_dir = "{plugin_dir}"
[nats]
url = "{nats}"
[[pipeline]]
id = "moved"
mongodb_uri = "{mongo}"
database = "shop"
[pipeline.checkpoint]
interval_ms = 200
oplog_check_interval_ms = 250
[[pipeline.tenant]]
id = "t"
namespaces = ["shop.orders"]
[pipeline.tenant.sink]
stream = "MOVED"
subject_prefix = "moved"
{plugin}
"#,
            plugin_dir = h.plugins.display(),
            nats = h.nats.url(),
        )
    };
    let metrics = tidegate::ops::metrics::pipeline(UNIT);

    // Run 1, on the harness's replica set: a checkpoint, so a position in the metrics.
    let path = h.write_config("first.toml", &config(&h.mongo.uri(), ""))?;
    let first = InProcess::start(&path)?;
    h.wait_checkpoints(&[UNIT]).await?;
    wait_until("run 1's position", Duration::from_secs(60), || async {
        metrics.checkpoint_position_secs().is_some()
    })
    .await?;
    first.stop().await?;
    let position = metrics
        .checkpoint_position_secs()
        .context("run 1's position")?;

    // Another deployment, whose oplog begins after run 1's position.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let elsewhere = MongoReplicaSet::start().await?;
    let (oldest, _) = tidegate::ops::oplog::ends(&elsewhere.client().await?)
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        i64::from(oldest.time) > position,
        "the new oplog ({}) does not begin after run 1's position ({position})",
        oldest.time
    );

    // Run 2 there, the tenant held: it never loads its checkpoint.
    let plugin = format!(
        "[[pipeline.tenant.plugins]]\nname = \"trap\"\nfile = \"{}\"",
        trapping.display()
    );
    let path = h.write_config("second.toml", &config(&elsewhere.uri(), &plugin))?;
    let second = InProcess::start(&path)?;
    // Two checks after the first one: the unit was watched before and after its start.
    let mut checks = std::collections::BTreeSet::new();
    wait_until(
        "three oplog checks in run 2",
        Duration::from_secs(120),
        || {
            if let Some(status) = metrics.oplog() {
                checks.insert(status.checked_at_unix_ms);
                assert_ne!(
                    status.level,
                    tidegate::ops::oplog::Level::Lost,
                    "run 1's position reported lost against the new oplog: {status:?}"
                );
            }
            std::future::ready(checks.len() >= 3)
        },
    )
    .await?;
    assert_eq!(metrics.checkpoint_position_secs(), None);
    second.stop().await?;
    Ok(())
}
