//! One pipeline, wired: source → plugin chain → sink, with the checkpoint beside the sink.
//!
//! ```text
//!  source task ──(events)──▶ chain thread ──(units)──▶ sink task ──▶ JetStream
//!  (async, driver)           (sync, wasmtime)          (async)    └─▶ checkpoint
//! ```
//! The chain runs on its own OS thread because plugin calls are synchronous CPU work. Stages
//! hand work over in batches (one wake-up per batch, not per event), and the bounded channels
//! between them are the backpressure: when JetStream slows down or
//! is away, the sink stops taking units, the chain stops taking events, and the source stops
//! reading the change stream. Nothing is dropped; the position simply stops advancing.
//!
//! Start: the position is durable before anything is published. Without a checkpoint the
//! start is resolved first (the stream's opening position, or a snapshot's captured start)
//! and saved; and the JetStream stream's own last message of this unit is a floor below
//! which nothing is published again (see `sink::Floor`).
//!
//! Shutdown: the source stops reading, the chain finishes what it has, the sink publishes
//! and settles every unit it was given, and the final position is checkpointed, all within
//! `shutdown_timeout_secs`; past it the unit stops with what is acknowledged checkpointed
//! and says how much was left (it is re-read on restart). Checkpoints are written by a task
//! of their own, so a store that hangs never holds up publishing or the drain.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Context;
use futures::FutureExt;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::CheckpointStore;
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::model::Position;
use crate::ops::telemetry::PipelineStats;
use crate::plugin::reload::{ChainUpdate, Updates};
use crate::plugin::{Chain, Verdict};
use crate::sink::framer::{Framer, DEFAULT_MAX_PAYLOAD, MIN_MAX_PAYLOAD};
use crate::sink::{self, Floor, Publisher, Unit};
use crate::source::{self, SourceItem};

/// Batches (of up to `source::HANDOFF_BATCH` events) read ahead of the plugin chain: several
/// change-stream batches, so the next getMore overlaps plugin and publish work.
const SOURCE_QUEUE_BATCHES: usize = 16;

/// Batches of units framed ahead of the publisher.
const UNIT_QUEUE_BATCHES: usize = 4;

