//! High availability, against real servers: three instances of the real binary share one
//! pipeline through a lease in NATS KV. The owner is SIGKILLed mid-stream, then the next owner
//! is suspended (SIGSTOP) past its lease and resumed (SIGCONT); the stream must still hold
//! every event exactly once, in order. And with many pipelines, instances balance them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::{
    assert_exactly_once_in_order, write_range, Harness, SIGCONT, SIGSTOP, SIGTERM, STREAM,
};
use tidegate_testkit::{wait_until, ChildProcess};

const BUCKET: &str = "tidegate-leases";
const TTL_MS: u64 = 2000;

fn ha_section(instance: &str) -> String {
    format!("[ha]\nenabled = true\nlease_ttl_ms = {TTL_MS}\ninstance = \"{instance}\"\n")
}

/// The instance holding `lease.<pipeline>` now, if any.
async fn owner(h: &Harness, pipeline: &str) -> anyhow::Result<Option<String>> {
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let Ok(kv) = js.get_key_value(BUCKET).await else {
        return Ok(None);
    };
    Ok(match kv.get(format!("lease.{pipeline}")).await? {
        Some(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)?["instance"]
            .as_str()
            .map(str::to_string),
        None => None,
    })
}

/// Waits until the lease of `pipeline` is held by an instance other than `not`; returns it.
async fn wait_owner_other_than(
    h: &Harness,
    pipeline: &str,
    not: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(now) = owner(h, pipeline).await? {
            if Some(now.as_str()) != not {
                return Ok(now);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no new owner of {pipeline} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The issue's "done when": three instances; the owner SIGKILLed mid-stream; the next owner
/// suspended past its lease and resumed while a third one has taken over. Every event ends up
/// in the stream exactly once, in order, and the woken owner says it stopped writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_then_owner_suspended_stream_stays_exactly_once() -> anyhow::Result<()> {
    const TOTAL: i64 = 6_000;
    let h = Harness::start().await?;
    let mut instances: BTreeMap<String, ChildProcess> = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let config = format!("{}\n{}", h.config("", ""), ha_section(name));
        let path = h.write_config(&format!("{name}.toml"), &config)?;
        instances.insert(name.to_string(), h.spawn_binary(&path)?);
    }
    h.wait_ready().await?;
    let first = wait_owner_other_than(&h, "orders", None, Duration::from_secs(120)).await?;

    let writer = tokio::spawn(write_range(
        h.collection().await?,
        0,
        TOTAL,
        20,
        Duration::from_millis(15),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 1. SIGKILL the owner mid-stream.
    let killed_at = Instant::now();
    instances.get_mut(&first).expect("owner").kill9();
    let second =
        wait_owner_other_than(&h, "orders", Some(&first), Duration::from_secs(120)).await?;
    let takeover = killed_at.elapsed();
    eprintln!("takeover after SIGKILL: {takeover:?} (lease TTL {TTL_MS} ms)");
    // Documented bound: TTL × 1.2 + the server's expiry timer (~1 s) + slack for a busy box.
    assert!(
        takeover < Duration::from_millis(TTL_MS * 12 / 10 + 3000),
        "takeover took {takeover:?}"
    );

    // 2. Let the second owner publish for a while, then suspend it past its lease.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    instances[&second].signal(SIGSTOP)?;
    let third =
        wait_owner_other_than(&h, "orders", Some(&second), Duration::from_secs(120)).await?;
    assert_ne!(third, first, "the killed instance cannot take over");
    // The third owner publishes meanwhile; then the suspended one wakes up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    instances[&second].signal(SIGCONT)?;
    instances[&second]
        .wait_for_log("stopped writing, standing by", Duration::from_secs(120))
        .await?;

    writer.await??;
    let messages = h
        .wait_settled(STREAM, TOTAL as u64, Duration::from_secs(120))
        .await?;
    assert_eq!(owner(&h, "orders").await?.as_deref(), Some(third.as_str()));
    for name in [&second, &third] {
        let child = instances.get_mut(name).expect("instance");
        child.signal(SIGTERM)?;
        let status = child.wait_exit(Duration::from_secs(120)).await?;
        assert!(status.success(), "{name}: {status:?}\n{}", child.log());
    }
    assert_exactly_once_in_order(&messages, TOTAL);
    Ok(())
}

/// Six pipelines, three instances: each instance ends up running two. When one instance is
/// killed, the other two share its pipelines, and every pipeline relays its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_balance_pipelines() -> anyhow::Result<()> {
    const PIPELINES: usize = 6;
    let h = Harness::start().await?;
    let mut pipelines = String::new();
    for i in 0..PIPELINES {
        pipelines.push_str(&format!(
            r#"
[[pipeline]]
id = "p{i}"
mongodb_uri = "{mongo}"
database = "shop"
collections = ["c{i}"]

[pipeline.sink]
stream = "S{i}"
subject_prefix = "s{i}"

[pipeline.checkpoint]
interval_ms = 200
"#,
            mongo = h.mongo.uri()
        ));
    }
    let mut instances = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let config = format!(
            "[nats]\nurl = \"{}\"\n{pipelines}\n{}",
            h.nats.url(),
            ha_section(name)
        );
        let path = h.write_config(&format!("{name}.toml"), &config)?;
        instances.insert(name.to_string(), h.spawn_binary(&path)?);
    }

    let counts = |owners: Vec<Option<String>>| {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for owner in owners.into_iter().flatten() {
            *counts.entry(owner).or_default() += 1;
        }
        counts
    };
    let owners = || async {
        let mut all = Vec::new();
        for i in 0..PIPELINES {
            all.push(owner(&h, &format!("p{i}")).await.unwrap_or(None));
        }
        all
    };
    wait_until(
        "two pipelines per instance",
        Duration::from_secs(120),
        || async {
            let c = counts(owners().await);
            c.len() == 3 && c.values().all(|&n| n == 2)
        },
    )
    .await?;

    instances.get_mut("a").expect("a").kill9();
    wait_until(
        "three pipelines per surviving instance",
        Duration::from_secs(120),
        || async {
            let c = counts(owners().await);
            c.get("b") == Some(&3) && c.get("c") == Some(&3)
        },
    )
    .await?;

    // Every pipeline relays (its checkpoint exists once its change stream is open).
    let js = async_nats::jetstream::new(h.nats_client().await?);
    wait_until(
        "every pipeline checkpointed",
        Duration::from_secs(120),
        || {
            let js = js.clone();
            async move {
                let Ok(kv) = js.get_key_value("tidegate-checkpoints").await else {
                    return false;
                };
                for i in 0..PIPELINES {
                    if !matches!(kv.get(format!("p{i}")).await, Ok(Some(_))) {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await?;
    let db = h.mongo.client().await?.database("shop");
    for i in 0..PIPELINES {
        db.collection::<bson::Document>(&format!("c{i}"))
            .insert_one(bson::doc! { "seq": 0 })
            .await?;
    }
    for i in 0..PIPELINES {
        h.wait_for_messages(&format!("S{i}"), 1, Duration::from_secs(120))
            .await?;
    }
    for name in ["b", "c"] {
        let child = instances.get_mut(name).expect("instance");
        child.signal(SIGTERM)?;
        let status = child.wait_exit(Duration::from_secs(120)).await?;
        assert!(status.success(), "{name}: {status:?}\n{}", child.log());
    }
    Ok(())
}

/// A rolling restart: the owner gets SIGTERM mid-stream, drains, checkpoints and releases
/// its lease, so the standby takes over at once (well within a lease's TTL); the owner
/// restarts as a standby. Nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_without_waiting_for_the_lease() -> anyhow::Result<()> {
    const TOTAL: i64 = 3_000;
    let h = Harness::start().await?;
    let mut instances: BTreeMap<String, ChildProcess> = BTreeMap::new();
    let mut paths = BTreeMap::new();
    for name in ["a", "b"] {
        // A long TTL: a handover within it can only come from the released lease.
        let config = format!("{}\n{}", h.config("", ""), ha_section(name))
            .replace(&format!("lease_ttl_ms = {TTL_MS}"), "lease_ttl_ms = 20000");
        let path = h.write_config(&format!("{name}.toml"), &config)?;
        instances.insert(name.to_string(), h.spawn_binary(&path)?);
        paths.insert(name.to_string(), path);
    }
    h.wait_ready().await?;
    let first = wait_owner_other_than(&h, "orders", None, Duration::from_secs(120)).await?;
    let writer = tokio::spawn(write_range(
        h.collection().await?,
        0,
        TOTAL,
        20,
        Duration::from_millis(15),
    ));
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let stopped_at = Instant::now();
    let owner_process = instances.get_mut(&first).expect("owner");
    owner_process.signal(SIGTERM)?;
    let status = owner_process.wait_exit(Duration::from_secs(120)).await?;
    assert!(status.success(), "{}", owner_process.log());
    assert!(
        owner_process.log().contains("lease released"),
        "{}",
        owner_process.log()
    );
    let second =
        wait_owner_other_than(&h, "orders", Some(&first), Duration::from_secs(120)).await?;
    let handover = stopped_at.elapsed();
    eprintln!("handover after SIGTERM: {handover:?} (lease TTL 20 s)");
    assert!(
        handover < Duration::from_secs(5),
        "handover took {handover:?}"
    );
    // The restarted instance stands by.
    instances.insert(first.clone(), h.spawn_binary(&paths[&first])?);

    writer.await??;
    let messages = h
        .wait_settled(STREAM, TOTAL as u64, Duration::from_secs(120))
        .await?;
    assert_eq!(owner(&h, "orders").await?.as_deref(), Some(second.as_str()));
    for child in instances.values_mut() {
        child.signal(SIGTERM)?;
        assert!(child.wait_exit(Duration::from_secs(120)).await?.success());
    }
    assert_exactly_once_in_order(&messages, TOTAL);
    Ok(())
}

/// The publisher of a deposed owner, against a real stream: another instance has published
/// past it (and the duplicate window has passed, so its own re-publish is not simply
/// deduplicated). The stream refuses its next message with "wrong last msg ID: X", X not
/// among its own in flight: it must stop and give up the pipeline, never skip ahead or
/// store anything. With a fence that tolerates a foreign tail (lease kept, earlier owner's
/// leftovers) it falls back to deduplication like a single instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_publisher_stops_at_a_foreign_last_message() -> anyhow::Result<()> {
    use tidegate::ha::fence::Fence;
    use tidegate::model::Position;
    use tidegate::sink::{EventMessages, Publisher};
    let h = Harness::start().await?;
    h.create_stream(&["cdc.>"], Duration::from_secs(1)).await?;
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let (token, message) = (support::numbered_token, support::numbered_message);
    // The new owner stored 0..=5.
    support::store_numbered(&js, 0..6).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stored = || async {
        anyhow::Ok(
            h.messages(STREAM)
                .await?
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .collect::<Vec<_>>(),
        )
    };
    let before = stored().await?;

    let config = tidegate::Config::parse(&h.config("", ""), std::path::Path::new("."), |_| None)
        .map_err(anyhow::Error::msg)?;
    let start = Position {
        token: token(0)?,
        last_msg_id: Some(message(0).msg_id),
        snapshot: None,
    };
    let run = |fence: Fence| {
        let (js, sink, start) = (js.clone(), config.pipelines[0].sink.clone(), start.clone());
        async move {
            // The deposed owner, still at its checkpoint 0, with 1 and 2 to publish.
            let mut publisher = Publisher::new(js, "p", &sink, Some(start), fence.clone());
            for n in 1..3 {
                publisher
                    .push(EventMessages {
                        messages: vec![message(n)],
                        token: token(n)?,
                        snapshot: None,
                        commit_unix_ms: None,
                    })
                    .await;
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            // (A pipeline stops as soon as its fence is lost.)
            while !publisher.is_idle() && fence.holds() && Instant::now() < deadline {
                let result =
                    tokio::time::timeout(Duration::from_secs(3), publisher.next_ack()).await;
                match result {
                    Ok(result) => publisher.handle_ack(result).await,
                    Err(_) => break,
                }
            }
            anyhow::Ok(publisher.position().cloned())
        }
    };

    let fence = Fence::leased(tokio::time::Instant::now() + Duration::from_secs(60));
    let position = run(fence.clone()).await?;
    assert!(!fence.holds(), "the publisher gave up the pipeline");
    assert!(fence.saw_foreign_tail());
    assert!(fence.reason().contains("p:0005:0"), "{}", fence.reason());
    assert_eq!(
        position.and_then(|p| p.last_msg_id),
        Some(message(0).msg_id),
        "no skipping"
    );
    assert_eq!(stored().await?, before, "nothing stored");

    let tolerant =
        Fence::tolerating_foreign_tail(tokio::time::Instant::now() + Duration::from_secs(60));
    let position = run(tolerant.clone()).await?;
    assert!(tolerant.holds());
    assert_eq!(
        position.and_then(|p| p.last_msg_id),
        Some(message(2).msg_id)
    );
    Ok(())
}

/// Without `[ha]`, the same config started twice by mistake: the second instance claims the
/// checkpoint, so the first one's next checkpoint write fails and it stops with an error that
/// says so, instead of both writing on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_without_ha_stops_the_first() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let path = h.write_config("tidegate.toml", &h.config("", ""))?;
    let mut first = h.spawn_binary(&path)?;
    h.wait_ready().await?;
    let mut second = h.spawn_binary(&path)?;
    second
        .wait_for_log("change stream open", Duration::from_secs(120))
        .await?;
    write_range(h.collection().await?, 0, 100, 50, Duration::ZERO).await?;
    let status = first.wait_exit(Duration::from_secs(120)).await?;
    let log = first.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("another instance has taken this pipeline over"),
        "{log}"
    );
    let messages = h
        .wait_settled(STREAM, 100, Duration::from_secs(120))
        .await?;
    second.signal(SIGTERM)?;
    assert!(second.wait_exit(Duration::from_secs(120)).await?.success());
    assert_exactly_once_in_order(&messages, 100);
    Ok(())
}

/// Checkpoint fencing on both stores, against real servers: once a new owner has loaded
/// (and so claimed) the checkpoint, the old owner's next write is refused and its fence is
/// revoked, while the new owner writes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_checkpoint_fences_the_previous_writer() -> anyhow::Result<()> {
    use tidegate::checkpoint::CheckpointStore;
    use tidegate::config::{CheckpointConfig, CheckpointStoreKind};
    use tidegate::ha::fence::Fence;
    use tidegate::model::Position;
    let h = Harness::start().await?;
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let mongo = h.mongo.client().await?;
    let position = |n: u32| -> anyhow::Result<Position> {
        Ok(Position {
            token: bson::deserialize_from_bson(bson::Bson::Document(
                bson::doc! { "_data": format!("{n:04}") },
            ))?,
            last_msg_id: Some(format!("p:{n:04}:0")),
            snapshot: None,
        })
    };
    for store in [CheckpointStoreKind::NatsKv, CheckpointStoreKind::Mongodb] {
        let config = CheckpointConfig {
            store,
            ..Default::default()
        };
        let lease = || Fence::leased(tokio::time::Instant::now() + Duration::from_secs(60));
        let (old_fence, new_fence) = (lease(), lease());
        let old = CheckpointStore::open(&config, "p", &js, &mongo, old_fence.clone()).await?;
        old.load().await?;
        old.save(&position(1)?).await?;
        old.save(&position(2)?).await?;

        let new = CheckpointStore::open(&config, "p", &js, &mongo, new_fence.clone()).await?;
        assert_eq!(new.load().await?, Some(position(2)?), "{store:?}");
        let refused = old.save(&position(3)?).await;
        assert!(
            matches!(refused, Err(tidegate::Error::Fenced { .. })),
            "{store:?}: {refused:?}"
        );
        assert!(!old_fence.holds(), "{store:?}");
        new.save(&position(4)?).await?;
        assert!(new_fence.holds(), "{store:?}");
        assert_eq!(new.load().await?, Some(position(4)?), "{store:?}");
    }
    Ok(())
}
