//! Initial (and blocking) snapshots: every document in scope, read while the stream waits,
//! then streaming resumes from the position captured before the first read.

use bson::{doc, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::change_stream::event::ResumeToken;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

use super::{chunk_query, document_id, estimated_total, unreadable};
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::model::token::token_id;
use crate::model::{Change, InitialProgress, SnapshotProgress, SourceEvent};
use crate::source::errors::{retry_later, MIN_BACKOFF};
use crate::source::open::{namespace_filter, OpenAt};
use crate::source::start::open_position;
use crate::source::SourceItem;

/// Reads the next chunk of the namespace `progress` is at: up to `size` documents after
/// `last_id`, in `_id` order, as events carrying the progress after each one. An empty
/// chunk means the namespace is done (`progress` then moves to the next).
pub async fn next_chunk(
    client: &mongodb::Client,
    progress: &mut InitialProgress,
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
            snapshot: Some(SnapshotProgress::Initial(Box::new(progress.clone()))),
            change,
        });
    }
    Ok(events)
}

/// A snapshot to take before streaming.
pub(crate) enum SnapshotPlan {
    /// From scratch.
    New,
    /// Continue the one whose progress the checkpoint holds.
    Resume(InitialProgress),
    /// A blocking snapshot requested by a signal (the stream pauses while it runs).
    Signalled(InitialProgress),
}

/// Reads every document in scope as `snapshot-read` events and returns the position to
/// stream from (captured before reading); `None` when shut down meanwhile.
pub(crate) async fn take_snapshot(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    plan: SnapshotPlan,
    events: &mpsc::Sender<Vec<SourceItem>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<ResumeToken>, Error> {
    let id = pipeline.id.as_str();
    // One backoff for the whole snapshot: a server that failed the start is not hammered
    // again by the first chunk.
    let mut backoff = MIN_BACKOFF;
    let Some(mut progress) = prepare(client, pipeline, plan, &mut backoff, shutdown).await? else {
        return Ok(None);
    };
    let total = estimated_total(client, &progress.namespaces).await;
    tracing::info!(
        pipeline = id,
        namespaces = progress.namespaces.len(),
        "snapshot: reading existing documents, then streaming from before the first read"
    );
    let reader = Chunks {
        client,
        pipeline,
        events,
        total,
    };
    if !reader
        .read_all(&mut progress, &mut backoff, shutdown)
        .await?
    {
        return Ok(None);
    }
    tracing::info!(
        pipeline = id,
        documents = progress.done,
        "snapshot done; streaming from where it began"
    );
    // A unit with no snapshot progress: the checkpoint becomes a plain position again.
    if events
        .send(vec![SourceItem::Heartbeat(progress.start.clone(), None)])
        .await
        .is_err()
    {
        return Ok(None);
    }
    Ok(Some(progress.start))
}

/// The progress `plan` starts from: the checkpoint's, the signal's, or a new snapshot's
/// (retried until the server answers). `None` when shut down meanwhile.
async fn prepare(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    plan: SnapshotPlan,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<InitialProgress>, Error> {
    let id = pipeline.id.as_str();
    Ok(Some(match plan {
        SnapshotPlan::Resume(progress) => {
            tracing::info!(
                pipeline = id,
                done = progress.done,
                namespace = progress.index,
                "resuming the snapshot where it stopped"
            );
            progress
        }
        SnapshotPlan::Signalled(progress) => {
            tracing::info!(
                pipeline = id,
                namespaces = progress.namespaces.len(),
                "blocking snapshot: the stream pauses while it runs, then resumes after its signal"
            );
            progress
        }
        SnapshotPlan::New => loop {
            match begin_snapshot(client, pipeline).await {
                Ok(progress) => break progress,
                Err(err) => {
                    let what = "cannot start the snapshot; retrying";
                    if retry_later(pipeline, what, err, backoff, shutdown).await? {
                        return Ok(None);
                    }
                }
            }
        },
    }))
}

/// Where the chunks of a running snapshot go, and how many documents it expects.
struct Chunks<'a> {
    client: &'a mongodb::Client,
    pipeline: &'a PipelineConfig,
    events: &'a mpsc::Sender<Vec<SourceItem>>,
    /// The server's estimate, for the progress bar.
    total: u64,
}

impl Chunks<'_> {
    /// Reads and hands on chunk after chunk until `progress` is finished; a failed chunk is
    /// read again after a backoff. `false` when shut down (or downstream gone) meanwhile.
    async fn read_all(
        &self,
        progress: &mut InitialProgress,
        backoff: &mut Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, Error> {
        let size = self.pipeline.snapshot_chunk_size;
        while !progress.finished() {
            if *shutdown.borrow() {
                return Ok(false);
            }
            let before = progress.clone();
            match next_chunk(self.client, progress, size).await {
                Ok(chunk) if chunk.is_empty() => {}
                Ok(chunk) => {
                    *backoff = MIN_BACKOFF;
                    if !self.hand_on(&before, progress, chunk).await {
                        return Ok(false);
                    }
                }
                Err(err) => {
                    *progress = before;
                    let what = "snapshot read failed; retrying the chunk";
                    if retry_later(self.pipeline, what, err, backoff, shutdown).await? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Reports a chunk read from where `before` was, and sends it downstream; `false` when
    /// downstream is gone.
    async fn hand_on(
        &self,
        before: &InitialProgress,
        progress: &InitialProgress,
        chunk: Vec<SourceEvent>,
    ) -> bool {
        let id = self.pipeline.id.as_str();
        let namespace = before.namespaces.get(before.index).map(ToString::to_string);
        tracing::info!(
            pipeline = id,
            namespace = namespace.unwrap_or_default(),
            read = chunk.len(),
            done = progress.done,
            "snapshot chunk"
        );
        crate::ops::metrics::pipeline(id).snapshot_read(chunk.len());
        crate::ops::telemetry::snapshot_progress(id, progress.done, self.total);
        let items = chunk
            .into_iter()
            .map(|event| SourceItem::Event(Box::new(event)))
            .collect();
        self.events.send(items).await.is_ok()
    }
}

/// Captures the stream's position now (before any document is read) and lists what to read.
pub(crate) async fn begin_snapshot(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Result<InitialProgress, mongodb::error::Error> {
    let start = open_position(client, pipeline, &OpenAt::Now).await?;
    let namespaces = super::namespaces(client, pipeline, namespace_filter(pipeline)).await?;
    Ok(InitialProgress {
        start,
        namespaces,
        index: 0,
        last_id: None,
        done: 0,
        filters: Vec::new(),
    })
}
