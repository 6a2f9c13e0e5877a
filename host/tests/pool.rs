//! The plugin worker pool, tenant quotas and the metrics' cardinality guard against real
//! servers: many tenants run on a few threads, a CPU hog does not starve its neighbour, a
//! rate quota throttles without losing anything, and tenant labels stop at their cap.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use bson::doc;
use support::{assert_exactly_once_in_order, header, metric, scrape, Harness, DB};
use tidegate_testkit::free_port;

/// The head of a config: two pool workers, the HTTP endpoint at `address` with at most
/// `max_tenant_series` tenant labels, and one pipeline `id` on the `shop` database whose
/// tenants follow.
fn head(h: &Harness, address: &str, max_tenant_series: usize, id: &str) -> String {
    format!(
        r#"
plugin_dir = "{plugins}"

[sandbox]
workers = 2

[http]
address = "{address}"
max_tenant_series = {max_tenant_series}

[nats]
url = "{nats}"
ack_timeout_ms = 2000

[[pipeline]]
id = "{id}"
mongodb_uri = "{mongo}"
database = "{DB}"
[pipeline.checkpoint]
interval_ms = 200
"#,
        plugins = h.plugins.display(),
        nats = h.nats.url(),
        mongo = h.mongo.uri(),
    )
}

/// One tenant `t` seeing `shop.<t>`, its stream `T`, one op-filter plugin, and `extra`
/// lines in its table.
fn tenant(t: &str, extra: &str) -> String {
    format!(
        r#"
[[pipeline.tenant]]
id = "{t}"
namespaces = ["{DB}.{t}"]
{extra}
[pipeline.tenant.sink]
stream = "{upper}"
subject_prefix = "{t}"
[[pipeline.tenant.plugins]]
name = "op-filter"
config = {{ operations = "insert,update,replace,delete" }}
"#,
        upper = t.to_uppercase()
    )
}

/// The names of the process's threads (Linux cuts them at 15 bytes).
fn threads(pid: u32) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(entry?.path().join("comm")).unwrap_or_default();
        names.push(comm.trim().to_string());
    }
    Ok(names)
}

/// Linux's `SCHED_IDLE` scheduling policy number.
const SCHED_IDLE: u32 = 5;

/// Each thread's name and scheduling policy (field 41 of `/proc/<pid>/task/<tid>/stat`).
fn policies(pid: u32) -> anyhow::Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name start at field 3 (the state).
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let policy = rest
            .split_whitespace()
            .nth(41 - 3)
            .and_then(|f| f.parse().ok());
        out.push((comm.trim().to_string(), policy.unwrap_or(u32::MAX)));
    }
    Ok(out)
}

