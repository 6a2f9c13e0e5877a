//! Initial snapshots: the documents that exist before capture starts, as `snapshot-read`
//! events through the same plugin chain, sink and deduplication as change events.
//!
//! The change stream's position is captured *before* the first document is read, and
//! streaming resumes from exactly there once the snapshot is done, so nothing changed during
//! the snapshot is missed (a document changed meanwhile is published as read, then its
//! changes follow: consumers end at the current state). Collections are read in chunks
//! ordered by `_id`; every event carries the snapshot's progress, which the checkpoint saves
//! with the acknowledged position, so a crash resumes after the last acknowledged document
//! instead of starting over. Event ids name the snapshot (its start position), the namespace
//! and the `_id`, so documents re-read after a crash are dropped by JetStream as duplicates.
//!
//! The oplog must still hold the captured position when the snapshot ends (long snapshots
//! need an oplog window to match; the checkpoint-age warnings watch it).

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::change_stream::event::ResumeToken;

use crate::config::PipelineConfig;
use crate::event::{token_id, Change, Namespace, Operation, SourceEvent};

/// How far a snapshot has come; saved in the checkpoint as a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The stream position captured before reading: streaming resumes after it.
    pub start: ResumeToken,
    /// Every namespace to read, in order.
    pub namespaces: Vec<Namespace>,
    /// Index of the namespace being read.
    pub index: usize,
    /// `_id` of the last document handed on in that namespace (`None`: none yet).
    pub last_id: Option<Bson>,
    /// Documents handed on so far, for progress lines.
    pub done: u64,
}

impl Progress {
    /// The form saved in the checkpoint.
    pub fn to_document(&self) -> Document {
        // A token the server gave always serializes; were it not to, loading the checkpoint
        // would fail with a clear error rather than resume from a wrong place.
        let start = bson::serialize_to_bson(&self.start).unwrap_or(Bson::Null);
        let namespaces: Vec<Bson> = self
            .namespaces
            .iter()
            .map(|ns| Bson::String(ns.to_string()))
            .collect();
        let mut progress = doc! {
            "start": start,
            "namespaces": namespaces,
            "index": self.index as i64,
            "done": self.done as i64,
        };
        if let Some(id) = &self.last_id {
            progress.insert("lastId", id.clone());
        }
        progress
    }

    /// Reads the form saved in the checkpoint.
    pub fn from_document(saved: &Document) -> Result<Progress, String> {
        let start = saved
            .get("start")
            .cloned()
            .ok_or("snapshot progress has no start")?;
        let start: ResumeToken = bson::deserialize_from_bson(start).map_err(|e| e.to_string())?;
        let namespaces = saved
            .get_array("namespaces")
            .map_err(|e| e.to_string())?
            .iter()
            .filter_map(|ns| ns.as_str())
            .map(|ns| {
                let (db, coll) = ns.split_once('.').unwrap_or((ns, ""));
                Namespace {
                    db: db.to_string(),
                    coll: Some(coll.to_string()),
                }
            })
            .collect();
        Ok(Progress {
            start,
            namespaces,
            index: saved.get_i64("index").unwrap_or(0).max(0) as usize,
            last_id: saved.get("lastId").cloned(),
            done: saved.get_i64("done").unwrap_or(0).max(0) as u64,
        })
    }

    /// Whether every namespace has been read.
    pub fn finished(&self) -> bool {
        self.index >= self.namespaces.len()
    }
}

