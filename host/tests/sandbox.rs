//! The sandbox's limits against hostile plugins written in WAT, with the real binary and real
//! servers: a plugin's memory cap holds for all its memories and tables together (pooled or
//! not), a component that declares more than its cap is refused at load naming it, and a
//! plugin cannot forge or flood tidegate's log.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bson::doc;
use prometheus_parse::{Scrape, Value};
use support::{header, http_get, wat_filter, Harness, DB, SIGTERM};
use tidegate_testkit::{free_port, plugin_dir};

const MIB: f64 = 1024.0 * 1024.0;

/// One pipeline `id` on `shop.orders` whose tenants each run one plugin: `(tenant, plugin
/// file, extra tenant keys)`. Tenant `t` publishes to stream `T` (upper case) under
/// prefix `t`.
fn config(h: &Harness, id: &str, tenants: &[(&str, &Path, &str)], extra: &str) -> String {
    let mut text = format!(
        r#"
{extra}

[nats]
url = "{nats}"
ack_timeout_ms = 2000

[[pipeline]]
id = "{id}"
mongodb_uri = "{mongo}"
database = "{DB}"
full_document = "update-lookup"

[pipeline.checkpoint]
interval_ms = 200
"#,
        nats = h.nats.url(),
        mongo = h.mongo.uri(),
    );
    for (tenant, file, keys) in tenants {
        text += &format!(
            r#"
[[pipeline.tenant]]
id = "{tenant}"
namespaces = ["shop.orders"]
{keys}
[pipeline.tenant.sink]
stream = "{stream}"
subject_prefix = "{tenant}"
[[pipeline.tenant.plugins]]
name = "{tenant}"
file = "{file}"
"#,
            stream = tenant.to_uppercase(),
            file = file.display(),
        );
    }
    text
}

/// The dead-letter kind of a message (`None`: a normal message).
fn dead_letter_kind(message: &StreamMessage) -> Option<String> {
    message
        .subject
        .ends_with(".dead-letter")
        .then(|| header(message, "Tidegate-Error-Kind").unwrap_or_default())
}

