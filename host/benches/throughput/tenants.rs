//! Scenario 8: the shared reader at scale. K tenants on one pipeline (a database each, or one
//! collection routed by tenant key), each with a chain of 1–3 first-party plugins, N events
//! written live; per row the total rate (and its ratio to K = 1 of the same routing and
//! chain), the start-up time, the change streams open on mongod, mongod's CPU, the CPU per
//! event of each process (the bench process, which hosts tidegate; mongod; nats-server), and
//! the bench process's RSS and threads.
//!
//! Sizes, chains and routings come from the environment, so that the whole matrix or one
//! essential row can be run: `TIDEGATE_BENCH_TENANTS=1,10,100,1000` (default `1,10,100`),
//! `TIDEGATE_BENCH_CHAINS=1,3` (plugins per tenant, default `1`),
//! `TIDEGATE_BENCH_ROUTING=db,key` (default both), `TIDEGATE_BENCH_LAYOUT=own,shared` (a
//! stream per tenant, or one stream the tenants share with a subject space each; default
//! both), `TIDEGATE_BENCH_ROUNDS=R` (default 1: each round runs every K in turn; ratios are
//! per round, and the table shows their median), `TIDEGATE_BENCH_CHECKPOINT_MS=M` (the
//! pipeline's `checkpoint.interval_ms`, default tidegate's).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bson::{doc, Document};
use futures::StreamExt;
use tidegate::Config;
use tidegate_testkit::{stream_len, MongoReplicaSet, NatsServer};

use super::{fmt_rate, median, Args, Cpu, Table, INSERT_BATCH, KV_BUCKET};

/// Inserts in flight at once while writing the events (one `insert_many` each).
const WRITERS: usize = 8;

/// Streams whose length one poll asks for at once after the first incomplete one is complete,
/// and the pause between polls while the events are being stored.
const POLL_GROUP: usize = 32;
const POLL_EVERY: Duration = Duration::from_millis(20);

/// The longest a run may take to start its tenants or to store every event.
const CEILING: Duration = Duration::from_secs(900);

/// How the tenants' events are told apart.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Routing {
    /// Tenant `i` owns database `db<i>`.
    Database,
    /// One collection, `tenant_key = "fullDocument.tenantId"`.
    Key,
}

impl Routing {
    fn label(self) -> &'static str {
        match self {
            Routing::Database => "database per tenant",
            Routing::Key => "tenant key",
        }
    }
}

/// Where the tenants publish.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Tenant `i` has its own sink, stream `T<i>`.
    OwnStreams,
    /// The pipeline's sink, stream `ALL`, shared: tenant `i` publishes under `t.t<i>`.
    SharedStream,
}

impl Layout {
    fn label(self) -> &'static str {
        match self {
            Layout::OwnStreams => "a stream per tenant",
            Layout::SharedStream => "one shared stream",
        }
    }
}

/// A comma-separated list from the environment variable `name`, or `default`.
pub(super) fn list<T: std::str::FromStr>(name: &str, default: Vec<T>) -> Vec<T> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.split(',').map(|k| k.trim().parse().ok()).collect())
        .unwrap_or(default)
}

