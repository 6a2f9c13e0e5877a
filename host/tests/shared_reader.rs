//! One change stream per tenanted pipeline, against real servers: events routed to tenants
//! by namespace and by tenant key, one change stream on mongod whatever the number of
//! tenants, a slow tenant detaching and rejoining with nothing lost or duplicated while the
//! others flow (and, alone, holding the stream back instead), a restart with tenants at
//! different positions, and a backlog read in the shared reader's large batches.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bson::{doc, Document};
use futures::TryStreamExt;
use support::{json, wat_filter, Harness, InProcess, SIGCONT, SIGSTOP, SIGTERM};
use tidegate_testkit::wait_until;

/// Generous ceiling for anything a busy machine may be slow at.
const PATIENCE: Duration = Duration::from_secs(180);

/// A config of pipeline `p` (the `[[pipeline]]` keys in `pipeline`) with `tenants`
/// (`[[pipeline.tenant]]` tables).
fn config(h: &Harness, pipeline: &str, tenants: &str) -> String {
    format!(
        r#"
plugin_dir = "{plugin_dir}"

[nats]
url = "{nats}"
ack_timeout_ms = 2000

[[pipeline]]
id = "p"
mongodb_uri = "{mongo}"
{pipeline}

[pipeline.checkpoint]
interval_ms = 200

{tenants}
"#,
        plugin_dir = h.plugins.display(),
        nats = h.nats.url(),
        mongo = h.mongo.uri(),
    )
}

/// A tenant table: `id` seeing `namespaces`, publishing to stream `id` in upper case.
fn tenant(id: &str, namespaces: &str, extra: &str) -> String {
    format!(
        "[[pipeline.tenant]]\nid = \"{id}\"\nnamespaces = [{namespaces}]\n{extra}\n\
         [pipeline.tenant.sink]\nstream = \"{stream}\"\nsubject_prefix = \"{id}\"\n",
        stream = id.to_uppercase()
    )
}

/// `n` of every message's `fullDocument`, in stream order.
fn numbers(messages: &[StreamMessage]) -> Vec<i64> {
    messages
        .iter()
        .filter_map(|m| json(m)["fullDocument"]["n"].as_i64())
        .collect()
}

/// Tenant `id`'s messages in the stream `ALL` its pipeline's tenants share (its subjects,
/// `all.<id>.…`), in stream order.
fn tenant_messages(all: &[StreamMessage], id: &str) -> Vec<StreamMessage> {
    let prefix = format!("all.{id}.");
    all.iter()
        .filter(|m| m.subject.starts_with(prefix.as_str()))
        .cloned()
        .collect()
}

/// A config of pipeline `p` over database `shop` whose tenants `ids` (each seeing
/// `shop.<id>`) share the stream `ALL` under `all.<id>`.
fn shared_stream_config(h: &Harness, ids: &[&str]) -> String {
    let tenants: String = ids
        .iter()
        .map(|id| format!("[[pipeline.tenant]]\nid = \"{id}\"\nnamespaces = [\"shop.{id}\"]\n"))
        .collect();
    let pipeline =
        "database = \"shop\"\n\n[pipeline.sink]\nstream = \"ALL\"\nsubject_prefix = \"all\"";
    config(h, pipeline, &tenants)
}

/// The change streams open on mongod: every operation or idle cursor whose command began
/// with `$changeStream`.
async fn change_streams(client: &mongodb::Client) -> anyhow::Result<usize> {
    let ops: Vec<Document> = client
        .database("admin")
        .aggregate(vec![
            doc! { "$currentOp": { "allUsers": true, "idleCursors": true } },
        ])
        .await?
        .try_collect()
        .await?;
    let first_stage = |op: &Document| -> Option<bool> {
        let command = op
            .get_document("cursor")
            .and_then(|c| c.get_document("originatingCommand"))
            .or_else(|_| op.get_document("command"))
            .ok()?;
        let stage = command.get_array("pipeline").ok()?.first()?.as_document()?;
        Some(stage.contains_key("$changeStream"))
    };
    Ok(ops
        .iter()
        .filter(|op| first_stage(op).unwrap_or(false))
        .count())
}

/// Waits until mongod has exactly one change stream open (every tenant joined the shared
/// reader); on timeout, the error lists what `$currentOp` showed.
async fn wait_one_change_stream(h: &Harness) -> anyhow::Result<()> {
    let client = h.mongo.client().await?;
    let waited = wait_until("one change stream on mongod", PATIENCE, || {
        let client = client.clone();
        async move { matches!(change_streams(&client).await, Ok(1)) }
    })
    .await;
    if let Err(err) = waited {
        let ops: Vec<Document> = client
            .database("admin")
            .aggregate(vec![
                doc! { "$currentOp": { "allUsers": true, "idleCursors": true } },
            ])
            .await?
            .try_collect()
            .await?;
        anyhow::bail!(
            "{err}: {:?} counted; $currentOp: {ops:#?}",
            change_streams(&client).await
        );
    }
    Ok(())
}

/// Database-per-tenant: five tenants on one cluster-wide pipeline, each owning a database
/// (one owns two of another's collections' database too, via `db.coll`). Every tenant
/// receives exactly its own events, in order, and mongod serves one change stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_namespace_over_one_change_stream() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let k = 5;
    let mut tenants = String::new();
    for i in 0..k {
        tenants.push_str(&tenant(&format!("t{i}"), &format!("\"db{i}.*\""), ""));
    }
    // Overlap: `audit` sees db0.orders too (an event may belong to two tenants).
    tenants.push_str(&tenant("audit", "\"db0.orders\"", ""));
    let path = h.write_config("shared.toml", &config(&h, "", &tenants))?;
    let units: Vec<String> = (0..k)
        .map(|i| format!("p.t{i}"))
        .chain(["p.audit".to_string()])
        .collect();
    let running = InProcess::start(&path)?;
    h.wait_checkpoints(&units).await?;
    wait_one_change_stream(&h).await?;

    let client = h.mongo.client().await?;
    for n in 0..20i64 {
        for i in 0..k {
            client
                .database(&format!("db{i}"))
                .collection::<Document>("orders")
                .insert_one(doc! { "n": n, "tenant": i })
                .await?;
        }
        // A database no tenant owns: routed nowhere.
        client
            .database("nobody")
            .collection::<Document>("orders")
            .insert_one(doc! { "n": n })
            .await?;
    }
    for i in 0..k {
        let stream = format!("T{i}");
        let messages = h.wait_settled(&stream, 20, PATIENCE).await?;
        assert_eq!(numbers(&messages), (0..20).collect::<Vec<_>>(), "{stream}");
        for m in &messages {
            assert_eq!(json(m)["ns"]["db"], format!("db{i}"), "{stream}");
        }
    }
    let audit = h.wait_settled("AUDIT", 20, PATIENCE).await?;
    assert_eq!(numbers(&audit), (0..20).collect::<Vec<_>>());
    assert_eq!(
        change_streams(&client).await?,
        1,
        "one change stream for {} tenants",
        k + 1
    );
    running.stop().await?;
    Ok(())
}

