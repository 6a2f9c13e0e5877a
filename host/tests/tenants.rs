//! Multi-tenancy and the sandbox against real servers: hostile plugins in one tenant never
//! touch another tenant's events, every violation is dead-lettered with its reason, nothing
//! is lost, and plugins are swapped on disk or by SIGHUP without a restart.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bson::doc;
use support::{
    component, header, http_get, json, metric, scrape, wat_filter, Harness, InProcess, DB, SIGTERM,
};
use tidegate_testkit::{free_port, stream_len, wait_until};

/// Two tenants on one `shop` pipeline: `good` (no plugins) sees `shop.orders`; `bad` runs
/// `bad_plugins` on `shop.orders` and `shop.returns`. `bad_extra` adds keys to the bad
/// tenant's table (limits, quarantine…).
fn tenant_config(h: &Harness, plugin_dir: &Path, bad_plugins: &str, bad_extra: &str) -> String {
    format!(
        r#"
plugin_dir = "{plugin_dir}"

[nats]
url = "{nats}"
ack_timeout_ms = 2000

[[pipeline]]
id = "shop"
mongodb_uri = "{mongo}"
database = "{DB}"
full_document = "update-lookup"

[pipeline.checkpoint]
interval_ms = 200

[[pipeline.tenant]]
id = "good"
namespaces = ["shop.orders"]
[pipeline.tenant.sink]
stream = "GOOD"
subject_prefix = "good"

[[pipeline.tenant]]
id = "bad"
namespaces = ["shop.orders", "shop.returns"]
{bad_extra}
[pipeline.tenant.sink]
stream = "BAD"
subject_prefix = "bad"
{bad_plugins}
"#,
        plugin_dir = plugin_dir.display(),
        nats = h.nats.url(),
        mongo = h.mongo.uri(),
    )
}

/// Runs tidegate in-process on `config` and waits until `units` have checkpointed.
async fn start_tenants(h: &Harness, config: &str, units: &[&str]) -> anyhow::Result<InProcess> {
    let path = h.write_config("tenants.toml", config)?;
    let running = InProcess::start(&path)?;
    h.wait_checkpoints(units).await?;
    Ok(running)
}

/// Inserts `count` orders numbered from `n` on, a few milliseconds apart.
async fn write(
    orders: &mongodb::Collection<bson::Document>,
    n: &mut i64,
    count: i64,
) -> anyhow::Result<()> {
    for _ in 0..count {
        orders
            .insert_one(doc! { "n": *n, "email": "a@b.c", "name": "x" })
            .await?;
        *n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Waits until the child's log holds `line` at least `count` times.
async fn wait_for_count(
    child: &tidegate_testkit::ChildProcess,
    line: &str,
    count: usize,
) -> anyhow::Result<()> {
    wait_until(
        &format!("{count}× '{line}'"),
        Duration::from_secs(120),
        || async { child.log().matches(line).count() >= count },
    )
    .await
}

/// `n` of every message's payload, in stream order.
fn numbers(messages: &[StreamMessage]) -> Vec<i64> {
    messages
        .iter()
        .filter_map(|m| json(m)["fullDocument"]["n"].as_i64())
        .collect()
}

/// A private copy of the built plugins, so a test can swap files without touching others.
fn plugin_copy(h: &Harness) -> anyhow::Result<PathBuf> {
    let dir = h.dir.path().join("plugins");
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&h.plugins)? {
        let entry = entry?;
        // Files only: `v0.1/` holds the contract 0.1 builds.
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
        }
    }
    Ok(dir)
}

/// Replaces a plugin file the way an operator should: write aside, then rename over.
fn swap_plugin(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let temp = dir.join(format!(".{name}.new"));
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, dir.join(name))?;
    Ok(())
}

