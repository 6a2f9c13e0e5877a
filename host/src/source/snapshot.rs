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

use bson::{doc, Bson, Document, RawDocument, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::change_stream::event::ResumeToken;

use crate::config::PipelineConfig;
use crate::model::token::token_id;
use crate::model::{Change, Namespace, SourceEvent};

/// The server's estimate of how many documents `namespaces` hold, for the progress bar.
pub async fn estimated_total(client: &mongodb::Client, namespaces: &[Namespace]) -> u64 {
    let mut total = 0;
    for ns in namespaces {
        let collection = client
            .database(&ns.db)
            .collection::<Document>(ns.coll.as_deref().unwrap_or_default());
        total += collection.estimated_document_count().await.unwrap_or(0);
    }
    total
}

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
    /// A query per namespace (same order; empty: every document), from a signal's
    /// `additional-conditions`.
    pub filters: Vec<Document>,
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
        insert_filters(&mut progress, &self.filters);
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
            filters: saved_filters(saved),
        })
    }

    /// Whether every namespace has been read.
    pub fn finished(&self) -> bool {
        self.index >= self.namespaces.len()
    }
}

/// Saves per-namespace filters in a progress document (only when there are any, so that
/// progress without filters keeps its earlier form).
fn insert_filters(progress: &mut Document, filters: &[Document]) {
    if filters.iter().any(|f| !f.is_empty()) {
        let filters: Vec<Bson> = filters.iter().cloned().map(Bson::Document).collect();
        progress.insert("filters", filters);
    }
}