/// An ObjectId a tenant of `routes_by_tenant_key` is keyed by.
const TENANT_OID: &str = "65a1f0c2e4b0a1b2c3d4e5f6";

/// Tenant key: tenants share one collection and own the documents whose `tenantId` is one
/// of their key values (the id by default), whether a string, an integer (int, long, or an
/// integral double) or an ObjectId, named by its text. Inserts and updates (with the
/// looked-up document) reach exactly their owner; documents of an unknown tenant, without
/// the key or with a key of another type (a fraction, a boolean, an array) reach nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_tenant_key() -> anyhow::Result<()> {
    routes_by_tenant_key_with("shared").await
}

/// The same with a change stream per tenant (`tenant_reader = "own"`), where the server
/// narrows each tenant's stream to its key values: the query a tenant catching up on its
/// own reads with, which must pick exactly the events the router gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_tenant_key_on_streams_of_their_own() -> anyhow::Result<()> {
    routes_by_tenant_key_with("own").await
}

async fn routes_by_tenant_key_with(reader: &str) -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let pipeline = format!(
        "database = \"shop\"\ncollections = [\"orders\"]\n\
         full_document = \"update-lookup\"\nskip_operations = [\"delete\"]\n\
         tenant_key = \"fullDocument.tenantId\"\ntenant_reader = \"{reader}\""
    );
    let tenants = [
        tenant("a", "\"shop.orders\"", ""),
        tenant("b", "\"shop.orders\"", ""),
        tenant("c", "\"shop.orders\"", "key_values = [\"c1\", \"c2\"]"),
        tenant("n", "\"shop.orders\"", "key_values = [\"42\"]"),
        tenant(
            "o",
            "\"shop.orders\"",
            &format!("key_values = [\"{TENANT_OID}\"]"),
        ),
    ]
    .concat();
    let path = h.write_config("key.toml", &config(&h, &pipeline, &tenants))?;
    let running = InProcess::start(&path)?;
    h.wait_checkpoints(&["p.a", "p.b", "p.c", "p.n", "p.o"])
        .await?;
    if reader == "shared" {
        wait_one_change_stream(&h).await?;
    }

    let orders = h.collection().await?;
    let owners = ["a", "b", "c1", "c2", "zzz"];
    for n in 0..30i64 {
        let owner = owners[n as usize % owners.len()];
        orders
            .insert_one(doc! { "_id": n, "n": n, "tenantId": owner })
            .await?;
    }
    let oid = bson::oid::ObjectId::parse_str(TENANT_OID)?;
    let typed: [(i64, bson::Bson); 11] = [
        (200, 42i32.into()),
        (201, 42i64.into()),
        (202, 42.0f64.into()),
        (203, "42".into()),
        (204, 42.5f64.into()),
        (205, oid.into()),
        (206, TENANT_OID.into()),
        (207, true.into()),
        (208, bson::bson!(["a"])),
        (209, 7i32.into()),
        (210, "042".into()),
    ];
    for (n, key) in typed {
        orders
            .insert_one(doc! { "_id": n, "n": n, "tenantId": key })
            .await?;
    }
    orders.insert_one(doc! { "_id": 100, "n": 100 }).await?;
    // An update of a's first document: the looked-up document carries the key.
    orders
        .update_one(doc! { "_id": 0 }, doc! { "$set": { "updated": true } })
        .await?;

    let expect = |keys: &[&str]| -> Vec<i64> {
        (0..30)
            .filter(|n| keys.contains(&owners[*n as usize % owners.len()]))
            .collect()
    };
    let a = h.wait_settled("A", 7, PATIENCE).await?;
    let mut a_inserts = expect(&["a"]);
    a_inserts.push(0); // the update
    assert_eq!(numbers(&a), a_inserts);
    assert_eq!(json(&a[6])["operationType"], "update");
    let b = h.wait_settled("B", 6, PATIENCE).await?;
    assert_eq!(numbers(&b), expect(&["b"]));
    let c = h.wait_settled("C", 12, PATIENCE).await?;
    assert_eq!(numbers(&c), expect(&["c1", "c2"]));
    let n = h.wait_settled("N", 4, PATIENCE).await?;
    assert_eq!(numbers(&n), [200, 201, 202, 203]);
    let o = h.wait_settled("O", 2, PATIENCE).await?;
    assert_eq!(numbers(&o), [205, 206]);
    running.stop().await?;
    Ok(())
}