/// A sample of `name` whose labels include `labels`.
fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Each call grows every memory (or the table) by a fixed step: the first call of an
/// instance stays under the 64 MiB cap only if the memories are counted together, the second
/// goes over it. So every other event must be dead-lettered as `memory`, whether instances
/// are pooled or not; and the peak metric must report the instance's total. Without the
/// per-instance sum, each memory alone stays under the cap and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cap_counts_all_memories_and_tables_of_an_instance() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let dir = h.dir.path();
    // Two memories, 20 MiB more each per call: 40 MiB after the first call, 80 after two.
    let two = wat_filter(
        dir,
        "two",
        1,
        "(memory $m1 1)",
        "",
        "(drop (memory.grow (i32.const 320))) (drop (memory.grow $m1 (i32.const 320)))",
    );
    // Sixteen memories, 3 MiB more each per call: 48 MiB after one call, 96 after two.
    let extra: String = (1..16).map(|i| format!("(memory $m{i} 1)\n")).collect();
    let grow: String = (0..16)
        .map(|i| format!("(drop (memory.grow {i} (i32.const 48)))\n"))
        .collect();
    let sixteen = wat_filter(dir, "sixteen", 1, &extra, "", &grow);
    // Two tables, 90,000 elements (720 kB at 8 bytes each) more each per call, under a 2 MiB
    // cap: 1.44 MB after one call, 2.16 MB partway through the second (each table stays
    // under the 200,000 elements a table may have).
    let table = wat_filter(
        dir,
        "table",
        1,
        "(table $t0 1 funcref) (table $t1 1 funcref)",
        "",
        "(drop (table.grow $t0 (ref.null func) (i32.const 90000)))\n\
         (drop (table.grow $t1 (ref.null func) (i32.const 90000)))",
    );
    let tenants = [
        ("two", two.as_path(), ""),
        ("sixteen", sixteen.as_path(), ""),
        ("table", table.as_path(), "limits = { memory_mib = 2 }"),
    ];
    let orders = h.collection().await?;
    let mut written = 0u64;
    for pooling in [true, false] {
        let id = if pooling { "pooled" } else { "ondemand" };
        let address = format!("127.0.0.1:{}", free_port());
        let extra = format!("[sandbox]\npooling = {pooling}\n[http]\naddress = \"{address}\"");
        let text = config(&h, id, &tenants, &extra)
            .replace("subject_prefix = \"", &format!("subject_prefix = \"{id}-"))
            .replace("stream = \"", &format!("stream = \"{}_", id.to_uppercase()));
        let path = h.write_config(&format!("{id}.toml"), &text)?;
        let mut child = h.spawn_binary(&path)?;
        let units: Vec<String> = tenants.iter().map(|t| format!("{id}.{}", t.0)).collect();
        h.wait_checkpoints(&units).await?;
        let first = written;
        for _ in 0..4 {
            orders.insert_one(doc! { "n": written as i64 }).await?;
            written += 1;
        }
        for (tenant, _, _) in &tenants {
            let stream = format!("{}_{}", id.to_uppercase(), tenant.to_uppercase());
            let messages = h.wait_settled(&stream, 4, Duration::from_secs(60)).await?;
            let kinds: Vec<Option<String>> = messages.iter().map(dead_letter_kind).collect();
            let memory = Some("memory".to_string());
            assert_eq!(
                kinds,
                vec![None, memory.clone(), None, memory],
                "{id} {tenant}: every second call of an instance goes over the cap \
                 (events {first}..{written}); log:\n{}",
                child.log()
            );
            let reason = header(&messages[1], "Tidegate-Error").unwrap_or_default();
            assert!(
                reason.contains("limits.memory_mib"),
                "{id} {tenant}: {reason}"
            );
        }
        // The peak is the instance's total: both memories after one call, not the larger.
        let (status, text) = http_get(&address, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
        let peak = |tenant: &str| {
            sample(
                &scrape,
                "tidegate_plugin_memory_peak_bytes",
                &[("tenant", tenant)],
            )
            .unwrap_or(0.0)
        };
        assert!(
            (40.0 * MIB..=64.0 * MIB).contains(&peak("two")),
            "{id}: peak of two memories {}",
            peak("two")
        );
        assert!(
            (48.0 * MIB..=64.0 * MIB).contains(&peak("sixteen")),
            "{id}: peak of sixteen memories {}",
            peak("sixteen")
        );
        assert!(
            (1_440_000.0..=2.0 * MIB).contains(&peak("table")),
            "{id}: peak with a grown table {}",
            peak("table")
        );
        child.signal(SIGTERM)?;
        child.wait_exit(Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// Components whose declared memories and tables alone exceed the cap (one huge memory, two
/// memories that only together do, a table too large, too many memories), or with a function
/// too large to compile safely, are refused at load by `tidegate check`, naming the limit,
/// with either allocator.
#[test]
fn components_declaring_more_than_the_cap_are_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let huge = wat_filter(dir.path(), "huge", 2000, "", "", "");
    let pair = wat_filter(dir.path(), "pair", 640, "(memory $m1 640)", "", "");
    let table = wat_filter(dir.path(), "table", 1, "(table 8000000 funcref)", "", "");
    let many: String = (1..17).map(|i| format!("(memory $m{i} 1)\n")).collect();
    let many = wat_filter(dir.path(), "many", 1, &many, "", "");
    // A body just over the limit: 349,526 `i32.const 1; drop` pairs of 3 bytes, its locals'
    // count and its `end`: 1,048,580 bytes.
    let body = "i32.const 1 drop\n".repeat(tidegate::sandbox::MAX_FUNCTION_BYTES / 3 + 1);
    let giant = wat_filter(
        dir.path(),
        "giant",
        1,
        &format!("(func $giant {body})"),
        "",
        "",
    );
    let cases = [
        (&huge, "over its cap of 64 MiB (limits.memory_mib)"),
        (&pair, "over its cap of 64 MiB (limits.memory_mib)"),
        (&table, "the limit is 200000 per table"),
        (&many, "at most 16 memories"),
        (
            &giant,
            "has a function of 1048580 bytes of code; tidegate compiles functions of at most 1 MiB",
        ),
    ];
    for pooling in [true, false] {
        for (file, expected) in &cases {
            let text = offline_config(&format!("pooling = {pooling}"), "hostile", file, "", "");
            let out = check(dir.path(), &text);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "pooling {pooling}: {err}");
            assert!(
                err.contains("plugin 'hostile'") && err.contains(expected),
                "pooling {pooling}, {}: {err}",
                file.display()
            );
        }
    }
}

/// The compiled-plugin cache keeps to `sandbox.cache_max_mib`: plugins of ~400 KB compiled
/// one after another with a 1 MiB limit leave at most 1 MiB but the last one in the
/// folder, the last one always among them.
#[test]
fn the_compiled_cache_keeps_to_its_size_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("compiled");
    let data = "x".repeat(400_000);
    let cached = |cache: &Path| -> Vec<(String, u64)> {
        std::fs::read_dir(cache)
            .expect("read the cache")
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().expect("meta").len(),
                )
            })
            .collect()
    };
    for n in 0..5 {
        // Each plugin differs (its data starts with its number), so each is compiled anew.
        let extra = format!("(data (i32.const 64) \"{n}{data}\")");
        let file = wat_filter(dir.path(), &format!("big{n}"), 8, &extra, "", "");
        let text = offline_config("", "big", &file, "", "").replace(
            "cache = false",
            &format!("cache_max_mib = 1\ncache_dir = \"{}\"", cache.display()),
        );
        let out = check(dir.path(), &text);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let files = cached(&cache);
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        let newest = files.iter().map(|(_, len)| *len).max().unwrap_or(0);
        assert!(total > 400_000, "plugin {n}: nothing cached: {files:?}");
        assert!(total <= 1024 * 1024 + newest, "plugin {n}: {files:?}");
    }
    assert!(
        cached(&cache).len() < 5,
        "nothing was deleted: {:?}",
        cached(&cache)
    );
}

