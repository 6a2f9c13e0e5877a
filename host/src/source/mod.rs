//! The MongoDB side: one change stream per pipeline, resumed across failures.
//!
//! The source hands events downstream in change-stream order. While no events arrive it also
//! hands down the stream's post-batch resume token as a heartbeat, so a quiet pipeline's
//! checkpoint keeps moving and does not age out of the oplog.
//!
//! Transient failures (network, elections) reopen the stream after the last token read, with
//! backoff. Failures no resume can fix (history lost from the oplog, an invalid token, a
//! server that is not a replica set, auth) stop the pipeline with the server's own words.

pub mod oversize;
pub mod signal;
pub mod snapshot;

use std::task::Poll;
use std::time::{Duration, Instant};

use bson::{doc, Document, RawDocumentBuf};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::ErrorKind;
use mongodb::options::{ChangeStreamOptions, FullDocumentBeforeChangeType, FullDocumentType};
use tokio::sync::{mpsc, watch};

use self::snapshot::{Incremental, Progress};
use crate::config::{
    check_stage, parse_start_at, parse_token, CheckpointStoreKind, FullDocument,
    FullDocumentBeforeChange, HistoryLostPolicy, InvalidatePolicy, NamespaceFilter, OversizePolicy,
    PipelineConfig, SnapshotMode, StartAt, SPLIT_STAGE,
};
use crate::error::Error;
use crate::model::token::{token_from_document, token_id, token_time};
use crate::model::Position;
use crate::model::{Namespace, Operation, SourceEvent};
use crate::source::signal::{Signal, SnapshotKind, SnapshotRequest};

/// What the source hands downstream.
#[derive(Debug)]
pub enum SourceItem {
    /// A change.
    Event(Box<SourceEvent>),
    /// A change over MongoDB's 16 MiB limit, stripped to a stub by `oversize = "skip"`: only
    /// its identity (id, namespace, document key, times) and its size in bytes.
    Oversize {
        /// The stub.
        event: Box<SourceEvent>,
        /// The whole event's size, as the server measured it.
        size: i64,
    },
    /// No change to publish, but the stream's position moved on to this token (with the
    /// progress of a running incremental snapshot, if any).
    Heartbeat(ResumeToken, Option<Document>),
}

/// Where to open the stream.
#[derive(Debug, Clone)]
enum OpenAt {
    Now,
    AtTime(bson::Timestamp),
    ResumeAfter(ResumeToken),
    StartAfter(ResumeToken),
}

/// MongoDB's ChangeStreamHistoryLost.
const HISTORY_LOST: i32 = 286;