/// The server and the router read a key value alike: over documents keyed by every BSON
/// type (and by arrays, and through them), the query a tenant's own stream is narrowed with
/// (`TenantKey::server_match`) picks exactly the documents whose key text
/// (`TenantKey::value_text`, what the router reads) is one of the tenant's values. Were they
/// to differ, a tenant catching up on its own would get events the shared reader keeps from
/// it, or lose events it would give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_and_the_router_read_a_key_value_alike() -> anyhow::Result<()> {
    use bson::{Bson, RawBsonRef, RawDocumentBuf};
    use tidegate::config::TenantKey;

    let h = Harness::start().await?;
    let client = h.mongo.client().await?;
    let keyed = client.database("keys").collection::<Document>("k");
    let oid = bson::oid::ObjectId::parse_str(TENANT_OID)?;
    let two_to_63 = 9_223_372_036_854_775_808.0f64;
    let keys: Vec<Bson> = vec![
        "acme".into(),
        "ACME".into(),
        "42".into(),
        "042".into(),
        "-7".into(),
        TENANT_OID.into(),
        TENANT_OID.to_uppercase().into(),
        42i32.into(),
        42i64.into(),
        42.0f64.into(),
        42.5f64.into(),
        (-7i64).into(),
        (-7.0f64).into(),
        1e17f64.into(),
        i64::MAX.into(),
        two_to_63.into(),
        oid.into(),
        bson::oid::ObjectId::new().into(),
        true.into(),
        Bson::Null,
        bson::bson!(["acme"]),
        bson::bson!([42]),
        bson::bson!({ "x": "acme" }),
    ];
    for (n, key) in keys.iter().enumerate() {
        keyed
            .insert_one(doc! { "_id": n as i64, "doc": { "org": { "k": key.clone() } } })
            .await?;
    }
    // A decimal 42 (which compares equal to 42 on the server), an array on the way, a key
    // missing, and something other than a document on the way.
    keyed
        .insert_one(doc! { "_id": 100i64, "doc": { "org": { "k": 0 } } })
        .await?;
    keyed
        .update_one(
            doc! { "_id": 100i64 },
            vec![doc! { "$set": { "doc.org.k": { "$toDecimal": "42" } } }],
        )
        .await?;
    keyed
        .insert_one(doc! { "_id": 101i64, "doc": { "org": [{ "k": "acme" }] } })
        .await?;
    keyed.insert_one(doc! { "_id": 102i64, "doc": {} }).await?;
    keyed
        .insert_one(doc! { "_id": 103i64, "doc": { "org": "acme" } })
        .await?;

    let values: Vec<String> = [
        "acme",
        "42",
        "042",
        "-7",
        TENANT_OID,
        &TENANT_OID.to_uppercase(),
        "100000000000000000",
        "9223372036854775807",
    ]
    .map(String::from)
    .to_vec();
    let mut by_server: Vec<i64> = keyed
        .find(TenantKey::server_match("doc.org.k", &values))
        .await?
        .map_ok(|d| d.get_i64("_id").unwrap_or(-1))
        .try_collect()
        .await?;
    by_server.sort_unstable();
    let mut by_router = Vec::new();
    let mut all = keyed
        .clone_with_type::<RawDocumentBuf>()
        .find(doc! {})
        .await?;
    while let Some(raw) = all.try_next().await? {
        // Under the root (`doc` here, `fullDocument` in an event), as the router walks.
        let key = match raw.get_document("doc")?.get("org")? {
            Some(RawBsonRef::Document(org)) => org.get("k")?,
            _ => None,
        };
        let text = key.and_then(TenantKey::value_text);
        if text.is_some_and(|text| values.iter().any(|v| *v == text)) {
            by_router.push(raw.get_i64("_id")?);
        }
    }
    by_router.sort_unstable();
    // The strings as written, the integers however stored, the ObjectId; not "ACME", the
    // fraction, 2^63, the other ObjectId, the decimal, arrays, a document, null, missing.
    assert_eq!(by_router, [0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 16]);
    assert_eq!(by_server, by_router);
    Ok(())
}

/// A tenant's plugin table (and limits) for a filter that spins ~20 M loop turns on every
/// event, which makes its tenant fall behind the shared reader.
/// The config of a test whose slow tenants must make progress on a busy machine: without the
/// background lane. Their spinning calls would make them heavy, and a heavy tenant runs only
/// on CPU nobody else wants (`SCHED_IDLE`): beside other processes that keep every core busy
/// it gets next to none, and the catch-up these tests wait for would not come within any
/// ceiling. The lane is tested in `sandbox` and measured in the noisy-neighbour bench.
fn slow_config(h: &Harness, pipeline: &str, tenants: &str) -> String {
    format!(
        "{}\n[sandbox]\nbackground = false\n",
        config(h, pipeline, tenants)
    )
}

fn slow_tenant_plugin(h: &Harness) -> String {
    spinning_plugin(h, 20_000_000)
}

/// A tenant's plugin tables: one filter that counts to `iterations` on every event.
fn spinning_plugin(h: &Harness, iterations: u32) -> String {
    let spin = wat_filter(
        h.dir.path(),
        "spin",
        1,
        "",
        "",
        &format!(
            "(local $i i32)\n(loop $spin\n(local.set $i (i32.add (local.get $i) (i32.const 1)))\n\
             (br_if $spin (i32.lt_u (local.get $i) (i32.const {iterations}))))"
        ),
    );
    format!(
        "limits = {{ timeout_ms = 10000, fuel_per_call = 1000000000 }}\n\
         [[pipeline.tenant.plugins]]\nname = \"spin\"\nfile = \"{}\"",
        spin.display()
    )
}

/// A slow tenant (a plugin that spins on every event) falls behind: the shared reader
/// detaches it and the fast tenant receives everything while the slow one is still far
/// behind; the slow tenant catches up on its own stream and rejoins; both end with every
/// event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tenant_detaches_and_rejoins_without_loss() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let slow_plugin = slow_tenant_plugin(&h);
    let tenants = [
        tenant("fast", "\"shop.orders\"", ""),
        tenant("slow", "\"shop.orders\"", &slow_plugin),
    ]
    .concat();
    // Detached once 50 events behind (not 16,384), so that a test of 600 events sees it.
    let pipeline = "database = \"shop\"\ntenant_lane_events = 50";
    let path = h.write_config("slow.toml", &slow_config(&h, pipeline, &tenants))?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["p.fast", "p.slow"]).await?;
    wait_one_change_stream(&h).await?;

    let total = 600i64;
    let orders = h.collection().await?;
    for chunk in 0..(total / 50) {
        let docs: Vec<Document> = (chunk * 50..chunk * 50 + 50)
            .map(|n| doc! { "n": n })
            .collect();
        // One insert per document: the fast tenant keeps up with each as it comes.
        for d in docs {
            orders.insert_one(d).await?;
        }
    }
    let fast = h.wait_settled("FAST", total as u64, PATIENCE).await?;
    assert_eq!(numbers(&fast), (0..total).collect::<Vec<_>>());
    let slow_now = h.messages("SLOW").await?.len() as i64;
    assert!(
        slow_now < total,
        "the fast tenant finished while the slow one was behind ({slow_now} of {total})"
    );
    child
        .wait_for_log("tenant detached from the shared change stream", PATIENCE)
        .await?;
    let slow = h.wait_settled("SLOW", total as u64, PATIENCE).await?;
    assert_eq!(numbers(&slow), (0..total).collect::<Vec<_>>());
    // Rejoined: one change stream again, and the slow tenant read from it twice (at start,
    // and after catching up).
    wait_one_change_stream(&h).await?;
    let joins = child
        .log()
        .lines()
        .filter(|l| l.contains("p.slow") && l.contains("reading from the shared change stream"))
        .count();
    assert!(joins >= 2, "{}", child.log());
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(60)).await?;
    Ok(())
}