/// Runs one pipeline (or tenant unit) until `shutdown` turns true (then drains and
/// checkpoints), a fatal error occurs, or `fence` is lost (then stops at once with
/// [`Error::Fenced`], writing nothing more).
///
/// Without a `chain` (its plugins failed to load) the unit holds: it reads nothing and keeps
/// its checkpoint until `updates` brings a chain that loads. `updates` also carries hot
/// reloads to the plugin thread; it is shared (a high-availability owner runs the unit again
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
    let chain = match chain {
        Some(chain) => chain,
        None => {
            tracing::warn!(pipeline = %id, "holding: reading nothing until its plugins load");
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    update = updates.recv() => match update {
                        Some(ChainUpdate::Chain(chain)) => break chain,
                        Some(ChainUpdate::Plugin { .. }) => continue,
                        None => return Ok(()),
                    },
                }
            }
        }
    };
    let topology = source::log_elections(&id);
    let mongo = crate::security::mongo_client_watched(&pipeline.mongodb_uri, Some(topology))
        .await
        .map_err(|err| Error::Source {
            pipeline: id.clone(),
            message: format!("invalid MongoDB URI: {err}"),
        })?;
    source::check_images(&mongo, &pipeline).await?;
    crate::source::oversize::check_split_support(&mongo, &pipeline).await?;
    sink::prepare_stream(&js, &pipeline).await?;
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
    let checkpoints =
        CheckpointStore::open(&pipeline.checkpoint, &id, &js, &mongo, fence.clone()).await?;
    let checkpoint = checkpoints.load().await?;
    let tail = sink::stream_tail(&js, &pipeline).await?;
    let Some(Start {
        position: start,
        floor,
        at_time,
    }) = resolve_start(
        &mongo,
        &pipeline,
        &checkpoints,
        checkpoint,
        &tail,
        &mut shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    if *shutdown.borrow() {
        // Asked to stop while the start was resolved: nothing was read or published.
        return Ok(());
    }

    let stats = crate::ops::metrics::pipeline(&id);
    let (event_tx, event_rx) = mpsc::channel::<Vec<SourceItem>>(SOURCE_QUEUE_BATCHES);
    let (unit_tx, mut unit_rx) = mpsc::channel::<Vec<Unit>>(UNIT_QUEUE_BATCHES);

    let wake = event_tx.downgrade();
    let (source_stop_tx, source_stop_rx) = watch::channel(false);
    let source_task = tokio::spawn(source::run(
        mongo.clone(),
        pipeline.clone(),
        start.clone(),
        at_time,
        event_tx,
        source_stop_rx,
    ));

    // Reloads reach the plugin thread between two events; an empty batch wakes it when the
    // stream is idle. The weak sender never keeps the event channel open on its own, and the
    // forwarder (holding the lock on `updates`) ends with this run.
    let (reload_tx, reloads) = std::sync::mpsc::channel();
    let _forwarder = AbortOnDrop(tokio::spawn(async move {
        while let Some(update) = updates.recv().await {
            let Some(wake) = wake.upgrade() else { return };
            if reload_tx.send(update).is_err() || wake.send(Vec::new()).await.is_err() {
                return;
            }
        }
    }));

    let _heartbeat_writer = AbortOnDrop(tokio::spawn(source::write_heartbeats(
        mongo.clone(),
        pipeline.clone(),
    )));
    let mut chain = chain;
    cap_output_bytes(&mut chain, &id, max_payload, true);
    let longest_id = start
        .as_ref()
        .and_then(|p| p.last_msg_id.as_ref())
        .map_or(0, String::len);
    let framer = Framer::new(&pipeline, max_payload, longest_id)?;
    let chain_stats = stats.clone();
    let scope = pipeline.clone();
    let chain_thread = std::thread::Builder::new()
        .name(format!("tidegate-chain-{id}"))
        .spawn(move || {
            let stages = ChainStages {
                chain,
                scope,
                framer,
                reloads,
            };
            stages.run(event_rx, unit_tx, &chain_stats)
        })
        .map_err(|err| Error::Sink {
            pipeline: id.clone(),
            message: format!("cannot start plugin thread: {err}"),
        })?;

    let mut publisher = Publisher::new(js, &id, &pipeline.sink, start.clone(), fence.clone());
    publisher.continue_after(tail, floor);
    let (positions, saver) = CheckpointSaver::spawn(Arc::new(checkpoints), start);
    let mut checkpoint_timer =
        tokio::time::interval(Duration::from_millis(pipeline.checkpoint.interval_ms));
    let summary_every = Duration::from_secs(30);
    let mut summary_timer =
        tokio::time::interval_at(tokio::time::Instant::now() + summary_every, summary_every);
    // After a stall (NATS away) missed ticks are skipped, not fired all at once.
    checkpoint_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    summary_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut inputs_open = true;
    // Units received but not yet published, waiting for room in the window.
    let mut backlog: VecDeque<Unit> = VecDeque::new();
    let shutdown_timeout = Duration::from_secs(pipeline.shutdown_timeout_secs);
    let stop_by = Arc::new(std::sync::OnceLock::new());
    let deadline = shutdown_deadline(shutdown.clone(), shutdown_timeout, stop_by.clone());

    // The drain loop. It is raced against the shutdown deadline: every await inside leaves the
    // publisher and the backlog consistent if it is cancelled there.
    let drain = async {
        loop {
            while publisher.has_room() {
                let Some(unit) = backlog.pop_front() else {
                    break;
                };
                publisher.push(unit).await;
            }
            if !inputs_open && backlog.is_empty() && publisher.is_idle() {
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.changed(), if !*source_stop_tx.borrow() => {
                    tracing::info!(pipeline = %id, "stopping: draining in-flight messages");
                    let _ = source_stop_tx.send(true);
                }
                units = unit_rx.recv(), if inputs_open && backlog.is_empty() => match units {
                    Some(units) => backlog.extend(units),
                    None => inputs_open = false,
                },
                result = publisher.next_ack(), if !publisher.is_idle() => {
                    publisher.handle_ack(result).await;
                    // Settle acknowledgements that have already arrived without another turn
                    // of the loop.
                    while !publisher.is_idle() {
                        match publisher.next_ack().now_or_never() {
                            Some(result) => publisher.handle_ack(result).await,
                            None => break,
                        }
                    }
                }
                _ = checkpoint_timer.tick() => {
                    positions.send_replace(publisher.position().cloned());
                }
                _ = summary_timer.tick() => stats.log(),
                _ = fence.lost() => {
                    let _ = source_stop_tx.send(true);
                    return Err(Error::Fenced { pipeline: id.clone(), message: fence.reason() });
                }
            }
        }
    };
    let mut outcome: Result<(), Error> = tokio::select! {
        drained = drain => drained,
        () = deadline => {
            let _ = source_stop_tx.send(true);
            let queued: usize = backlog.iter().map(|u| u.messages.len()).sum();
            tracing::error!(
                pipeline = %id,
                timeout_s = shutdown_timeout.as_secs(),
                unacknowledged_messages = publisher.in_flight(),
                unacknowledged_units = publisher.units_in_flight(),
                queued_units = backlog.len(),
                queued_messages = queued,
                "shutdown timeout: stopping with messages unpublished; what is acknowledged is \
                 checkpointed, the rest is read again on restart"
            );
            Err(Error::Shutdown {
                pipeline: id.clone(),
                message: format!(
                    "not drained within shutdown_timeout_secs = {}: {} messages in flight and {} \
                     units queued were left unpublished (they are read again on restart)",
                    shutdown_timeout.as_secs(),
                    publisher.in_flight(),
                    backlog.len()
                ),
            })
        }
    };
    // Unblocks the chain thread if the loop ended early (fenced, timed out).
    drop(unit_rx);
    positions.send_replace(publisher.position().cloned());
    drop(positions);
    // The final save gets what is left of the shutdown timeout (all of it when stopping for
    // another reason); a store that does not answer by then is abandoned: the checkpoint
    // stays where it was, and the rest is replayed.
    let save_within = stop_by
        .get()
        .map_or(shutdown_timeout, |at: &tokio::time::Instant| {
            at.saturating_duration_since(tokio::time::Instant::now())
        });
    if tokio::time::timeout(save_within.max(Duration::from_secs(1)), saver)
        .await
        .is_err()
    {
        tracing::error!(pipeline = %id, "final checkpoint not saved in time; the restart re-reads from the previous one");
    }
    stats.log();
    // The loop ends once the chain's input closed, i.e. once the source task returned: by
    // shutdown, or with a fatal error that everything read before it was published ahead of.
    // (When fenced, the source is still stopping: await it before blocking on the thread.)
    if outcome.is_err() {
        // Stopping early: the source may be waiting on a server; it holds nothing to save.
        source_task.abort();
    }
    let source_result = match source_task.await {
        Ok(result) => result,
        Err(err) if err.is_cancelled() => Ok(()),
        Err(err) => Err(Error::Source {
            pipeline: id.clone(),
            message: format!("source task failed: {err}"),
        }),
    };
    // Everything the plugin thread handed over was published and checkpointed above; what
    // it held is replayed on restart.
    let chain_result = match chain_thread.join() {
        Ok(result) => result,
        Err(panic) => Err(Error::Sink {
            pipeline: id.clone(),
            message: format!("plugin thread panicked (a tidegate bug): {panic:?}"),
        }),
    };
    if outcome.is_ok() {
        outcome = chain_result;
    }
    stats.set_state(crate::ops::metrics::State::Stopped);
    tracing::info!(pipeline = %id, "stopped");
    outcome.and(source_result)
}