/// What the log-forging plugin writes: a line break followed by a line dressed as
/// tidegate's own, a carriage return and a terminal escape.
const FORGED: &str =
    "innocent\n1999-01-01T00:00:00.000000Z  INFO tidegate: lease taken: FORGED\r\x1b[31m";

/// A plugin that forges log lines and floods the log: its first call of an instance logs
/// [`FORGED`] and then 32 lines of 1 MiB each, its second fails with [`FORGED`] as the error.
fn log_forger(dir: &Path) -> std::path::PathBuf {
    let len = FORGED.len();
    let data: String = FORGED
        .bytes()
        .map(|b| format!("\\{b:02x}"))
        .collect::<String>();
    let extra =
        format!("(data (i32.const 64) \"{data}\")\n(global $calls (mut i32) (i32.const 0))");
    let init = "(memory.fill (i32.const 65536) (i32.const 65) (i32.const 1048576))";
    let filter = format!(
        r#"(local $i i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.eq (global.get $calls) (i32.const 2))
      (then
        ;; err(failed(FORGED)): failed is case 2; its string at 24 (address, length).
        (i32.store8 (i32.const 16) (i32.const 1))
        (i32.store8 (i32.const 20) (i32.const 2))
        (i32.store (i32.const 24) (i32.const 64))
        (i32.store (i32.const 28) (i32.const {len}))
        (return (i32.const 16))))
    (call $log (i32.const 1) (i32.const 64) (i32.const {len}))
    (block $done
      (loop $more
        (br_if $done (i32.ge_u (local.get $i) (i32.const 32)))
        (call $log (i32.const 2) (i32.const 65536) (i32.const 1048576))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $more)))"#
    );
    wat_filter(dir, "forger", 32, &extra, init, &filter)
}

