//! The MongoDB side: one change stream per pipeline, resumed across failures.
//!
//! The source hands events downstream in change-stream order. While no events arrive it also
//! hands down the stream's post-batch resume token as a heartbeat, so a quiet pipeline's
//! checkpoint keeps moving and does not age out of the oplog.
//!
//! Transient failures (network, elections) reopen the stream after the last token read, with
//! backoff. Failures no resume can fix (history lost from the oplog, an invalid token, a
//! server that is not a replica set, auth) stop the pipeline with the server's own words.
//!
//! # The reader
//!
//! [`run`] is a loop of two phases; every handler answers with a `Step` (on with the next
//! document, reopen, or stop), so the loop itself stays a dispatcher:
//!
//! 1. *open* (`open.rs`): hand over what was read, take a snapshot if one is due
//!    (`snapshot/`), then open the stream where the last event left it (`start.rs` decides
//!    the first position, `errors.rs` which failures are waited out and which are fatal);
//! 2. *read* (`read.rs`): each document is a change (published), a fragment of a split event
//!    (collected, see [`oversize`]), a write to the heartbeat collection (only moves the
//!    position) or to the signal collection (acted on, see [`signal`] and [`snapshot`]), or,
//!    at the end of a batch, the post-batch token (a heartbeat).
//!
//! Beside the stream, `heartbeat.rs` writes the heartbeat documents and `elections.rs` logs
//! the deployment losing and regaining its primary.

mod elections;
mod errors;
mod heartbeat;
mod open;
#[cfg(test)]
pub(crate) use self::open::SHARED_BATCH_SIZE;
pub mod oversize;
mod read;
pub mod signal;
pub mod snapshot;
mod start;

use std::time::Instant;

use bson::{Document, RawDocumentBuf};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use tokio::sync::{mpsc, watch};

pub use self::elections::log_elections;
pub use self::errors::{describe, uri_hosts};
use self::errors::{error_code, retry_later, retry_quietly, HISTORY_LOST, MIN_BACKOFF};
pub use self::heartbeat::write_heartbeats;
use self::open::{heartbeat_namespace, open, signal_collection, start_label, OpenAt};
use self::snapshot::{finished, take_snapshot, Incremental, SnapshotPlan};
pub use self::start::{check_images, first_position};
use self::start::{history_lost, plan_start};
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::model::{Namespace, SourceEvent};
use crate::model::{Position, SnapshotProgress};

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
    Heartbeat(ResumeToken, Option<SnapshotProgress>),
}

impl SourceItem {
    /// The item's resume token: the stream's position once it is handled.
    pub fn token(&self) -> &ResumeToken {
        match self {
            SourceItem::Event(event) | SourceItem::Oversize { event, .. } => &event.token,
            SourceItem::Heartbeat(token, _) => token,
        }
    }
}

/// Most events handed downstream at once (see [`run`]).
pub const HANDOFF_BATCH: usize = 256;

/// Reads the pipeline's change stream until `shutdown` turns true or a fatal error occurs.
/// `start` is the checkpointed token to resume after; without one the stream opens at
/// `at_time` (the stream's last message, see `pipeline::start::resolve_start`), or else where the
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
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut reader = Reader::new(client, pipeline, start, at_time, events, shutdown)?;
    loop {
        let mut stream = match reader.open_stream().await? {
            Ok(stream) => stream,
            Err(Step::Stop) => return Ok(()),
            Err(_) => continue,
        };
        match reader.opened().await? {
            Step::Stop => return Ok(()),
            Step::Reopen => continue,
            Step::Next => {}
        }
        crate::ops::metrics::pipeline(&reader.pipeline.id)
            .set_state(crate::ops::metrics::State::Running);
        if reader.read(&mut stream).await? == Step::Stop {
            return Ok(());
        }
    }
}

/// How the reader goes on after a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// With the next document of the same stream.
    Next,
    /// Opens the stream again at `Reader::start`.
    Reopen,
    /// Returns: shut down, or downstream is gone.
    Stop,
}

/// The state of one pipeline's change stream across reopenings.
struct Reader {
    client: mongodb::Client,
    pipeline: PipelineConfig,
    events: mpsc::Sender<Vec<SourceItem>>,
    shutdown: watch::Receiver<bool>,
    /// The signal collection's namespace and a handle to write watermarks, if configured.
    signals: Option<(Namespace, mongodb::Collection<Document>)>,
    /// The heartbeat collection, whose writes only move the position.
    heartbeats: Option<Namespace>,
    /// The running incremental snapshot, if any.
    incremental: Option<Incremental>,
    /// Where the next open starts: moved past everything read so far.
    start: OpenAt,
    /// A snapshot to take (or finish) before the next open.
    snapshot: Option<SnapshotPlan>,
    backoff: std::time::Duration,
    /// Since when the stream is lost (an election, a server away), while it is: the first
    /// failure is logged as a warning, the retries quietly, the resume with its duration.
    lost_since: Option<Instant>,
    /// The last post-batch token handed down, so that an idle stream sends it once.
    last_heartbeat: Option<ResumeToken>,
    fragments: oversize::Fragments,
    /// After BSONObjectTooLarge: the stream is read again up to the event with the `skip`
    /// stage (`probe`), which names the event and lets those before it through.
    probing: bool,
    probe: PipelineConfig,
    batch: Vec<SourceItem>,
}