/// A tenant far behind, whose chain is slow, catches up on its own stream faster than its
/// chain takes the events: when it joins the shared reader, several batches it forwarded
/// (more than the chain stage gathers at once) are still queued. They must all come before
/// what the shared reader hands it, and nothing may wait behind the newer events: the
/// tenant ends with every event once, in order. (Handed over at
/// once, the stage took the channel after the first queued batches; the rest waited unread
/// until the next detach, which never came, while the checkpoint moved past them. Whether
/// this test meets that depends on the chain still working through its backlog when the
/// first event after the join arrives; the inlet's unit test
/// `everything_forwarded_comes_before_the_channel` pins the rule.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_joining_with_a_queue_full_of_its_backlog_loses_nothing() -> anyhow::Result<()> {
    const BEHIND: i64 = 2_000;
    const AFTER: i64 = 50;
    let h = Harness::start().await?;
    let plugin = spinning_plugin(&h, 500_000);
    let fast = tenant("fast", "\"shop.orders\"", "");
    let both = [fast.clone(), tenant("slow", "\"shop.returns\"", &plugin)].concat();
    let pipeline = "database = \"shop\"";
    let both = h.write_config("both.toml", &slow_config(&h, pipeline, &both))?;
    let only_fast = h.write_config("fast.toml", &slow_config(&h, pipeline, &fast))?;
    let returns = h
        .mongo
        .client()
        .await?
        .database("shop")
        .collection::<Document>("returns");

    // The slow tenant starts, saves its position and stops.
    let running = InProcess::start(&both)?;
    h.wait_checkpoints(&["p.fast", "p.slow"]).await?;
    running.stop().await?;

    // Its backlog, written in large batches while it is away.
    let running = InProcess::start(&only_fast)?;
    for chunk in 0..(BEHIND / 400) {
        let docs: Vec<Document> = (chunk * 400..chunk * 400 + 400)
            .map(|n| doc! { "n": n })
            .collect();
        returns.insert_many(docs).await?;
    }
    running.stop().await?;

    let running = InProcess::start(&both)?;
    h.wait_for_messages("SLOW", 1, PATIENCE).await?;
    // While its chain works through the backlog: the first of these may still come through
    // its own stream, the rest through the shared reader once it has joined. (Not counted
    // on mongod: the quick stops above can leave a server cursor idle for minutes.)
    for n in BEHIND..BEHIND + AFTER {
        returns.insert_one(doc! { "n": n }).await?;
    }
    let slow = h
        .wait_settled("SLOW", (BEHIND + AFTER) as u64, PATIENCE)
        .await?;
    assert_eq!(numbers(&slow), (0..BEHIND + AFTER).collect::<Vec<_>>());
    running.stop().await?;
    Ok(())
}

/// The only tenant attached is never detached for being behind: a slow tenant alone on the
/// shared reader holds the shared change stream back, as a unit's own stream waits for its
/// chain, instead of opening a second change stream to read the same events again. Mongod
/// serves one change stream throughout, and the tenant gets every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_attached_tenant_holds_the_stream_back_instead_of_detaching() -> anyhow::Result<()>
{
    let h = Harness::start().await?;
    let slow_plugin = slow_tenant_plugin(&h);
    let tenants = tenant("slow", "\"shop.orders\"", &slow_plugin);
    // A lane of 50 events, so that 400 fill it many times over.
    let pipeline = "database = \"shop\"\ntenant_lane_events = 50";
    let path = h.write_config("alone.toml", &slow_config(&h, pipeline, &tenants))?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["p.slow"]).await?;
    wait_one_change_stream(&h).await?;

    // One insert per document, far more than the lane holds (a tenant beside another is
    // detached by them, see above).
    let total = 400i64;
    let orders = h.collection().await?;
    for n in 0..total {
        orders.insert_one(doc! { "n": n }).await?;
    }
    let client = h.mongo.client().await?;
    let nats = h.nats_client().await?;
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    wait_until("the slow tenant has every event", PATIENCE, || {
        let (client, nats, most) = (client.clone(), nats.clone(), most.clone());
        async move {
            if let Ok(open) = change_streams(&client).await {
                most.fetch_max(open, std::sync::atomic::Ordering::Relaxed);
            }
            tidegate_testkit::stream_len(&nats, "SLOW").await >= total as u64
        }
    })
    .await?;
    let slow = h.wait_settled("SLOW", total as u64, PATIENCE).await?;
    assert_eq!(numbers(&slow), (0..total).collect::<Vec<_>>());
    assert!(
        !child.log().contains("tenant detached"),
        "the only tenant was detached: {}",
        child.log()
    );
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(most, 1, "{most} change streams open at once on mongod");
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(60)).await?;
    Ok(())
}

/// Catching up is bounded: three slow tenants fall behind while tidegate is stopped; on the
/// restart, with `tenant_catch_up_streams = 1`, one catches up on a stream of its own while
/// the others wait detached ("waiting for a catch-up turn"), so mongod serves the shared
/// stream and one other (plus, briefly, the one being closed as the next turn opens). Each
/// tenant ends with every event exactly once, in order, and all join the shared stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_is_bounded_and_the_others_wait_detached() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let slow_plugin = slow_tenant_plugin(&h);
    let ids = ["a", "b", "c", "d"];
    let tenants: String = ids
        .iter()
        .map(|id| tenant(id, "\"shop.orders\"", &slow_plugin))
        .collect();
    let pipeline = "database = \"shop\"\ntenant_catch_up_streams = 1";
    let path = h.write_config("bounded.toml", &slow_config(&h, pipeline, &tenants))?;
    let orders = h.collection().await?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["p.a", "p.b", "p.c", "p.d"]).await?;
    for n in 0..5 {
        orders.insert_one(doc! { "n": n }).await?;
    }
    for id in ids {
        h.wait_for_messages(&id.to_uppercase(), 5, PATIENCE).await?;
    }
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(60)).await?;
    let client = h.mongo.client().await?;
    // Cursors of the stopped process mongod may still list until it reaps them.
    let leftover = change_streams(&client).await?;

    // Written while stopped: every tenant restarts behind the reader.
    let total = 65i64;
    for n in 5..total {
        orders.insert_one(doc! { "n": n }).await?;
    }
    let mut child = h.spawn_binary(&path)?;
    let nats = h.nats_client().await?;
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    wait_until("every tenant caught up", PATIENCE, || {
        let (client, nats, most) = (client.clone(), nats.clone(), most.clone());
        async move {
            if let Ok(open) = change_streams(&client).await {
                most.fetch_max(open, std::sync::atomic::Ordering::Relaxed);
            }
            let mut done = true;
            for id in ids {
                done &=
                    tidegate_testkit::stream_len(&nats, &id.to_uppercase()).await >= total as u64;
            }
            done
        }
    })
    .await?;
    // The reader, one tenant's turn, and the turn before it while its cursor is being
    // killed: at most 3 beside the leftovers (unbounded, the four tenants would make 5).
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        most <= leftover + 3,
        "{most} change streams open at once on mongod ({leftover} left from the first run)"
    );
    assert!(
        child.log().contains("waiting for a catch-up turn"),
        "{}",
        child.log()
    );
    for id in ids {
        let got = h
            .wait_settled(&id.to_uppercase(), total as u64, PATIENCE)
            .await?;
        assert_eq!(numbers(&got), (0..total).collect::<Vec<_>>(), "tenant {id}");
    }
    wait_one_change_stream(&h).await?;
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(60)).await?;
    Ok(())
}

