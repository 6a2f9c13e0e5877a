//! Delivery at every edge, against real servers: a replica set electing a new primary (by
//! step-down and by SIGKILL) while writes go on with `w: "majority"`, nats-server SIGKILLed,
//! a NATS outage outlasting the publisher's backoff with a SIGTERM in the middle, and
//! tidegate SIGKILLed in the first second of fresh pipelines. Every test checks the stream
//! with its own client: every event exactly once, in order.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bson::doc;
use support::{assert_exactly_once_in_order, header, seqs, write_range, Harness, SIGTERM, STREAM};
use tidegate_testkit::{
    stream_len, stream_messages, wait_until, ChildProcess, MongoReplicaSet3, NatsServer,
};

/// Generous ceiling for anything a busy machine may be slow at.
const PATIENCE: Duration = Duration::from_secs(180);

/// The standard one-pipeline config (see `Harness::config`) for any MongoDB and NATS.
fn config(plugins: &Path, nats: &str, mongo: &str, id: &str, stream: &str, extra: &str) -> String {
    format!(
        r#"
plugin_dir = "{plugins}"

[nats]
url = "{nats}"
ack_timeout_ms = 2000

[[pipeline]]
id = "{id}"
mongodb_uri = "{mongo}"
database = "shop"
collections = ["orders"]
{extra}

[pipeline.sink]
stream = "{stream}"
subject_prefix = "cdc_{id}"

[pipeline.checkpoint]
interval_ms = 200
"#,
        plugins = plugins.display(),
    )
}

/// The `seq` of the last message in `stream`, if any.
async fn last_seq(client: &async_nats::Client, stream: &str) -> Option<i64> {
    let js = async_nats::jetstream::new(client.clone());
    let mut handle = js.get_stream(stream).await.ok()?;
    let last = handle.info().await.ok()?.state.last_sequence;
    let message = handle.get_raw_message(last).await.ok()?;
    seqs(std::slice::from_ref(&message)).first().copied()
}

fn spawn(config: &Path) -> anyhow::Result<ChildProcess> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"));
    cmd.arg("run").arg("--config").arg(config);
    ChildProcess::spawn(cmd)
}