/// Scenario 8 alone: every (routing, chain, K) row on fresh servers.
pub(super) async fn tenants_only(args: &Args, plugins: &Path) -> anyhow::Result<Vec<Table>> {
    let sizes: Vec<usize> = list("TIDEGATE_BENCH_TENANTS", vec![1, 10, 100]);
    let chains: Vec<usize> = list("TIDEGATE_BENCH_CHAINS", vec![1]);
    let routings: Vec<Routing> = match std::env::var("TIDEGATE_BENCH_ROUTING").ok().as_deref() {
        Some("db") => vec![Routing::Database],
        Some("key") => vec![Routing::Key],
        _ => vec![Routing::Database, Routing::Key],
    };
    let layouts: Vec<Layout> = match std::env::var("TIDEGATE_BENCH_LAYOUT").ok().as_deref() {
        Some("own") => vec![Layout::OwnStreams],
        Some("shared") => vec![Layout::SharedStream],
        _ => vec![Layout::OwnStreams, Layout::SharedStream],
    };
    if chains.iter().any(|c| !(1..=3).contains(c)) {
        bail!("TIDEGATE_BENCH_CHAINS: plugins per tenant are 1, 2 or 3");
    }
    let rounds: usize = list("TIDEGATE_BENCH_ROUNDS", vec![1])
        .first()
        .copied()
        .unwrap_or(1);
    if rounds == 0 {
        bail!("TIDEGATE_BENCH_ROUNDS: at least one round");
    }
    let mut table = Table::new(
        &format!(
            "8. Shared reader: K tenants, one change stream (N = {} live events, {rounds} \
             round(s))",
            args.events
        ),
        &[
            "routing",
            "streams",
            "plugins",
            "K",
            "start-up s",
            "events/s total",
            "× K = 1",
            "× K = 1 per round",
            "change streams on mongod",
            "mongod CPU cores",
            "CPU µs per event: bench / mongod / nats",
            "RSS MiB",
            "threads",
        ],
    );
    let mut cases = Vec::new();
    for &routing in &routings {
        for &layout in &layouts {
            cases.extend(chains.iter().map(|&chain| (routing, layout, chain)));
        }
    }
    for (routing, layout, chain) in cases {
        // rows[i][r]: size i in round r. Rounds interleave the sizes, so that a slow
        // minute on a shared machine lands on K = 1 and K = 1000 alike.
        let mut rows: Vec<Vec<Row>> = sizes.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for (i, &k) in sizes.iter().enumerate() {
                eprintln!(
                    "8. tenants: {}, {}, {chain} plugin(s), K = {k}, round {}/{rounds}…",
                    routing.label(),
                    layout.label(),
                    round + 1
                );
                let case = (k, chain, routing, layout);
                rows[i].push(run(args.events, plugins, case).await?);
            }
        }
        for (i, &k) in sizes.iter().enumerate() {
            let runs = &rows[i];
            // Each round's ratio is against the first size of the same round.
            let ratios: Vec<f64> = runs
                .iter()
                .zip(&rows[0])
                .map(|(row, first)| row.rate() / first.rate())
                .collect();
            let [ratio, per_round] = ratio_cells(&ratios);
            table.row(vec![
                routing.label().into(),
                layout.label().into(),
                chain_label(chain).into(),
                k.to_string(),
                format!(
                    "{:.1}",
                    median(runs.iter().map(|r| r.startup.as_secs_f64()))
                ),
                fmt_rate(median(runs.iter().map(Row::rate))),
                ratio,
                per_round,
                runs.iter()
                    .map(|r| r.streams)
                    .max()
                    .unwrap_or(0)
                    .to_string(),
                format!(
                    "{:.2}",
                    median(runs.iter().map(|r| r.cpu_seconds[1] / r.wall))
                ),
                (0..3)
                    .map(|p| {
                        let per_event = median(runs.iter().map(|r| r.cpu_seconds[p] / r.events));
                        format!("{:.0}", per_event * 1e6)
                    })
                    .collect::<Vec<_>>()
                    .join(" / "),
                (runs.iter().map(|r| r.rss_kib).max().unwrap_or(0) / 1024).to_string(),
                runs.iter()
                    .map(|r| r.threads)
                    .max()
                    .unwrap_or(0)
                    .to_string(),
            ]);
        }
    }
    table.note("In-process: RSS and threads are the bench process's (tidegate, its drivers, this harness), read after the row's events are stored; rows run in order in one process, so a row's RSS may include what earlier rows left allocated. Collections are created before tidegate starts; events are written live with insert_many (8 in flight; database per tenant: N/K events per tenant; tenant key: batches of 1000 spread over all tenants) while tidegate runs; the rate is events / (first write → last tenant's last message stored). \"× K = 1\" is against the first K of the same routing and chain in the same round, the median over the rounds (each round runs every K in turn, so that a slow minute on a shared machine lands on every K alike); events/s, start-up, mongod CPU and CPU per event are medians over the rounds, RSS and threads the highest. CPU per event is each process's CPU time from the first write to the last message stored, divided by the events written (the bench process's includes the writer and the polling of stream lengths). Start-up: from tidegate::run until every tenant has saved its start. Change streams counted with $currentOp (allUsers, idleCursors) after the run.".into());
    Ok(vec![table])
}

/// The "× K = 1" and "× K = 1 per round" cells: the median of the rounds' ratios, and each.
pub(super) fn ratio_cells(ratios: &[f64]) -> [String; 2] {
    [
        format!("{:.2}", median(ratios.iter().copied())),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
    ]
}

fn chain_label(plugins: usize) -> &'static str {
    match plugins {
        1 => "op-filter",
        2 => "op-filter, redact",
        _ => "op-filter, redact, fanout×1",
    }
}

/// One tenant's `[[pipeline.tenant.plugins]]` tables: the first `count` of op-filter, redact
/// and fanout (one copy: one message per event).
fn tenant_plugins(count: usize) -> String {
    [
        "[[pipeline.tenant.plugins]]\nname = \"op-filter\"\nconfig = { operations = \"insert,update,replace,delete\" }\n",
        "[[pipeline.tenant.plugins]]\nname = \"redact\"\nconfig = { fields = \"email\" }\n",
        "[[pipeline.tenant.plugins]]\nname = \"fanout\"\nconfig = { copies = \"1\" }\n",
    ]
    .iter()
    .take(count)
    .copied()
    .collect()
}