/// The collections a snapshot reads: the pipeline's scope, narrowed by the same namespace
/// filters as its change stream (evaluated by the server on synthetic events, so regexes
/// behave exactly alike).
pub async fn namespaces(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    filters: Vec<Document>,
) -> Result<Vec<Namespace>, mongodb::error::Error> {
    let databases = match &pipeline.database {
        Some(db) => vec![db.clone()],
        None => client
            .list_database_names()
            .await?
            .into_iter()
            .filter(|db| !["admin", "local", "config"].contains(&db.as_str()))
            .collect(),
    };
    let mut candidates = Vec::new();
    for db in databases {
        let mut names = match pipeline.collections.is_empty() {
            true => client.database(&db).list_collection_names().await?,
            false => pipeline.collections.clone(),
        };
        names.retain(|name| !name.starts_with("system."));
        names.sort();
        candidates.extend(names.into_iter().map(|coll| (db.clone(), coll)));
    }
    if candidates.is_empty() || filters.is_empty() {
        return Ok(candidates
            .into_iter()
            .map(|(db, coll)| Namespace {
                db,
                coll: Some(coll),
            })
            .collect());
    }
    let documents: Vec<Document> = candidates
        .iter()
        .map(|(db, coll)| doc! { "ns": { "db": db, "coll": coll } })
        .collect();
    let mut stages = vec![doc! { "$documents": documents }];
    stages.extend(filters);
    let mut kept = client.database("admin").aggregate(stages).await?;
    let mut out = Vec::new();
    while let Some(found) = kept.try_next().await? {
        let ns = found.get_document("ns").ok();
        if let (Some(db), Some(coll)) = (
            ns.and_then(|n| n.get_str("db").ok()),
            ns.and_then(|n| n.get_str("coll").ok()),
        ) {
            out.push(Namespace {
                db: db.to_string(),
                coll: Some(coll.to_string()),
            });
        }
    }
    Ok(out)
}

/// Reads the next chunk of the namespace `progress` is at: up to `size` documents after
/// `last_id`, in `_id` order, as events carrying the progress after each one. An empty
/// chunk means the namespace is done (`progress` then moves to the next).
pub async fn next_chunk(
    client: &mongodb::Client,
    progress: &mut Progress,
    size: u32,
) -> Result<Vec<SourceEvent>, mongodb::error::Error> {
    let Some(ns) = progress.namespaces.get(progress.index).cloned() else {
        return Ok(Vec::new());
    };
    let collection = client
        .database(&ns.db)
        .collection::<Document>(ns.coll.as_deref().unwrap_or_default());
    let filter = match &progress.last_id {
        Some(last) => doc! { "_id": { "$gt": last.clone() } },
        None => doc! {},
    };
    let docs: Vec<Document> = collection
        .find(filter)
        .sort(doc! { "_id": 1 })
        .limit(i64::from(size))
        .await?
        .try_collect()
        .await?;
    if docs.is_empty() {
        progress.index += 1;
        progress.last_id = None;
        return Ok(Vec::new());
    }
    let snapshot_id = token_id(&progress.start);
    let mut events = Vec::with_capacity(docs.len());
    for document in docs {
        let id = document.get("_id").cloned().unwrap_or(Bson::Null);
        progress.last_id = Some(id.clone());
        progress.done += 1;
        let id_text = id.clone().into_relaxed_extjson().to_string();
        events.push(SourceEvent {
            token: progress.start.clone(),
            snapshot: Some(progress.to_document()),
            change: Change {
                id: format!("snapshot.{snapshot_id}.{ns}.{id_text}"),
                operation: Operation::SnapshotRead,
                namespace: ns.clone(),
                to: None,
                document_key: Some(doc! { "_id": id }),
                full_document: Some(document),
                full_document_before_change: None,
                update_description: None,
                cluster_time: None,
                wall_time: None,
                lsid: None,
                txn_number: None,
            },
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checkpointed form reads back as it was written.
    #[test]
    fn progress_round_trips() {
        let start: ResumeToken =
            bson::deserialize_from_bson(Bson::Document(doc! { "_data": "8263A1" })).expect("token");
        let progress = Progress {
            start,
            namespaces: vec![Namespace {
                db: "shop".into(),
                coll: Some("orders".into()),
            }],
            index: 0,
            last_id: Some(Bson::Int32(42)),
            done: 7,
        };
        let saved = progress.to_document();
        assert_eq!(Progress::from_document(&saved).expect("decode"), progress);
        assert!(!progress.finished());
    }
}