/// Neither a log message nor an error string of a plugin can start a log line of its own or
/// reach the terminal raw, in either log format; a call's log output is capped in bytes
/// with one note saying what was suppressed; plugin lines carry their pipeline and tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_cannot_forge_or_flood_the_log() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let forger = log_forger(h.dir.path());
    let orders = h.collection().await?;
    let mut written = 0i64;
    for format in ["human", "json"] {
        let id = format!("log-{format}");
        let extra = format!("[log]\nformat = \"{format}\"");
        let text = config(&h, &id, &[("noisy", forger.as_path(), "")], &extra)
            .replace(
                "stream = \"NOISY\"",
                &format!("stream = \"NOISY_{}\"", format.to_uppercase()),
            )
            .replace(
                "subject_prefix = \"noisy\"",
                &format!("subject_prefix = \"noisy-{format}\""),
            );
        let path = h.write_config(&format!("{id}.toml"), &text)?;
        let mut child = h.spawn_binary(&path)?;
        h.wait_checkpoints(&[format!("{id}.noisy")]).await?;
        for _ in 0..2 {
            orders.insert_one(doc! { "n": written }).await?;
            written += 1;
        }
        let stream = format!("NOISY_{}", format.to_uppercase());
        let messages = h.wait_settled(&stream, 2, Duration::from_secs(60)).await?;
        assert_eq!(
            messages.iter().map(dead_letter_kind).collect::<Vec<_>>(),
            vec![None, Some("plugin-error".to_string())]
        );
        child
            .wait_for_log("event dead-lettered", Duration::from_secs(30))
            .await?;
        child.signal(SIGTERM)?;
        child.wait_exit(Duration::from_secs(30)).await?;
        let log = child.log();

        let excerpt = || log.chars().take(4000).collect::<String>();
        assert!(
            log.len() < 512 * 1024,
            "{format}: 32 MiB of plugin log per call must be capped; the log holds {} bytes",
            log.len()
        );
        assert!(
            !log.lines().any(|line| line.starts_with("1999-01-01")),
            "{format}: a forged line starts a log line:\n{}",
            excerpt()
        );
        assert!(
            !log.contains('\u{1b}'),
            "{format}: a raw escape reached the log"
        );
        assert!(
            !log.contains('\r'),
            "{format}: a raw carriage return reached the log"
        );
        assert!(
            log.contains("suppressed_lines") && log.contains("suppressed_bytes"),
            "{format}: one note says what was suppressed:\n{}",
            excerpt()
        );
        let forged_lines: Vec<&str> = log.lines().filter(|l| l.contains("innocent")).collect();
        assert_eq!(
            forged_lines.len(),
            2,
            "{format}: the plugin's line and the dead-letter warning, one line each:\n{}",
            excerpt()
        );
        for line in forged_lines {
            assert!(line.contains("lease taken: FORGED"), "{format}: {line}");
            match format {
                "human" => assert!(
                    line.contains(r"innocent\n1999-01-01") && line.contains(r"\u{1b}[31m"),
                    "{format}: escaped in place: {line}"
                ),
                _ => {
                    let value: serde_json::Value = serde_json::from_str(line)?;
                    let text = value.to_string();
                    assert!(text.contains(r"innocent\\n1999-01-01"), "{format}: {line}");
                }
            }
        }
        let plugin_line = log
            .lines()
            .find(|l| l.contains("innocent") && !l.contains("dead-lettered"))
            .unwrap_or_default();
        match format {
            "human" => assert!(
                plugin_line.contains(&format!("pipeline=\"{id}.noisy\""))
                    && plugin_line.contains("tenant=\"noisy\""),
                "{format}: the plugin's line names its pipeline and tenant: {plugin_line}"
            ),
            _ => {
                let value: serde_json::Value = serde_json::from_str(plugin_line)?;
                assert_eq!(
                    value["fields"]["pipeline"],
                    format!("{id}.noisy"),
                    "{value}"
                );
                assert_eq!(value["fields"]["tenant"], "noisy", "{value}");
                assert_eq!(value["fields"]["plugin"], "noisy", "{value}");
            }
        }
    }
    Ok(())
}

/// A call that breaks a limit costs its unit idle time before the next event
/// (`quarantine.breach_pause` times the call), so a plugin that runs into its deadline on every
/// event cannot keep a core busy. The chain owes the pause and the chain stage waits it out
/// off the worker pool; only a lower bound is asserted (the pause is never shorter than
/// asked), so a slow machine cannot fail this.
#[test]
fn a_limit_breach_pauses_only_the_offending_unit() {
    use std::time::Instant;
    use tidegate::plugin::Verdict;

    let spin = insert_flagged(Some("spin"));
    {
        let (_sandbox, mut chain) = faulty_chain(4);
        let started = Instant::now();
        let verdict = chain.run(&spin);
        let took = started.elapsed() + chain.take_pause();
        assert!(chain.take_pause().is_zero(), "a pause is owed once");
        match verdict {
            Verdict::DeadLetter(cause) => assert_eq!(cause.kind().as_str(), "deadline"),
            other => panic!("expected a deadline dead letter, got {other:?}"),
        }
        // The deadline is 100 ms (counted in epoch ticks, so the call may end a little
        // early): the call takes about 100 ms, and the pause owed is four times more.
        assert!(
            took >= Duration::from_millis(400),
            "breach_pause = 4: the chain returned after {took:?}"
        );
    }
}