/// Every hostile behaviour in one tenant's plugin: each event is dead-lettered with its
/// reason and the plugin's name and hash, the host survives, the other tenant receives every
/// one of its events unchanged, neither tenant sees a namespace outside its own, and nothing
/// is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugin_harms_only_its_own_tenant() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = tenant_config(
        &h,
        &h.plugins,
        "[[pipeline.tenant.plugins]]\nname = \"faulty\"",
        // Fuel high enough that the spinning call meets its wall-clock deadline first, and
        // that deadline long enough that no other hostile call reaches it on a busy machine;
        // quarantine off so every event gets its own verdict.
        "limits = { memory_mib = 16, timeout_ms = 2000, fuel_per_call = 1000000000000 }\n\
         quarantine = { after_failures = 0 }",
    );
    // A pipeline id of its own: metrics are per process, and other tests run beside this one.
    let config = config.replace("id = \"shop\"", "id = \"hostile\"");
    let address = format!("127.0.0.1:{}", free_port());
    let config = format!("{config}\n[http]\naddress = \"{address}\"\n");
    let running = start_tenants(&h, &config, &["hostile.good", "hostile.bad"]).await?;

    let client = h.mongo.client().await?;
    let orders = client.database(DB).collection::<bson::Document>("orders");
    let hostile = [
        ("spin", "deadline"),
        ("bomb", "memory"),
        ("huge", "output-too-large"),
        ("trap", "trap"),
        ("fail", "plugin-error"),
        ("escape", "invalid-output"),
    ];
    let mut n = 0;
    for (flag, _) in hostile {
        orders.insert_one(doc! { "n": n, "plain": true }).await?;
        n += 1;
        orders.insert_one(doc! { "n": n, flag: true }).await?;
        n += 1;
    }
    orders.insert_one(doc! { "n": n, "plain": true }).await?;
    n += 1;
    // Outside both tenants, and inside only `bad`'s namespaces.
    client
        .database(DB)
        .collection::<bson::Document>("secrets")
        .insert_one(doc! { "n": 1000 })
        .await?;
    client
        .database(DB)
        .collection::<bson::Document>("returns")
        .insert_one(doc! { "n": 2000 })
        .await?;

    let good = h
        .wait_settled("GOOD", n as u64, Duration::from_secs(120))
        .await?;
    let bad = h
        .wait_settled("BAD", n as u64 + 1, Duration::from_secs(120))
        .await?;
    let metrics = scrape(&address).await?;
    running.stop().await?;

    // The counters say the same, per tenant, plugin and reason.
    for (_, reason) in hostile {
        let labels = [
            ("pipeline", "hostile"),
            ("plugin", "faulty"),
            ("reason", reason),
        ];
        assert_eq!(
            metric(&metrics, "tidegate_dead_letters_total", "bad", &labels),
            1.0,
            "{reason}"
        );
    }
    let faulty = [("pipeline", "hostile"), ("plugin", "faulty")];
    let calls = metric(&metrics, "tidegate_plugin_calls_total", "bad", &faulty);
    assert!(calls >= n as f64, "calls: {calls}");
    let peak = metric(
        &metrics,
        "tidegate_plugin_memory_peak_bytes",
        "bad",
        &faulty,
    );
    assert!(peak > 0.0 && peak <= 16.0 * 1024.0 * 1024.0, "peak: {peak}");
    assert!(metric(&metrics, "tidegate_plugin_fuel_total", "bad", &faulty) > 0.0);
    assert_eq!(
        metric(
            &metrics,
            "tidegate_events_read_total",
            "good",
            &[("pipeline", "hostile")]
        ),
        n as f64
    );

    // The good tenant: every order, in order, unchanged, and nothing else.
    assert_eq!(numbers(&good), (0..n).collect::<Vec<_>>());
    for m in &good {
        assert!(m.subject.as_str().starts_with("good.shop.orders."));
        assert_eq!(header(m, "Tidegate-Tenant").as_deref(), Some("good"));
        assert_eq!(header(m, "Tidegate-Error-Kind"), None);
    }

    // The bad tenant: one message per event, plain ones published, hostile ones
    // dead-lettered with the right reason; plus its own `returns` event.
    assert_eq!(bad.len() as i64, n + 1, "one message per event, none lost");
    let mut seen = Vec::new();
    for m in &bad {
        let doc = &json(m)["fullDocument"];
        let number = doc["n"].as_i64().unwrap_or(-1);
        seen.push(number);
        if number == 2000 {
            assert_eq!(m.subject.as_str(), "bad.shop.returns.insert");
            continue;
        }
        match hostile.iter().find(|(flag, _)| doc[*flag] == true) {
            Some((flag, kind)) => {
                assert_eq!(m.subject.as_str(), "bad.dead-letter", "{flag}");
                assert_eq!(
                    header(m, "Tidegate-Error-Kind").as_deref(),
                    Some(*kind),
                    "{flag}: {:?}",
                    header(m, "Tidegate-Error")
                );
                assert_eq!(header(m, "Tidegate-Plugin").as_deref(), Some("faulty"));
                assert!(header(m, "Tidegate-Plugin-Hash")
                    .unwrap_or_default()
                    .starts_with("sha256:"));
                assert_eq!(header(m, "Tidegate-Tenant").as_deref(), Some("bad"));
            }
            None => assert_eq!(m.subject.as_str(), "bad.shop.orders.insert"),
        }
    }
    let mut expected: Vec<i64> = (0..n).collect();
    expected.push(2000);
    assert_eq!(seen, expected);
    Ok(())
}