/// The per-namespace filters saved by [`insert_filters`].
fn saved_filters(saved: &Document) -> Vec<Document> {
    saved
        .get_array("filters")
        .map(|all| {
            all.iter()
                .map(|f| f.as_document().cloned().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// The query of one chunk: documents after `last_id` (in `_id` order) that match `filter`.
fn chunk_query(last_id: &Option<Bson>, filter: Option<&Document>) -> Document {
    let after = last_id
        .as_ref()
        .map(|last| doc! { "_id": { "$gt": last.clone() } });
    match (after, filter.filter(|f| !f.is_empty())) {
        (Some(after), Some(filter)) => doc! { "$and": [after, filter.clone()] },
        (Some(after), None) => after,
        (None, Some(filter)) => filter.clone(),
        (None, None) => doc! {},
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
    let candidates = in_scope(client, pipeline).await?;
    filter_namespaces(client, candidates, filters).await
}

/// Every collection in the pipeline's database/collections scope, sorted.
async fn in_scope(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Result<Vec<(String, String)>, mongodb::error::Error> {
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
    Ok(candidates)
}

/// The namespaces of the pipeline's scope (after its namespace `filters`) that a signal's
/// `data-collections` name; see [`match_patterns`].
pub async fn requested_namespaces(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    filters: Vec<Document>,
    patterns: &[String],
) -> Result<Matched, mongodb::error::Error> {
    let scope = in_scope(client, pipeline).await?;
    let candidates = filter_namespaces(client, scope, filters).await?;
    match_patterns(client, candidates, patterns).await
}

/// The namespaces anchored regular `patterns` match, and the patterns that matched none.
#[derive(Debug, Default)]
pub struct Matched {
    /// Every candidate some pattern matches, in the candidates' order.
    pub namespaces: Vec<Namespace>,
    /// Indexes of the patterns that matched no candidate.
    pub unmatched: Vec<usize>,
}

/// Matches `db.coll` of every candidate against `patterns` (anchored regular expressions),
/// evaluated by the server so that they behave as the stream's own regex filters. An
/// invalid expression is the server's command error.
pub async fn match_patterns(
    client: &mongodb::Client,
    candidates: Vec<Namespace>,
    patterns: &[String],
) -> Result<Matched, mongodb::error::Error> {
    if candidates.is_empty() || patterns.is_empty() {
        return Ok(Matched {
            namespaces: Vec::new(),
            unmatched: (0..patterns.len()).collect(),
        });
    }
    let documents: Vec<Document> = candidates
        .iter()
        .enumerate()
        .map(|(i, ns)| doc! { "i": i as i64, "ns": ns.to_string() })
        .collect();
    let hits: Vec<Document> = patterns
        .iter()
        .map(|p| doc! { "$regexMatch": { "input": "$ns", "regex": p } })
        .collect();
    let stages = vec![
        doc! { "$documents": documents },
        doc! { "$project": { "i": 1, "hits": hits } },
    ];
    let mut rows = client.database("admin").aggregate(stages).await?;
    let mut matched = Matched::default();
    let mut used = vec![false; patterns.len()];
    while let Some(row) = rows.try_next().await? {
        let index = row.get_i64("i").unwrap_or(-1);
        let hits = row.get_array("hits").cloned().unwrap_or_default();
        let mut any = false;
        for (p, hit) in hits.iter().enumerate() {
            if hit.as_bool() == Some(true) {
                any = true;
                if let Some(u) = used.get_mut(p) {
                    *u = true;
                }
            }
        }
        if let (true, Some(ns)) = (
            any,
            usize::try_from(index).ok().and_then(|i| candidates.get(i)),
        ) {
            matched.namespaces.push(ns.clone());
        }
    }
    matched.unmatched = (0..patterns.len()).filter(|p| !used[*p]).collect();
    Ok(matched)
}

/// Checks that `filter` is a query the server accepts on `namespace` (one document read),
/// so that a bad filter is refused with the signal instead of failing every chunk.
pub async fn check_filter(
    client: &mongodb::Client,
    namespace: &Namespace,
    filter: &Document,
) -> Result<(), mongodb::error::Error> {
    client
        .database(&namespace.db)
        .collection::<Document>(namespace.coll.as_deref().unwrap_or_default())
        .find_one(filter.clone())
        .await
        .map(|_| ())
}

/// Keeps the candidates the namespace `filters` let through, run by the server on synthetic
/// events so that regexes behave as in the change stream.
async fn filter_namespaces(
    client: &mongodb::Client,
    candidates: Vec<(String, String)>,
    filters: Vec<Document>,
) -> Result<Vec<Namespace>, mongodb::error::Error> {
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

/// A stored document's `_id` (`null` if it has none), as the progress and event ids keep it.
fn document_id(document: &RawDocument) -> Bson {
    match document.get("_id") {
        Ok(Some(id)) => Bson::try_from(id).unwrap_or(Bson::Null),
        _ => Bson::Null,
    }
}

/// A document the driver read but tidegate cannot frame (malformed BSON): an error that
/// retries the chunk, naming the problem.
fn unreadable(message: String) -> mongodb::error::Error {
    mongodb::error::Error::from(std::io::Error::other(format!(
        "unreadable snapshot document: {message}"
    )))
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
    // Read raw: documents are published as stored (see `event::Change`).
    let collection = client
        .database(&ns.db)
        .collection::<RawDocumentBuf>(ns.coll.as_deref().unwrap_or_default());
    let filter = chunk_query(&progress.last_id, progress.filters.get(progress.index));
    let docs: Vec<RawDocumentBuf> = collection
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
        let id = document_id(&document);
        progress.last_id = Some(id.clone());
        progress.done += 1;
        let id_text = id.into_relaxed_extjson().to_string();
        let change = Change::snapshot_read(
            format!("snapshot.{snapshot_id}.{ns}.{id_text}"),
            ns.clone(),
            &document,
        )
        .map_err(unreadable)?;
        events.push(SourceEvent {
            token: progress.start.clone(),
            snapshot: Some(progress.to_document()),
            change,
        });
    }
    Ok(events)
}

/// An incremental snapshot, requested while streaming by a signal document (the
/// Debezium `execute-snapshot` format) in the pipeline's `signal_collection`, and run chunk by
/// chunk between watermarks so that a document changed meanwhile is never published stale
/// after its newer change (the DBLog algorithm):
///
/// 1. write a *window-open* watermark into the signal collection, read the next chunk of up
///    to `snapshot_chunk_size` documents by `_id`, write a *window-close* watermark;
/// 2. while the stream is between the two watermarks, a change to a document of the chunk
///    removes it from the chunk: the change event carries a state at least as new;
/// 3. at the window-close watermark, the rest of the chunk is published as `snapshot-read`
///    events, in the stream's order, and the next chunk starts.
///
/// The progress travels with every event and heartbeat into the checkpoint, so a restart
/// continues with the chunk after the last acknowledged one. A `stop-snapshot` signal ends it.
pub struct Incremental {
    /// Names the snapshot in event ids and watermarks: the signal event's id.
    id: String,
    /// The unit whose watermarks these are (several units may share a signal collection).
    unit: String,
    signals: mongodb::Collection<Document>,
    namespaces: Vec<Namespace>,
    /// A query per namespace (empty: every document), from `additional-conditions`.
    filters: Vec<Document>,
    index: usize,
    last_id: Option<Bson>,
    done: u64,
    chunks: u64,
    /// Paused by a `pause-snapshot` signal: no new chunk starts until `resume-snapshot`.
    paused: bool,
    window: Option<Window>,
    /// The server's estimate of the documents to read (for the progress bar), once known.
    estimate: Option<u64>,
}

/// The chunk read between two watermarks, waiting for the stream to reach them.
struct Window {
    /// Watermark id, `<snapshot id>:<chunk number>`.
    id: String,
    /// Whether the stream has passed the window-open watermark.
    open: bool,
    namespace: Namespace,
    /// The chunk, in `_id` order; documents changed inside the window are removed.
    documents: Vec<RawDocumentBuf>,
    /// `_id` of the chunk's last document, whether or not it is still in `documents`.
    last_id: Bson,
}

impl Incremental {
    /// A new incremental snapshot of `namespaces` (each read with its filter; empty: all),
    /// named by the signal event's id.
    pub fn new(
        id: String,
        unit: &str,
        signals: mongodb::Collection<Document>,
        namespaces: Vec<Namespace>,
        filters: Vec<Document>,
    ) -> Incremental {
        Incremental {
            id,
            unit: unit.to_string(),
            signals,
            namespaces,
            filters,
            index: 0,
            last_id: None,
            done: 0,
            chunks: 0,
            paused: false,
            window: None,
            estimate: None,
        }
    }

    /// The one saved in a checkpoint, if `saved` is an incremental snapshot's progress.
    pub fn restore(
        saved: &Document,
        unit: &str,
        signals: mongodb::Collection<Document>,
    ) -> Option<Incremental> {
        if !saved.get_bool("incremental").unwrap_or(false) {
            return None;
        }
        let namespaces = saved
            .get_array("namespaces")
            .ok()?
            .iter()
            .filter_map(|ns| ns.as_str())
            .filter_map(|ns| ns.split_once('.'))
            .map(|(db, coll)| Namespace {
                db: db.to_string(),
                coll: Some(coll.to_string()),
            })
            .collect();
        Some(Incremental {
            id: saved.get_str("id").ok()?.to_string(),
            unit: unit.to_string(),
            signals,
            namespaces,
            filters: saved_filters(saved),
            index: saved.get_i64("index").unwrap_or(0).max(0) as usize,
            last_id: saved.get("lastId").cloned(),
            done: saved.get_i64("done").unwrap_or(0).max(0) as u64,
            chunks: saved.get_i64("chunks").unwrap_or(0).max(0) as u64,
            paused: saved.get_bool("paused").unwrap_or(false),
            window: None,
            estimate: None,
        })
    }

    /// The progress saved with every position while the snapshot runs.
    pub fn progress(&self) -> Document {
        let namespaces: Vec<Bson> = self
            .namespaces
            .iter()
            .map(|ns| Bson::String(ns.to_string()))
            .collect();
        let mut progress = doc! {
            "incremental": true,
            "id": &self.id,
            "namespaces": namespaces,
            "index": self.index as i64,
            "done": self.done as i64,
            "chunks": self.chunks as i64,
        };
        if let Some(id) = &self.last_id {
            progress.insert("lastId", id.clone());
        }
        if self.paused {
            progress.insert("paused", true);
        }
        insert_filters(&mut progress, &self.filters);
        progress
    }

    /// The namespaces still to read (the current one first).
    pub fn remaining(&self) -> Vec<Namespace> {
        self.namespaces.iter().skip(self.index).cloned().collect()
    }

    /// Drops `removed` from the namespaces still to read (a `stop-snapshot` naming
    /// collections). Returns whether the chunk in flight was dropped with them: the caller
    /// then starts the next chunk (the dropped window's watermarks pass unused).
    pub fn remove(&mut self, removed: &[Namespace]) -> bool {
        // Namespaces before `index` are read already and stay (the progress counts them);
        // so `index` keeps pointing at the first one still to read.
        let dropped_current = self
            .namespaces
            .get(self.index)
            .is_some_and(|current| removed.contains(current));
        let mut kept = Vec::new();
        let mut filters = Vec::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if i >= self.index && removed.contains(ns) {
                continue;
            }
            kept.push(ns.clone());
            filters.push(self.filters.get(i).cloned().unwrap_or_default());
        }
        self.namespaces = kept;
        self.filters = filters;
        if dropped_current {
            self.last_id = None;
            self.window = None;
        }
        dropped_current
    }

    /// Whether a `pause-snapshot` holds it.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses or resumes; a paused snapshot starts no new chunk.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Whether a chunk is waiting for its watermarks.
    pub fn in_window(&self) -> bool {
        self.window.is_some()
    }

    /// Documents published so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The server's estimate of the documents to read, asked once.
    pub async fn estimate(&mut self, client: &mongodb::Client) -> u64 {
        if self.estimate.is_none() {
            self.estimate = Some(estimated_total(client, &self.namespaces).await);
        }
        self.estimate.unwrap_or(0)
    }

    /// Starts the next chunk: writes the opening watermark, reads the chunk, writes the
    /// closing one. `Ok(false)` when every namespace has been read (the snapshot is over).
    pub async fn next_chunk(
        &mut self,
        client: &mongodb::Client,
        size: u32,
    ) -> Result<bool, mongodb::error::Error> {
        loop {
            let Some(namespace) = self.namespaces.get(self.index).cloned() else {
                return Ok(false);
            };
            let filter = chunk_query(&self.last_id, self.filters.get(self.index));
            let window = format!("{}:{}", self.id, self.chunks);
            self.signals
                .insert_one(
                    doc! { "type": "snapshot-window-open", "window": &window, "unit": &self.unit },
                )
                .await?;
            let documents: Vec<RawDocumentBuf> = client
                .database(&namespace.db)
                .collection::<RawDocumentBuf>(namespace.coll.as_deref().unwrap_or_default())
                .find(filter)
                .sort(doc! { "_id": 1 })
                .limit(i64::from(size))
                .await?
                .try_collect()
                .await?;
            self.signals
                .insert_one(
                    doc! { "type": "snapshot-window-close", "window": &window, "unit": &self.unit },
                )
                .await?;
            self.chunks += 1;
            let Some(last_id) = documents.last().map(|d| document_id(d)) else {
                // The namespace is done; the watermarks just written pass unused.
                self.index += 1;
                self.last_id = None;
                continue;
            };
            self.window = Some(Window {
                id: window,
                open: false,
                namespace,
                documents,
                last_id,
            });
            return Ok(true);
        }
    }

    /// Sees a change event go by: inside the window, a change to a chunk document removes
    /// it from the chunk.
    pub fn saw_change(&mut self, change: &Change) {
        let Some(window) = self.window.as_mut().filter(|w| w.open) else {
            return;
        };
        if *change.namespace() != window.namespace {
            return;
        }
        let Some(id) = change
            .document_key()
            .and_then(|k| k.get("_id").ok().flatten())
        else {
            return;
        };
        window
            .documents
            .retain(|d| d.get("_id").ok().flatten().is_none_or(|own| own != id));
    }

    /// Sees one of this unit's watermarks go by. At the window's close it returns the chunk's
    /// remaining documents as events to publish at `token`'s position; the caller then starts
    /// the next chunk.
    pub fn saw_watermark(
        &mut self,
        open: bool,
        window_id: &str,
        token: &ResumeToken,
    ) -> Result<Option<Vec<SourceEvent>>, mongodb::error::Error> {
        let Some(window) = self.window.as_mut().filter(|w| w.id == window_id) else {
            return Ok(None);
        };
        if open {
            window.open = true;
            return Ok(None);
        }
        let Some(window) = self.window.take() else {
            return Ok(None);
        };
        let mut events = Vec::with_capacity(window.documents.len());
        for document in window.documents {
            let id = document_id(&document);
            // Each event carries the progress up to itself: a crash half-way through the
            // chunk re-reads only what was not acknowledged.
            self.done += 1;
            self.last_id = Some(id.clone());
            let progress = self.progress();
            let id_text = id.into_relaxed_extjson().to_string();
            let change = Change::snapshot_read(
                format!("snapshot.{}.{}.{id_text}", self.id, window.namespace),
                window.namespace.clone(),
                &document,
            )
            .map_err(unreadable)?;
            events.push(SourceEvent {
                token: token.clone(),
                snapshot: Some(progress),
                change,
            });
        }
        self.last_id = Some(window.last_id);
        Ok(Some(events))
    }

    /// The unit these watermarks belong to.
    pub fn unit(&self) -> &str {
        &self.unit
    }
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
            filters: vec![doc! { "color": "blue" }],
        };
        let saved = progress.to_document();
        assert_eq!(Progress::from_document(&saved).expect("decode"), progress);
        assert!(!progress.finished());
    }
}
