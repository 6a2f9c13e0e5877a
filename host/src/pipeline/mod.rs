//! One pipeline, wired: source → plugin chain → sink, with the checkpoint beside the sink.
//!
//! ```text
//!  source task ──(events)──▶ chain stage ──(framed)──▶ sink task ──▶ JetStream
//!  (async, driver)           (turns on the             (async)    └─▶ checkpoint
//!                             worker pool)
//! ```
//! The chain's plugin calls are synchronous CPU work: they run in short turns on the
//! process's worker pool, shared fairly by every unit (`sandbox::pool`). Stages
//! hand work over in batches (one wake-up per batch, not per event), and the bounded channels
//! between them are the backpressure: when JetStream slows down or
//! is away, the sink stops taking framed events, the chain stops taking events, and the source stops
//! reading the change stream. Nothing is dropped; the position simply stops advancing.
//!
//! Start: the position is durable before anything is published. Without a checkpoint the
//! start is resolved first (the stream's opening position, or a snapshot's captured start)
//! and saved; and the JetStream stream's own last message of this unit is a floor below
//! which nothing is published again (see `sink::Floor`).
//!
//! Shutdown: the source stops reading, the chain finishes what it has, the sink publishes
//! and settles everything it was given, and the final position is checkpointed, all within
//! `shutdown_timeout_secs`; past it the unit stops with what is acknowledged checkpointed
//! and says how much was left (it is re-read on restart). Checkpoints are written by a task
//! of their own, so a store that hangs never holds up publishing or the drain.

use std::time::Duration;

use async_nats::jetstream::Context;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::pace::WritePace;
use crate::checkpoint::CheckpointStore;
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::model::Position;
use crate::plugin::reload::{ChainUpdate, Updates};
use crate::plugin::Chain;
use crate::sink::framer::{DEFAULT_MAX_PAYLOAD, MIN_MAX_PAYLOAD};
use crate::sink::{self, EventMessages, Outlet, Publisher};
use crate::source::{self, SourceItem};

mod chain_thread;
mod checkpointer;
mod drain;
pub(crate) mod inlet;
pub(crate) mod shared;
mod shutdown;
mod start;

use chain_thread::UpdatesGuard;
use checkpointer::CheckpointSaver;
use drain::{Drain, DrainIo};
use shutdown::Deadline;
use start::{resolve_start, Start};

/// Batches (of up to `source::HANDOFF_BATCH` events) read ahead of the plugin chain: several
/// change-stream batches, so the next getMore overlaps plugin and publish work.
const SOURCE_QUEUE_BATCHES: usize = 16;

/// Batches of framed events ahead of the publisher.
const FRAMED_QUEUE_BATCHES: usize = 4;

/// The source task, ending with the source's own error, if any.
type SourceTask = tokio::task::JoinHandle<Result<(), Error>>;