/// Waits until `stream` holds `count` messages and a little longer (a late duplicate would
/// show), then returns them.
async fn settled(
    client: &async_nats::Client,
    stream: &str,
    count: u64,
) -> anyhow::Result<Vec<StreamMessage>> {
    wait_until(&format!("{count} messages in {stream}"), PATIENCE, || {
        let client = client.clone();
        async move { stream_len(&client, stream).await >= count }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(750)).await;
    stream_messages(client, stream).await
}

/// Inserts `{_id: seq, seq}` for `from..to` one at a time, acknowledged by a majority,
/// retrying each through elections: a write whose outcome was lost is retried, and a
/// duplicate-key refusal then means it had landed. `written` follows progress.
async fn write_through_elections(
    coll: mongodb::Collection<bson::Document>,
    from: i64,
    to: i64,
    written: std::sync::Arc<std::sync::atomic::AtomicI64>,
) -> anyhow::Result<()> {
    for seq in from..to {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            match coll
                .insert_one(doc! { "_id": seq, "seq": seq, "pad": "x".repeat(100) })
                .await
            {
                Ok(_) => break,
                Err(err) if err.to_string().contains("E11000") => break,
                Err(err) => {
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "write {seq} kept failing: {err}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        written.store(seq + 1, std::sync::atomic::Ordering::Release);
    }
    Ok(())
}

/// A 3-member replica set loses its primary twice while writes go on with `w: "majority"`:
/// first by `replSetStepDown`, then by SIGKILL. tidegate follows the new primaries, every
/// event arrives exactly once and in order, and the log tells of each election: when the
/// primary was lost and how long it took to get one back, or (the driver can hear of the new
/// primary before it notices the old one is gone) that the primary moved, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_by_step_down_and_sigkill_lose_nothing_and_are_logged() -> anyhow::Result<()> {
    const TOTAL: i64 = 1_500;
    let plugins = tokio::task::spawn_blocking(tidegate_testkit::plugin_dir).await??;
    let (mut rs, nats) = tokio::try_join!(MongoReplicaSet3::start(), NatsServer::start())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tidegate.toml");
    std::fs::write(
        &path,
        config(&plugins, &nats.url(), &rs.uri(), "orders", STREAM, ""),
    )?;
    let mut tidegate = spawn(&path)?;
    tidegate
        .wait_for_log("change stream open", PATIENCE)
        .await?;

    let coll = rs.client().await?.database("shop").collection("orders");
    let written = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = tokio::spawn(write_through_elections(coll, 0, TOTAL, written.clone()));
    let reached = |n: i64| {
        let written = written.clone();
        async move {
            wait_until(&format!("{n} writes"), PATIENCE, || {
                let written = written.clone();
                async move { written.load(std::sync::atomic::Ordering::Acquire) >= n }
            })
            .await
        }
    };
    reached(300).await?;
    rs.step_down().await?;
    reached(800).await?;
    // tidegate's driver has a primary again (the step-down is told in full) before the
    // next election, so that the two cannot merge into one gap.
    wait_until(
        "tidegate's log to tell of the first election",
        PATIENCE,
        || {
            let told = elections_told(&tidegate.log());
            async move { told.regained >= 1 || told.moved >= 1 }
        },
    )
    .await
    .map_err(|err| anyhow::anyhow!("{err}; log:\n{}", tidegate.log()))?;
    let before_kill = elections_told(&tidegate.log());
    let (killed, _) = rs.kill_primary().await?;
    reached(1_100).await?;
    rs.revive(killed).await?;
    writer.await??;

    let client = nats.client().await?;
    let messages = settled(&client, STREAM, TOTAL as u64).await?;
    tidegate.signal(SIGTERM)?;
    tidegate.wait_exit(PATIENCE).await?;
    assert_exactly_once_in_order(&messages, TOTAL);
    let log = tidegate.log();
    let told = elections_told(&log);
    // Each gap without a primary is told twice: a warning, then a line with its duration
    // (however the driver saw the elections, each as a gap or as a move).
    assert!(told.lost + told.moved >= 2, "two elections told:\n{log}");
    assert_eq!(
        told.regained, told.lost,
        "every gap's end, with its duration:\n{log}"
    );
    // The SIGKILL is told either way: a new gap, or the primary moving.
    assert!(
        told.lost + told.moved > before_kill.lost + before_kill.moved,
        "no line for the election after the SIGKILL:\n{log}"
    );
    Ok(())
}

/// What tidegate's log has said about elections so far.
struct ElectionsTold {
    lost: usize,
    regained: usize,
    moved: usize,
}

fn elections_told(log: &str) -> ElectionsTold {
    ElectionsTold {
        lost: log.matches("MongoDB has no primary").count(),
        regained: log.matches("MongoDB has a primary again after").count(),
        moved: log.matches("MongoDB's primary moved from").count(),
    }
}

/// nats-server is SIGKILLed (no clean shutdown) while events are written, and started again:
/// nothing is lost or duplicated, and the log reports the disconnect and the reconnect once
/// each, the reconnect with how long NATS was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sigkill_mid_stream_loses_nothing_and_is_logged_once() -> anyhow::Result<()> {
    const TOTAL: i64 = 3_000;
    let mut h = Harness::start().await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let writer = tokio::spawn(write_range(
        h.collection().await?,
        0,
        TOTAL,
        30,
        Duration::from_millis(20),
    ));
    h.wait_for_messages(STREAM, 200, PATIENCE).await?;
    h.nats.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.nats.start_again().await?;
    writer.await??;
    let messages = h.wait_settled(STREAM, TOTAL as u64, PATIENCE).await?;
    tidegate.signal(SIGTERM)?;
    let status = tidegate.wait_exit(PATIENCE).await?;
    let log = tidegate.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert_exactly_once_in_order(&messages, TOTAL);
    assert_eq!(
        log.matches("NATS disconnected").count(),
        1,
        "one disconnect line:\n{log}"
    );
    assert_eq!(
        log.matches("NATS reconnected after").count(),
        1,
        "one reconnect line, with the outage's length:\n{log}"
    );
    assert!(
        !log.contains("didn't receive ack in time:  "),
        "publish failures carry their detail:\n{log}"
    );
    Ok(())
}

/// NATS is away longer than the publisher's backoff cap (5 s) and tidegate gets SIGTERM in
/// the middle: it exits within `shutdown_timeout_secs` (plus a margin), non-zero, saying how
/// much it left unpublished; after NATS is back, the restart publishes everything, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_long_nats_outage_exits_in_time_and_loses_nothing() -> anyhow::Result<()> {
    const TOTAL: i64 = 600;
    const SHUTDOWN_TIMEOUT_SECS: u64 = 4;
    let mut h = Harness::start().await?;
    let text = h.config("", "").replace(
        "full_document = \"update-lookup\"",
        &format!(
            "full_document = \"update-lookup\"\nshutdown_timeout_secs = {SHUTDOWN_TIMEOUT_SECS}"
        ),
    );
    let path = h.write_config("tidegate.toml", &text)?;
    let mut tidegate = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let coll = h.collection().await?;
    write_range(coll.clone(), 0, 200, 50, Duration::ZERO).await?;
    h.wait_for_messages(STREAM, 200, PATIENCE).await?;

    h.nats.kill9();
    // Read from MongoDB, unpublishable: they wait in the pipeline.
    write_range(coll.clone(), 200, 400, 50, Duration::ZERO).await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    tidegate.signal(SIGTERM)?;
    let signalled = std::time::Instant::now();
    let status = tidegate
        .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS) + Duration::from_secs(60))
        .await?;
    let log = tidegate.log();
    assert!(!status.success(), "non-zero exit: {status:?}\n{log}");
    assert!(
        log.contains("shutdown timeout"),
        "says what was left:\n{log}"
    );
    assert!(
        log.contains("unacknowledged_messages="),
        "counts what was left:\n{log}"
    );
    // Not a timing assertion of tidegate's speed: the bound is the configured timeout, with
    // a minute to spare for a busy machine.
    assert!(signalled.elapsed() < Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 60));

    h.nats.start_again().await?;
    write_range(coll, 400, TOTAL, 50, Duration::ZERO).await?;
    let mut again = h.spawn_binary(&path)?;
    let messages = h.wait_settled(STREAM, TOTAL as u64, PATIENCE).await?;
    again.signal(SIGTERM)?;
    assert!(
        again.wait_exit(PATIENCE).await?.success(),
        "{}",
        again.log()
    );
    assert_exactly_once_in_order(&messages, TOTAL);
    Ok(())
}