/// A plugin that fails event after event is quarantined: with `dead-letter`, the following
/// events are dead-lettered without calling it (reason `quarantined`); replacing the file
/// releases it. With `halt`, its unit stops while the other tenant carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_plugin_is_quarantined_until_replaced() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = plugin_copy(&h)?;
    std::fs::copy(plugins.join("faulty.wasm"), plugins.join("tenant.wasm"))?;
    let config = tenant_config(
        &h,
        &plugins,
        "[[pipeline.tenant.plugins]]\nname = \"tenant\"",
        "quarantine = { after_failures = 3, action = \"dead-letter\" }",
    );
    let running = start_tenants(&h, &config, &["shop.good", "shop.bad"]).await?;
    let orders = h.collection().await?;

    for n in 0..3 {
        orders.insert_one(doc! { "n": n, "fail": true }).await?;
    }
    for n in 3..6 {
        orders.insert_one(doc! { "n": n }).await?;
    }
    let bad = h.wait_settled("BAD", 6, Duration::from_secs(120)).await?;
    let kinds: Vec<_> = bad
        .iter()
        .map(|m| header(m, "Tidegate-Error-Kind").unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        [
            "plugin-error",
            "plugin-error",
            "plugin-error",
            "quarantined",
            "quarantined",
            "quarantined"
        ]
    );

    // A new version on disk releases it (op-filter passes every event).
    swap_plugin(
        &plugins,
        "tenant.wasm",
        &std::fs::read(plugins.join("op-filter.wasm"))?,
    )?;
    let mut n = 6;
    // Keep writing until the new version shows, then a few more.
    let messages = loop {
        orders.insert_one(doc! { "n": n }).await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let messages = h.messages("BAD").await?;
        if messages
            .last()
            .and_then(|m| header(m, "Tidegate-Error-Kind"))
            .is_none()
        {
            break messages;
        }
        assert!(n < 200, "the replaced plugin never took over");
    };
    let good = h
        .wait_settled("GOOD", n as u64, Duration::from_secs(120))
        .await?;
    running.stop().await?;
    assert_eq!(numbers(&good), (0..n).collect::<Vec<_>>());
    // Every event of the bad tenant is there once: quarantined ones dead-lettered, later
    // ones published; once published, never dead-lettered again.
    let all = h.messages("BAD").await?;
    assert_eq!(numbers(&all), (0..n).collect::<Vec<_>>());
    let first_ok = messages.len() - 1;
    for m in &all[first_ok..] {
        assert_eq!(header(m, "Tidegate-Error-Kind"), None);
    }
    Ok(())
}

/// `halt`: the quarantined tenant's unit stops before the event, which stays unpublished and
/// uncheckpointed; the other tenant carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_stops_only_the_failing_tenant() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = tenant_config(
        &h,
        &h.plugins,
        "[[pipeline.tenant.plugins]]\nname = \"faulty\"",
        "quarantine = { after_failures = 2, action = \"halt\" }",
    );
    let running = start_tenants(&h, &config, &["shop.good", "shop.bad"]).await?;
    let orders = h.collection().await?;
    for n in 0..2 {
        orders.insert_one(doc! { "n": n, "fail": true }).await?;
    }
    for n in 2..20 {
        orders.insert_one(doc! { "n": n }).await?;
    }
    let good = h.wait_settled("GOOD", 20, Duration::from_secs(120)).await?;
    assert_eq!(numbers(&good), (0..20).collect::<Vec<_>>());
    let bad = h.wait_settled("BAD", 2, Duration::from_secs(120)).await?;
    assert_eq!(
        numbers(&bad),
        vec![0, 1],
        "the halted unit published nothing after"
    );
    let result = running.stop().await;
    let err = format!("{:#}", result.expect_err("a halted unit is reported"));
    assert!(err.contains("halted"), "{err}");
    Ok(())
}