/// Runs one pipeline (or tenant unit) until `shutdown` turns true (then drains and
/// checkpoints), a fatal error occurs, or `fence` is lost (then stops at once with
/// [`Error::Fenced`], writing nothing more).
///
/// Without a `chain` (its plugins failed to load) the unit holds: it reads nothing and keeps
/// its checkpoint until `updates` brings a chain that loads. `updates` also carries hot
/// reloads to the chain stage; it is shared (a high-availability owner runs the unit again
/// after regaining its lease) and locked for the duration of one run.
pub async fn run(
    pipeline: PipelineConfig,
    chain: Option<Chain>,
    updates: Updates,
    js: Context,
    mut shutdown: watch::Receiver<bool>,
    fence: Fence,
) -> Result<(), Error> {
    let id = pipeline.id.clone();
    let mut updates = updates.lock_owned().await;
    let Some(chain) = hold_until_loaded(chain, &id, &mut updates, &mut shutdown).await else {
        return Ok(());
    };
    let shared = shared::reader_for(&pipeline).await?;
    let (mongo, max_payload) = connect(&pipeline, &js, shared.as_ref()).await?;
    let checkpoints =
        CheckpointStore::open(&pipeline.checkpoint, &id, &js, &mongo, fence.clone()).await?;
    let checkpoint = checkpoints.load().await?;
    let tail = sink::stream_tail(&js, &pipeline).await?;
    let resolved = resolve_start(
        &mongo,
        &pipeline,
        &checkpoints,
        checkpoint,
        &tail,
        &mut shutdown,
    );
    let Some(Start {
        position: start,
        floor,
        at_time,
    }) = resolved.await?
    else {
        return Ok(());
    };
    if *shutdown.borrow() {
        // Asked to stop while the start was resolved: nothing was read or published.
        return Ok(());
    }

    // A tenant publishing into its pipeline's stream shares the stream's one publisher.
    let shared_stream = match pipeline.sink.shared_prefix {
        Some(_) => Some(sink::shared_stream(&js, &pipeline, fence.clone()).await?),
        None => None,
    };

    let stats = crate::ops::metrics::pipeline(&id);
    let (event_tx, event_rx) = mpsc::channel::<Vec<SourceItem>>(SOURCE_QUEUE_BATCHES);
    let (framed_tx, framed_rx) = mpsc::channel::<Vec<EventMessages>>(FRAMED_QUEUE_BATCHES);
    let wake = event_tx.downgrade();
    let (inlet, bypass) = inlet::Inlet::new(event_rx);
    let (source_task, source_stop, _heartbeats) = start_source(
        &mongo,
        shared,
        &pipeline,
        (&start, at_time),
        (event_tx, bypass),
    );
    let (_forwarder, reloads) = chain_thread::forward_reloads(updates, wake);
    let longest_id = shared_stream.as_ref().map(|s| s.longest_id());
    let outlet = match shared_stream {
        Some(stream) => Outlet::Shared(stream.open(&id, start.clone(), floor)),
        None => {
            let mut publisher =
                Publisher::new(js, &id, &pipeline.sink, start.clone(), fence.clone());
            publisher.continue_after(tail, floor);
            Outlet::Own(Box::new(publisher))
        }
    };
    let direct = match &outlet {
        Outlet::Shared(handle) => Some(handle.direct()),
        Outlet::Own(_) => None,
    };
    let chain_io = (
        inlet,
        chain_thread::Output::new(framed_tx, direct),
        shutdown.clone(),
    );
    let chain_thread = chain_thread::spawn(
        chain,
        &pipeline,
        max_payload,
        (&start, longest_id),
        chain_io,
        reloads,
        stats.clone(),
    )?;
    let pace = WritePace::for_pipeline(
        pipeline.pipeline_id(),
        pipeline.checkpoint.max_writes_per_sec,
    );
    let (positions, saver) = CheckpointSaver::spawn(std::sync::Arc::new(checkpoints), start, pace);
    let deadline = Deadline::new(Duration::from_secs(pipeline.shutdown_timeout_secs));
    let passed = deadline.passed(shutdown.clone());
    let io = DrainIo {
        framed: framed_rx,
        shutdown,
        source_stop,
        positions,
    };
    let mut drain = Drain::new(&pipeline, outlet, io, stats.clone(), fence);
    let outcome = tokio::select! {
        drained = drain.run() => drained,
        () = passed => Err(drain.timed_out(deadline.timeout())),
    };
    let _source_stop = drain.close();
    deadline.await_last_save(saver, &id).await;
    stats.log();
    let outcome = shutdown::join_stages(&id, outcome, source_task, chain_thread).await;
    stats.set_state(crate::ops::metrics::State::Stopped);
    tracing::info!(pipeline = %id, "stopped");
    outcome
}