/// Caps every plugin's `max_output_bytes` at the NATS server's `max_payload` (a larger
/// limit could only let through outputs the server refuses), saying so once per start when
/// `log` is set.
fn cap_output_bytes(chain: &mut Chain, unit: &str, max_payload: usize, log: bool) {
    if log {
        for plugin in chain.plugins() {
            let configured = plugin.limits().max_output_bytes;
            if configured > max_payload as u64 {
                tracing::info!(
                    pipeline = %unit,
                    plugin = %plugin.name(),
                    "limits.max_output_bytes is {configured}, above the NATS server's \
                     max_payload of {max_payload}: outputs are capped at {max_payload} bytes"
                );
            }
        }
    }
    chain.cap_output_bytes(max_payload as u64);
}

/// Aborts a task when dropped, on every way out of a function.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes checkpoints in a task of its own, off the publishing loop: a checkpoint store that
/// hangs (NATS away) must not stop acknowledgements from being settled or the drain from
/// ending. The loop posts the acknowledged position; the saver writes the newest one, retrying
/// failures, and after the loop drops its sender makes one last attempt and ends.
struct CheckpointSaver;

impl CheckpointSaver {
    fn spawn(
        store: Arc<CheckpointStore>,
        saved: Option<Position>,
    ) -> (watch::Sender<Option<Position>>, tokio::task::JoinHandle<()>) {
        let (positions, mut wanted) = watch::channel(saved.clone());
        let task = tokio::spawn(async move {
            let mut saved = saved;
            let mut failing = false;
            loop {
                let closed = wanted.changed().await.is_err();
                let position = wanted.borrow_and_update().clone();
                if let Some(position) = position.filter(|p| saved.as_ref() != Some(p)) {
                    match store.save(&position).await {
                        Ok(()) => {
                            if failing {
                                tracing::info!(pipeline = %store.pipeline(), "checkpoint saved again");
                            }
                            failing = false;
                            saved = Some(position);
                        }
                        // Deposed: the pipeline is stopping (the lease keeper logs why).
                        Err(Error::Fenced { .. }) => return,
                        // The position is kept and saved with the next one; a crash meanwhile
                        // only replays events already stored, which the stream's tail skips.
                        Err(err) => {
                            crate::ops::metrics::pipeline(store.pipeline())
                                .set_error(&err.to_string());
                            if !failing {
                                tracing::warn!(pipeline = %store.pipeline(), error = %err, "checkpoint not saved; will retry");
                            }
                            failing = true;
                        }
                    }
                }
                if closed {
                    return;
                }
            }
        });
        (positions, task)
    }
}