/// In a run of limit breaches the pause doubles with each one, up to
/// `FAILED_RUN_PAUSE` (a tenth of a second), so that cheap failed events (a header bomb's:
/// each still read from the change stream, dead-lettered and stored) come at most ten a
/// second; a costly call's pause is never lengthened (a hog's stays four times its call, so
/// it reaches quarantine as soon as before). One call that does not fail ends the run. Only
/// bounds derived from the calls' own durations are asserted, never a timing.
#[test]
fn a_run_of_breaches_is_slowed_to_ten_a_second() {
    use std::time::Instant;
    use tidegate::config::FAILED_RUN_PAUSE;
    use tidegate::plugin::Verdict;

    let (_sandbox, mut chain) = faulty_chain(4);
    let breach = |chain: &mut tidegate::plugin::Chain, event: &tidegate::model::Change, kind| {
        let started = Instant::now();
        let verdict = chain.run(event);
        let took = started.elapsed();
        match verdict {
            Verdict::DeadLetter(cause) => assert_eq!(cause.kind().as_str(), kind),
            // Not the verdict itself: a header bomb's output is 2 MiB of text.
            Verdict::Publish(outputs) => panic!(
                "expected a {kind} dead letter, got {} outputs",
                outputs.len()
            ),
            _ => panic!("expected a {kind} dead letter"),
        }
        (took, chain.take_pause())
    };

    // Cheap breaches: the pause grows to the cap and stays there.
    let bomb = insert_flagged(Some("header_bomb"));
    let mut owed = Vec::new();
    for _ in 0..16 {
        owed.push(breach(&mut chain, &bomb, "output-too-large"));
    }
    let (took, first) = owed[0];
    assert!(
        first <= took * 4,
        "first breach: {first:?} for a call of {took:?}"
    );
    // 2^15 × 4 × any call of a microsecond or more is past the cap.
    let (_, last) = owed[15];
    assert!(
        last >= FAILED_RUN_PAUSE,
        "16th breach in a row: at least the run's cap, owed {last:?}"
    );
    for (i, (took, pause)) in owed.iter().enumerate() {
        assert!(
            *pause <= FAILED_RUN_PAUSE.max(*took * 4),
            "breach {i} in a row owes {pause:?} for a call of {took:?}: past the run's cap"
        );
    }

    // One call that passes ends the run.
    match chain.run(&insert_flagged(None)) {
        Verdict::Publish(outputs) => assert_eq!(outputs.len(), 1),
        other => panic!("expected the unflagged event published, got {other:?}"),
    }
    assert!(
        chain.take_pause().is_zero(),
        "a call that passes owes nothing"
    );
    let (took, again) = breach(&mut chain, &bomb, "output-too-large");
    assert!(
        again <= took * 4,
        "after a call that passed, a breach costs 4 × its call again: {again:?} for {took:?}"
    );

    // Costly breaches (the 100 ms deadline): four times the call, however many in a row.
    let spin = insert_flagged(Some("spin"));
    for i in 0..3 {
        let (took, pause) = breach(&mut chain, &spin, "deadline");
        assert!(
            pause <= took * 4,
            "deadline breach {i} in a row owes {pause:?} for a call of {took:?}: lengthened"
        );
    }
}

/// An insert of `{_id: 1}` into `shop.orders`, with the `faulty` plugin's `flag` set to true
/// (none: an event it passes unchanged).
fn insert_flagged(flag: Option<&str>) -> tidegate::model::Change {
    let mut full = bson::rawdoc! { "_id": 1 };
    if let Some(flag) = flag {
        let flag: &bson::raw::CStr = flag.try_into().expect("a flag name");
        full.append(flag, true);
    }
    insert_of(full)
}

/// An insert of `full` (with `_id: 1`) into `shop.orders`.
fn insert_of(full: bson::RawDocumentBuf) -> tidegate::model::Change {
    use std::borrow::Cow;
    use tidegate::model::{Change, Fields, Namespace, Operation};

    let key = bson::rawdoc! { "_id": 1 };
    let namespace = Namespace {
        db: "shop".into(),
        coll: Some("orders".into()),
    };
    let fields = Fields {
        document_key: Some(Cow::Owned(key)),
        full_document: Some(Cow::Owned(full)),
        ..Fields::new("82AA", Operation::Insert, namespace)
    };
    Change::from_fields(fields, None).expect("change")
}