/// Starts reading the change stream after `start` (or at `at_time`), and the heartbeat writer
/// beside it; returns the reading task and its stop signal. A tenant under a `shared` reader
/// reads through it (`shared::read_lane`, which may hand its lane channel to the chain stage
/// by `bypass`); the reader writes the heartbeats.
fn start_source(
    mongo: &mongodb::Client,
    shared: Option<std::sync::Arc<shared::SharedReader>>,
    pipeline: &PipelineConfig,
    (start, at_time): (&Option<Position>, Option<bson::Timestamp>),
    (events, bypass): (mpsc::Sender<Vec<SourceItem>>, inlet::Bypass),
) -> (SourceTask, watch::Sender<bool>, Option<AbortOnDrop>) {
    let (stop, stop_rx) = watch::channel(false);
    if let Some(reader) = shared {
        let (pipeline, start) = (pipeline.clone(), start.clone());
        let lane = shared::read_lane(
            reader,
            pipeline,
            (start, at_time),
            (events, bypass),
            stop_rx,
        );
        return (tokio::spawn(lane), stop, None);
    }
    let task = tokio::spawn(source::run(
        mongo.clone(),
        pipeline.clone(),
        start.clone(),
        at_time,
        events,
        stop_rx,
    ));
    let heartbeats = AbortOnDrop(tokio::spawn(source::write_heartbeats(
        mongo.clone(),
        pipeline.clone(),
    )));
    (task, stop, Some(heartbeats))
}

/// Without a chain, waits for `updates` to bring one that loads; `None` when the run ends
/// first (shutdown, or the reloader gone).
async fn hold_until_loaded(
    chain: Option<Chain>,
    id: &str,
    updates: &mut UpdatesGuard,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Chain> {
    if chain.is_some() {
        return chain;
    }
    tracing::warn!(pipeline = %id, "holding: reading nothing until its plugins load");
    let stats = crate::ops::metrics::pipeline(id);
    stats.set_state(crate::ops::metrics::State::Held);
    let chain = loop {
        tokio::select! {
            _ = shutdown.changed() => break None,
            update = updates.recv() => match update {
                Some(ChainUpdate::Chain(chain)) => break Some(chain),
                Some(ChainUpdate::Plugin { .. }) => continue,
                None => break None,
            },
        }
    };
    stats.set_state(crate::ops::metrics::State::Starting);
    chain
}

/// Connects to MongoDB (or takes the `shared` reader's client) and checks both servers
/// before anything is read: the source's prerequisites, the stream, and the NATS server's
/// `max_payload` (returned: it bounds every message).
async fn connect(
    pipeline: &PipelineConfig,
    js: &Context,
    shared: Option<&std::sync::Arc<shared::SharedReader>>,
) -> Result<(mongodb::Client, usize), Error> {
    let id = &pipeline.id;
    let mongo = match shared {
        Some(reader) => reader.client().clone(),
        None => {
            let topology = source::log_elections(id);
            crate::security::mongo_client_watched(&pipeline.mongodb_uri, Some(topology))
                .await
                .map_err(|err| Error::Source {
                    pipeline: id.clone(),
                    message: format!("invalid MongoDB URI: {err}"),
                })?
        }
    };
    source::check_images(&mongo, pipeline).await?;
    crate::source::oversize::check_split_support(&mongo, pipeline).await?;
    sink::prepare_stream(js, pipeline).await?;
    // Known only once connected (the client may have started before NATS was up).
    let max_payload = match js.client().server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        n => n,
    };
    if max_payload < MIN_MAX_PAYLOAD {
        return Err(Error::Sink {
            pipeline: id.clone(),
            message: format!(
                "the NATS server's max_payload is {max_payload} bytes; tidegate needs at \
                 least {MIN_MAX_PAYLOAD} so that every dead letter fits"
            ),
        });
    }
    Ok((mongo, max_payload))
}

/// Completes once `signal` changes (or its sender is gone); fused, so a loop can keep one and
/// poll it on every turn. Made once per run rather than per turn: a wait on a watch registers
/// with it when first polled and unregisters when dropped, and at a thousand tenants the
/// drain's and a lane's loops turn for nearly every event.
pub(crate) fn signalled(
    signal: &watch::Receiver<bool>,
) -> futures::future::Fuse<impl std::future::Future<Output = ()>> {
    let mut signal = signal.clone();
    futures::FutureExt::fuse(async move {
        let _ = signal.changed().await;
    })
}

/// Aborts a task when dropped, on every way out of a function.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