/// Resolves `timeout` after `shutdown` turns true (never, if it never does), recording the
/// deadline in `stop_by` as soon as it is known.
async fn shutdown_deadline(
    mut shutdown: watch::Receiver<bool>,
    timeout: Duration,
    stop_by: Arc<std::sync::OnceLock<tokio::time::Instant>>,
) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        return std::future::pending().await;
    }
    let at = *stop_by.get_or_init(|| tokio::time::Instant::now() + timeout);
    tokio::time::sleep_until(at).await;
}

/// Where a run starts: the position to resume after (saved before anything is published),
/// or without one, the cluster time to open at; and the stream's tail as a floor.
struct Start {
    position: Option<Position>,
    floor: Option<Floor>,
    at_time: Option<bson::Timestamp>,
}

/// Decides where the unit starts, from its checkpoint and the stream's last message `tail`:
/// after the later of the two. Without either, the start is resolved now and saved before
/// anything is published, so that a crash at any moment restarts from the same place.
/// `None` when shut down meanwhile.
async fn resolve_start(
    mongo: &mongodb::Client,
    pipeline: &PipelineConfig,
    checkpoints: &CheckpointStore,
    checkpoint: Option<Position>,
    tail: &Option<String>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Start>, Error> {
    let id = pipeline.id.as_str();
    let floor = tail.as_deref().and_then(|tail| Floor::parse(id, tail));
    if tail.is_some() && floor.is_none() {
        tracing::warn!(pipeline = id, tail = ?tail, "the stream's last message under this unit's subjects is not this unit's; ordering continues from it");
    }
    if let Some(position) = checkpoint {
        let floor = floor.filter(|f| f.lies_after(&position.token));
        match &floor {
            Some(floor) => tracing::info!(
                pipeline = id,
                tail = %floor.msg_id(),
                checkpoint = ?position.last_msg_id,
                "resuming after checkpoint; the stream holds messages past it, which are not published again"
            ),
            None => tracing::info!(pipeline = id, "resuming after checkpoint"),
        }
        if let Some(new) =
            source::first_position(mongo, pipeline, Some(&position), shutdown).await?
        {
            return save_start(checkpoints, pipeline, new, floor)
                .await
                .map(Some);
        }
        return Ok(Some(Start {
            position: Some(position),
            floor,
            at_time: None,
        }));
    }
    // No checkpoint, but the stream holds this unit's messages (the checkpoint was deleted,
    // or written by a version that published first): the tail is the position.
    if let Some((floor, time)) = floor.as_ref().and_then(|f| Some((f.clone(), f.time()?))) {
        tracing::warn!(
            pipeline = id,
            tail = %floor.msg_id(),
            "no checkpoint, but the stream holds this unit's messages: continuing from its last one"
        );
        return Ok(Some(Start {
            position: None,
            floor: Some(floor),
            at_time: Some(time),
        }));
    }
    if let Some(floor) = &floor {
        tracing::warn!(pipeline = id, tail = %floor.msg_id(), "no checkpoint; the stream's last message (a snapshot read) gives no position to continue from: starting afresh");
    }
    match source::first_position(mongo, pipeline, None, shutdown).await? {
        Some(position) => save_start(checkpoints, pipeline, position, floor)
            .await
            .map(Some),
        None if *shutdown.borrow() => Ok(None),
        // An explicit start (`start_at` time, `start_after_token`) is the same on every
        // restart: nothing to save.
        None => {
            tracing::info!(
                pipeline = id,
                "no checkpoint: starting at the configured position"
            );
            Ok(Some(Start {
                position: None,
                floor,
                at_time: None,
            }))
        }
    }
}

/// Saves a newly resolved start before anything is published.
async fn save_start(
    checkpoints: &CheckpointStore,
    pipeline: &PipelineConfig,
    position: Position,
    floor: Option<Floor>,
) -> Result<Start, Error> {
    checkpoints.save(&position).await?;
    tracing::info!(
        pipeline = %pipeline.id,
        snapshot = position.snapshot.is_some(),
        "start position saved before publishing"
    );
    Ok(Start {
        position: Some(position),
        floor,
        at_time: None,
    })
}

/// What the plugin thread owns.
struct ChainStages {
    chain: Chain,
    /// The unit's config, for the tenant scope check.
    scope: PipelineConfig,
    framer: Framer,
    reloads: std::sync::mpsc::Receiver<ChainUpdate>,
}

impl ChainStages {
    /// The plugin thread: runs each event through the chain and frames the result as
    /// messages, a batch at a time. Reloaded plugins are swapped in between two events. A
    /// quarantined plugin under the `halt` policy ends the thread with an error before the
    /// event it would have seen, so that event is neither published nor checkpointed.
    fn run(
        mut self,
        mut events: mpsc::Receiver<Vec<SourceItem>>,
        units: mpsc::Sender<Vec<Unit>>,
        stats: &PipelineStats,
    ) -> Result<(), Error> {
        while let Some(batch) = events.blocking_recv() {
            self.apply_updates(stats);
            if batch.is_empty() {
                continue;
            }
            let mut framed = Vec::with_capacity(batch.len());
            let mut halted = None;
            for item in batch {
                self.apply_updates(stats);
                let event = match item {
                    SourceItem::Heartbeat(token, snapshot) => {
                        framed.push(Unit {
                            messages: self.framer.heartbeat(&token),
                            token,
                            snapshot,
                            commit_unix_ms: None,
                        });
                        continue;
                    }
                    SourceItem::Event(event) => event,
                    SourceItem::Oversize { event, size } => {
                        stats.read();
                        framed.push(if self.scope.may_see(event.change.namespace()) {
                            self.framer.oversize(&event, size, stats)
                        } else {
                            self.framer.frame(&event, Verdict::OutOfScope, stats)
                        });
                        continue;
                    }
                };
                stats.read();
                let verdict = if self.scope.may_see(event.change.namespace()) {
                    self.chain.run(&event.change)
                } else {
                    Verdict::OutOfScope
                };
                if let Verdict::Halt(err) = verdict {
                    halted = Some(err);
                    break;
                }
                framed.push(self.framer.frame(&event, verdict, stats));
            }
            if units.blocking_send(framed).is_err() {
                return Ok(());
            }
            if let Some(err) = halted {
                return Err(Error::Plugin {
                    name: err.plugin,
                    path: Default::default(),
                    message: format!(
                        "unit '{}' halted: {} (quarantine action `halt`; fix the plugin and \
                         restart, or send SIGHUP once it is replaced)",
                        self.scope.id, err.message
                    ),
                });
            }
        }
        Ok(())
    }

    /// Swaps in whatever the reloader has sent.
    fn apply_updates(&mut self, stats: &PipelineStats) {
        let mut swapped = false;
        while let Ok(update) = self.reloads.try_recv() {
            swapped = true;
            match update {
                ChainUpdate::Plugin { index, plugin } => {
                    let name = plugin.name().to_string();
                    let hash = plugin.hash().to_string();
                    if self.chain.replace(index, *plugin).is_some() {
                        tracing::info!(pipeline = %self.scope.id, plugin = %name, %hash, "plugin reloaded");
                    }
                }
                ChainUpdate::Chain(chain) => {
                    self.chain = chain;
                    cap_output_bytes(
                        &mut self.chain,
                        &self.scope.id,
                        self.framer.max_payload,
                        false,
                    );
                    tracing::info!(pipeline = %self.scope.id, "plugin chain reloaded");
                }
            }
        }
        if swapped {
            stats.reload_applied();
            stats.set_plugins(self.chain.infos());
        }
    }
}