/// A restart with tenants at different positions: tenant `b` is left out of the config for
/// a while, so its checkpoint falls behind `a`'s. When both run again, `b` catches up from
/// its own checkpoint and joins; each ends with its events exactly once, in order, and `a`
/// republishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_each_tenant_from_its_own_position() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let a = tenant("a", "\"shop.orders\"", "");
    let b = tenant("b", "\"shop.returns\"", "");
    let pipeline = "database = \"shop\"";
    let both = h.write_config("both.toml", &config(&h, pipeline, &[a.clone(), b].concat()))?;
    let only_a = h.write_config("a.toml", &config(&h, pipeline, &a))?;
    let db = h.mongo.client().await?.database("shop");
    let (orders, returns) = (
        db.collection::<Document>("orders"),
        db.collection::<Document>("returns"),
    );
    let mut n = 0i64;
    let mut write = async |count: i64| -> anyhow::Result<()> {
        for _ in 0..count {
            orders.insert_one(doc! { "n": n }).await?;
            returns.insert_one(doc! { "n": n }).await?;
            n += 1;
        }
        Ok(())
    };

    let running = InProcess::start(&both)?;
    h.wait_checkpoints(&["p.a", "p.b"]).await?;
    write(10).await?;
    h.wait_for_messages("A", 10, PATIENCE).await?;
    h.wait_for_messages("B", 10, PATIENCE).await?;
    running.stop().await?;

    let running = InProcess::start(&only_a)?;
    write(10).await?;
    h.wait_for_messages("A", 20, PATIENCE).await?;
    running.stop().await?;

    write(10).await?;
    let running = InProcess::start(&both)?;
    write(10).await?;
    let a = h.wait_settled("A", 40, PATIENCE).await?;
    let b = h.wait_settled("B", 40, PATIENCE).await?;
    assert_eq!(numbers(&a), (0..40).collect::<Vec<_>>());
    assert_eq!(numbers(&b), (0..40).collect::<Vec<_>>());
    wait_one_change_stream(&h).await?;
    running.stop().await?;
    Ok(())
}

/// The instance holding lease `key` in the HA bucket now, if any.
async fn lease_owner(h: &Harness, key: &str) -> anyhow::Result<Option<String>> {
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let Ok(kv) = js.get_key_value("tidegate-leases").await else {
        return Ok(None);
    };
    Ok(match kv.get(key).await? {
        Some(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)?["instance"]
            .as_str()
            .map(str::to_string),
        None => None,
    })
}