/// Hot reload with the real binary: a new version on disk takes over between two events
/// with nothing lost or duplicated; garbage, a wrong-world component and a plugin that
/// traps on contact are refused while the running version carries on; SIGHUP applies a
/// changed plugin config; a tenant whose plugin does not load at start-up is held and
/// catches up from its checkpoint once the file is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_swap_on_disk_and_on_sighup_without_loss() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let plugins = plugin_copy(&h)?;
    let op_filter = std::fs::read(plugins.join("op-filter.wasm"))?;
    let match_plugin = std::fs::read(plugins.join("match.wasm"))?;
    let redact = std::fs::read(plugins.join("redact.wasm"))?;
    std::fs::write(plugins.join("tenant.wasm"), &op_filter)?;
    // op-filter and match both take `operations`; faulty refuses it in `init` (an unknown
    // key), and redact takes `fields` (after SIGHUP).
    let plugin_table = |config: &str| {
        format!("[[pipeline.tenant.plugins]]\nname = \"tenant\"\nconfig = {{ {config} }}")
    };
    let operations = "operations = \"insert,update,replace,delete\"";
    let wrong_world = component(
        h.dir.path(),
        "shape",
        "package test:shape;\nworld shape { export filter: func(x: u32) -> bool; }\n",
        "shape",
        r#"(module (func (export "filter") (param i32) (result i32) i32.const 1))"#,
    );
    let wants_network = component(
        h.dir.path(),
        "net",
        "package test:net;\ninterface socket { connect: func(); }\n\
         world net { import socket; export filter: func(x: u32) -> bool; }\n",
        "net",
        r#"(module (import "test:net/socket" "connect" (func))
                   (func (export "filter") (param i32) (result i32) i32.const 1))"#,
    );
    let address = format!("127.0.0.1:{}", free_port());
    let http = format!("\n[http]\naddress = \"{address}\"\n");
    let config = tenant_config(&h, &plugins, &plugin_table(operations), "") + &http;
    let path = h.write_config("tenants.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["shop.good", "shop.bad"]).await?;
    let orders = h.collection().await?;
    let mut n = 0i64;

    write(&orders, &mut n, 50).await?;
    // Refused, one after the other, while events flow: garbage, a component of another
    // world, one importing what tidegate does not grant, one failing `init`.
    let refused = [
        b"\0asm garbage".to_vec(),
        std::fs::read(&wrong_world)?,
        std::fs::read(&wants_network)?,
        std::fs::read(plugins.join("faulty.wasm"))?,
    ];
    for (count, bytes) in refused.iter().enumerate() {
        swap_plugin(&plugins, "tenant.wasm", bytes)?;
        wait_for_count(&child, "plugin reload refused", count + 1).await?;
        write(&orders, &mut n, 10).await?;
    }
    // A real new version taking the same keys: match.
    swap_plugin(&plugins, "tenant.wasm", &match_plugin)?;
    child
        .wait_for_log("plugin reloaded", Duration::from_secs(120))
        .await?;
    write(&orders, &mut n, 50).await?;

    let bad = h
        .wait_settled("BAD", n as u64, Duration::from_secs(120))
        .await?;
    assert_eq!(
        numbers(&bad),
        (0..n).collect::<Vec<_>>(),
        "nothing lost or repeated"
    );
    assert_eq!(
        child.log().matches("plugin reloaded").count(),
        1,
        "the swap happens once: {}",
        child.log()
    );
    let metrics = scrape(&address).await?;
    let reloads = |outcome| {
        metric(
            &metrics,
            "tidegate_plugin_reloads_total",
            "bad",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(reloads("refused"), 4.0);
    assert_eq!(reloads("applied"), 1.0);

    // SIGHUP: a new chain, redact with `fields = "name"` (the file watcher may see the new
    // file first and refuse it under the old keys; the SIGHUP applies file and config).
    let config = tenant_config(&h, &plugins, &plugin_table("fields = \"name\""), "") + &http;
    swap_plugin(&plugins, "tenant.wasm", &redact)?;
    std::fs::write(&path, config)?;
    child.signal(1)?;
    child
        .wait_for_log("plugin chain reloaded", Duration::from_secs(120))
        .await?;
    let before = n;
    write(&orders, &mut n, 20).await?;
    let bad = h
        .wait_settled("BAD", n as u64, Duration::from_secs(120))
        .await?;
    assert_eq!(numbers(&bad), (0..n).collect::<Vec<_>>());
    let last = json(bad.last().expect("messages"));
    assert_eq!(last["fullDocument"]["email"], "a@b.c", "{last}");
    assert_ne!(last["fullDocument"]["name"], "x", "{last}");

    // Stop, break the plugin on disk, start again: `bad` is held, `good` flows; fixing the
    // file lets `bad` catch up from its checkpoint.
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    swap_plugin(&plugins, "tenant.wasm", b"not wasm at all")?;
    let mut child = h.spawn_binary(&path)?;
    child
        .wait_for_log(
            "tenant held until its plugins load",
            Duration::from_secs(120),
        )
        .await?;
    write(&orders, &mut n, 30).await?;
    let good = h
        .wait_settled("GOOD", n as u64, Duration::from_secs(120))
        .await?;
    assert_eq!(numbers(&good), (0..n).collect::<Vec<_>>());
    assert_eq!(
        stream_len(&h.nats_client().await?, "BAD").await,
        before as u64 + 20
    );
    // Held is the tenant's own state: shown on `/status` with why and as a metric, while
    // the instance stays ready (`good` is served).
    wait_until("bad shown held", Duration::from_secs(60), || {
        let address = address.clone();
        async move {
            let held = scrape(&address).await.ok().map(|m| {
                metric(&m, "tidegate_pipeline_held", "bad", &[])
                    + metric(&m, "tidegate_pipeline_held", "good", &[]) * 10.0
            });
            held == Some(1.0)
        }
    })
    .await?;
    let (ready, body) = http_get(&address, "/readyz").await?;
    assert_eq!(
        ready, 200,
        "a held tenant leaves the instance ready: {body}"
    );
    let status: serde_json::Value = serde_json::from_str(&http_get(&address, "/status").await?.1)?;
    let bad = status["pipelines"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["labels"]["tenant"] == "bad"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(bad["state"], "held", "{status}");
    let reason = bad["last_error"]["message"].as_str().unwrap_or_default();
    assert!(reason.contains("held until its plugins load"), "{status}");
    swap_plugin(&plugins, "tenant.wasm", &redact)?;
    let bad = h
        .wait_settled("BAD", n as u64, Duration::from_secs(120))
        .await?;
    assert_eq!(
        numbers(&bad),
        (0..n).collect::<Vec<_>>(),
        "held tenant caught up"
    );
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    Ok(())
}

/// Tenants load independently: while one tenant's `init` spins towards a long deadline, the
/// other tenant starts and publishes; the spinning tenant is held only once its deadline
/// passes. (Loaded one after the other, the good tenant would start only after the bad
/// one's 'held' line.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_spinning_in_init_does_not_delay_the_others() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let spin = wat_filter(h.dir.path(), "spin", 1, "", "(loop $spin (br $spin))", "");
    let config = tenant_config(
        &h,
        &h.plugins,
        &format!(
            "[[pipeline.tenant.plugins]]\nname = \"spin\"\nfile = \"{}\"",
            spin.display()
        ),
        "limits = { timeout_ms = 45000, fuel_per_call = 1000000000000 }",
    );
    let path = h.write_config("tenants.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["shop.good"]).await?;
    h.collection()
        .await?
        .insert_one(doc! { "n": 0, "email": "a@b.c" })
        .await?;
    let good = h
        .wait_for_messages("GOOD", 1, Duration::from_secs(60))
        .await?;
    assert_eq!(numbers(&good), vec![0]);
    let held = "tenant held until its plugins load";
    assert!(
        !child.log().contains(held),
        "the good tenant waited for the bad one's init:\n{}",
        child.log()
    );
    // The bad tenant was spinning all along: held once its deadline passed.
    child.wait_for_log(held, Duration::from_secs(120)).await?;
    assert!(
        child.log().contains("init trapped: deadline"),
        "{}",
        child.log()
    );
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(30)).await?;
    Ok(())
}

/// Tenants at scale load independently: 200 tenants (a database each, op-filter and redact)
/// and one whose `init` spins, all on one shared reader. Every one of the 200 starts and
/// publishes its event, none is held for a missed `init` deadline (loads run a few at a
/// time, each deadline counted from its own start), and only the spinning tenant is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tenants_start_while_one_spins_in_init() -> anyhow::Result<()> {
    const K: usize = 200;
    let h = Harness::start().await?;
    let spin = wat_filter(h.dir.path(), "spin", 1, "", "(loop $spin (br $spin))", "");
    let mut config = format!(
        "plugin_dir = \"{}\"\n[nats]\nurl = \"{}\"\n[sandbox]\nmax_instances = {}\n\
         [[pipeline]]\nid = \"many\"\nmongodb_uri = \"{}\"\n[pipeline.checkpoint]\ninterval_ms = 200\n\
         [[pipeline.tenant]]\nid = \"spinner\"\nnamespaces = [\"spinner.*\"]\n\
         limits = {{ timeout_ms = 20000, fuel_per_call = 1000000000000 }}\n\
         [[pipeline.tenant.plugins]]\nname = \"spin\"\nfile = \"{}\"\n\
         [pipeline.tenant.sink]\nstream = \"SPINNER\"\nsubject_prefix = \"spinner\"\n",
        h.plugins.display(),
        h.nats.url(),
        2 * K + 16,
        h.mongo.uri(),
        spin.display()
    );
    for i in 0..K {
        config += &format!(
            "[[pipeline.tenant]]\nid = \"t{i}\"\nnamespaces = [\"db{i}.*\"]\n\
             [[pipeline.tenant.plugins]]\nname = \"op-filter\"\n\
             [[pipeline.tenant.plugins]]\nname = \"redact\"\nconfig = {{ fields = \"email\" }}\n\
             [pipeline.tenant.sink]\nstream = \"T{i}\"\nsubject_prefix = \"t{i}\"\n"
        );
    }
    let path = h.write_config("many.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    let units: Vec<String> = (0..K).map(|i| format!("many.t{i}")).collect();
    h.wait_checkpoints(&units).await?;
    let mongo = h.mongo.client().await?;
    for i in 0..K {
        mongo
            .database(&format!("db{i}"))
            .collection::<bson::Document>("orders")
            .insert_one(doc! { "n": i as i64, "email": "a@b.c" })
            .await?;
    }
    for i in 0..K {
        let got = h
            .wait_for_messages(&format!("T{i}"), 1, Duration::from_secs(120))
            .await?;
        assert_eq!(numbers(&got), vec![i as i64], "tenant t{i}");
    }
    // The spinning tenant is held once its own deadline passes; no other tenant is.
    let held = "tenant held until its plugins load";
    child.wait_for_log(held, Duration::from_secs(120)).await?;
    let log = child.log();
    assert_eq!(log.matches(held).count(), 1, "{log}");
    assert!(log.contains("init trapped: deadline"), "{log}");
    let held_line = log.lines().find(|l| l.contains(held)).unwrap_or_default();
    assert!(held_line.contains("spinner"), "{held_line}");
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;
    Ok(())
}

/// Capabilities: a plugin that reads the environment, the clock, random numbers, folders and
/// the network sees nothing real without grants (an empty environment, a clock stopped at
/// the epoch, the same random bytes every time, no folders, connections denied), and sees
/// exactly what its tenant was granted otherwise. The network is never granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_capabilities_are_denied_unless_granted() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let shared = h.dir.path().join("shared");
    std::fs::create_dir_all(&shared)?;
    let tenant = |id: &str, stream: &str, grants: &str| {
        format!(
            r#"
[[pipeline.tenant]]
id = "{id}"
namespaces = ["shop.orders"]
{grants}
[pipeline.tenant.sink]
stream = "{stream}"
subject_prefix = "{id}"
[[pipeline.tenant.plugins]]
name = "snoop"
"#
        )
    };
    let config = format!(
        r#"
plugin_dir = "{plugin_dir}"
[nats]
url = "{nats}"
[[pipeline]]
id = "shop"
mongodb_uri = "{mongo}"
database = "{DB}"
[pipeline.checkpoint]
interval_ms = 200
{closed}
{open}
"#,
        plugin_dir = h.plugins.display(),
        nats = h.nats.url(),
        mongo = h.mongo.uri(),
        closed = tenant("closed", "CLOSED", ""),
        open = tenant(
            "open",
            "OPEN",
            &format!(
                "capabilities = {{ clock = true, random = true, env = [\"SNOOP_VISIBLE\"], \
                 read_dirs = [\"{}\"] }}",
                shared.display()
            )
        ),
    );
    let path = h.write_config("capabilities.toml", &config)?;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"));
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .env("SNOOP_VISIBLE", "yes")
        .env("SNOOP_HIDDEN", "no");
    let mut child = tidegate_testkit::ChildProcess::spawn(cmd)?;
    h.wait_checkpoints(&["shop.closed", "shop.open"]).await?;
    let orders = h.collection().await?;
    for n in 0..2 {
        orders.insert_one(doc! { "n": n }).await?;
    }
    let closed = h
        .wait_settled("CLOSED", 2, Duration::from_secs(120))
        .await?;
    let open = h.wait_settled("OPEN", 2, Duration::from_secs(120)).await?;
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(120)).await?;

    for m in &closed {
        assert_eq!(header(m, "X-Env").as_deref(), Some("0"));
        assert_eq!(header(m, "X-Clock").as_deref(), Some("0"));
        assert_eq!(header(m, "X-Dirs").as_deref(), Some(""));
        assert_eq!(header(m, "X-Connect").as_deref(), Some("access-denied"));
    }
    assert_eq!(
        header(&closed[0], "X-Random"),
        header(&closed[1], "X-Random"),
        "without the grant, randomness is a fixed stream"
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    for m in &open {
        assert_eq!(
            header(m, "X-Env").as_deref(),
            Some("1"),
            "only the listed variable"
        );
        let clock: u64 = header(m, "X-Clock").unwrap_or_default().parse()?;
        assert!(clock.abs_diff(now.as_secs()) < 300, "real clock: {clock}");
        assert_eq!(header(m, "X-Dirs"), Some(shared.display().to_string()));
        assert_eq!(header(m, "X-Connect").as_deref(), Some("access-denied"));
    }
    assert_ne!(header(&open[0], "X-Random"), header(&open[1], "X-Random"));
    Ok(())
}

/// Header bombs from one tenant never reach the NATS server: one 2 MiB header (over the
/// tenant's `max_output_bytes` of 8 MiB, which is capped at the server's 1 MiB
/// `max_payload` with a log line), 2500 small headers that together exceed `max_payload` on
/// the wire, and a subject of 8 KiB (over the server's `max_control_line`) are each
/// dead-lettered with their reason, an event too large even to dead-letter whole is
/// dead-lettered as a stub, the shared connection is never dropped, and the good tenant
/// receives every one of its events. (The bad tenant's deadline is a minute: its breaching
/// calls run at the lowest CPU priority, which on a busy machine can outlast the default
/// second, and this test is about sizes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_bombs_never_drop_the_shared_connection() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let config = tenant_config(
        &h,
        &h.plugins,
        "[[pipeline.tenant.plugins]]\nname = \"faulty\"",
        "limits = { max_output_bytes = 8388608, timeout_ms = 60000 }\n\
         quarantine = { after_failures = 0 }",
    );
    let path = h.write_config("tenants.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["shop.good", "shop.bad"]).await?;

    let client = h.mongo.client().await?;
    let orders = client.database(DB).collection::<bson::Document>("orders");
    let bombs: [(bson::Document, &str, &str); 3] = [
        (
            doc! { "header_bomb": true },
            "output-too-large",
            "the limit is 1048576 (the NATS server's max_payload; limits.max_output_bytes is 8388608)",
        ),
        (
            doc! { "header_flood": true },
            "too-large",
            "the NATS server accepts at most 1048576 (max_payload)",
        ),
        (
            doc! { "long_subject": "bad" },
            "too-large",
            "output 0: subject is 8196 bytes",
        ),
    ];
    // Plain orders between the bombs, each round twice: the good tenant keeps flowing.
    let mut n = 0;
    let mut expected_bad = Vec::new();
    for _ in 0..2 {
        for (bomb, kind, reason) in &bombs {
            for _ in 0..3 {
                orders.insert_one(doc! { "n": n, "plain": true }).await?;
                expected_bad.push(None);
                n += 1;
            }
            let mut bomb = bomb.clone();
            bomb.insert("n", n);
            orders.insert_one(bomb).await?;
            expected_bad.push(Some((*kind, *reason)));
            n += 1;
        }
    }
    orders.insert_one(doc! { "n": n, "plain": true }).await?;
    expected_bad.push(None);
    n += 1;
    // Only the bad tenant sees `returns`: 1.5 MiB, too large to publish or dead-letter whole.
    client
        .database(DB)
        .collection::<bson::Document>("returns")
        .insert_one(doc! { "n": 2000, "blob": "r".repeat(1536 * 1024) })
        .await?;

    let good = h
        .wait_settled("GOOD", n as u64, Duration::from_secs(120))
        .await?;
    let bad = h
        .wait_settled("BAD", n as u64 + 1, Duration::from_secs(120))
        .await?;
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(30)).await?;
    let log = child.log();
    let nats_log = std::fs::read_to_string(h.nats.log_path())?.to_lowercase();

    // The shared connection was never dropped for a message the server refused.
    assert!(!nats_log.contains("maximum payload"), "nats-server log");
    assert!(!nats_log.contains("control line"), "nats-server log");
    assert!(!log.contains("NATS disconnected"), "{log}");
    assert!(
        log.contains(
            "limits.max_output_bytes is 8388608, above the NATS server's max_payload of 1048576"
        ),
        "{log}"
    );

    // The good tenant: every order, in order, published.
    assert_eq!(numbers(&good), (0..n).collect::<Vec<_>>());
    for m in &good {
        assert_eq!(header(m, "Tidegate-Error-Kind"), None);
    }

    // The bad tenant: one message per event, in order; every bomb dead-lettered with its
    // reason, the original event intact.
    assert_eq!(bad.len(), expected_bad.len() + 1, "one message per event");
    for (i, (m, expected)) in bad.iter().zip(&expected_bad).enumerate() {
        assert_eq!(json(m)["fullDocument"]["n"].as_i64(), Some(i as i64));
        match expected {
            None => assert_eq!(m.subject.as_str(), "bad.shop.orders.insert"),
            Some((kind, reason)) => {
                assert_eq!(m.subject.as_str(), "bad.dead-letter", "event {i}");
                assert_eq!(header(m, "Tidegate-Error-Kind").as_deref(), Some(*kind));
                let error = header(m, "Tidegate-Error").unwrap_or_default();
                assert!(error.contains(reason), "event {i}: {error}");
                assert_eq!(header(m, "Tidegate-Stub"), None);
            }
        }
    }
    // The 1.5 MiB event: a stub that fits, with its key, namespace, time and the sizes.
    let stub = bad.last().expect("the returns event");
    assert_eq!(stub.subject.as_str(), "bad.dead-letter");
    assert_eq!(
        header(stub, "Tidegate-Error-Kind").as_deref(),
        Some("output-too-large")
    );
    let why = header(stub, "Tidegate-Stub").unwrap_or_default();
    assert!(
        why.starts_with("documents left out: message is ") && why.contains("1048576"),
        "{why}"
    );
    let body = json(stub);
    assert!(body["documentKey"]["_id"].is_object(), "{body}");
    assert_eq!(body["ns"]["coll"], "returns", "{body}");
    assert!(body["clusterTime"].is_object(), "{body}");
    assert!(body.get("fullDocument").is_none(), "{body}");
    Ok(())
}