/// Server error codes after which resuming cannot succeed.
const FATAL_CODES: &[(i32, &str)] = &[
    (
        HISTORY_LOST,
        "the checkpointed position is no longer in the oplog (ChangeStreamHistoryLost); \
         events were lost while tidegate was behind. Set `on_history_lost = \"latest\"` or \
         delete the pipeline's checkpoint to start from now, and enlarge the oplog",
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
        "change streams need a replica set or sharded cluster, and this server is standalone; \
         make it a one-member replica set (restart mongod with --replSet rs0, run \
         rs.initiate() once) and add replicaSet=rs0 to mongodb_uri",
    ),
    (
        13,
        "not authorized to watch this namespace; grant the user the changeStream and find \
         actions on it (the read role has both)",
    ),
    (
        18,
        "authentication failed; check the user, password and authSource in mongodb_uri",
    ),
    (
        40324,
        "the server does not know a stage of the change stream (Unrecognized pipeline stage \
         name); `oversize = \"split\"` needs MongoDB 6.0.9+ or 7.0+",
    ),
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
/// `start` is the checkpointed token to resume after; without one the stream opens at
/// `at_time` (the stream's last message, see `pipeline::resolve_start`), or else where the
/// config says (`start_at`, `start_after_token`).
///
/// Events go downstream in batches: everything the driver already holds (up to
/// [`HANDOFF_BATCH`]) is handed over at once, and a batch is sent as soon as the next event
/// would need a round trip to the server. One hand-off per batch instead of per event keeps
/// the plugin thread from being woken for every single event.
pub async fn run(
    client: mongodb::Client,
    pipeline: PipelineConfig,
    start: Option<Position>,
    at_time: Option<bson::Timestamp>,
    events: mpsc::Sender<Vec<SourceItem>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let signals = signal_collection(&client, &pipeline);
    let heartbeats = pipeline
        .heartbeat_collection
        .as_deref()
        .and_then(|ns| ns.split_once('.'))
        .map(|(db, coll)| Namespace {
            db: db.to_string(),
            coll: Some(coll.to_string()),
        });
    // An incremental snapshot the checkpoint says was running.
    let mut incremental = match (&start, &signals) {
        (
            Some(Position {
                snapshot: Some(progress),
                ..
            }),
            Some((_, collection)),
        ) => Incremental::restore(progress, &pipeline.id, collection.clone()),
        _ => None,
    };
    // A snapshot to take (or finish) before streaming.
    let (mut start, mut snapshot) = match start {
        Some(Position { token, .. }) if incremental.is_some() => (OpenAt::ResumeAfter(token), None),
        Some(Position {
            token,
            snapshot: Some(progress),
            ..
        }) => (
            OpenAt::ResumeAfter(token),
            Some(SnapshotPlan::Resume(progress)),
        ),
        Some(Position { token, .. }) => (
            OpenAt::ResumeAfter(token),
            (pipeline.snapshot == SnapshotMode::Always).then_some(SnapshotPlan::New),
        ),
        None => match at_time {
            Some(time) => (OpenAt::AtTime(time), None),
            None => (
                first_start(&pipeline)?,
                (pipeline.snapshot != SnapshotMode::Never).then_some(SnapshotPlan::New),
            ),
        },
    };
    let mut backoff = MIN_BACKOFF;
    // Since when the stream is lost (an election, a server away), while it is: the first
    // failure is logged as a warning, the retries quietly, the resume with its duration.
    let mut lost_since: Option<Instant> = None;
    let mut last_heartbeat: Option<ResumeToken> = None;
    let mut fragments = oversize::Fragments::default();
    // After BSONObjectTooLarge: the stream is read again up to the event with the `skip`
    // stage (`probe`), which names the event and lets those before it through.
    let mut probing = false;
    let probe = oversize::probe_config(&pipeline);
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
        if let Some(plan) = snapshot.take() {
            match take_snapshot(&client, &pipeline, plan, &events, &mut shutdown).await? {
                Some(began) => start = OpenAt::ResumeAfter(began),
                None => return Ok(()),
            }
        }
        // A split event half read when the stream broke is read again from its first fragment.
        fragments.clear();
        // Opening waits for server selection: a shutdown must not wait for it.
        let opened = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            opened = open(&client, if probing { &probe } else { &pipeline }, &start) => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(err) if error_code(&err) == Some(oversize::BSON_OBJECT_TOO_LARGE) => {
                too_large(&pipeline, &start, &mut probing, err)?;
                continue 'reopen;
            }
            Err(err) if error_code(&err) == Some(HISTORY_LOST) => {
                match history_lost(&client, &pipeline, &start, err).await? {
                    Some(next) => start = next,
                    None => snapshot = Some(SnapshotPlan::New),
                }
                continue 'reopen;
            }
            Err(err) => {
                let what = "cannot open change stream; retrying";
                let first = lost_since.is_none();
                lost_since.get_or_insert_with(Instant::now);
                if retry_quietly(&pipeline, what, err, &mut backoff, &mut shutdown, !first).await? {
                    return Ok(());
                }
                continue 'reopen;
            }
        };
        match lost_since.take() {
            Some(since) => {
                backoff = MIN_BACKOFF;
                tracing::info!(
                    pipeline = %pipeline.id,
                    start = ?start_label(&start),
                    lost_ms = since.elapsed().as_millis() as u64,
                    "change stream open again, resumed after {:.1} s without it",
                    since.elapsed().as_secs_f64()
                );
            }
            None => {
                tracing::info!(pipeline = %pipeline.id, start = ?start_label(&start), "change stream open")
            }
        }
        // A running incremental snapshot (re)starts its current chunk with fresh watermarks.
        if let Some(running) = incremental.as_mut().filter(|r| !r.is_paused()) {
            match running
                .next_chunk(&client, pipeline.snapshot_chunk_size)
                .await
            {
                Ok(true) => {}
                Ok(false) => incremental = finished(&pipeline.id, incremental.take()),
                Err(err) => {
                    let what = "incremental snapshot read failed; retrying";
                    if retry_later(&pipeline, what, err, &mut backoff, &mut shutdown).await? {
                        return Ok(());
                    }
                    continue 'reopen;
                }
            }
        }
        crate::ops::metrics::pipeline(&pipeline.id).set_state(crate::ops::metrics::State::Running);
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
                Ok(Some(document)) => {
                    backoff = MIN_BACKOFF;
                    let (mut event, oversize) = match read_document(&mut fragments, document) {
                        Read::Partial => continue,
                        Read::Event(event, Some(size))
                            if pipeline.oversize != OversizePolicy::Skip =>
                        {
                            hand_off(&events, &mut batch).await;
                            let described = oversize::describe(&event.change, Some(size));
                            return Err(oversize_stop(&pipeline, &described, None));
                        }
                        Read::Event(event, oversize) => (*event, oversize),
                        Read::OutOfSequence(message) => {
                            // Reopened before the event, the server sends it whole again.
                            tracing::warn!(pipeline = %pipeline.id, "{message}; reading the event again");
                            continue 'reopen;
                        }
                        Read::Unreadable(message) => {
                            hand_off(&events, &mut batch).await;
                            return Err(Error::Source {
                                pipeline: pipeline.id.clone(),
                                message,
                            });
                        }
                    };
                    if heartbeats.as_ref() == Some(event.change.namespace()) {
                        // tidegate's own heartbeat write: it only moves the position.
                        start = OpenAt::ResumeAfter(event.token.clone());
                        batch.push(SourceItem::Heartbeat(
                            event.token,
                            incremental.as_ref().map(Incremental::progress),
                        ));
                        continue;
                    }
                    if let Some((namespace, collection)) = &signals {
                        if event.change.namespace() == namespace {
                            // A signal or a watermark: acted on, never published.
                            let acted = on_signal(
                                &client,
                                &pipeline,
                                collection,
                                &event,
                                &mut incremental,
                                &mut batch,
                            )
                            .await;
                            let acted = match acted {
                                Ok(AfterSignal::Block(progress)) => {
                                    // The stream pauses here: the snapshot runs, then the
                                    // stream reopens after the signal. Its events carry their
                                    // progress, so a crash meanwhile resumes the snapshot.
                                    snapshot = Some(SnapshotPlan::Signalled(*progress));
                                    continue 'reopen;
                                }
                                other => other,
                            };
                            if let Err(err) = acted {
                                if !hand_off(&events, &mut batch).await {
                                    return Ok(());
                                }
                                let what = "incremental snapshot read failed; retrying";
                                if retry_later(&pipeline, what, err, &mut backoff, &mut shutdown)
                                    .await?
                                {
                                    return Ok(());
                                }
                                continue 'reopen;
                            }
                            start = OpenAt::ResumeAfter(event.token.clone());
                            batch.push(SourceItem::Heartbeat(
                                event.token,
                                incremental.as_ref().map(Incremental::progress),
                            ));
                            continue;
                        }
                    }
                    if let Some(running) = incremental.as_mut() {
                        running.saw_change(&event.change);
                        event.snapshot = Some(running.progress());
                    }
                    let invalidated = *event.change.operation() == Operation::Invalidate;
                    if invalidated && event.change.namespace().db.is_empty() {
                        // The server sends invalidate without `ns`; say what was invalidated.
                        match event.change.with_namespace(watched_namespace(&pipeline)) {
                            Ok(named) => event.change = named,
                            Err(message) => {
                                tracing::warn!(pipeline = %pipeline.id, %message, "invalidate event published without a namespace")
                            }
                        }
                    }
                    start = if invalidated {
                        OpenAt::StartAfter(event.token.clone())
                    } else {
                        OpenAt::ResumeAfter(event.token.clone())
                    };
                    if invalidated && pipeline.on_invalidate == InvalidatePolicy::Stop {
                        // Everything before the invalidate is published and checkpointed; the
                        // invalidate is not, so every restart stops here again.
                        hand_off(&events, &mut batch).await;
                        return Err(Error::Source {
                            pipeline: pipeline.id.clone(),
                            message: format!(
                                "the watched namespace {} was dropped or renamed (invalidate) and \
                                 on_invalidate = \"stop\"; set it to \"continue\" to go on after \
                                 it, or delete the checkpoint to start afresh",
                                event.change.namespace()
                            ),
                        });
                    }
                    batch.push(match oversize {
                        Some(size) => SourceItem::Oversize {
                            event: Box::new(event),
                            size,
                        },
                        None => SourceItem::Event(Box::new(event)),
                    });
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
                    if fragments.in_progress() {
                        // Inside a split event: no position to move to until it is whole.
                        continue;
                    }
                    let token = stream.resume_token();
                    if let Some(token) = token {
                        if last_heartbeat.as_ref() != Some(&token) {
                            last_heartbeat = Some(token.clone());
                            if !matches!(start, OpenAt::StartAfter(_)) {
                                start = OpenAt::ResumeAfter(token.clone());
                            }
                            batch.push(SourceItem::Heartbeat(
                                token,
                                incremental.as_ref().map(Incremental::progress),
                            ));
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
                    if error_code(&err) == Some(oversize::BSON_OBJECT_TOO_LARGE) {
                        too_large(&pipeline, &start, &mut probing, err)?;
                        continue 'reopen;
                    }
                    if error_code(&err) == Some(HISTORY_LOST) {
                        match history_lost(&client, &pipeline, &start, err).await? {
                            Some(next) => start = next,
                            None => snapshot = Some(SnapshotPlan::New),
                        }
                        continue 'reopen;
                    }
                    let what = "change stream lost (primary stepped down or unreachable, \
                                connection lost); resuming after the last event read";
                    let first = lost_since.is_none();
                    lost_since.get_or_insert_with(Instant::now);
                    if retry_quietly(&pipeline, what, err, &mut backoff, &mut shutdown, !first)
                        .await?
                    {
                        return Ok(());
                    }
                    continue 'reopen;
                }
            }
        }
    }
}