/// Waits until lease `key` is held by an instance other than `not`; returns it.
async fn wait_lease_owner(h: &Harness, key: &str, not: Option<&str>) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(now) = lease_owner(h, key).await? {
            if Some(now.as_str()) != not {
                return Ok(now);
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no owner of {key} other than {not:?} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `{ n }` for each `n` of `range` to both collections `colls` of `db`, sleeping `pause`
/// after each pair.
async fn write_pairs(
    db: mongodb::Database,
    colls: [&'static str; 2],
    range: std::ops::Range<i64>,
    pause: Duration,
) -> anyhow::Result<()> {
    for n in range {
        for coll in colls {
            db.collection::<Document>(coll)
                .insert_one(doc! { "n": n })
                .await?;
        }
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// High availability leases the shared reader, not each tenant: three instances, one lease
/// `lease.p` for both tenants (no `lease.p.a`); the owner SIGKILLed mid-stream, the next owner
/// suspended (SIGSTOP) past its lease while events are written and resumed once a third has
/// taken every tenant over, then taking the pipeline back when the third is killed; each
/// tenant's stream ends with its events exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_per_pipeline_and_a_takeover_loses_nothing() -> anyhow::Result<()> {
    takeover_loses_nothing(false).await
}

/// The same with the tenants sharing one stream: each new owner's one publisher continues
/// the stream's chain after the old owner's last message, the woken one writes nothing more,
/// and each tenant's subjects end with its events exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_of_a_shared_stream_loses_nothing() -> anyhow::Result<()> {
    takeover_loses_nothing(true).await
}

/// Three HA instances, tenants `a` and `b` each with a stream of its own or (`shared`)
/// sharing stream `ALL`: the owner SIGKILLed after 100 events each, 100 more written, then
/// the new owner suspended while 200 more are written and resumed after a third instance
/// has taken over. It must say it stopped writing and stand by: when the third is killed in
/// turn, it takes the pipeline back, and both tenants end with all 500.
async fn takeover_loses_nothing(shared: bool) -> anyhow::Result<()> {
    const TOTAL: i64 = 400;
    let h = Harness::start().await?;
    let (pipeline, tenants) = match shared {
        false => (
            "database = \"shop\"".to_string(),
            [
                tenant("a", "\"shop.orders\"", ""),
                tenant("b", "\"shop.returns\"", ""),
            ]
            .concat(),
        ),
        true => (
            "database = \"shop\"\n\n[pipeline.sink]\nstream = \"ALL\"\nsubject_prefix = \"all\""
                .to_string(),
            "[[pipeline.tenant]]\nid = \"a\"\nnamespaces = [\"shop.orders\"]\n\
             [[pipeline.tenant]]\nid = \"b\"\nnamespaces = [\"shop.returns\"]\n"
                .to_string(),
        ),
    };
    let mut instances = std::collections::BTreeMap::new();
    for name in ["x", "y", "z"] {
        let text = format!(
            "{}\n[ha]\nenabled = true\nlease_ttl_ms = 2000\ninstance = \"{name}\"\n",
            config(&h, &pipeline, &tenants)
        );
        let path = h.write_config(&format!("{name}.toml"), &text)?;
        instances.insert(name.to_string(), h.spawn_binary(&path)?);
    }
    let first = wait_lease_owner(&h, "lease.p", None).await?;
    h.wait_checkpoints(&["p.a", "p.b"]).await?;
    for unit in ["lease.p.a", "lease.p.b"] {
        assert_eq!(lease_owner(&h, unit).await?, None, "{unit}");
    }
    let db = h.mongo.client().await?.database("shop");
    let write = |from: i64, to: i64, pause: Duration| {
        write_pairs(db.clone(), ["orders", "returns"], from..to, pause)
    };
    write(0, 100, Duration::ZERO).await?;
    match shared {
        false => h.wait_for_messages("A", 50, PATIENCE).await?,
        true => h.wait_for_messages("ALL", 100, PATIENCE).await?,
    };
    instances.get_mut(&first).expect("owner").kill9();
    let second = wait_lease_owner(&h, "lease.p", Some(&first)).await?;
    write(100, 200, Duration::ZERO).await?;

    // Suspended past its lease while events keep coming, resumed after the takeover.
    let writer = tokio::spawn(write(200, TOTAL, Duration::from_millis(15)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    instances[&second].signal(SIGSTOP)?;
    let third = wait_lease_owner(&h, "lease.p", Some(&second)).await?;
    assert_ne!(third, first, "the killed instance cannot take over");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    instances[&second].signal(SIGCONT)?;
    instances[&second]
        .wait_for_log("stopped writing, standing by", PATIENCE)
        .await?;
    writer.await??;
    assert_eq!(
        lease_owner(&h, "lease.p").await?.as_deref(),
        Some(third.as_str())
    );

    // Standing by, the woken instance takes the pipeline back when the owner dies.
    instances.get_mut(&third).expect("owner").kill9();
    assert_eq!(
        wait_lease_owner(&h, "lease.p", Some(&third)).await?,
        second,
        "the only live instance takes over"
    );
    write(TOTAL, TOTAL + 100, Duration::ZERO).await?;
    let total = TOTAL + 100;
    let (a, b) = match shared {
        false => (
            h.wait_settled("A", total as u64, PATIENCE).await?,
            h.wait_settled("B", total as u64, PATIENCE).await?,
        ),
        true => {
            let all = h.wait_settled("ALL", 2 * total as u64, PATIENCE).await?;
            (tenant_messages(&all, "a"), tenant_messages(&all, "b"))
        }
    };
    assert_eq!(numbers(&a), (0..total).collect::<Vec<_>>());
    assert_eq!(numbers(&b), (0..total).collect::<Vec<_>>());
    let child = instances.get_mut(&second).expect("instance");
    child.signal(SIGTERM)?;
    let status = child.wait_exit(Duration::from_secs(120)).await?;
    assert!(status.success(), "{status:?}\n{}", child.log());
    Ok(())
}

/// Under high availability, a NATS outage longer than the lease: the owner cannot renew, its
/// fence lapses and the pipeline's term must end (every tenant stopped, the loss logged), so
/// that the instance stands by, takes the lease again once NATS is back, and every tenant
/// goes on from its checkpoint. Until the term ended on a lost fence, the instance stayed in
/// the lapsed term for good and the pipeline never ran again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pipeline_under_ha_outlives_a_nats_outage_longer_than_its_lease(
) -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let text = format!(
        "{}\n[ha]\nenabled = true\nlease_ttl_ms = 2000\ninstance = \"x\"\n",
        shared_stream_config(&h, &["a", "b"])
    );
    let path = h.write_config("ha.toml", &text)?;
    let mut child = h.spawn_binary(&path)?;
    wait_lease_owner(&h, "lease.p", None).await?;
    h.wait_checkpoints(&["p.a", "p.b"]).await?;
    let db = h.mongo.client().await?.database("shop");
    let write = |from: i64, to: i64| write_pairs(db.clone(), ["a", "b"], from..to, Duration::ZERO);
    write(0, 50).await?;
    h.wait_for_messages("ALL", 100, PATIENCE).await?;

    h.nats.stop();
    write(50, 100).await?;
    child
        .wait_for_log("lost the lease: stopped writing, standing by", PATIENCE)
        .await?;
    h.nats.start_again().await?;
    write(100, 150).await?;

    let all = h.wait_settled("ALL", 300, PATIENCE).await?;
    for id in ["a", "b"] {
        let got = tenant_messages(&all, id);
        assert_eq!(numbers(&got), (0..150).collect::<Vec<_>>(), "tenant {id}");
    }
    assert_eq!(
        child.log().matches("lease taken").count(),
        2,
        "{}",
        child.log()
    );
    child.signal(SIGTERM)?;
    let status = child.wait_exit(Duration::from_secs(120)).await?;
    assert!(status.success(), "{status:?}\n{}", child.log());
    Ok(())
}

/// A unit that writes nothing when its lease is lost must still give the term up: a tenant
/// with a lease of its own (`tenant_reader = "own"`) holding because its plugin does not
/// load, its instance suspended (SIGSTOP) past the lease and resumed. It finds out about the
/// lost fence from the lease keeper, not from a write: it says it lost the lease, stands by,
/// and takes the lease again (it is the only instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_tenant_that_loses_its_lease_stands_by_and_takes_it_back() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let broken = h.dir.path().join("broken.wasm");
    std::fs::write(&broken, b"not a component")?;
    let plugin = format!(
        "[[pipeline.tenant.plugins]]\nname = \"broken\"\nfile = \"{}\"",
        broken.display()
    );
    let pipeline = "database = \"shop\"\ntenant_reader = \"own\"";
    let text = format!(
        "{}\n[ha]\nenabled = true\nlease_ttl_ms = 2000\ninstance = \"x\"\n",
        config(&h, pipeline, &tenant("a", "\"shop.orders\"", &plugin))
    );
    let path = h.write_config("held.toml", &text)?;
    let mut child = h.spawn_binary(&path)?;
    wait_lease_owner(&h, "lease.p.a", None).await?;
    child
        .wait_for_log("holding: reading nothing until its plugins load", PATIENCE)
        .await?;
    child.signal(SIGSTOP)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    child.signal(SIGCONT)?;
    child
        .wait_for_log("lost the lease: stopped writing, standing by", PATIENCE)
        .await?;
    wait_until("the lease taken again", PATIENCE, || {
        let taken = child.log().matches("lease taken").count();
        async move { taken >= 2 }
    })
    .await?;
    child.signal(SIGTERM)?;
    let status = child.wait_exit(Duration::from_secs(120)).await?;
    assert!(status.success(), "{status:?}\n{}", child.log());
    Ok(())
}

/// Tenants without a sink of their own share the pipeline's stream, each under its own
/// subjects, through one publisher (one ordering chain for the stream): tidegate is
/// SIGKILLed again and again and NATS is restarted while three tenants' events are written.
/// Each tenant's subjects end with its events exactly once, in order, every message names
/// its tenant, and no stream of a tenant's own is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_one_stream_through_kills_and_a_nats_restart() -> anyhow::Result<()> {
    const EACH: i64 = 1_500;
    let ids = ["a", "b", "c"];
    let mut h = Harness::start().await?;
    let path = h.write_config("shared.toml", &shared_stream_config(&h, &ids))?;
    let mut child = h.spawn_binary(&path)?;
    h.wait_checkpoints(&["p.a", "p.b", "p.c"]).await?;

    let db = h.mongo.client().await?.database("shop");
    let writers: Vec<_> = ids
        .iter()
        .map(|id| {
            tokio::spawn(support::write_range(
                db.collection(id),
                0,
                EACH,
                25,
                Duration::from_millis(20),
            ))
        })
        .collect();
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..4 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(300 + rng % 600)).await;
        child.kill9();
        child = h.spawn_binary(&path)?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.nats.start_again().await?;
    for writer in writers {
        writer.await??;
    }

    let all = h
        .wait_settled("ALL", 3 * EACH as u64, PATIENCE)
        .await
        .map_err(|err| anyhow::anyhow!("{err}\n{}", child.log()))?;
    for id in ids {
        let own = tenant_messages(&all, id);
        assert!(
            own.iter()
                .all(|m| support::header(m, "Tidegate-Tenant").as_deref() == Some(id)),
            "tenant {id}'s messages name it"
        );
        support::assert_exactly_once_in_order(&own, EACH);
    }
    // One writer: the tenants never broke each other's ordering chain.
    let log = child.log();
    assert!(
        log.contains("one publisher for the tenants' shared stream"),
        "{log}"
    );
    assert!(
        !log.contains("is not the one this pipeline expected"),
        "{log}"
    );
    let nats = h.nats_client().await?;
    for id in ids {
        assert_eq!(
            tidegate_testkit::stream_len(&nats, &id.to_uppercase()).await,
            0,
            "no stream of tenant {id}'s own"
        );
    }
    child.signal(SIGTERM)?;
    child.wait_exit(Duration::from_secs(60)).await?;
    Ok(())
}

