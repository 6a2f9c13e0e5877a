//! Incremental snapshots, read chunk by chunk between watermarks while the stream runs.

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::change_stream::event::ResumeToken;

use super::{chunk_query, document_id, estimated_total, unreadable};
use crate::model::{Change, IncrementalProgress, Namespace, SnapshotProgress, SourceEvent};

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
    /// What the checkpoint saves: which documents are published, and the snapshot's name.
    progress: IncrementalProgress,
    /// The unit whose watermarks these are (several units may share a signal collection).
    unit: String,
    signals: mongodb::Collection<Document>,
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
            progress: IncrementalProgress {
                id,
                namespaces,
                index: 0,
                last_id: None,
                done: 0,
                chunks: 0,
                paused: false,
                filters,
            },
            unit: unit.to_string(),
            signals,
            window: None,
            estimate: None,
        }
    }

    /// The one saved in a checkpoint, if `saved` is an incremental snapshot's progress.
    pub fn restore(
        saved: &SnapshotProgress,
        unit: &str,
        signals: mongodb::Collection<Document>,
    ) -> Option<Incremental> {
        let SnapshotProgress::Incremental(progress) = saved else {
            return None;
        };
        Some(Incremental {
            progress: (**progress).clone(),
            unit: unit.to_string(),
            signals,
            window: None,
            estimate: None,
        })
    }

    /// The progress saved with every position while the snapshot runs.
    pub fn progress(&self) -> SnapshotProgress {
        SnapshotProgress::Incremental(Box::new(self.progress.clone()))
    }

    /// The namespaces still to read (the current one first).
    pub fn remaining(&self) -> Vec<Namespace> {
        self.progress
            .namespaces
            .iter()
            .skip(self.progress.index)
            .cloned()
            .collect()
    }

    /// Drops `removed` from the namespaces still to read (a `stop-snapshot` naming
    /// collections). Returns whether the chunk in flight was dropped with them: the caller
    /// then starts the next chunk (the dropped window's watermarks pass unused).
    pub fn remove(&mut self, removed: &[Namespace]) -> bool {
        // Namespaces before `index` are read already and stay (the progress counts them);
        // so `index` keeps pointing at the first one still to read.
        let dropped_current = self
            .progress
            .namespaces
            .get(self.progress.index)
            .is_some_and(|current| removed.contains(current));
        let mut kept = Vec::new();
        let mut filters = Vec::new();
        for (i, ns) in self.progress.namespaces.iter().enumerate() {
            if i >= self.progress.index && removed.contains(ns) {
                continue;
            }
            kept.push(ns.clone());
            filters.push(self.progress.filters.get(i).cloned().unwrap_or_default());
        }
        self.progress.namespaces = kept;
        self.progress.filters = filters;
        if dropped_current {
            self.progress.last_id = None;
            self.window = None;
        }
        dropped_current
    }

    /// Whether a `pause-snapshot` holds it.
    pub fn is_paused(&self) -> bool {
        self.progress.paused
    }

    /// Pauses or resumes; a paused snapshot starts no new chunk.
    pub fn set_paused(&mut self, paused: bool) {
        self.progress.paused = paused;
    }

    /// Whether a chunk is waiting for its watermarks.
    pub fn in_window(&self) -> bool {
        self.window.is_some()
    }

    /// Documents published so far.
    pub fn done(&self) -> u64 {
        self.progress.done
    }

    /// The server's estimate of the documents to read, asked once.
    pub async fn estimate(&mut self, client: &mongodb::Client) -> u64 {
        if self.estimate.is_none() {
            self.estimate = Some(estimated_total(client, &self.progress.namespaces).await);
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
            let Some(namespace) = self.progress.namespaces.get(self.progress.index).cloned() else {
                return Ok(false);
            };
            let filter = chunk_query(
                &self.progress.last_id,
                self.progress.filters.get(self.progress.index),
            );
            let window = format!("{}:{}", self.progress.id, self.progress.chunks);
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
            self.progress.chunks += 1;
            let Some(last_id) = documents.last().map(|d| document_id(d)) else {
                // The namespace is done; the watermarks just written pass unused.
                self.progress.index += 1;
                self.progress.last_id = None;
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
            self.progress.done += 1;
            self.progress.last_id = Some(id.clone());
            let progress = self.progress();
            let id_text = id.into_relaxed_extjson().to_string();
            let change = Change::snapshot_read(
                format!(
                    "snapshot.{}.{}.{id_text}",
                    self.progress.id, window.namespace
                ),
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
        self.progress.last_id = Some(window.last_id);
        Ok(Some(events))
    }

    /// The unit these watermarks belong to.
    pub fn unit(&self) -> &str {
        &self.unit
    }
}
