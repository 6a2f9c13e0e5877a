//! Opening the change stream: where it starts, at which level it watches (cluster, database
//! or collection), and the stages the server runs on it so that only the pipeline's
//! namespaces and operations cross the network. The signal and heartbeat collections are
//! let through every filter, since they steer the source.

use std::time::Duration;

use bson::{doc, Document, RawDocumentBuf};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::{ChangeStreamOptions, FullDocumentBeforeChangeType, FullDocumentType};

use crate::config::{
    check_stage, CheckpointStoreKind, FullDocument, FullDocumentBeforeChange, NamespaceFilter,
    PipelineConfig, TenantKey, KEYED_OPERATIONS, SPLIT_STAGE,
};
use crate::model::Namespace;
use crate::source::oversize;

/// Where to open the stream.
#[derive(Debug, Clone)]
pub(crate) enum OpenAt {
    Now,
    AtTime(bson::Timestamp),
    ResumeAfter(ResumeToken),
    StartAfter(ResumeToken),
}

/// Events per getMore. Well under the pipeline's source queue, so that the next batch is
/// fetched while the plugin and publish stages still have the previous one to work on (the
/// server's default, up to 16 MB, made them idle through every long getMore).
const BATCH_SIZE: u32 = 1000;

/// Events per getMore of a shared reader: as many as the server's 16 MiB reply holds (for
/// events of 1 KiB or more). Its batch is split among the tenants, and a getMore of 1000
/// spread over a thousand tenants gave each about one event, so every event made its own
/// trip through its tenant's chain stage and a pool turn; read in larger batches (and routed
/// in passes of several reader batches, `pipeline::shared`), each tenant gets several events
/// at a time, and tidegate's CPU per event at K = 1000 by tenant key fell by about a fifth
/// (BENCHMARKS.md, "Lanes counted in events"). It changes nothing when the stream keeps up:
/// a getMore returns what there is. The tenants' own catch-up streams keep [`BATCH_SIZE`]:
/// each reads one tenant's events.
pub(crate) const SHARED_BATCH_SIZE: u32 = 16_000;

pub(crate) async fn open(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    start: &OpenAt,
) -> Result<ChangeStream<RawDocumentBuf>, mongodb::error::Error> {
    let full_document = match pipeline.full_document {
        FullDocument::Off => None,
        FullDocument::UpdateLookup => Some(FullDocumentType::UpdateLookup),
        FullDocument::WhenAvailable => Some(FullDocumentType::WhenAvailable),
        FullDocument::Required => Some(FullDocumentType::Required),
    };
    let before = match pipeline.full_document_before_change {
        FullDocumentBeforeChange::Off => None,
        FullDocumentBeforeChange::WhenAvailable => {
            Some(FullDocumentBeforeChangeType::WhenAvailable)
        }
        FullDocumentBeforeChange::Required => Some(FullDocumentBeforeChangeType::Required),
    };
    let (resume_after, start_after, at_time) = match start {
        OpenAt::Now => (None, None, None),
        OpenAt::AtTime(time) => (None, None, Some(*time)),
        OpenAt::ResumeAfter(token) => (Some(token.clone()), None, None),
        OpenAt::StartAfter(token) => (None, Some(token.clone()), None),
    };
    let options = ChangeStreamOptions::builder()
        .full_document(full_document)
        .full_document_before_change(before)
        .resume_after(resume_after)
        .start_after(start_after)
        .start_at_operation_time(at_time)
        .show_expanded_events(pipeline.show_expanded_events.then_some(true))
        .max_await_time(Duration::from_millis(500))
        .batch_size(if pipeline.shared_reader {
            SHARED_BATCH_SIZE
        } else {
            BATCH_SIZE
        })
        .build();
    let stages = server_side_filter(pipeline);
    // Events are read as raw BSON (see `event::Change`), never through serde.
    let stream = match watch_level(pipeline) {
        WatchLevel::Cluster => client.watch().pipeline(stages).with_options(options).await,
        WatchLevel::Collection(db, coll) => {
            client
                .database(db)
                .collection::<Document>(coll)
                .watch()
                .pipeline(stages)
                .with_options(options)
                .await
        }
        WatchLevel::Database(db) => {
            client
                .database(db)
                .watch()
                .pipeline(stages)
                .with_options(options)
                .await
        }
    };
    // Raw documents: a fragment of a split event is not a whole change event (see `oversize`).
    stream.map(ChangeStream::with_type::<RawDocumentBuf>)
}

pub(crate) fn start_label(start: &OpenAt) -> &'static str {
    match start {
        OpenAt::Now => "now",
        OpenAt::AtTime(_) => "at-cluster-time",
        OpenAt::ResumeAfter(_) => "resume-after-token",
        OpenAt::StartAfter(_) => "start-after-token",
    }
}

/// Where a change stream is opened.
#[derive(Debug, PartialEq)]
enum WatchLevel<'a> {
    Cluster,
    Database(&'a str),
    Collection(&'a str, &'a str),
}