/// What one row measured.
struct Row {
    startup: Duration,
    streams: usize,
    /// Events written, and seconds from the first write to the last message stored.
    events: f64,
    wall: f64,
    /// CPU seconds over `wall` of the bench process (tidegate and this harness), mongod and
    /// nats-server.
    cpu_seconds: [f64; 3],
    rss_kib: u64,
    threads: usize,
}

impl Row {
    /// Events per second, first write to last message stored.
    fn rate(&self) -> f64 {
        self.events / self.wall
    }
}

/// One run on fresh servers: `k` tenants of `plugins` plugins each, `n` events.
async fn run(
    n: usize,
    plugin_dir: &Path,
    (k, plugins, routing, layout): (usize, usize, Routing, Layout),
) -> anyhow::Result<Row> {
    let (mongo, nats) = tokio::try_join!(MongoReplicaSet::start(), NatsServer::start())?;
    let cpu = Cpu::of(&mongo, &nats);
    let pipeline = match routing {
        Routing::Database => String::new(),
        Routing::Key => "database = \"app\"\ncollections = [\"orders\"]\ntenant_key = \"fullDocument.tenantId\"\nfull_document = \"update-lookup\"\nskip_operations = [\"delete\"]\n".into(),
    };
    let mut text = format!(
        "plugin_dir = \"{}\"\n[log]\nlevel = \"warn\"\n[sandbox]\nmax_instances = {instances}\n[nats]\nurl = \"{}\"\n[[pipeline]]\nid = \"p\"\nmongodb_uri = \"{}\"\n{pipeline}",
        plugin_dir.display(),
        nats.url(),
        mongo.uri(),
        instances = (k * plugins + 16).max(256)
    );
    if let Ok(interval) = std::env::var("TIDEGATE_BENCH_CHECKPOINT_MS") {
        text += &format!("[pipeline.checkpoint]\ninterval_ms = {interval}\n");
    }
    if layout == Layout::SharedStream {
        text += "[pipeline.sink]\nstream = \"ALL\"\nsubject_prefix = \"t\"\n";
    }
    let chain = tenant_plugins(plugins);
    for i in 0..k {
        let ns = match routing {
            Routing::Key => "app.orders".to_string(),
            Routing::Database => format!("db{i}.*"),
        };
        text += &format!("[[pipeline.tenant]]\nid = \"t{i}\"\nnamespaces = [\"{ns}\"]\n{chain}");
        if layout == Layout::OwnStreams {
            text +=
                &format!("[pipeline.tenant.sink]\nstream = \"T{i}\"\nsubject_prefix = \"t{i}\"\n");
        }
    }
    let config =
        Config::parse(&text, plugin_dir, |_| None).map_err(|e| anyhow!("tenants config: {e}"))?;
    let client = mongo.client().await?;
    // Collections exist before the run: creating a thousand of them on the first insert is
    // mongod's cost (tens of ms each), not the reader's.
    let databases: Vec<String> = match routing {
        Routing::Database => (0..k).map(|i| format!("db{i}")).collect(),
        Routing::Key => vec!["app".into()],
    };
    let mut creating = futures::stream::iter(databases.into_iter().map(|db| {
        let db = client.database(&db);
        async move { db.create_collection("orders").await }
    }))
    .buffer_unordered(WRITERS);
    while let Some(done) = creating.next().await {
        done?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let began_run = Instant::now();
    let running = tokio::spawn(tidegate::run(config, async move {
        let _ = stopped.await;
    }));
    let nats_client = nats.client().await?;
    let js = async_nats::jetstream::new(nats_client.clone());
    // Every tenant has saved its start (its lane then joins the reader).
    for i in 0..k {
        loop {
            if began_run.elapsed() > CEILING {
                bail!("tenant t{i} saved no start within {} s", CEILING.as_secs());
            }
            if running.is_finished() {
                bail!("tidegate stopped during start-up");
            }
            if let Ok(kv) = js.get_key_value(KV_BUCKET).await {
                if matches!(kv.get(format!("p.t{i}")).await, Ok(Some(_))) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let startup = began_run.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let profiler = super::goals::Profiler::start(&format!(
        "tenants-{}-{}-{k}x{plugins}",
        if layout == Layout::SharedStream {
            "shared"
        } else {
            "own"
        },
        if routing == Routing::Key { "key" } else { "db" },
    ));
    let cpu_before = cpu.mark();
    let began = Instant::now();
    let writes = writes(n, k, routing);
    let total: u64 = writes.iter().map(|(_, docs)| docs.len() as u64).sum();
    let expected = per_tenant(&writes, k);
    let mut inserts = futures::stream::iter(writes.into_iter().map(|(db, docs)| {
        let coll = client.database(&db).collection::<Document>("orders");
        async move { coll.insert_many(docs).await }
    }))
    .buffer_unordered(WRITERS);
    while let Some(done) = inserts.next().await {
        done?;
    }
    let deadline = Instant::now() + CEILING;
    // The streams not yet complete. While one is incomplete, a poll asks for that one alone
    // (one request every POLL_EVERY); once it is complete the next ones are asked in groups
    // until one is not. Measuring so costs NATS about fifty requests a second whatever K:
    // a group of 32 every poll was ~1600 stream-info requests a second at K = 1000, load on
    // the same two cores that was counted against tidegate.
    let mut waiting: Vec<(String, u64)> = match layout {
        Layout::OwnStreams => expected
            .into_iter()
            .enumerate()
            .map(|(i, want)| (format!("T{i}"), want))
            .collect(),
        Layout::SharedStream => vec![("ALL".to_string(), total)],
    };
    let mut group = 1;
    while !waiting.is_empty() {
        group = group.min(waiting.len());
        let lens = futures::future::join_all(waiting[..group].iter().map(|(stream, _)| {
            let client = &nats_client;
            async move { stream_len(client, stream).await }
        }))
        .await;
        let done: Vec<bool> = waiting[..group]
            .iter()
            .zip(lens)
            .map(|((_, want), len)| len >= *want)
            .collect();
        let complete = done.iter().all(|&d| d);
        let mut flags = done.into_iter();
        waiting.retain(|_| !flags.next().unwrap_or(false));
        if complete {
            group = POLL_GROUP;
            continue;
        }
        group = 1;
        if Instant::now() > deadline {
            bail!(
                "tenants: {} streams incomplete after {} s",
                waiting.len(),
                CEILING.as_secs()
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let wall = began.elapsed();
    let cpu_seconds = cpu.seconds(cpu_before, cpu.mark());
    profiler.stop();
    let streams = change_streams(&client).await?;
    let row = Row {
        startup,
        streams,
        events: total as f64,
        wall: wall.as_secs_f64(),
        cpu_seconds,
        rss_kib: super::rss_kib(),
        threads: std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count()),
    };
    let _ = stop.send(());
    let _ = running.await;
    Ok(row)
}

/// The inserts of one run, as (database, documents): database per tenant, N/K documents to
/// each tenant's database in batches of at most [`INSERT_BATCH`]; tenant key, batches of
/// [`INSERT_BATCH`] in `app.orders` whose owners rotate over every tenant.
fn writes(n: usize, k: usize, routing: Routing) -> Vec<(String, Vec<Document>)> {
    let doc = |n: usize, owner: usize| {
        doc! { "n": n as i64, "tenantId": format!("t{owner}"), "email": "a@b.c", "pad": "x".repeat(200) }
    };
    match routing {
        Routing::Database => {
            let share = n.div_ceil(k).max(1);
            let mut writes = Vec::new();
            for tenant in 0..k {
                let mut from = 0;
                while from < share {
                    let to = (from + INSERT_BATCH).min(share);
                    let docs = (from..to)
                        .map(|j| doc(tenant * share + j, tenant))
                        .collect();
                    writes.push((format!("db{tenant}"), docs));
                    from = to;
                }
            }
            writes
        }
        Routing::Key => (0..n.div_ceil(INSERT_BATCH))
            .map(|b| {
                let docs = (b * INSERT_BATCH..(b + 1) * INSERT_BATCH)
                    .map(|j| doc(j, j % k))
                    .collect();
                ("app".to_string(), docs)
            })
            .collect(),
    }
}

/// How many of `writes`' documents each of the `k` tenants owns (by `tenantId`).
fn per_tenant(writes: &[(String, Vec<Document>)], k: usize) -> Vec<u64> {
    let mut counts = vec![0; k];
    for doc in writes.iter().flat_map(|(_, docs)| docs) {
        let owner = doc
            .get_str("tenantId")
            .ok()
            .and_then(|id| id.strip_prefix('t'))
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(count) = owner.and_then(|i| counts.get_mut(i)) {
            *count += 1;
        }
    }
    counts
}

/// The change streams open on mongod: every operation or idle cursor whose command began
/// with `$changeStream`.
async fn change_streams(client: &mongodb::Client) -> anyhow::Result<usize> {
    let ops: Vec<Document> = futures::TryStreamExt::try_collect(
        client
            .database("admin")
            .aggregate(vec![
                doc! { "$currentOp": { "allUsers": true, "idleCursors": true } },
            ])
            .await?,
    )
    .await?;
    Ok(ops
        .iter()
        .filter(|op| {
            let command = op
                .get_document("cursor")
                .and_then(|c| c.get_document("originatingCommand"))
                .or_else(|_| op.get_document("command"));
            command
                .ok()
                .and_then(|c| c.get_array("pipeline").ok())
                .and_then(|p| p.first())
                .and_then(|s| s.as_document())
                .is_some_and(|s| s.contains_key("$changeStream"))
        })
        .count())
}