/// Fifty tenants, each with its own plugin chain, run on the pool's two workers (and two
/// background workers, under `SCHED_IDLE`, with their settler): the process has no thread per
/// tenant, and every tenant's events arrive. With `max_tenant_series = 10`, ten tenants keep
/// their own metrics and the forty others are counted together under `tenant="_other"`, with
/// one warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tenants_share_a_bounded_pool_and_capped_labels() -> anyhow::Result<()> {
    const TENANTS: usize = 50;
    let h = Harness::start().await?;
    let address = format!("127.0.0.1:{}", free_port());
    let ids: Vec<String> = (0..TENANTS).map(|i| format!("t{i:02}")).collect();
    let mut config = head(&h, &address, 10, "fifty");
    for id in &ids {
        config.push_str(&tenant(id, ""));
    }
    let path = h.write_config("fifty.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    let units: Vec<String> = ids.iter().map(|t| format!("fifty.{t}")).collect();
    h.wait_checkpoints(&units).await?;

    let client = h.mongo.client().await?;
    for id in &ids {
        let coll = client.database(DB).collection::<bson::Document>(id);
        coll.insert_many((0..2).map(|seq| doc! { "seq": seq as i64 }))
            .await?;
    }
    for id in &ids {
        let messages = h
            .wait_settled(&id.to_uppercase(), 2, Duration::from_secs(180))
            .await?;
        assert_exactly_once_in_order(&messages, 2);
    }

    let names = threads(child.pid())?;
    let pool = names
        .iter()
        .filter(|n| n.starts_with("tidegate-plugin"))
        .count();
    // Thread names are cut to 15 characters: `tidegate-plugin` covers the two workers, the
    // two background workers and the background lane's settler.
    assert_eq!(
        pool, 5,
        "two workers, two background workers and their settler: {names:?}"
    );
    let idle = policies(child.pid())?
        .iter()
        .filter(|(name, policy)| name.starts_with("tidegate-plugin") && *policy == SCHED_IDLE)
        .count();
    assert_eq!(idle, 2, "the two background workers run under SCHED_IDLE");
    assert!(
        !names.iter().any(|n| n.starts_with("tidegate-chain")),
        "no thread per unit: {names:?}"
    );
    assert!(
        names.len() < TENANTS,
        "{} threads for {TENANTS} tenants: {names:?}",
        names.len()
    );

    let metrics = scrape(&address).await?;
    let tenants: BTreeSet<&str> = metrics
        .samples
        .iter()
        .filter(|s| s.metric == "tidegate_events_read_total")
        .filter_map(|s| s.labels.get("tenant"))
        .collect();
    assert_eq!(tenants.len(), 11, "ten tenants and _other: {tenants:?}");
    assert!(tenants.contains("_other"));
    let pipeline = [("pipeline", "fifty")];
    let read_alone: f64 = tenants
        .iter()
        .filter(|t| **t != "_other")
        .map(|t| metric(&metrics, "tidegate_events_read_total", t, &pipeline))
        .sum();
    let read_other = metric(&metrics, "tidegate_events_read_total", "_other", &pipeline);
    assert_eq!(
        (read_alone, read_other),
        (20.0, 80.0),
        "every event counted once"
    );
    child.signal(support::SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    assert_eq!(
        child
            .log()
            .matches("more tenants than http.max_tenant_series")
            .count(),
        1,
        "one warning"
    );
    Ok(())
}

/// A tenant whose plugin spins to its limit on every event (quarantine off) beside a good
/// tenant: all of the good tenant's events arrive, exactly once and in order. A third tenant
/// under `quota.events_per_sec = 100` receives all of a burst of 300 events (none dropped),
/// and its wait shows in `tidegate_quota_wait_seconds_total{quota="events_per_sec"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hog_does_not_starve_others_and_a_rate_quota_throttles_without_loss() -> anyhow::Result<()>
{
    let h = Harness::start().await?;
    let address = format!("127.0.0.1:{}", free_port());
    let mut config = head(&h, &address, 100, "quota");
    config.push_str(&tenant("good", ""));
    config.push_str(&tenant("slow", "quota = { events_per_sec = 100.0 }"));
    config.push_str(
        &tenant(
            "hog",
            "limits = { timeout_ms = 200, fuel_per_call = 1000000000000 }\n\
             quarantine = { after_failures = 0 }",
        )
        .replace("name = \"op-filter\"", "name = \"faulty\"")
        .replace(
            "config = { operations = \"insert,update,replace,delete\" }",
            "",
        ),
    );
    let path = h.write_config("quota.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["quota.good", "quota.slow", "quota.hog"])
        .await?;

    let db = h.mongo.client().await?.database(DB);
    const HOG_EVENTS: u64 = 8;
    let (good, slow, hog) = (
        db.collection::<bson::Document>("good"),
        db.collection::<bson::Document>("slow"),
        db.collection::<bson::Document>("hog"),
    );
    // A few only: breaches in a row double the hog's pause up to 5 s each, so every further
    // event adds 5 s to the wait for the last dead letter.
    hog.insert_many((0..HOG_EVENTS).map(|seq| doc! { "seq": seq as i64, "spin": true }))
        .await?;
    slow.insert_many((0..300).map(|seq| doc! { "seq": seq as i64 }))
        .await?;
    for batch in 0..20i64 {
        good.insert_many((0..10).map(|i| doc! { "seq": batch * 10 + i }))
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let good_messages = h
        .wait_settled("GOOD", 200, Duration::from_secs(180))
        .await?;
    assert_exactly_once_in_order(&good_messages, 200);
    let slow_messages = h
        .wait_settled("SLOW", 300, Duration::from_secs(180))
        .await?;
    assert_exactly_once_in_order(&slow_messages, 300);
    // Every hog event was dead-lettered (its deadline), none lost.
    h.wait_settled("HOG", HOG_EVENTS, Duration::from_secs(180))
        .await?;

    let metrics = scrape(&address).await?;
    let pipeline = [("pipeline", "quota")];
    let waited = metric(
        &metrics,
        "tidegate_quota_wait_seconds_total",
        "slow",
        &[("pipeline", "quota"), ("quota", "events_per_sec")],
    );
    assert!(
        waited > 0.0,
        "the events/s quota made the unit wait: {waited}"
    );
    for t in ["good", "slow", "hog"] {
        assert!(
            metric(&metrics, "tidegate_chain_cpu_seconds_total", t, &pipeline) > 0.0,
            "{t}'s chain CPU is counted"
        );
    }
    assert_eq!(
        metric(
            &metrics,
            "tidegate_quota_wait_seconds_total",
            "good",
            &[("pipeline", "quota"), ("quota", "events_per_sec")],
        ),
        0.0,
        "no quota, no wait"
    );
    child.signal(support::SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    Ok(())
}

/// Tenants whose plugin asks to sleep an hour on every event (a wait on a monotonic-clock
/// pollable: a host call, which the epoch deadline cannot cut), beside a good tenant, on a
/// pool of two workers. Three of them have no `clock` grant: their waits end at once and their
/// events are published (the plugin's clock unmoved). One has the grant and a 200 ms
/// deadline: each wait fails its call at once as a `deadline`, a dead letter. The good
/// tenant's events all arrive, once and in order. Had a wait blocked, the first two sleeping
/// events would have held both workers for an hour and nothing below would have arrived
/// within the two-minute ceilings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_that_sleep_cannot_hold_the_pool() -> anyhow::Result<()> {
    const HOUR_MS: i64 = 3_600_000;
    const SLEEPY_EVENTS: u64 = 3;
    let h = Harness::start().await?;
    let address = format!("127.0.0.1:{}", free_port());
    let mut config = head(&h, &address, 100, "sleepy");
    config.push_str(&tenant("good", ""));
    let snoop = |t: &str, extra: &str| {
        tenant(t, extra)
            .replace("name = \"op-filter\"", "name = \"snoop\"")
            .replace(
                "config = { operations = \"insert,update,replace,delete\" }",
                "",
            )
    };
    let sleepers = ["nap1", "nap2", "nap3"];
    for t in sleepers {
        config.push_str(&snoop(t, ""));
    }
    config.push_str(&snoop(
        "waiter",
        "capabilities = { clock = true }\n\
         limits = { timeout_ms = 200 }\n\
         quarantine = { after_failures = 0 }",
    ));
    let path = h.write_config("sleepy.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    let units: Vec<String> = ["good", "nap1", "nap2", "nap3", "waiter"]
        .iter()
        .map(|t| format!("sleepy.{t}"))
        .collect();
    let units: Vec<&str> = units.iter().map(String::as_str).collect();
    h.wait_checkpoints(&units).await?;

    let db = h.mongo.client().await?.database(DB);
    for t in sleepers.iter().chain(&["waiter"]) {
        db.collection::<bson::Document>(t)
            .insert_many(
                (0..SLEEPY_EVENTS).map(|seq| doc! { "seq": seq as i64, "wait_ms": HOUR_MS }),
            )
            .await?;
    }
    let good = db.collection::<bson::Document>("good");
    for batch in 0..5i64 {
        good.insert_many((0..10).map(|i| doc! { "seq": batch * 10 + i }))
            .await?;
    }

    let ceiling = Duration::from_secs(120);
    let good_messages = h.wait_settled("GOOD", 50, ceiling).await?;
    assert_exactly_once_in_order(&good_messages, 50);
    for t in sleepers {
        let messages = h
            .wait_settled(&t.to_uppercase(), SLEEPY_EVENTS, ceiling)
            .await?;
        for m in &messages {
            assert_eq!(
                header(m, "X-Waited-Ms").as_deref(),
                Some("0"),
                "{t}: without the clock grant a wait ends at once"
            );
        }
    }
    let waited = h.wait_settled("WAITER", SLEEPY_EVENTS, ceiling).await?;
    for m in &waited {
        assert_eq!(
            header(m, "Tidegate-Error-Kind").as_deref(),
            Some("deadline"),
            "a wait past the deadline is a deadline dead letter"
        );
        let reason = header(m, "Tidegate-Error").unwrap_or_default();
        assert!(
            reason.contains("asked to wait"),
            "the reason names the wait: {reason}"
        );
    }
    child.signal(support::SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    Ok(())
}
