//! The MongoDB side: one change stream per pipeline, resumed across failures.
//!
//! The source hands events downstream in change-stream order. While no events arrive it also
//! hands down the stream's post-batch resume token as a heartbeat, so a quiet pipeline's
//! checkpoint keeps moving and does not age out of the oplog.
//!
//! Transient failures (network, elections) reopen the stream after the last token read, with
//! backoff. Failures no resume can fix (history lost from the oplog, an invalid token, a
//! server that is not a replica set, auth) stop the pipeline with the server's own words.

use std::task::Poll;
use std::time::Duration;

use bson::{doc, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::error::ErrorKind;
use mongodb::options::{ChangeStreamOptions, FullDocumentBeforeChangeType, FullDocumentType};
use tokio::sync::{mpsc, watch};

use crate::config::{CheckpointStoreKind, FullDocument, FullDocumentBeforeChange, PipelineConfig};
use crate::error::Error;
use crate::event::{Namespace, Operation, SourceEvent};

/// What the source hands downstream.
#[derive(Debug)]
pub enum SourceItem {
    /// A change.
    Event(Box<SourceEvent>),
    /// No change arrived, but the stream's position moved on to this token.
    Heartbeat(ResumeToken),
}

/// Where to open the stream.
#[derive(Debug, Clone)]
enum OpenAt {
    Now,
    ResumeAfter(ResumeToken),
    StartAfter(ResumeToken),
}

/// Server error codes after which resuming cannot succeed.
const FATAL_CODES: &[(i32, &str)] = &[
    (
        286,
        "the checkpointed position is no longer in the oplog (ChangeStreamHistoryLost); \
         events were lost while tidegate was behind. Delete the pipeline's checkpoint to start \
         from now, or enlarge the oplog",
    ),
    (
        260,
        "the checkpointed resume token is invalid for this stream (InvalidResumeToken)",
    ),
    (
        280,
        "the change stream failed fatally (ChangeStreamFatalError)",
    ),
    (
        40573,
        "change streams need a replica set or sharded cluster, and this server is standalone",
    ),
    (13, "not authorized to watch this namespace"),
    (18, "authentication failed"),
];

/// Events per getMore. Well under the pipeline's source queue, so that the next batch is
/// fetched while the plugin and publish stages still have the previous one to work on (the
/// server's default, up to 16 MB, made them idle through every long getMore).
const BATCH_SIZE: u32 = 1000;

/// Most events handed downstream at once (see [`run`]).
pub const HANDOFF_BATCH: usize = 256;

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn error_code(err: &mongodb::error::Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(command) => Some(command.code),
        // A failed handshake (e.g. a wrong SCRAM password) carries the server's refusal as
        // its source.
        ErrorKind::Authentication { .. } => {
            let source = std::error::Error::source(err)?;
            let source = source
                .downcast_ref::<Box<mongodb::error::Error>>()
                .map(|boxed| &**boxed)
                .or_else(|| source.downcast_ref::<mongodb::error::Error>())?;
            error_code(source)
        }
        _ => None,
    }
}

/// Reads the pipeline's change stream until `shutdown` turns true or a fatal error occurs.
/// `start` is the checkpointed token to resume after (none: start from now).
///
/// Events go downstream in batches: everything the driver already holds (up to
/// [`HANDOFF_BATCH`]) is handed over at once, and a batch is sent as soon as the next event
/// would need a round trip to the server. One hand-off per batch instead of per event keeps
/// the plugin thread from being woken for every single event.
pub async fn run(
    client: mongodb::Client,
    pipeline: PipelineConfig,
    start: Option<ResumeToken>,
    events: mpsc::Sender<Vec<SourceItem>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut start = start.map(OpenAt::ResumeAfter).unwrap_or(OpenAt::Now);
    let mut backoff = MIN_BACKOFF;
    let mut last_heartbeat: Option<ResumeToken> = None;
    let mut batch: Vec<SourceItem> = Vec::with_capacity(HANDOFF_BATCH);
    // Sends the batch; false when downstream is gone (shutting down).
    async fn hand_off(events: &mpsc::Sender<Vec<SourceItem>>, batch: &mut Vec<SourceItem>) -> bool {
        if batch.is_empty() {
            return true;
        }
        let full = std::mem::replace(batch, Vec::with_capacity(HANDOFF_BATCH));
        events.send(full).await.is_ok()
    }
    'reopen: loop {
        // `start` has moved past everything read so far: hand it over before reopening.
        if !hand_off(&events, &mut batch).await || *shutdown.borrow() {
            return Ok(());
        }
        let mut stream = match open(&client, &pipeline, &start).await {
            Ok(stream) => stream,
            Err(err) => {
                let what = "cannot open change stream; retrying";
                if retry_later(&pipeline.id, what, err, &mut backoff, &mut shutdown).await? {
                    return Ok(());
                }
                continue 'reopen;
            }
        };
        tracing::info!(pipeline = %pipeline.id, start = ?start_label(&start), "change stream open");
        crate::metrics::pipeline(&pipeline.id).set_state(crate::metrics::State::Running);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let next = {
                let next = stream.next_if_any();
                tokio::pin!(next);
                match futures::poll!(&mut next) {
                    Poll::Ready(next) => next,
                    Poll::Pending => {
                        // The next event needs a round trip: hand over what we have first.
                        if !hand_off(&events, &mut batch).await {
                            return Ok(());
                        }
                        tokio::select! {
                            biased;
                            _ = shutdown.changed() => return Ok(()),
                            next = &mut next => next,
                        }
                    }
                }
            };
            match next {
                Ok(Some(event)) => {
                    backoff = MIN_BACKOFF;
                    let mut event = SourceEvent::from_driver(event);
                    let invalidated = event.change.operation == Operation::Invalidate;
                    if invalidated && event.change.namespace.db.is_empty() {
                        // The server sends invalidate without `ns`; say what was invalidated.
                        event.change.namespace = watched_namespace(&pipeline);
                    }
                    start = if invalidated {
                        OpenAt::StartAfter(event.token.clone())
                    } else {
                        OpenAt::ResumeAfter(event.token.clone())
                    };
                    batch.push(SourceItem::Event(Box::new(event)));
                    if invalidated {
                        tracing::warn!(pipeline = %pipeline.id, "change stream invalidated (watched namespace dropped or renamed); continuing after it");
                        continue 'reopen;
                    }
                    if batch.len() >= HANDOFF_BATCH && !hand_off(&events, &mut batch).await {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    if !stream.is_alive() {
                        continue 'reopen;
                    }
                    let token = stream.resume_token();
                    if let Some(token) = token {
                        if last_heartbeat.as_ref() != Some(&token) {
                            last_heartbeat = Some(token.clone());
                            if !matches!(start, OpenAt::StartAfter(_)) {
                                start = OpenAt::ResumeAfter(token.clone());
                            }
                            batch.push(SourceItem::Heartbeat(token));
                            if !hand_off(&events, &mut batch).await {
                                return Ok(());
                            }
                        }
                    }
                }
                Err(err) => {
                    if !hand_off(&events, &mut batch).await {
                        return Ok(());
                    }
                    let what = "change stream failed; resuming after the last event read";
                    if retry_later(&pipeline.id, what, err, &mut backoff, &mut shutdown).await? {
                        return Ok(());
                    }
                    continue 'reopen;
                }
            }
        }
    }
}