/// The first second of a fresh pipeline: tidegate is SIGKILLed at a random moment within a
/// second of its change stream opening, repeatedly, while writes go on; a pipeline that had
/// published something must never restart "from now". Each round is a new pipeline (its own
/// id and stream). In the end every stream holds a gap-free run of events, each once, in
/// order, up to the last one written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_first_second_of_fresh_pipelines_loses_nothing() -> anyhow::Result<()> {
    const ROUNDS: usize = 4;
    const KILLS_PER_ROUND: usize = 3;
    let h = Harness::start().await?;
    let coll = h.collection().await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let coll = coll.clone();
        tokio::spawn(async move {
            let mut next = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                write_range(coll.clone(), next, next + 10, 10, Duration::ZERO).await?;
                next += 10;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            anyhow::Ok(next)
        })
    };
    // A 5 s checkpoint interval leaves the first second without a periodic checkpoint.
    let configs: Vec<_> = (0..ROUNDS)
        .map(|r| {
            let text = config(
                &h.plugins,
                &h.nats.url(),
                &h.mongo.uri(),
                &format!("fresh{r}"),
                &format!("FRESH{r}"),
                "",
            )
            .replace("interval_ms = 200", "interval_ms = 5000");
            h.write_config(&format!("fresh{r}.toml"), &text)
        })
        .collect::<Result<_, _>>()?;
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    let mut published_before_a_kill = 0;
    for (r, path) in configs.iter().enumerate() {
        for _ in 0..KILLS_PER_ROUND {
            let mut tidegate = h.spawn_binary(path)?;
            tidegate
                .wait_for_log("change stream open", PATIENCE)
                .await?;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            tokio::time::sleep(Duration::from_millis(rng % 1000)).await;
            tidegate.kill9();
            if stream_len(&h.nats_client().await?, &format!("FRESH{r}")).await > 0 {
                published_before_a_kill += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let total = writer.await??;

    let client = h.nats_client().await?;
    for (r, path) in configs.iter().enumerate() {
        let stream = format!("FRESH{r}");
        let mut tidegate = h.spawn_binary(path)?;
        // Caught up once the last document written is in.
        wait_until(
            &format!("{stream} reaches seq {}", total - 1),
            PATIENCE,
            || {
                let client = client.clone();
                let stream = stream.clone();
                async move { last_seq(&client, &stream).await == Some(total - 1) }
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(750)).await;
        let messages = stream_messages(&client, &stream).await?;
        tidegate.signal(SIGTERM)?;
        tidegate.wait_exit(PATIENCE).await?;
        let got = seqs(&messages);
        let first = got.first().copied().unwrap_or(-1);
        let expected: Vec<i64> = (first..total).collect();
        if got != expected {
            let missing: Vec<i64> = expected
                .iter()
                .filter(|s| !got.contains(s))
                .take(10)
                .copied()
                .collect();
            panic!(
                "{stream}: {} messages from seq {first}, expected {} gap-free up to {}; \
                 missing (first 10): {missing:?}\n{}",
                got.len(),
                expected.len(),
                total - 1,
                tidegate.log()
            );
        }
        let ids: HashSet<String> = messages
            .iter()
            .filter_map(|m| header(m, "Nats-Msg-Id"))
            .collect();
        assert_eq!(ids.len(), messages.len(), "{stream}: unique ids");
    }
    assert!(
        published_before_a_kill > 0,
        "some kill came after the first publish (else the test proved nothing)"
    );
    Ok(())
}