/// A plugin's wait (a guest's `sleep`: a monotonic-clock pollable it blocks on) is a host
/// call, which the epoch deadline cannot cut: had tidegate let it block, one event could have
/// held a worker of the pool for as long as the plugin asked (an hour, or for ever), with no
/// CPU charged to its tenant, and two such tenants would have stalled every other. Without
/// the `clock` capability a plugin's clock is stopped, so its waits end at once (a verdict
/// still cannot depend on time); with it, a wait is real but one reaching past the call's
/// deadline fails the call as a deadline, at once, and a wait within it is charged to the
/// tenant on the worker pool as CPU time (see the pool's own test). Each case is checked by the plugin's own
/// monotonic clock and by the call's duration; the only timings asserted are ceilings far
/// above the deadline (a wait that blocked would take a minute) and a floor the wait must
/// have lasted.
#[test]
fn a_plugin_cannot_wait_past_its_deadline() {
    use std::time::Instant;
    use tidegate::plugin::Verdict;

    const MINUTE_MS: i64 = 60_000;
    let snoop = plugin_dir().expect("plugins").join("snoop.wasm");
    let waiting = |ms: i64| insert_of(bson::rawdoc! { "_id": 1, "wait_ms": ms });
    let chain_of = |grants: &str| {
        offline_chain(&format!(
            "{}\n[pipeline.capabilities]\n{grants}\n",
            offline_config("", "snoop", &snoop, "", "timeout_ms = 200")
        ))
    };
    let waited_ms = |verdict: &Verdict| match verdict {
        Verdict::Publish(outputs) => header_of(&outputs[0].headers, "X-Waited-Ms")
            .map(|ms| ms.parse::<u64>().expect("a number")),
        other => panic!("expected the event published, got {other:?}"),
    };

    // No clock: a minute's wait ends at once, and the clock did not move.
    let (_sandbox, mut stopped) = chain_of("clock = false");
    let started = Instant::now();
    let verdict = stopped.run(&waiting(MINUTE_MS));
    let took = started.elapsed();
    assert_eq!(waited_ms(&verdict), Some(0));
    assert!(
        took < Duration::from_secs(30),
        "a stopped clock's wait took {took:?}"
    );

    // The clock granted: a wait within the deadline is real.
    let (_sandbox, mut real) = chain_of("clock = true");
    let verdict = real.run(&waiting(50));
    let waited = waited_ms(&verdict).expect("the wait's header");
    assert!(
        waited >= 50,
        "asked 50 ms, waited {waited} ms by the plugin's clock"
    );
    // The wait held the worker: the worker pool charges it as CPU time.
    let strain = real.take_strain();
    assert!(
        strain.waited >= Duration::from_millis(50),
        "the chain reports {:?} waited",
        strain.waited
    );

    // ... and one past the deadline fails the call, without waiting for it.
    let started = Instant::now();
    let verdict = real.run(&waiting(MINUTE_MS));
    let took = started.elapsed();
    match verdict {
        Verdict::DeadLetter(cause) => {
            assert_eq!(cause.kind().as_str(), "deadline");
            assert!(
                cause.message().contains("wait"),
                "the reason names the wait: {}",
                cause.message()
            );
        }
        other => panic!("expected a deadline dead letter, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(30),
        "a wait past the deadline took {took:?}"
    );
    // The plugin is called again (on a fresh instance) and publishes.
    assert!(waited_ms(&real.run(&waiting(0))).is_some());
}

/// The WASI resources a plugin holds (pollables, streams…) live in host memory, outside
/// `memory_mib`: an instance may hold at most `MAX_RESOURCES` at once, and one that creates
/// more fails its call as a `memory` breach naming the cap (wasmtime's own cap, a million,
/// let one call keep that many in the host's memory for the instance's life). Under the cap,
/// resources are created and kept as the plugin asks.
#[test]
fn a_plugin_cannot_hold_resources_without_bound() {
    use tidegate::plugin::Verdict;
    use tidegate::sandbox::MAX_RESOURCES;

    let snoop = plugin_dir().expect("plugins").join("snoop.wasm");
    let (_sandbox, mut chain) = offline_chain(&offline_config("", "snoop", &snoop, "", ""));
    let holding = |n: usize| insert_of(bson::rawdoc! { "_id": 1, "hold": n as i64 });

    // Two events of 100 each: the instance keeps them (the second sees 200).
    for held in [100, 200] {
        match chain.run(&holding(100)) {
            Verdict::Publish(outputs) => assert_eq!(
                header_of(&outputs[0].headers, "X-Held"),
                Some(held.to_string())
            ),
            other => panic!("expected the event published, got {other:?}"),
        }
    }
    match chain.run(&holding(MAX_RESOURCES * 2)) {
        Verdict::DeadLetter(cause) => {
            assert_eq!(cause.kind().as_str(), "memory");
            assert!(
                cause.message().contains(&MAX_RESOURCES.to_string()),
                "the reason names the cap: {}",
                cause.message()
            );
        }
        other => panic!("expected a memory dead letter, got {other:?}"),
    }
    // A fresh instance holds nothing: the next call starts again from none.
    match chain.run(&holding(1)) {
        Verdict::Publish(outputs) => assert_eq!(
            header_of(&outputs[0].headers, "X-Held").as_deref(),
            Some("1")
        ),
        other => panic!("expected the event published, got {other:?}"),
    }
}

/// The value of header `name` among `headers`.
fn header_of(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, value)| value.clone())
}

