//! Reading the open stream: what each document the server sends amounts to (a change, a
//! fragment, a heartbeat write, a signal) and how the position moves with it.

use std::task::Poll;

use bson::RawDocumentBuf;
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;

use super::errors::{retry_later, MIN_BACKOFF};
use super::open::OpenAt;
use super::snapshot::{on_signal, AfterSignal, Incremental, SnapshotPlan};
use super::{oversize, Reader, SourceItem, Step, HANDOFF_BATCH};
use crate::config::{InvalidatePolicy, OversizePolicy, PipelineConfig};
use crate::error::Error;
use crate::model::token::{token_id, token_time};
use crate::model::{Namespace, Operation, SourceEvent};

/// What the reader does when the stream is lost; the rest of the line says why.
const LOST: &str = "change stream lost (primary stepped down or unreachable, \
                    connection lost); resuming after the last event read";

impl Reader {
    /// Reads the open stream until it must be reopened (`Step::Reopen`) or the reader stops.
    pub(super) async fn read(
        &mut self,
        stream: &mut ChangeStream<RawDocumentBuf>,
    ) -> Result<Step, Error> {
        loop {
            if *self.shutdown.borrow() {
                return Ok(Step::Stop);
            }
            let step = match self.next(stream).await {
                None => Step::Stop,
                Some(Ok(Some(document))) => self.on_document(document).await?,
                Some(Ok(None)) => self.on_idle(stream).await,
                Some(Err(err)) => self.failed(err, LOST).await?,
            };
            if step != Step::Next {
                return Ok(step);
            }
        }
    }

    /// The stream's next document (`Ok(None)`: none in this batch). When it needs a round
    /// trip, the batch read so far is handed over first; `None` when shut down meanwhile.
    async fn next(
        &mut self,
        stream: &mut ChangeStream<RawDocumentBuf>,
    ) -> Option<Result<Option<RawDocumentBuf>, mongodb::error::Error>> {
        let next = stream.next_if_any();
        tokio::pin!(next);
        if let Poll::Ready(next) = futures::poll!(&mut next) {
            return Some(next);
        }
        if !self.hand_off().await {
            return None;
        }
        tokio::select! {
            biased;
            _ = self.shutdown.changed() => None,
            next = &mut next => Some(next),
        }
    }

    /// One document from the stream: a fragment, a heartbeat write, a signal or a change.
    async fn on_document(&mut self, document: RawDocumentBuf) -> Result<Step, Error> {
        self.backoff = MIN_BACKOFF;
        let (event, oversize) = match read_document(&mut self.fragments, document) {
            Read::Partial => return Ok(Step::Next),
            Read::Event(event, Some(size)) if self.pipeline.oversize != OversizePolicy::Skip => {
                self.hand_off().await;
                let described = oversize::describe(&event.change, Some(size));
                return Err(oversize_stop(&self.pipeline, &described, None));
            }
            Read::Event(event, oversize) => (*event, oversize),
            Read::OutOfSequence(message) => {
                // Reopened before the event, the server sends it whole again.
                tracing::warn!(pipeline = %self.pipeline.id, "{message}; reading the event again");
                return Ok(Step::Reopen);
            }
            Read::Unreadable(message) => {
                self.hand_off().await;
                return Err(Error::Source {
                    pipeline: self.pipeline.id.clone(),
                    message,
                });
            }
        };
        if self.heartbeats.as_ref() == Some(event.change.namespace()) {
            // tidegate's own heartbeat write: it only moves the position.
            self.moved_to(event.token);
            return Ok(Step::Next);
        }
        let signalled = self.signals.as_ref().map(|(namespace, _)| namespace);
        if signalled == Some(event.change.namespace()) {
            return self.on_signal_event(event).await;
        }
        self.on_change(event, oversize).await
    }