impl Reader {
    fn new(
        client: mongodb::Client,
        pipeline: PipelineConfig,
        start: Option<Position>,
        at_time: Option<bson::Timestamp>,
        events: mpsc::Sender<Vec<SourceItem>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Reader, Error> {
        let signals = signal_collection(&client, &pipeline);
        // An incremental snapshot the checkpoint says was running.
        let incremental = match (&start, &signals) {
            (
                Some(Position {
                    snapshot: Some(progress),
                    ..
                }),
                Some((_, collection)),
            ) => Incremental::restore(progress, &pipeline.id, collection.clone()),
            _ => None,
        };
        let (start, snapshot) = plan_start(&pipeline, start, at_time, incremental.is_some())?;
        Ok(Reader {
            heartbeats: heartbeat_namespace(&pipeline),
            probe: oversize::probe_config(&pipeline),
            client,
            pipeline,
            events,
            shutdown,
            signals,
            incremental,
            start,
            snapshot,
            backoff: MIN_BACKOFF,
            lost_since: None,
            last_heartbeat: None,
            fragments: oversize::Fragments::default(),
            probing: false,
            batch: Vec::with_capacity(HANDOFF_BATCH),
        })
    }

    /// Sends the batch; false when downstream is gone (shutting down).
    async fn hand_off(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        let full = std::mem::replace(&mut self.batch, Vec::with_capacity(HANDOFF_BATCH));
        self.events.send(full).await.is_ok()
    }

    /// Hands over what was read, takes a pending snapshot, and opens the stream at `start`.
    async fn open_stream(&mut self) -> Result<Result<ChangeStream<RawDocumentBuf>, Step>, Error> {
        // `start` has moved past everything read so far: hand it over before reopening.
        if !self.hand_off().await || *self.shutdown.borrow() {
            return Ok(Err(Step::Stop));
        }
        if let Some(plan) = self.snapshot.take() {
            let (client, pipeline) = (&self.client, &self.pipeline);
            match take_snapshot(client, pipeline, plan, &self.events, &mut self.shutdown).await? {
                Some(began) => self.start = OpenAt::ResumeAfter(began),
                None => return Ok(Err(Step::Stop)),
            }
        }
        // A split event half read when the stream broke is read again from its first fragment.
        self.fragments.clear();
        let config = if self.probing {
            &self.probe
        } else {
            &self.pipeline
        };
        // Opening waits for server selection: a shutdown must not wait for it.
        let opened = tokio::select! {
            biased;
            _ = self.shutdown.changed() => return Ok(Err(Step::Stop)),
            opened = open(&self.client, config, &self.start) => opened,
        };
        match opened {
            Ok(stream) => Ok(Ok(stream)),
            Err(err) => Ok(Err(self
                .failed(err, "cannot open change stream; retrying")
                .await?)),
        }
    }

    /// Logs the stream open (again), and restarts a running incremental snapshot's chunk
    /// with fresh watermarks (the old ones may have passed while the stream was away).
    async fn opened(&mut self) -> Result<Step, Error> {
        let (id, start) = (&self.pipeline.id, start_label(&self.start));
        match self.lost_since.take() {
            Some(since) => {
                self.backoff = MIN_BACKOFF;
                tracing::info!(
                    pipeline = %id,
                    start = ?start,
                    lost_ms = since.elapsed().as_millis() as u64,
                    "change stream open again, resumed after {:.1} s without it",
                    since.elapsed().as_secs_f64()
                );
            }
            None => tracing::info!(pipeline = %id, start = ?start, "change stream open"),
        }
        let Some(running) = self.incremental.as_mut().filter(|r| !r.is_paused()) else {
            return Ok(Step::Next);
        };
        match running
            .next_chunk(&self.client, self.pipeline.snapshot_chunk_size)
            .await
        {
            Ok(true) => {}
            Ok(false) => self.incremental = finished(&self.pipeline.id, self.incremental.take()),
            Err(err) => {
                let what = "incremental snapshot read failed; retrying";
                let (pipeline, backoff) = (&self.pipeline, &mut self.backoff);
                if retry_later(pipeline, what, err, backoff, &mut self.shutdown).await? {
                    return Ok(Step::Stop);
                }
                return Ok(Step::Reopen);
            }
        }
        Ok(Step::Next)
    }

    /// A failed open or read: an event over 16 MiB is probed for, lost history handled as
    /// `on_history_lost` says, anything else retried after a backoff (or fatal).
    async fn failed(&mut self, err: mongodb::error::Error, what: &str) -> Result<Step, Error> {
        if !self.hand_off().await {
            return Ok(Step::Stop);
        }
        match error_code(&err) {
            Some(oversize::BSON_OBJECT_TOO_LARGE) => {
                read::too_large(&self.pipeline, &self.start, &mut self.probing, err)?;
            }
            Some(HISTORY_LOST) => {
                match history_lost(&self.client, &self.pipeline, &self.start, err).await? {
                    Some(next) => self.start = next,
                    None => self.snapshot = Some(SnapshotPlan::New),
                }
            }
            _ => {
                let quiet = self.lost_since.is_some();
                self.lost_since.get_or_insert_with(Instant::now);
                let (pipeline, backoff) = (&self.pipeline, &mut self.backoff);
                if retry_quietly(pipeline, what, err, backoff, &mut self.shutdown, quiet).await? {
                    return Ok(Step::Stop);
                }
            }
        }
        Ok(Step::Reopen)
    }
}