/// The namespace a pipeline watches: a database, and a collection when it watches just one.
fn watched_namespace(pipeline: &PipelineConfig) -> Namespace {
    Namespace {
        db: pipeline.database.clone().unwrap_or_default(),
        coll: match pipeline.collections.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        },
    }
}

fn start_label(start: &OpenAt) -> &'static str {
    match start {
        OpenAt::Now => "now",
        OpenAt::ResumeAfter(_) => "resume-after-token",
        OpenAt::StartAfter(_) => "start-after-token",
    }
}

fn fatal_reason(err: &mongodb::error::Error) -> Option<&'static str> {
    let code = error_code(err)?;
    FATAL_CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, reason)| *reason)
}

/// Handles a failed open or read: a fatal error is returned; anything else is logged and
/// waited out with exponential backoff. `Ok(true)` means shutdown was requested meanwhile.
async fn retry_later(
    pipeline: &str,
    what: &str,
    err: mongodb::error::Error,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    if let Some(reason) = fatal_reason(&err) {
        return Err(Error::Source {
            pipeline: pipeline.to_string(),
            message: format!("{reason}: {err}"),
        });
    }
    tracing::warn!(pipeline, error = %err, retry_in_ms = backoff.as_millis() as u64, "{what}");
    crate::metrics::pipeline(pipeline).set_state(crate::metrics::State::Retrying);
    let delay = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    Ok(tokio::select! {
        _ = tokio::time::sleep(delay) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    })
}

async fn open(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    start: &OpenAt,
) -> Result<ChangeStream<ChangeStreamEvent<Document>>, mongodb::error::Error> {
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
    let (resume_after, start_after) = match start {
        OpenAt::Now => (None, None),
        OpenAt::ResumeAfter(token) => (Some(token.clone()), None),
        OpenAt::StartAfter(token) => (None, Some(token.clone())),
    };
    let options = ChangeStreamOptions::builder()
        .full_document(full_document)
        .full_document_before_change(before)
        .resume_after(resume_after)
        .start_after(start_after)
        .max_await_time(Duration::from_millis(500))
        .batch_size(BATCH_SIZE)
        .build();
    let stages = server_side_filter(pipeline);
    match (&pipeline.database, pipeline.collections.as_slice()) {
        (None, _) => client.watch().pipeline(stages).with_options(options).await,
        (Some(db), [coll]) => {
            client
                .database(db)
                .collection::<Document>(coll)
                .watch()
                .pipeline(stages)
                .with_options(options)
                .await
        }
        (Some(db), _) => {
            client
                .database(db)
                .watch()
                .pipeline(stages)
                .with_options(options)
                .await
        }
    }
}

/// The `$match` stages that narrow a database- or deployment-wide stream on the server:
/// the listed collections only, and never the pipeline's own checkpoint collection (whose
/// writes would otherwise be published, checkpointed, published… forever).
fn server_side_filter(pipeline: &PipelineConfig) -> Vec<Document> {
    let mut stages = Vec::new();
    if pipeline.collections.len() > 1 {
        stages.push(doc! { "$match": { "ns.coll": { "$in": pipeline.collections.clone() } } });
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