    /// A document in the signal collection: a signal or a watermark, acted on, never
    /// published.
    async fn on_signal_event(&mut self, event: SourceEvent) -> Result<Step, Error> {
        let Some((_, collection)) = &self.signals else {
            return Ok(Step::Next);
        };
        let (client, pipeline) = (&self.client, &self.pipeline);
        let acted = on_signal(
            client,
            pipeline,
            collection,
            &event,
            &mut self.incremental,
            &mut self.batch,
        )
        .await;
        match acted {
            Ok(AfterSignal::Stream) => {}
            Ok(AfterSignal::Block(progress)) => {
                // The stream pauses here: the snapshot runs, then the stream reopens after
                // the signal. Its events carry their progress, so a crash meanwhile resumes
                // the snapshot.
                self.snapshot = Some(SnapshotPlan::Signalled(*progress));
                return Ok(Step::Reopen);
            }
            Err(err) => {
                if !self.hand_off().await {
                    return Ok(Step::Stop);
                }
                let what = "incremental snapshot read failed; retrying";
                let (pipeline, backoff) = (&self.pipeline, &mut self.backoff);
                if retry_later(pipeline, what, err, backoff, &mut self.shutdown).await? {
                    return Ok(Step::Stop);
                }
                return Ok(Step::Reopen);
            }
        }
        self.moved_to(event.token);
        Ok(Step::Next)
    }

    /// A change to publish. An invalidate reopens the stream after it, or stops the
    /// pipeline (`on_invalidate = "stop"`).
    async fn on_change(
        &mut self,
        mut event: SourceEvent,
        oversize: Option<i64>,
    ) -> Result<Step, Error> {
        if let Some(running) = self.incremental.as_mut() {
            running.saw_change(&event.change);
            event.snapshot = Some(running.progress());
        }
        let invalidated = *event.change.operation() == Operation::Invalidate;
        if invalidated && event.change.namespace().db.is_empty() {
            // The server sends invalidate without `ns`; say what was invalidated.
            match event
                .change
                .with_namespace(watched_namespace(&self.pipeline))
            {
                Ok(named) => event.change = named,
                Err(message) => {
                    tracing::warn!(pipeline = %self.pipeline.id, %message, "invalidate event published without a namespace")
                }
            }
        }
        self.start = if invalidated {
            OpenAt::StartAfter(event.token.clone())
        } else {
            OpenAt::ResumeAfter(event.token.clone())
        };
        if invalidated && self.pipeline.on_invalidate == InvalidatePolicy::Stop {
            // Everything before the invalidate is published and checkpointed; the
            // invalidate is not, so every restart stops here again.
            self.hand_off().await;
            return Err(Error::Source {
                pipeline: self.pipeline.id.clone(),
                message: format!(
                    "the watched namespace {} was dropped or renamed (invalidate) and \
                     on_invalidate = \"stop\"; set it to \"continue\" to go on after \
                     it, or delete the checkpoint to start afresh",
                    event.change.namespace()
                ),
            });
        }
        self.batch.push(match oversize {
            Some(size) => SourceItem::Oversize {
                event: Box::new(event),
                size,
            },
            None => SourceItem::Event(Box::new(event)),
        });
        if invalidated {
            tracing::warn!(pipeline = %self.pipeline.id, "change stream invalidated (watched namespace dropped or renamed); continuing after it");
            return Ok(Step::Reopen);
        }
        if self.batch.len() >= HANDOFF_BATCH && !self.hand_off().await {
            return Ok(Step::Stop);
        }
        Ok(Step::Next)
    }

    /// The end of a batch: the stream's post-batch token, new since the last one, goes
    /// down as a heartbeat (at once: a quiet stream has nothing else to send).
    async fn on_idle(&mut self, stream: &mut ChangeStream<RawDocumentBuf>) -> Step {
        if !stream.is_alive() {
            return Step::Reopen;
        }
        if self.fragments.in_progress() {
            // Inside a split event: no position to move to until it is whole.
            return Step::Next;
        }
        let Some(token) = stream.resume_token() else {
            return Step::Next;
        };
        if self.last_heartbeat.as_ref() == Some(&token) {
            return Step::Next;
        }
        self.last_heartbeat = Some(token.clone());
        if !matches!(self.start, OpenAt::StartAfter(_)) {
            self.start = OpenAt::ResumeAfter(token.clone());
        }
        self.batch.push(SourceItem::Heartbeat(
            token,
            self.incremental.as_ref().map(Incremental::progress),
        ));
        if !self.hand_off().await {
            return Step::Stop;
        }
        Step::Next
    }

    /// The position moves to `token` with nothing to publish: a heartbeat downstream.
    fn moved_to(&mut self, token: ResumeToken) {
        self.start = OpenAt::ResumeAfter(token.clone());
        self.batch.push(SourceItem::Heartbeat(
            token,
            self.incremental.as_ref().map(Incremental::progress),
        ));
    }
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
/// that it can be named (see `Reader::on_document`); if that cannot help (the
/// stage is already there), the error stopping the pipeline, naming the position.
pub(super) fn too_large(
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