/// The signal and heartbeat collections (`db`, `coll`), which steer the source.
fn control_namespaces(pipeline: &PipelineConfig) -> Vec<(&str, &str)> {
    [&pipeline.signal_collection, &pipeline.heartbeat_collection]
        .into_iter()
        .filter_map(|c| c.as_deref().and_then(|c| c.split_once('.')))
        .collect()
}

/// The narrowest level whose stream sees both the pipeline's scope and its control
/// collections: a control collection in another database (Streamkap's `streamkap_signal`
/// setup, say) widens a database- or collection-scoped pipeline's stream, and
/// [`scope_stage`] narrows it back on the server.
fn watch_level(pipeline: &PipelineConfig) -> WatchLevel<'_> {
    let control = control_namespaces(pipeline);
    match (&pipeline.database, pipeline.collections.as_slice()) {
        (None, _) => WatchLevel::Cluster,
        (Some(db), _) if control.iter().any(|(c, _)| c != db) => WatchLevel::Cluster,
        (Some(db), [coll]) if control.iter().all(|(_, c)| c == coll) => {
            WatchLevel::Collection(db, coll)
        }
        (Some(db), _) => WatchLevel::Database(db),
    }
}

/// The `$match` that keeps a widened stream (see [`watch_level`]) to the pipeline's
/// `database` and single collection (several collections have their own stage).
fn scope_stage(pipeline: &PipelineConfig) -> Option<Document> {
    let db = pipeline.database.as_deref()?;
    match (watch_level(pipeline), pipeline.collections.as_slice()) {
        (WatchLevel::Cluster | WatchLevel::Database(_), [coll]) => {
            Some(doc! { "$match": { "ns.db": db, "ns.coll": coll } })
        }
        (WatchLevel::Cluster, _) => Some(doc! { "$match": { "ns.db": db } }),
        _ => None,
    }
}

/// The stages appended to the change stream on the server: the namespace filters, skipped
/// operations, then the user's own stages.
fn server_side_filter(pipeline: &PipelineConfig) -> Vec<Document> {
    let mut stages: Vec<Document> = scope_stage(pipeline).into_iter().collect();
    stages.extend(namespace_filter(pipeline));
    if !pipeline.skip_operations.is_empty() {
        stages.push(
            doc! { "$match": { "operationType": { "$nin": pipeline.skip_operations.clone() } } },
        );
    }
    // The user's own stages come last, checked with the config (they leave `_id` alone); a
    // `$changeStreamSplitLargeEvent` among them goes with the oversize stages, at the end.
    stages.extend(
        pipeline
            .stages
            .iter()
            .filter(|stage| !stage.contains_key(SPLIT_STAGE))
            .filter_map(|stage| check_stage(stage).ok()),
    );
    // Signal and heartbeat collections pass every filter: they steer the source.
    for (db, coll) in control_namespaces(pipeline) {
        for stage in &mut stages {
            if let Ok(condition) = stage.get_document("$match") {
                let either = doc! { "$or": [{ "ns.db": db, "ns.coll": coll }, condition.clone()] };
                *stage = doc! { "$match": either };
            }
        }
    }
    stages.extend(oversize::stages(pipeline));
    stages
}

/// The stages that decide which namespaces a pipeline sees: the listed collections only
/// (`collections`, or `collections_file`'s rows), a tenant's namespaces only,
/// include/exclude, and never the pipeline's own checkpoint
/// collection (whose writes would otherwise be published, checkpointed, published…
/// forever). They look at `ns` only, so a snapshot runs them on synthetic events to pick
/// its collections.
pub(crate) fn namespace_filter(pipeline: &PipelineConfig) -> Vec<Document> {
    let mut stages = Vec::new();
    if pipeline.collections.len() > 1 {
        stages.push(doc! { "$match": { "ns.coll": { "$in": pipeline.collections.clone() } } });
    }
    if !pipeline.collection_list.is_empty() {
        // Mirrors `PipelineConfig::may_see`; one `$in` per database keeps a long list cheap.
        let mut listed: Vec<Document> = pipeline
            .collection_list
            .by_database()
            .map(|(db, colls)| {
                let colls: Vec<&String> = colls.iter().collect();
                doc! { "ns.db": db, "ns.coll": { "$in": colls } }
            })
            .collect();
        listed.push(doc! { "operationType": "invalidate" });
        stages.push(doc! { "$match": { "$or": listed } });
    }
    if let Some(tenant) = &pipeline.tenant {
        // Mirrors `PipelineConfig::may_see`, which checks every event again in the host.
        let mut allowed = vec![doc! { "operationType": "invalidate" }];
        for pattern in &tenant.namespaces {
            allowed.push(match &pattern.coll {
                Some(coll) => doc! { "ns.db": &pattern.db, "ns.coll": coll },
                None => doc! { "ns.db": &pattern.db },
            });
            allowed.push(doc! { "ns.db": &pattern.db, "ns.coll": { "$exists": false } });
        }
        stages.push(doc! { "$match": { "$or": allowed } });
        stages.extend(tenant_key_stage(pipeline, &tenant.key_values));
    }
    let condition = |entry: &String| match NamespaceFilter::parse(entry) {
        Ok(NamespaceFilter::Pattern(p)) => match &p.coll {
            Some(coll) => doc! { "ns.db": &p.db, "ns.coll": coll },
            None => doc! { "ns.db": &p.db },
        },
        Ok(NamespaceFilter::Regex(regex)) => doc! { "$expr": { "$regexMatch": {
            "input": { "$concat": ["$ns.db", ".", { "$ifNull": ["$ns.coll", ""] }] },
            "regex": regex,
        } } },
        // Validated with the config; unreachable, and matching nothing is the safe side.
        Err(_) => doc! { "_id": { "$exists": false } },
    };
    if !pipeline.include.is_empty() {
        let mut any: Vec<Document> = pipeline.include.iter().map(condition).collect();
        any.push(doc! { "operationType": "invalidate" });
        stages.push(doc! { "$match": { "$or": any } });
    }
    if !pipeline.exclude.is_empty() {
        let none: Vec<Document> = pipeline.exclude.iter().map(condition).collect();
        stages.push(doc! { "$match": { "$nor": none } });
    }
    let checkpoint = &pipeline.checkpoint;
    let may_see_checkpoints = match &pipeline.database {
        None => true,
        Some(db) => db == &checkpoint.database && pipeline.collections.len() != 1,
    };
    if checkpoint.store == CheckpointStoreKind::Mongodb && may_see_checkpoints {
        stages.push(doc! { "$match": { "$or": [
            { "ns.db": { "$ne": &checkpoint.database } },
            { "ns.coll": { "$ne": &checkpoint.collection } },
        ] } });
    }
    stages
}