/// A chain of the `faulty` plugin alone under [`config_text`], and its sandbox (see
/// [`offline_chain`]).
fn faulty_chain(breach_pause: u32) -> (tidegate::sandbox::Sandbox, tidegate::plugin::Chain) {
    offline_chain(&config_text(breach_pause))
}

/// The chain of the one plugin of `text`'s one pipeline (an [`offline_config`]), loaded in
/// process, and its sandbox: keep the sandbox while the chain runs (dropping it stops the
/// epoch ticker that fires deadlines).
fn offline_chain(text: &str) -> (tidegate::sandbox::Sandbox, tidegate::plugin::Chain) {
    use tidegate::plugin::{Chain, Plugin};

    let config = tidegate::Config::parse(text, Path::new("."), |_| None).expect("config");
    let sandbox = tidegate::new_sandbox(&config).expect("sandbox");
    let pipeline = &config.pipelines[0];
    let plugin_config = &pipeline.plugins[0];
    let file = tidegate::config::PipelineConfig::plugin_path(plugin_config, Path::new("."));
    let settings = Chain::settings(pipeline, plugin_config);
    let plugin = Plugin::load(&sandbox, &plugin_config.name, &file, &settings).expect("load");
    let chain = Chain::of(vec![plugin], pipeline);
    (sandbox, chain)
}

/// `tidegate check` of config `text`, written into `dir`.
fn check(dir: &Path, text: &str) -> std::process::Output {
    let path = dir.join("tidegate.toml");
    std::fs::write(&path, text).expect("write config");
    std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run tidegate check")
}

/// A config of one pipeline `p` with one plugin, for tests that load plugins without servers
/// (`tidegate check`, in-process chains): `sandbox`, `quarantine` and `limits` are TOML
/// added to those sections.
fn offline_config(
    sandbox: &str,
    name: &str,
    file: &Path,
    quarantine: &str,
    limits: &str,
) -> String {
    format!(
        r#"
[sandbox]
cache = false
{sandbox}

[nats]
url = "nats://127.0.0.1:1"

[[pipeline]]
id = "p"
mongodb_uri = "mongodb://127.0.0.1:1/?replicaSet=rs0"
database = "shop"

[pipeline.sink]
stream = "P"
subject_prefix = "p"

[pipeline.quarantine]
{quarantine}

[[pipeline.plugins]]
name = "{name}"
file = "{}"
limits = {{ {limits} }}
"#,
        file.display()
    )
}

/// A one-pipeline config with the `faulty` plugin under a 100 ms deadline (and fuel for far
/// longer, so that the deadline is what stops it).
fn config_text(breach_pause: u32) -> String {
    let plugins = plugin_dir().expect("plugins");
    offline_config(
        "",
        "faulty",
        &plugins.join("faulty.wasm"),
        &format!("breach_pause = {breach_pause}"),
        // 1 MiB of output: a header bomb's 2 MiB header breaks it.
        "timeout_ms = 100, fuel_per_call = 1000000000000, max_output_bytes = 1048576",
    )
}