/// A pipeline's tenants share one pace of checkpoint writes (`checkpoint.max_writes_per_sec`):
/// twelve tenants whose positions move every 50 ms make at most about four writes a second
/// between them while events flow (unpaced they would make 240), the writes still come, and
/// when the pipeline stops each tenant's checkpoint names its last message at once, whatever
/// its turn in the pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_one_pace_of_checkpoint_writes() -> anyhow::Result<()> {
    const TENANTS: usize = 12;
    const ROUNDS: i64 = 30;
    const PER_SEC: f64 = 4.0;
    let h = Harness::start().await?;
    let pipeline = "database = \"shop\"\ncollections = [\"orders\"]\n\
                    skip_operations = [\"update\", \"delete\"]\n\
                    tenant_key = \"fullDocument.tenantId\"";
    let ids: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();
    let tenants: String = ids
        .iter()
        .map(|id| tenant(id, "\"shop.orders\"", ""))
        .collect();
    let text = config(&h, pipeline, &tenants).replace(
        "interval_ms = 200",
        "interval_ms = 50\nmax_writes_per_sec = 4",
    );
    let path = h.write_config("paced.toml", &text)?;
    let running = InProcess::start(&path)?;
    let units: Vec<String> = ids.iter().map(|id| format!("p.{id}")).collect();
    h.wait_checkpoints(&units).await?;
    wait_one_change_stream(&h).await?;

    // Every write to the bucket, any key, is one more message in its stream.
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let writes = || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("KV_tidegate-checkpoints").await?;
            anyhow::Ok(stream.info().await?.state.last_sequence)
        }
    };
    let (before, started) = (writes().await?, std::time::Instant::now());
    let orders = h.collection().await?;
    for round in 0..ROUNDS {
        let docs: Vec<Document> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let n = round * TENANTS as i64 + i as i64;
                doc! { "_id": n, "n": n, "tenantId": id }
            })
            .collect();
        orders.insert_many(docs).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Paced writes still come while the pipeline runs (however slow the machine).
    wait_until("a paced checkpoint write", PATIENCE, || async {
        writes().await.is_ok_and(|now| now > before)
    })
    .await?;
    let (after, elapsed) = (writes().await?, started.elapsed());
    let written = after - before;
    // The pace's slots, one a quarter second apart, and the writes in flight at either end.
    let most = (PER_SEC * elapsed.as_secs_f64()).ceil() as u64 + 3;
    assert!(
        written <= most,
        "{written} checkpoint writes in {elapsed:?}: expected at most {most}"
    );

    let mut last_ids = Vec::new();
    for id in &ids {
        let messages = h
            .wait_settled(&id.to_uppercase(), ROUNDS as u64, PATIENCE)
            .await?;
        assert_eq!(messages.len(), ROUNDS as usize, "{id}");
        last_ids.push(support::header(messages.last().unwrap(), "Nats-Msg-Id"));
    }
    running.stop().await?;
    let kv = js.get_key_value("tidegate-checkpoints").await?;
    for (unit, last_id) in units.iter().zip(last_ids) {
        let record = kv.get(unit).await?.expect("a checkpoint");
        let record: serde_json::Value = serde_json::from_slice(&record)?;
        assert_eq!(
            record["lastMsgId"].as_str(),
            last_id.as_deref(),
            "{unit}'s checkpoint after the stop: {record}"
        );
    }
    Ok(())
}

/// The checkpoint of tenant unit `unit`: the message id it names (`None` without one).
async fn checkpointed_id(
    kv: &async_nats::jetstream::kv::Store,
    unit: &str,
) -> anyhow::Result<Option<String>> {
    let Some(record) = kv.get(unit).await? else {
        return Ok(None);
    };
    let record: serde_json::Value = serde_json::from_slice(&record)?;
    Ok(record["lastMsgId"].as_str().map(str::to_string))
}