/// With the pipeline's `tenant_key`, the `$match` that keeps a tenant's own stream to its
/// key values (mirrors the shared reader's routing, `pipeline::shared`): events that carry a
/// document only with one of the values, every other event (drop, rename…) as it is. Looks
/// only at fields synthetic snapshot events lack, so they pass (snapshots and tenant keys
/// do not go together, see the config's validation).
fn tenant_key_stage(pipeline: &PipelineConfig, values: &[String]) -> Option<Document> {
    let key = TenantKey::parse(pipeline.tenant_key.as_deref()?).ok()?;
    let mut either = vec![doc! { "operationType": { "$nin": KEYED_OPERATIONS.to_vec() } }];
    match &key.delete_path {
        None => either.push(TenantKey::server_match(&key.path, values)),
        Some(before) => {
            // Beside the key's own fields (under fullDocument…, or a `$or` of them).
            let mut not_deletes = TenantKey::server_match(&key.path, values);
            not_deletes.insert("operationType", doc! { "$ne": "delete" });
            let mut deletes = TenantKey::server_match(before, values);
            deletes.insert("operationType", "delete");
            either.extend([not_deletes, deletes]);
        }
    }
    Some(doc! { "$match": { "$or": either } })
}

/// The signal collection, if configured: its namespace and a handle to write watermarks.
pub(crate) fn signal_collection(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Option<(Namespace, mongodb::Collection<Document>)> {
    let (db, coll) = pipeline.signal_collection.as_deref()?.split_once('.')?;
    Some((
        Namespace {
            db: db.to_string(),
            coll: Some(coll.to_string()),
        },
        client.database(db).collection(coll),
    ))
}

/// The heartbeat collection, if configured: its writes move the position and nothing else.
pub(crate) fn heartbeat_namespace(pipeline: &PipelineConfig) -> Option<Namespace> {
    let (db, coll) = pipeline.heartbeat_collection.as_deref()?.split_once('.')?;
    Some(Namespace {
        db: db.to_string(),
        coll: Some(coll.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A pipeline made from `scope` keys, with `capture.csv` holding `rows`.
    fn pipeline(scope: &str, rows: &str) -> PipelineConfig {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("capture.csv"), rows).expect("write");
        let text = format!(
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[[pipeline]]\nid = \"p\"\n\
             mongodb_uri = \"mongodb://127.0.0.1:1/?replicaSet=rs0\"\n{scope}\n\
             collections_file = \"capture.csv\"\n[pipeline.sink]\nstream = \"S\"\n\
             subject_prefix = \"cdc\"\n"
        );
        let mut config = Config::parse(&text, dir.path(), |_| None).expect("valid");
        config.pipelines.remove(0)
    }

    /// The listed collections become one `$in` per database, on a stream opened on the
    /// deployment, or on `database` when it is set.
    #[test]
    fn a_collections_file_is_matched_on_the_server() {
        let p = pipeline("", "shop,orders\nshop,users\ncrm,users\n");
        assert_eq!(watch_level(&p), WatchLevel::Cluster);
        assert_eq!(scope_stage(&p), None);
        let stages = namespace_filter(&p);
        assert_eq!(
            stages.first(),
            Some(&doc! { "$match": { "$or": [
                { "ns.db": "crm", "ns.coll": { "$in": ["users"] } },
                { "ns.db": "shop", "ns.coll": { "$in": ["orders", "users"] } },
                { "operationType": "invalidate" },
            ] } })
        );
        let p = pipeline("database = \"shop\"", "shop,orders\n");
        assert_eq!(watch_level(&p), WatchLevel::Database("shop"));
    }
}