/// A driver topology listener that logs the deployment losing its primary (a warning: an
/// election, a step-down, the primary unreachable) and getting one again (with how long it
/// had none), once each. Writes and change streams wait for the primary meanwhile.
pub fn log_elections(
    pipeline: &str,
) -> mongodb::event::EventHandler<mongodb::event::sdam::SdamEvent> {
    use mongodb::event::sdam::SdamEvent;
    let pipeline = pipeline.to_string();
    let lost_at = std::sync::Mutex::new(None::<Instant>);
    mongodb::event::EventHandler::callback(move |event: SdamEvent| {
        let SdamEvent::TopologyDescriptionChanged(change) = event else {
            return;
        };
        let before = change.previous_description.has_writable_server();
        let after = change.new_description.has_writable_server();
        let Ok(mut lost_at) = lost_at.lock() else {
            return;
        };
        // The client's own shutdown also ends in an `Unknown` topology: not an election.
        let closing =
            change.new_description.topology_type() == mongodb::event::sdam::TopologyType::Unknown;
        match (before, after) {
            (true, false) if lost_at.is_none() && !closing => {
                *lost_at = Some(Instant::now());
                tracing::warn!(
                    pipeline = %pipeline,
                    topology = ?change.new_description.topology_type(),
                    "MongoDB has no primary (election, step-down or primary unreachable); \
                     reading and checkpointing wait for one"
                );
            }
            (false, true) => {
                if let Some(since) = lost_at.take() {
                    tracing::info!(
                        pipeline = %pipeline,
                        without_primary_ms = since.elapsed().as_millis() as u64,
                        "MongoDB has a primary again after {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
            }
            _ => {}
        }
    })
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

/// Where a pipeline without a checkpoint opens its stream.
fn first_start(pipeline: &PipelineConfig) -> Result<OpenAt, Error> {
    let invalid = |message: String| Error::Source {
        pipeline: pipeline.id.clone(),
        message,
    };
    if let Some(text) = &pipeline.start_after_token {
        let token = parse_token(text)
            .and_then(token_from_document)
            .map_err(|e| invalid(format!("start_after_token: {e}")))?;
        return Ok(OpenAt::StartAfter(token));
    }
    Ok(match &pipeline.start_at {
        None => OpenAt::Now,
        Some(text) => match parse_start_at(text).map_err(invalid)? {
            StartAt::Now => OpenAt::Now,
            StartAt::ClusterTime(time) => OpenAt::AtTime(time),
        },
    })
}

/// Updates this unit's document in `heartbeat_collection` every `heartbeat_write_ms`, so
/// that the change stream always has an event to move its position with. Runs until
/// aborted; a failed write is retried at the next tick.
pub async fn write_heartbeats(client: mongodb::Client, pipeline: PipelineConfig) {
    let Some((db, coll)) = pipeline
        .heartbeat_collection
        .as_deref()
        .and_then(|c| c.split_once('.'))
    else {
        return;
    };
    let heartbeats = client.database(db).collection::<Document>(coll);
    let mut tick = tokio::time::interval(Duration::from_millis(pipeline.heartbeat_write_ms));
    let mut failing = false;
    loop {
        tick.tick().await;
        let written = heartbeats
            .update_one(
                doc! { "_id": &pipeline.id },
                doc! { "$set": { "at": bson::DateTime::now() } },
            )
            .upsert(true)
            .await;
        match written {
            Ok(_) => failing = false,
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(pipeline = %pipeline.id, error = %err, "cannot write the heartbeat document; retrying");
            }
            Err(_) => {}
        }
    }
}

/// The signal collection, if configured: its namespace and a handle to write watermarks.
fn signal_collection(
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

/// What the stream does after a signal.
enum AfterSignal {
    /// Goes on.
    Stream,
    /// Pauses for a blocking snapshot, then reopens after the signal.
    Block(Box<Progress>),
}

/// Acts on one signal-collection event (see [`crate::source::signal`]): a Debezium signal, or one
/// of this unit's watermarks (at its closing watermark, the chunk's remaining documents are
/// queued and the next chunk starts). Every signal is counted; one that cannot be acted on
/// is logged at WARN with the reason. `Err` only for a failure worth retrying (the server).
async fn on_signal(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    collection: &mongodb::Collection<Document>,
    event: &SourceEvent,
    incremental: &mut Option<Incremental>,
    batch: &mut Vec<SourceItem>,
) -> Result<AfterSignal, mongodb::error::Error> {
    let id = pipeline.id.as_str();
    // Only inserted documents are signals (updates and deletes of them are not).
    let (Operation::Insert, Some(raw)) = (event.change.operation(), event.change.full_document())
    else {
        return Ok(AfterSignal::Stream);
    };
    let document = match Document::try_from(raw) {
        Ok(document) => document,
        Err(err) => {
            tracing::warn!(pipeline = id, "signal refused: unreadable document: {err}");
            crate::ops::metrics::count_signal(id, "invalid");
            return Ok(AfterSignal::Stream);
        }
    };
    let document = &document;
    let refused = |outcome: &'static str, reason: &str| {
        tracing::warn!(pipeline = id, signal = %document, "signal refused: {reason}");
        crate::ops::metrics::count_signal(id, outcome);
    };
    let accepted = |what: &str| {
        tracing::info!(pipeline = id, signal = %document, "{what}");
        crate::ops::metrics::count_signal(id, "accepted");
    };
    match Signal::parse(document) {
        Signal::Watermark { open, window, unit } if unit == id => {
            let Some(running) = incremental.as_mut() else {
                return Ok(AfterSignal::Stream);
            };
            if let Some(chunk) = running.saw_watermark(open, &window, &event.token)? {
                tracing::info!(
                    pipeline = id,
                    read = chunk.len(),
                    done = running.done(),
                    "incremental snapshot chunk"
                );
                crate::ops::metrics::pipeline(id).snapshot_read(chunk.len());
                let total = running.estimate(client).await;
                crate::ops::telemetry::snapshot_progress(id, running.done(), total);
                batch.extend(chunk.into_iter().map(|e| SourceItem::Event(Box::new(e))));
                if running.is_paused() {
                    tracing::info!(pipeline = id, "incremental snapshot paused after its chunk");
                } else if !running
                    .next_chunk(client, pipeline.snapshot_chunk_size)
                    .await?
                {
                    *incremental = finished(id, incremental.take());
                }
            }
        }
        Signal::Watermark { .. } => {}
        Signal::Invalid(reason) => refused("invalid", &reason),
        Signal::Log(message) => {
            let at = token_id(&event.token);
            tracing::info!(pipeline = id, "signal log: {}", message.replace("{}", &at));
            crate::ops::metrics::count_signal(id, "accepted");
        }
        Signal::Execute(_) if incremental.is_some() => refused(
            "refused",
            "an incremental snapshot is already running; stop it first (stop-snapshot) or \
             wait for it to finish",
        ),
        Signal::Execute(request) => {
            let planned = match plan_snapshot(client, pipeline, &request).await? {
                Ok(planned) => planned,
                Err((outcome, reason)) => {
                    refused(outcome, &reason);
                    return Ok(AfterSignal::Stream);
                }
            };
            let (namespaces, filters) = planned;
            let names: Vec<String> = namespaces.iter().map(ToString::to_string).collect();
            if request.kind == SnapshotKind::Blocking {
                accepted(&format!(
                    "blocking snapshot started by a signal: [{}]",
                    names.join(", ")
                ));
                return Ok(AfterSignal::Block(Box::new(Progress {
                    start: event.token.clone(),
                    namespaces,
                    index: 0,
                    last_id: None,
                    done: 0,
                    filters,
                })));
            }
            accepted(&format!(
                "incremental snapshot started by a signal: [{}]",
                names.join(", ")
            ));
            let mut running = Incremental::new(
                format!("i{}", token_id(&event.token)),
                id,
                collection.clone(),
                namespaces,
                filters,
            );
            *incremental = match running
                .next_chunk(client, pipeline.snapshot_chunk_size)
                .await?
            {
                true => Some(running),
                false => finished(id, Some(running)),
            };
        }
        Signal::Stop {
            kind: SnapshotKind::Blocking,
            ..
        } => refused(
            "refused",
            "a blocking snapshot holds the stream while it runs (no signal is read until it \
             is done), so there is none to stop; stop-snapshot applies to incremental ones",
        ),
        Signal::Stop { patterns, .. } => {
            let Some(running) = incremental.as_mut() else {
                refused("refused", "no incremental snapshot is running");
                return Ok(AfterSignal::Stream);
            };
            if patterns.is_empty() {
                let done = running.done();
                *incremental = None;
                accepted(&format!(
                    "incremental snapshot stopped by a signal after {done} documents"
                ));
                return Ok(AfterSignal::Stream);
            }
            let matched =
                match snapshot::match_patterns(client, running.remaining(), &patterns).await {
                    Ok(matched) => matched,
                    Err(err) => {
                        return input_error(err).map(|reason| {
                            refused("invalid", &format!("data-collections: {reason}"));
                            AfterSignal::Stream
                        })
                    }
                };
            if matched.namespaces.is_empty() {
                let remaining: Vec<String> = running
                    .remaining()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                refused(
                    "refused",
                    &format!(
                        "none of its data-collections is still to be read by the running \
                         snapshot (remaining: [{}])",
                        remaining.join(", ")
                    ),
                );
                return Ok(AfterSignal::Stream);
            }
            let names: Vec<String> = matched.namespaces.iter().map(ToString::to_string).collect();
            accepted(&format!(
                "incremental snapshot: [{}] removed by a stop-snapshot signal",
                names.join(", ")
            ));
            if running.remove(&matched.namespaces)
                && !running
                    .next_chunk(client, pipeline.snapshot_chunk_size)
                    .await?
            {
                *incremental = finished(id, incremental.take());
            }
        }
        Signal::Pause => match incremental.as_mut() {
            None => refused("refused", "no incremental snapshot is running"),
            Some(running) if running.is_paused() => refused("refused", "already paused"),
            Some(running) => {
                running.set_paused(true);
                accepted("incremental snapshot paused by a signal");
            }
        },
        Signal::Resume => match incremental.as_mut() {
            None => refused("refused", "no incremental snapshot is running"),
            Some(running) if !running.is_paused() => refused("refused", "it is not paused"),
            Some(running) => {
                running.set_paused(false);
                accepted("incremental snapshot resumed by a signal");
                if !running.in_window()
                    && !running
                        .next_chunk(client, pipeline.snapshot_chunk_size)
                        .await?
                {
                    *incremental = finished(id, incremental.take());
                }
            }
        },
    }
    Ok(AfterSignal::Stream)
}

/// A snapshot plan refused: the outcome to count (`refused`, `invalid`) and the reason.
type Refusal = (&'static str, String);

/// The namespaces an `execute-snapshot` request names (its `data-collections` matched
/// against the pipeline's scope) and each one's filter (its `additional-conditions`,
/// checked by the server). The inner `Err` refuses the signal; the outer is worth retrying.
async fn plan_snapshot(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    request: &SnapshotRequest,
) -> Result<Result<(Vec<Namespace>, Vec<Document>), Refusal>, mongodb::error::Error> {
    let id = pipeline.id.as_str();
    let matched = match snapshot::requested_namespaces(
        client,
        pipeline,
        namespace_filter(pipeline),
        &request.patterns,
    )
    .await
    {
        Ok(matched) => matched,
        Err(err) => {
            return input_error(err)
                .map(|reason| Err(("invalid", format!("data-collections: {reason}"))))
        }
    };
    let unmatched: Vec<&String> = matched
        .unmatched
        .iter()
        .filter_map(|i| request.requested.get(*i))
        .collect();
    if matched.namespaces.is_empty() {
        return Ok(Err((
            "refused",
            format!(
                "no collection in this pipeline's scope matches data-collections {:?} \
                 (names are matched whole, as `db.coll`, or as regular expressions)",
                request.requested
            ),
        )));
    }
    if !unmatched.is_empty() {
        tracing::warn!(
            pipeline = id,
            ?unmatched,
            "execute-snapshot: these data-collections match no collection in this pipeline's \
             scope and are skipped; the others are snapshotted"
        );
    }
    let mut filters = vec![Document::new(); matched.namespaces.len()];
    for (name, filter) in &request.conditions {
        let Some(at) = matched
            .namespaces
            .iter()
            .position(|ns| ns.to_string() == *name)
        else {
            let names: Vec<String> = matched.namespaces.iter().map(ToString::to_string).collect();
            return Ok(Err((
                "refused",
                format!(
                    "additional-conditions names {name}, which is not among the collections to \
                     snapshot [{}]",
                    names.join(", ")
                ),
            )));
        };
        if let Err(err) = snapshot::check_filter(client, &matched.namespaces[at], filter).await {
            return input_error(err).map(|reason| {
                Err((
                    "invalid",
                    format!("the filter {filter} for {name} is refused by the server: {reason}"),
                ))
            });
        }
        filters[at] = filter.clone();
    }
    Ok(Ok((matched.namespaces, filters)))
}

/// A server error caused by what a signal asked (a bad regular expression or query) as its
/// readable reason; any other error is returned to be retried.
fn input_error(err: mongodb::error::Error) -> Result<String, mongodb::error::Error> {
    match err.kind.as_ref() {
        ErrorKind::Command(command)
            if matches!(command.code, 2 | 9 | 14 | 51091 | 51108 | 51109)
                || command.message.contains("regular expression") =>
        {
            Ok(command.message.clone())
        }
        _ => Err(err),
    }
}

/// Logs the end of an incremental snapshot; returns `None` for the caller's state.
fn finished(pipeline: &str, done: Option<Incremental>) -> Option<Incremental> {
    if let Some(done) = done {
        tracing::info!(
            pipeline,
            documents = done.done(),
            "incremental snapshot done"
        );
    }
    None
}

/// A snapshot to take before streaming.
enum SnapshotPlan {
    /// From scratch.
    New,
    /// Continue the one whose progress the checkpoint holds.
    Resume(Document),
    /// A blocking snapshot requested by a signal (the stream pauses while it runs).
    Signalled(Progress),
}

/// Reads every document in scope as `snapshot-read` events (see [`snapshot`]) and returns the
/// position to stream from (captured before reading); `None` when shut down meanwhile.
async fn take_snapshot(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    plan: SnapshotPlan,
    events: &mpsc::Sender<Vec<SourceItem>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<ResumeToken>, Error> {
    let id = pipeline.id.as_str();
    let mut backoff = MIN_BACKOFF;
    let mut progress = match plan {
        SnapshotPlan::Resume(saved) => {
            let progress = Progress::from_document(&saved).map_err(|e| Error::Source {
                pipeline: id.to_string(),
                message: format!("the checkpoint's snapshot progress is unreadable: {e}"),
            })?;
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
                    if retry_later(pipeline, what, err, &mut backoff, shutdown).await? {
                        return Ok(None);
                    }
                }
            }
        },
    };
    let total = snapshot::estimated_total(client, &progress.namespaces).await;
    tracing::info!(
        pipeline = id,
        namespaces = progress.namespaces.len(),
        "snapshot: reading existing documents, then streaming from before the first read"
    );
    while !progress.finished() {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let before = progress.clone();
        match snapshot::next_chunk(client, &mut progress, pipeline.snapshot_chunk_size).await {
            Ok(chunk) if chunk.is_empty() => {}
            Ok(chunk) => {
                backoff = MIN_BACKOFF;
                let namespace = before.namespaces.get(before.index).map(ToString::to_string);
                tracing::info!(
                    pipeline = id,
                    namespace = namespace.unwrap_or_default(),
                    read = chunk.len(),
                    done = progress.done,
                    "snapshot chunk"
                );
                crate::ops::metrics::pipeline(id).snapshot_read(chunk.len());
                crate::ops::telemetry::snapshot_progress(id, progress.done, total);
                let items = chunk
                    .into_iter()
                    .map(|event| SourceItem::Event(Box::new(event)))
                    .collect();
                if events.send(items).await.is_err() {
                    return Ok(None);
                }
            }
            Err(err) => {
                progress = before;
                let what = "snapshot read failed; retrying the chunk";
                if retry_later(pipeline, what, err, &mut backoff, shutdown).await? {
                    return Ok(None);
                }
            }
        }
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

/// A new start that must be saved before anything is published, so that a crash cannot
/// restart somewhere else: for a pipeline without a `checkpoint`, the stream's position now
/// (`start_at = "now"`) or the captured start and empty progress of its snapshot; with a
/// plain checkpoint and `snapshot = "always"`, the new snapshot's. `None` when the start is
/// already fixed (a checkpoint, an explicit `start_at` time or `start_after_token`), or when
/// shut down while retrying.
pub async fn first_position(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    checkpoint: Option<&Position>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Position>, Error> {
    let snapshot = match checkpoint {
        None => pipeline.snapshot != SnapshotMode::Never,
        Some(saved) => pipeline.snapshot == SnapshotMode::Always && saved.snapshot.is_none(),
    };
    if !snapshot && (checkpoint.is_some() || !matches!(first_start(pipeline)?, OpenAt::Now)) {
        return Ok(None);
    }
    let mut backoff = MIN_BACKOFF;
    loop {
        let resolved = match snapshot {
            true => begin_snapshot(client, pipeline)
                .await
                .map(|progress| Position {
                    token: progress.start.clone(),
                    last_msg_id: None,
                    snapshot: Some(progress.to_document()),
                }),
            false => open_position(client, pipeline, &OpenAt::Now)
                .await
                .map(|token| Position {
                    token,
                    last_msg_id: None,
                    snapshot: None,
                }),
        };
        match resolved {
            Ok(position) => return Ok(Some(position)),
            Err(err) => {
                let what = "cannot resolve the start position; retrying";
                if retry_later(pipeline, what, err, &mut backoff, shutdown).await? {
                    return Ok(None);
                }
            }
        }
    }
}

/// The position a stream opened at `at` starts from: the token of its (empty) first batch.
async fn open_position(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    at: &OpenAt,
) -> Result<ResumeToken, mongodb::error::Error> {
    let mut stream = open(client, pipeline, at).await?;
    // The server returns the position with the (empty) first batch; an event arriving in
    // between would carry its own token, which lies after it: refuse that and retry.
    match stream.resume_token() {
        Some(token) => Ok(token),
        None => match stream.next_if_any().await? {
            None => stream.resume_token().ok_or_else(|| {
                mongodb::error::Error::from(std::io::Error::other(
                    "the server gave no starting position",
                ))
            }),
            Some(_) => Err(mongodb::error::Error::from(std::io::Error::other(
                "a change arrived while the starting position was being captured",
            ))),
        },
    }
}

/// Captures the stream's position now (before any document is read) and lists what to read.
async fn begin_snapshot(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Result<Progress, mongodb::error::Error> {
    let start = open_position(client, pipeline, &OpenAt::Now).await?;
    let namespaces = snapshot::namespaces(client, pipeline, namespace_filter(pipeline)).await?;
    Ok(Progress {
        start,
        namespaces,
        index: 0,
        last_id: None,
        done: 0,
        filters: Vec::new(),
    })
}

/// Applies `on_history_lost` when the stream cannot resume from `start`: `latest` reopens
/// from now (the only way on); `resnapshot` (or `snapshot = "when-needed"`) asks for a new
/// snapshot (`None`); `fail` is an error naming the checkpoint's time and the oplog's
/// oldest entry.
async fn history_lost(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
    start: &OpenAt,
    err: mongodb::error::Error,
) -> Result<Option<OpenAt>, Error> {
    let wanted = match start {
        OpenAt::ResumeAfter(token) | OpenAt::StartAfter(token) => token_time(token),
        OpenAt::AtTime(time) => Some(*time),
        OpenAt::Now => None,
    };
    let oldest = crate::ops::oplog::ends(client)
        .await
        .ok()
        .map(|(first, _)| first);
    let describe = |t: Option<bson::Timestamp>| match t {
        Some(t) => format!(
            "{} ({}.{})",
            bson::DateTime::from_millis(i64::from(t.time) * 1000),
            t.time,
            t.increment
        ),
        None => "unknown".to_string(),
    };
    let detail = format!(
        "the stream needed cluster time {}, the oldest oplog entry is {}",
        describe(wanted),
        describe(oldest)
    );
    let policy = match pipeline.snapshot {
        SnapshotMode::WhenNeeded => HistoryLostPolicy::Resnapshot,
        _ => pipeline.on_history_lost,
    };
    match policy {
        HistoryLostPolicy::Resnapshot => {
            tracing::error!(
                pipeline = %pipeline.id,
                "history lost: {detail}; taking a new snapshot, then streaming from where it \
                 began (changes in between are covered by the documents' current state)"
            );
            Ok(None)
        }
        HistoryLostPolicy::Latest => {
            tracing::error!(
                pipeline = %pipeline.id,
                "history lost: {detail}; on_history_lost = \"latest\", so capture resumes from \
                 now and the events in between are NOT published"
            );
            Ok(Some(OpenAt::Now))
        }
        HistoryLostPolicy::Fail => Err(Error::Source {
            pipeline: pipeline.id.clone(),
            message: format!(
                "{}; {detail}: {err}",
                FATAL_CODES
                    .iter()
                    .find(|(code, _)| *code == HISTORY_LOST)
                    .map(|(_, reason)| *reason)
                    .unwrap_or("history lost")
            ),
        }),
    }
}

/// Checks at start that `required` document images can work: the server is 6.0 or newer and
/// every listed collection records pre- and post-images. Without this the stream would fail
/// on the first event lacking an image, far from the cause.
pub async fn check_images(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Result<(), Error> {
    let needs_after = pipeline.full_document == FullDocument::Required;
    let needs_before = pipeline.full_document_before_change == FullDocumentBeforeChange::Required;
    let uses_images = needs_after
        || needs_before
        || pipeline.full_document == FullDocument::WhenAvailable
        || pipeline.full_document_before_change == FullDocumentBeforeChange::WhenAvailable;
    if !uses_images {
        return Ok(());
    }
    let fail = |message: String| Error::Source {
        pipeline: pipeline.id.clone(),
        message,
    };
    let info = match client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await
    {
        Ok(info) => info,
        Err(err) => {
            // Unreachable now (it may come up later, and the stream retries): check nothing
            // rather than fail a pipeline that would otherwise wait for the server.
            tracing::warn!(pipeline = %pipeline.id, error = %err, "cannot check document-image support now");
            return Ok(());
        }
    };
    let major = info
        .get_str("version")
        .ok()
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if major < 6 {
        return Err(fail(format!(
            "document images (full_document = when-available/required, \
             full_document_before_change) need MongoDB 6.0 or newer; this server is {}",
            info.get_str("version").unwrap_or("older")
        )));
    }
    if !(needs_after || needs_before) {
        return Ok(());
    }
    let Some(db) = &pipeline.database else {
        return Ok(());
    };
    for coll in &pipeline.collections {
        let mut found = client
            .database(db)
            .list_collections()
            .filter(doc! { "name": coll })
            .await
            .map_err(|e| fail(format!("cannot list collections of {db}: {e}")))?;
        let spec = futures::StreamExt::next(&mut found).await;
        let enabled = match spec {
            Some(Ok(spec)) => spec
                .options
                .change_stream_pre_and_post_images
                .is_some_and(|o| o.enabled),
            _ => false,
        };
        if !enabled {
            return Err(fail(format!(
                "`required` document images need changeStreamPreAndPostImages on {db}.{coll}, \
                 which is off (or the collection does not exist); enable it with \
                 db.runCommand({{collMod: \"{coll}\", changeStreamPreAndPostImages: {{enabled: true}}}}) \
                 or use when-available"
            )));
        }
    }
    Ok(())
}

/// What one document read from the change stream amounts to (see [`read_document`]).
enum Read {
    /// A fragment of a split event; the rest is still to come.
    Partial,
    /// A change, with its size if `oversize = "skip"` stripped it to a stub.
    Event(Box<SourceEvent>, Option<i64>),
    /// Fragments out of sequence: read the event again.
    OutOfSequence(String),
    /// A document that is not a change event.
    Unreadable(String),
}

/// Turns a document from the stream into a change: fragments of a split event are collected
/// until the event is whole (see [`oversize::Fragments`]), and a stub of `oversize = "skip"`
/// is recognised by its size marker.
fn read_document(fragments: &mut oversize::Fragments, document: RawDocumentBuf) -> Read {
    let whole = match fragments.add(document) {
        Ok(Some(whole)) => whole,
        Ok(None) => return Read::Partial,
        Err(message) => return Read::OutOfSequence(message),
    };
    let size = oversize::marked_size(&whole);
    match SourceEvent::from_server_event(&whole) {
        Ok(event) => Read::Event(Box::new(event), size),
        Err(e) => Read::Unreadable(format!("unreadable change event: {e}")),
    }
}

/// Handles BSONObjectTooLarge from the server: the first time, `probing` turns on and the
/// caller reopens the stream at `start` with the `skip` stage, which strips the event so
/// that it can be named (see the `Read::Event` arm of [`run`]); if that cannot help (the
/// stage is already there), the error stopping the pipeline, naming the position.
fn too_large(
    pipeline: &PipelineConfig,
    start: &OpenAt,
    probing: &mut bool,
    err: mongodb::error::Error,
) -> Result<(), Error> {
    if *probing || pipeline.oversize == OversizePolicy::Skip {
        let position = match start {
            OpenAt::ResumeAfter(token) | OpenAt::StartAfter(token) => format!(
                "the first event after resume token {} (cluster time {})",
                token_id(token),
                token_time(token)
                    .map(|t| format!("{}.{}", t.time, t.increment))
                    .unwrap_or_else(|| "unknown".into())
            ),
            OpenAt::AtTime(time) => format!(
                "the first event at or after cluster time {}.{}",
                time.time, time.increment
            ),
            OpenAt::Now => "the first event of the stream".to_string(),
        };
        return Err(oversize_stop(pipeline, &position, Some(err)));
    }
    tracing::warn!(pipeline = %pipeline.id, error = %err, "an event over 16 MiB (BSONObjectTooLarge); reading up to it again to name it");
    *probing = true;
    Ok(())
}

/// The error that stops a pipeline on an event over 16 MiB, `described`.
fn oversize_stop(
    pipeline: &PipelineConfig,
    described: &str,
    err: Option<mongodb::error::Error>,
) -> Error {
    let mut message = oversize::fatal_message(pipeline, described);
    if let Some(err) = err {
        message.push_str(&format!(" ({err})"));
    }
    Error::Source {
        pipeline: pipeline.id.clone(),
        message,
    }
}

fn start_label(start: &OpenAt) -> &'static str {
    match start {
        OpenAt::Now => "now",
        OpenAt::AtTime(_) => "at-cluster-time",
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

/// Handles a failed open or read: a fatal error is returned; anything else is logged (one
/// readable line, see [`describe`]) and waited out with exponential backoff. `Ok(true)`
/// means shutdown was requested meanwhile.
async fn retry_later(
    pipeline: &PipelineConfig,
    what: &str,
    err: mongodb::error::Error,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    retry_quietly(pipeline, what, err, backoff, shutdown, false).await
}

/// [`retry_later`], logging the failure only at debug level when `quiet` (a retry within an
/// outage already reported).
async fn retry_quietly(
    pipeline: &PipelineConfig,
    what: &str,
    err: mongodb::error::Error,
    backoff: &mut Duration,
    shutdown: &mut watch::Receiver<bool>,
    quiet: bool,
) -> Result<bool, Error> {
    let id = pipeline.id.as_str();
    if let Some(reason) = fatal_reason(&err) {
        return Err(Error::Source {
            pipeline: id.to_string(),
            message: format!(
                "{reason} (the server at {} said: {})",
                uri_hosts(&pipeline.mongodb_uri),
                server_words(&err)
            ),
        });
    }
    let described = describe(pipeline, &err);
    let retry_in_ms = backoff.as_millis() as u64;
    match quiet {
        true => tracing::debug!(pipeline = id, retry_in_ms, "{what}: {described}"),
        false => tracing::warn!(pipeline = id, retry_in_ms, "{what}: {described}"),
    }
    crate::ops::metrics::pipeline(id).retrying(&format!("{what}: {described}"));
    let delay = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    Ok(tokio::select! {
        _ = tokio::time::sleep(delay) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    })
}

// First contact: driver errors as one readable line naming the server, the likely cause and
// what to do (the driver's own text is a dump of its topology).

/// The `host:port` list of a MongoDB URI, without credentials or options.
pub fn uri_hosts(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let hosts = rest.split(['/', '?']).next().unwrap_or(rest);
    hosts
        .rsplit_once('@')
        .map_or(hosts, |(_, hosts)| hosts)
        .to_string()
}

/// The server's own message in a command error (or the error's text otherwise).
fn server_words(err: &mongodb::error::Error) -> String {
    match err.kind.as_ref() {
        ErrorKind::Command(command) => command.message.clone(),
        _ => err.to_string(),
    }
}

/// A driver error as one line: what failed at which server, the likely cause, what to do.
pub fn describe(pipeline: &PipelineConfig, err: &mongodb::error::Error) -> String {
    let hosts = uri_hosts(&pipeline.mongodb_uri);
    match err.kind.as_ref() {
        ErrorKind::ServerSelection { message, .. } => format!(
            "no usable MongoDB server at {hosts}: {}",
            selection_cause(message, &pipeline.mongodb_uri)
        ),
        ErrorKind::Command(command) => format!(
            "the server at {hosts} refused: {} ({} {})",
            command.message, command.code, command.code_name
        ),
        ErrorKind::Authentication { message, .. } => format!(
            "authentication at {hosts} failed: {message}; check the user, password and \
             authSource in mongodb_uri"
        ),
        ErrorKind::Io(io) => format!("network error talking to {hosts}: {io}"),
        _ => err.to_string(),
    }
}

/// The likely cause of a server-selection timeout, from the driver's topology text.
fn selection_cause(message: &str, uri: &str) -> String {
    let has = |needle: &str| message.to_ascii_lowercase().contains(needle);
    let replica_set = uri
        .split(['?', '&'])
        .find_map(|option| option.strip_prefix("replicaSet="));
    if has("failed to lookup address") || has("name or service not known") || has("dns") {
        return "the host name does not resolve; check the host in mongodb_uri".into();
    }
    if has("connection refused") {
        return "connection refused: nothing listens at that host and port; check mongodb_uri \
                and that mongod is running there"
            .into();
    }
    if has("certificate") || has("tls") || has("ssl") || has("handshake") {
        return "the TLS handshake failed: the server wants TLS (add tls=true to mongodb_uri) \
                or its certificate is not trusted (tlsCAFile=…)"
            .into();
    }
    if let (Some(name), true) = (replica_set, has("replicasetnoprimary")) {
        return format!(
            "mongodb_uri sets replicaSet={name}, but no server there is a primary of a replica \
             set with that name: a standalone server, a set named differently, or a set with no \
             primary (check rs.status() on the server; fix or remove replicaSet= — change \
             streams need a replica set)"
        );
    }
    if has("timed out") || has("timeout") {
        return "the connection attempt timed out: a wrong host, or a firewall in between".into();
    }
    "no server answered in time".into()
}

async fn open(
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
        .batch_size(BATCH_SIZE)
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

/// The stages that decide which namespaces a pipeline sees: the listed collections only, a
/// tenant's namespaces only, include/exclude, and never the pipeline's own checkpoint
/// collection (whose writes would otherwise be published, checkpointed, published…
/// forever). They look at `ns` only, so a snapshot runs them on synthetic events to pick
/// its collections.
fn namespace_filter(pipeline: &PipelineConfig) -> Vec<Document> {
    let mut stages = Vec::new();
    if pipeline.collections.len() > 1 {
        stages.push(doc! { "$match": { "ns.coll": { "$in": pipeline.collections.clone() } } });
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