/// Tenants publishing into one shared stream: once their events are acknowledged, each
/// tenant's checkpoint comes to name its last message while the pipeline runs and nothing
/// more arrives (the acknowledged position reaches the checkpoint without more traffic or a
/// stop); and a graceful stop in the middle of a burst leaves each tenant's checkpoint naming
/// exactly its last message in the stream: everything it read was published and
/// acknowledged, and nothing published lies beyond its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_stream_checkpoints_follow_acknowledgements_and_the_stop() -> anyhow::Result<()> {
    const EACH: i64 = 40;
    let ids = ["a", "b", "c"];
    let h = Harness::start().await?;
    let path = h.write_config("shared-checkpoints.toml", &shared_stream_config(&h, &ids))?;
    let running = InProcess::start(&path)?;
    let units: Vec<String> = ids.iter().map(|id| format!("p.{id}")).collect();
    h.wait_checkpoints(&units).await?;
    wait_one_change_stream(&h).await?;

    let db = h.mongo.client().await?.database("shop");
    let insert = |first: i64| {
        let db = db.clone();
        async move {
            for id in ids {
                let docs: Vec<Document> = (first..first + EACH).map(|n| doc! { "n": n }).collect();
                db.collection::<Document>(id).insert_many(docs).await?;
            }
            anyhow::Ok(())
        }
    };
    // The last message id of each tenant in the shared stream.
    let last_ids = |messages: &[StreamMessage]| -> Vec<Option<String>> {
        ids.iter()
            .map(|id| {
                tenant_messages(messages, id)
                    .last()
                    .and_then(|m| support::header(m, "Nats-Msg-Id"))
            })
            .collect()
    };
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let kv = js.get_key_value("tidegate-checkpoints").await?;

    insert(0).await?;
    let all = h.wait_settled("ALL", 3 * EACH as u64, PATIENCE).await?;
    for (unit, last) in units.iter().zip(last_ids(&all)) {
        let last = last.expect("every tenant published");
        wait_until(&format!("{unit}'s checkpoint at {last}"), PATIENCE, || {
            let (kv, last) = (&kv, &last);
            async move { checkpointed_id(kv, unit).await.ok().flatten().as_ref() == Some(last) }
        })
        .await?;
    }

    // A stop while a burst is read and published: each checkpoint is the tenant's last
    // message, wherever the stop fell.
    insert(EACH).await?;
    running.stop().await?;
    let all = h.messages("ALL").await?;
    for (unit, last) in units.iter().zip(last_ids(&all)) {
        assert_eq!(
            checkpointed_id(&kv, unit).await?,
            last,
            "{unit}'s checkpoint after the stop against its last message"
        );
    }
    for id in ids {
        let numbers = numbers(&tenant_messages(&all, id));
        assert_eq!(
            numbers,
            (0..numbers.len() as i64).collect::<Vec<_>>(),
            "tenant {id}: in order, none twice, none skipped"
        );
        assert!(numbers.len() as i64 >= EACH, "tenant {id}");
    }
    Ok(())
}

/// Tenants on a shared stream with a window of two events: a tenant's chain stage pushes
/// its events straight to the stream's publisher while its drain holds none, and hands them
/// to the drain when the window is full, so events keep switching between the two ways,
/// mixed batch sizes making both frequent. Each tenant's events are still published in
/// order, none twice and none skipped, and its checkpoint reaches its last message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_window_keeps_each_tenants_order_on_a_shared_stream() -> anyhow::Result<()> {
    const ROUNDS: i64 = 20;
    const EACH: i64 = 10;
    let ids = ["a", "b", "c"];
    let h = Harness::start().await?;
    let config = shared_stream_config(&h, &ids).replace(
        "subject_prefix = \"all\"",
        "subject_prefix = \"all\"\nmax_in_flight = 2",
    );
    assert!(config.contains("max_in_flight = 2"), "{config}");
    let path = h.write_config("small-window.toml", &config)?;
    let running = InProcess::start(&path)?;
    let units: Vec<String> = ids.iter().map(|id| format!("p.{id}")).collect();
    h.wait_checkpoints(&units).await?;
    wait_one_change_stream(&h).await?;

    let db = h.mongo.client().await?.database("shop");
    for round in 0..ROUNDS {
        for id in ids {
            let docs: Vec<Document> = (round * EACH..(round + 1) * EACH)
                .map(|n| doc! { "n": n })
                .collect();
            let orders = db.collection::<Document>(id);
            // Alternately one batch of ten and ten of one.
            if round % 2 == 0 {
                orders.insert_many(docs).await?;
            } else {
                for d in docs {
                    orders.insert_one(d).await?;
                }
            }
        }
    }
    let total = ROUNDS * EACH;
    let all = h
        .wait_settled("ALL", ids.len() as u64 * total as u64, PATIENCE)
        .await?;
    let js = async_nats::jetstream::new(h.nats_client().await?);
    let kv = js.get_key_value("tidegate-checkpoints").await?;
    for (id, unit) in ids.iter().zip(&units) {
        let mine = tenant_messages(&all, id);
        assert_eq!(
            numbers(&mine),
            (0..total).collect::<Vec<_>>(),
            "tenant {id}: in order, none twice, none skipped"
        );
        let last = mine
            .last()
            .and_then(|m| support::header(m, "Nats-Msg-Id"))
            .expect("a last message id");
        wait_until(&format!("{unit}'s checkpoint at {last}"), PATIENCE, || {
            let (kv, last) = (&kv, &last);
            async move { checkpointed_id(kv, unit).await.ok().flatten().as_ref() == Some(last) }
        })
        .await?;
    }
    running.stop().await?;
    Ok(())
}

/// A backlog the shared reader finds all at once (24,000 events committed by one
/// transaction, 8,000 for each of three tenants) is read in getMores far larger than a
/// tenant's own stream asks for (mongod's profiler records one returning more than 1,000
/// events) and reaches every tenant exactly once, in order, over one change stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_read_in_large_batches_and_reaches_each_tenant_once() -> anyhow::Result<()> {
    const EACH: i64 = 8_000;
    let ids = ["a", "b", "c"];
    let h = Harness::start().await?;
    let client = h.mongo.client().await?;
    let db = client.database("shop");
    for id in ids {
        db.create_collection(id).await?;
    }
    let path = h.write_config("shared.toml", &shared_stream_config(&h, &ids))?;
    let running = InProcess::start(&path)?;
    h.wait_checkpoints(&["p.a", "p.b", "p.c"]).await?;
    wait_one_change_stream(&h).await?;
    // Every operation is logged from here on (slowms 0), with the events it returned.
    let admin = client.database("admin");
    admin
        .run_command(doc! { "profile": 0, "slowms": 0 })
        .await?;

    let mut session = client.start_session().await?;
    session.start_transaction().await?;
    for id in ids {
        let docs: Vec<Document> = (0..EACH)
            .map(|seq| doc! { "seq": seq, "email": format!("user{seq}@example.com") })
            .collect();
        db.collection::<Document>(id)
            .insert_many(docs)
            .session(&mut session)
            .await?;
    }
    session.commit_transaction().await?;

    let all = h.wait_settled("ALL", 3 * EACH as u64, PATIENCE).await?;
    for id in ids {
        support::assert_exactly_once_in_order(&tenant_messages(&all, id), EACH);
    }
    admin
        .run_command(doc! { "profile": 0, "slowms": 100 })
        .await?;
    let log = std::fs::read_to_string(h.mongo.log_path())?;
    let returned: Vec<i64> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["attr"]["command"]["getMore"].is_number())
        .filter_map(|entry| entry["attr"]["nreturned"].as_i64())
        .collect();
    let largest = returned.iter().max();
    assert!(
        largest.is_some_and(|&n| n > 1_000),
        "the largest getMore returned {largest:?} events (of {} getMores logged)",
        returned.len()
    );
    assert_eq!(change_streams(&client).await?, 1, "one change stream");
    running.stop().await?;
    Ok(())
}