/// A tenant whose plugin breaks its limits on every event is throttled, not stopped: each
/// breach in a row doubles its pause (`quarantine.breach_pause`, up to 5 s), and a stop does
/// not wait those pauses out: the events it has read are dead-lettered at once and the
/// process exits cleanly within `shutdown_timeout_secs`, none lost. Sixteen header bombs in
/// a row: after the eighth, the pauses still owed add up to about half a minute. (The
/// deadline is a minute, as in `header_bombs_never_drop_the_shared_connection`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_tenant_does_not_hold_up_a_stop() -> anyhow::Result<()> {
    const BOMBS: u64 = 16;
    let h = Harness::start().await?;
    let config = tenant_config(
        &h,
        &h.plugins,
        "[[pipeline.tenant.plugins]]\nname = \"faulty\"",
        "limits = { timeout_ms = 60000 }\nquarantine = { after_failures = 0 }",
    )
    .replace(
        "full_document = \"update-lookup\"",
        "full_document = \"update-lookup\"\nshutdown_timeout_secs = 5",
    );
    let path = h.write_config("tenants.toml", &config)?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["shop.good", "shop.bad"]).await?;

    let orders = h.collection().await?;
    orders
        .insert_many((0..BOMBS).map(|n| doc! { "n": n as i64, "header_bomb": true }))
        .await?;
    // Half of them handled: the change stream has long read all sixteen (one insert).
    h.wait_for_messages("BAD", BOMBS / 2, Duration::from_secs(120))
        .await?;
    child.signal(SIGTERM)?;
    let status = child.wait_exit(Duration::from_secs(60)).await?;
    let log = child.log();
    assert!(status.success(), "exit {status}: {log}");
    assert!(!log.contains("shutdown timeout"), "{log}");

    // Every bomb dead-lettered, once, in order: the stop drained them without their pauses.
    let bad = h.messages("BAD").await?;
    assert_eq!(bad.len() as u64, BOMBS, "{log}");
    for (i, m) in bad.iter().enumerate() {
        assert_eq!(json(m)["fullDocument"]["n"].as_i64(), Some(i as i64));
        assert_eq!(m.subject.as_str(), "bad.dead-letter", "event {i}");
        assert_eq!(
            header(m, "Tidegate-Error-Kind").as_deref(),
            Some("output-too-large")
        );
    }
    Ok(())
}
