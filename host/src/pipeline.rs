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
use async_nats::HeaderMap;
use futures::FutureExt;
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::CheckpointStore;
use crate::config::{Encoding, PipelineConfig};
use crate::encode::{self, SubjectTemplate};
use crate::error::Error;
use crate::event::SourceEvent;
use crate::fence::Fence;
use crate::plugin::{CallError, Chain, Verdict};
use crate::reload::{ChainUpdate, Updates};
use crate::sink::{self, Floor, Message, Position, Publisher, Unit};
use crate::source::{self, SourceItem};
use crate::telemetry::PipelineStats;

/// Batches (of up to `source::HANDOFF_BATCH` events) read ahead of the plugin chain: several
/// change-stream batches, so the next getMore overlaps plugin and publish work.
const SOURCE_QUEUE_BATCHES: usize = 16;

/// Batches of units framed ahead of the publisher.
const UNIT_QUEUE_BATCHES: usize = 4;

/// NATS's default `max_payload`, assumed if the server did not say.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The smallest `max_payload` a pipeline runs with: below it even a dead-letter stub (ids,
/// namespace, reason) might not fit, and an event could be neither published nor
/// dead-lettered.
const MIN_MAX_PAYLOAD: usize = 16 * 1024;

/// The longest subject tidegate publishes to. nats-server closes the connection of a client
/// whose protocol line (`HPUB <subject> <reply inbox> <sizes>`) is longer than its
/// `max_control_line` (default 4096 bytes, not announced to clients); half of it leaves room
/// for the reply inbox and the sizes.
pub const MAX_SUBJECT_BYTES: usize = 2048;

/// Bytes reserved for the `Nats-Expected-Last-Msg-Id` value the publisher adds (the previous
/// message's id, unknown while framing) when no longer id has been seen.
const EXPECTED_ID_ALLOWANCE: usize = 512;

/// The most bytes of an error text a dead-letter stub carries.
const STUB_ERROR_CHARS: usize = 200;

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
    crate::oversize::check_split_support(&mongo, &pipeline).await?;
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

    let stats = crate::metrics::pipeline(&id);
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
    stats.set_state(crate::metrics::State::Stopped);
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
struct AbortOnDrop(tokio::task::JoinHandle<()>);

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
                            crate::metrics::pipeline(store.pipeline()).set_error(&err.to_string());
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
            stats.set_plugins(crate::metrics::plugin_infos(&self.chain));
        }
    }
}

/// Turns chain verdicts into NATS messages: subjects, ids, headers, payloads.
///
/// Every message it makes fits the connected server's `max_payload` as the server counts it
/// ([`Framer::fits`]): an output that does not is dead-lettered instead, and a dead letter
/// that does not is cut down to a stub that does. So no event, and no plugin output, can make
/// the server close the connection every unit shares.
pub struct Framer {
    pipeline: String,
    subjects: SubjectTemplate,
    dead_letter_subject: String,
    encoding: Encoding,
    max_payload: usize,
    /// The longest message id framed so far (at first, the checkpoint's): the publisher's
    /// `Nats-Expected-Last-Msg-Id` header repeats the previous message's id.
    longest_id: usize,
    /// The headers every message starts with, built once.
    common_headers: HeaderMap,
    /// `heartbeat_publish_ms`, and when the last heartbeat message was framed.
    heartbeat_every: Option<std::time::Duration>,
    last_heartbeat: Option<std::time::Instant>,
    heartbeat_subject: String,
}

impl Framer {
    /// A framer for `pipeline` publishing to a server that accepts `max_payload` bytes;
    /// `longest_id` is the length of the last published message's id, if known.
    pub fn new(
        pipeline: &PipelineConfig,
        max_payload: usize,
        longest_id: usize,
    ) -> Result<Framer, Error> {
        let subjects = SubjectTemplate::parse(
            &pipeline.sink.subject_template,
            &pipeline.sink.subject_prefix,
        )
        .map_err(|message| Error::Sink {
            pipeline: pipeline.id.clone(),
            message,
        })?;
        let mut common_headers = HeaderMap::new();
        common_headers.insert("Content-Type", pipeline.sink.encoding.content_type());
        common_headers.insert("Tidegate-Pipeline", pipeline.id.as_str());
        if let Some(tenant) = &pipeline.tenant {
            common_headers.insert("Tidegate-Tenant", tenant.id.as_str());
        }
        Ok(Framer {
            pipeline: pipeline.id.clone(),
            subjects,
            dead_letter_subject: pipeline.dead_letter_subject(),
            encoding: pipeline.sink.encoding,
            max_payload,
            longest_id,
            common_headers,
            heartbeat_every: (pipeline.heartbeat_publish_ms > 0)
                .then(|| Duration::from_millis(pipeline.heartbeat_publish_ms)),
            last_heartbeat: None,
            heartbeat_subject: format!("{}.heartbeat", pipeline.sink.subject_prefix),
        })
    }

    fn headers(&self) -> HeaderMap {
        self.common_headers.clone()
    }

    /// The subject dead letters go to.
    pub fn dead_letter_subject(&self) -> &str {
        &self.dead_letter_subject
    }

    /// A heartbeat message for an idle stream at `token`, if heartbeats are published and
    /// the last one is old enough.
    fn heartbeat(&mut self, token: &ResumeToken) -> Vec<Message> {
        let Some(every) = self.heartbeat_every else {
            return Vec::new();
        };
        if self.last_heartbeat.is_some_and(|at| at.elapsed() < every) {
            return Vec::new();
        }
        self.last_heartbeat = Some(std::time::Instant::now());
        let time = crate::event::token_time(token);
        let payload = serde_json::json!({
            "pipeline": self.pipeline,
            "clusterTime": time.map(|t| format!("{}.{}", t.time, t.increment)),
            "at": bson::DateTime::now().try_to_rfc3339_string().ok(),
        });
        let message = Message {
            subject: self.heartbeat_subject.clone(),
            msg_id: format!(
                "{}:{}:heartbeat",
                self.pipeline,
                crate::event::token_id(token)
            ),
            headers: self.headers(),
            payload: payload.to_string().into(),
        };
        match self.accept(message) {
            Ok(message) => vec![message],
            Err(reason) => {
                // Nothing is lost: a heartbeat only says the stream is alive.
                tracing::warn!(pipeline = %self.pipeline, "heartbeat not published: {reason}");
                Vec::new()
            }
        }
    }

    /// The messages for one event's verdict, each one checked with [`Framer::fits`].
    pub fn frame(&mut self, event: &SourceEvent, verdict: Verdict, stats: &PipelineStats) -> Unit {
        let unit = |messages| Unit {
            messages,
            token: event.token.clone(),
            snapshot: event.snapshot.clone(),
            commit_unix_ms: event.change.commit_unix_ms(),
        };
        let change = &event.change;
        let outputs = match verdict {
            Verdict::DeadLetter(err) => return unit(self.dead_letter(event, &err, stats)),
            Verdict::Skip(_) | Verdict::Halt(_) => {
                stats.skipped();
                Vec::new()
            }
            Verdict::OutOfScope => {
                stats.out_of_scope();
                Vec::new()
            }
            Verdict::Publish(outputs) => {
                if outputs.is_empty() {
                    stats.filtered();
                }
                outputs
            }
        };
        let mut messages = Vec::with_capacity(outputs.len());
        for (index, output) in outputs.into_iter().enumerate() {
            let change = output.change.as_ref().unwrap_or(change);
            let payload = match encode::payload(change, self.encoding) {
                Ok(payload) => payload,
                Err(message) => {
                    let err = CallError {
                        plugin: String::new(),
                        plugin_hash: String::new(),
                        kind: "encoding".into(),
                        message,
                    };
                    return unit(self.dead_letter(event, &err, stats));
                }
            };
            let subject = match output.subject {
                Some(subject) => subject,
                None => self.subjects.render(change),
            };
            let mut headers = self.headers();
            for (name, value) in output.headers {
                headers.append(name.as_str(), value.as_str());
            }
            let message = Message {
                subject,
                msg_id: format!("{}:{}:{index}", self.pipeline, change.id()),
                headers,
                payload: payload.into(),
            };
            match self.accept(message) {
                Ok(message) => messages.push(message),
                Err(reason) => {
                    let err = CallError {
                        plugin: String::new(),
                        plugin_hash: String::new(),
                        kind: "too-large".into(),
                        message: format!("output {index}: {reason}"),
                    };
                    return unit(self.dead_letter(event, &err, stats));
                }
            }
        }
        unit(messages)
    }

    /// An event `oversize = "skip"` stripped on the server: its stub (id, namespace, document
    /// key, times) goes to the dead-letter subject with reason `oversize` and the size in
    /// `Tidegate-Event-Size`; plugins never see it.
    fn oversize(&mut self, event: &SourceEvent, size: i64, stats: &PipelineStats) -> Unit {
        let err = CallError {
            plugin: String::new(),
            plugin_hash: String::new(),
            kind: "oversize".into(),
            message: format!(
                "the event is {size} bytes, over MongoDB's 16 MiB limit; oversize = \"skip\" \
                 dead-letters this stub of it (id, namespace, document key, cluster time)"
            ),
        };
        let mut messages = self.dead_letter(event, &err, stats);
        for message in &mut messages {
            message
                .headers
                .insert("Tidegate-Event-Size", size.to_string().as_str());
        }
        Unit {
            messages,
            token: event.token.clone(),
            snapshot: event.snapshot.clone(),
            commit_unix_ms: event.change.commit_unix_ms(),
        }
    }

    /// The original event, to the dead-letter subject, with the reason in headers; when that
    /// does not fit, a stub that does ([`Framer::dead_letter_stub`]).
    fn dead_letter(
        &mut self,
        event: &SourceEvent,
        err: &CallError,
        stats: &PipelineStats,
    ) -> Vec<Message> {
        stats.dead_lettered(&err.plugin, &err.kind);
        tracing::warn!(
            pipeline = %self.pipeline,
            plugin = %err.plugin,
            kind = %err.kind,
            // Plugin-supplied text, escaped (see `telemetry::escape`).
            error = %crate::telemetry::escape(&err.message),
            event = %crate::telemetry::escape(event.change.id()),
            "event dead-lettered"
        );
        let full = encode::payload(&event.change, self.encoding)
            .map(|payload| self.dead_letter_message(event, err, payload, HEADER_TEXT_CHARS));
        let too_large = match full.map(|message| self.accept(message)) {
            Ok(Ok(message)) => return vec![message],
            Ok(Err(reason)) => reason,
            Err(reason) => format!("the event cannot be encoded: {reason}"),
        };
        self.dead_letter_stub(event, err, &too_large)
            .into_iter()
            .collect()
    }
}

/// The most characters of one header value taken from an error or other free text.
const HEADER_TEXT_CHARS: usize = 1000;

/// Size accounting: how the NATS server measures a message, and the stub a dead letter is
/// cut down to. Kept apart from the framing above, which only asks [`Framer::fits`].
impl Framer {
    /// Why `message` cannot be published without the server refusing it (and closing the
    /// connection every unit shares), if it cannot: its subject is longer than
    /// [`MAX_SUBJECT_BYTES`], or subject, header block and payload together
    /// ([`Framer::wire_size`]) exceed the server's `max_payload`. nats-server itself counts
    /// only the header block and the payload; counting the subject too leaves JetStream's
    /// stored copy (which holds the subject) room as well.
    pub fn fits(&self, message: &Message) -> Result<(), String> {
        if message.subject.len() > MAX_SUBJECT_BYTES {
            return Err(format!(
                "subject is {} bytes; at most {MAX_SUBJECT_BYTES} are published (the NATS \
                 server closes connections whose protocol lines exceed its max_control_line)",
                message.subject.len()
            ));
        }
        let size = self.wire_size(message);
        if size.total() > self.max_payload {
            return Err(format!(
                "message is {} bytes (subject {}, headers {}, payload {}); the NATS server \
                 accepts at most {} (max_payload)",
                size.total(),
                size.subject,
                size.headers,
                size.payload,
                self.max_payload
            ));
        }
        Ok(())
    }

    /// `message` if it [`fits`](Framer::fits), remembering its id's length for the
    /// `Nats-Expected-Last-Msg-Id` header of the next message.
    fn accept(&mut self, message: Message) -> Result<Message, String> {
        self.fits(&message)?;
        self.longest_id = self.longest_id.max(message.msg_id.len());
        Ok(message)
    }

    /// What `message` weighs on the wire once the publisher adds its `Nats-Msg-Id` and
    /// `Nats-Expected-Last-Msg-Id` headers (the latter's value is the previous message's id,
    /// at most the longest id framed so far or [`EXPECTED_ID_ALLOWANCE`]).
    pub fn wire_size(&self, message: &Message) -> WireSize {
        let expected_id = self
            .longest_id
            .max(message.msg_id.len())
            .max(EXPECTED_ID_ALLOWANCE);
        WireSize {
            subject: message.subject.len(),
            headers: header_block_bytes(&message.headers)
                + header_line_bytes("Nats-Msg-Id", message.msg_id.len())
                + header_line_bytes("Nats-Expected-Last-Msg-Id", expected_id),
            payload: message.payload.len(),
        }
    }

    /// A dead letter for `event` with `payload`, the reason in `Tidegate-*` headers whose
    /// free text is cut at `text_chars` characters.
    fn dead_letter_message(
        &self,
        event: &SourceEvent,
        err: &CallError,
        payload: Vec<u8>,
        text_chars: usize,
    ) -> Message {
        let mut headers = self.headers();
        headers.insert(
            "Tidegate-Error-Kind",
            header_text(&err.kind, text_chars).as_str(),
        );
        headers.insert(
            "Tidegate-Error",
            header_text(&err.message, text_chars).as_str(),
        );
        if !err.plugin.is_empty() {
            headers.insert(
                "Tidegate-Plugin",
                header_text(&err.plugin, text_chars).as_str(),
            );
            headers.insert(
                "Tidegate-Plugin-Hash",
                header_text(&err.plugin_hash, text_chars).as_str(),
            );
        }
        headers.insert(
            "Tidegate-Original-Subject",
            header_text(&self.subjects.render(&event.change), text_chars).as_str(),
        );
        Message {
            subject: self.dead_letter_subject.clone(),
            msg_id: format!("{}:{}:dead-letter", self.pipeline, event.change.id()),
            headers,
            payload: payload.into(),
        }
    }

    /// A dead letter cut down to fit `max_payload`: the event without its documents (id,
    /// operation, namespace, document key, cluster and wall time), the error texts cut to
    /// [`STUB_ERROR_CHARS`], and a `Tidegate-Stub` header saying why the whole did not fit.
    /// If the document key alone is too large, it goes too. `None` (logged as an error, the
    /// event skipped) only if even that cannot fit, i.e. the event's id alone is larger than
    /// the server accepts: such an event cannot be published in any form.
    fn dead_letter_stub(
        &mut self,
        event: &SourceEvent,
        err: &CallError,
        too_large: &str,
    ) -> Option<Message> {
        let original = &event.change;
        for keep_key in [true, false] {
            let mut left_out = vec![
                "fullDocument",
                "fullDocumentBeforeChange",
                "updateDescription",
                "lsid",
                "txnNumber",
            ];
            if !keep_key {
                left_out.push("documentKey");
            }
            let payload = original
                .without(&left_out)
                .and_then(|stub| encode::payload(&stub, self.encoding))
                .unwrap_or_default();
            let mut message = self.dead_letter_message(event, err, payload, STUB_ERROR_CHARS);
            let what = if keep_key {
                "documents left out"
            } else {
                "documents and document key left out"
            };
            message.headers.insert(
                "Tidegate-Stub",
                header_text(&format!("{what}: {too_large}"), HEADER_TEXT_CHARS).as_str(),
            );
            if let Ok(message) = self.accept(message) {
                return Some(message);
            }
        }
        tracing::error!(
            pipeline = %self.pipeline,
            event = %header_text(original.id(), STUB_ERROR_CHARS),
            "event skipped: not even a dead-letter stub of it fits the NATS server's \
             max_payload of {} bytes",
            self.max_payload
        );
        None
    }
}

/// A message's size as the NATS server sees it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireSize {
    /// The subject.
    pub subject: usize,
    /// The header block, including the headers the publisher adds.
    pub headers: usize,
    /// The payload.
    pub payload: usize,
}

impl WireSize {
    /// Everything together.
    pub fn total(&self) -> usize {
        self.subject + self.headers + self.payload
    }
}

/// Bytes of `headers` as async-nats writes them in an `HPUB` (and nats-server counts toward
/// `max_payload`): `NATS/1.0\r\n`, one `Name: value\r\n` line per value, and `\r\n`.
pub fn header_block_bytes(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|value| header_line_bytes(name, value.as_str().len()))
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + "\r\n".len()
}

/// Bytes of one `Name: value\r\n` header line.
fn header_line_bytes(name: &str, value_len: usize) -> usize {
    name.len() + ": ".len() + value_len + "\r\n".len()
}

/// `text` as a header value: control characters (CR, LF…) as spaces, at most `max_chars`.
fn header_text(text: &str, max_chars: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::Output;

    /// A unit `t` publishing under `cdc`.
    fn pipeline() -> PipelineConfig {
        let mut sink = toml::Table::new();
        sink.insert("stream".into(), "T".into());
        sink.insert("subject_prefix".into(), "cdc".into());
        let mut table = toml::Table::new();
        table.insert("id".into(), "t".into());
        table.insert("mongodb_uri".into(), "mongodb://unused".into());
        table.insert("sink".into(), sink.into());
        table.try_into().expect("pipeline config")
    }

    fn event(change: crate::event::Change) -> SourceEvent {
        SourceEvent {
            token: crate::event::token_from_document(bson::doc! { "_data": "82AA" })
                .expect("token"),
            change,
            snapshot: None,
        }
    }

    fn output(subject: Option<String>, headers: Vec<(String, String)>) -> Verdict {
        Verdict::Publish(vec![Output {
            change: None,
            subject,
            headers,
        }])
    }

    fn kind(message: &Message) -> Option<String> {
        message
            .headers
            .get("Tidegate-Error-Kind")
            .map(|v| v.as_str().to_owned())
    }

    /// The header block is counted exactly as async-nats writes it in an `HPUB`.
    #[test]
    fn header_block_counts_the_wire_form() {
        let mut headers = HeaderMap::new();
        headers.insert("A", "xy");
        headers.append("B", "1");
        headers.append("B", "22");
        let wire = "NATS/1.0\r\nA: xy\r\nB: 1\r\nB: 22\r\n\r\n";
        assert_eq!(header_block_bytes(&headers), wire.len());
    }

    /// Outputs whose headers, or subject, would make the server drop the connection are
    /// dead-lettered with the sizes; everything framed fits.
    #[test]
    fn oversized_outputs_are_dead_lettered() {
        let max = 64 * 1024;
        let mut framer = Framer::new(&pipeline(), max, 0).expect("framer");
        let stats = crate::metrics::pipeline("framer-test");
        let event = event(crate::event::Change::probe());

        let small = output(None, vec![("X-Ok".into(), "1".into())]);
        let unit = framer.frame(&event, small, &stats);
        assert_eq!(unit.messages.len(), 1);
        assert_eq!(kind(&unit.messages[0]), None);

        // Many headers, each small, together over max_payload on the wire only.
        let flood = (0..200)
            .map(|i| (format!("X-F{i:03}"), "f".repeat(320)))
            .collect::<Vec<_>>();
        let named: usize = flood.iter().map(|(n, v)| n.len() + v.len()).sum();
        assert!(named < max, "names and values alone fit");
        let unit = framer.frame(&event, output(None, flood), &stats);
        assert_eq!(unit.messages.len(), 1);
        let dead = &unit.messages[0];
        assert_eq!(kind(dead).as_deref(), Some("too-large"));
        assert_eq!(dead.subject, "cdc.dead-letter");
        let error = dead.headers.get("Tidegate-Error").expect("error").as_str();
        assert!(
            error.contains("accepts at most 65536 (max_payload)"),
            "{error}"
        );

        let long = format!("cdc.{}", "s".repeat(MAX_SUBJECT_BYTES));
        let unit = framer.frame(&event, output(Some(long), Vec::new()), &stats);
        assert_eq!(kind(&unit.messages[0]).as_deref(), Some("too-large"));
        for message in &unit.messages {
            assert!(framer.fits(message).is_ok());
        }
    }

    /// A dead letter too large to send whole becomes a stub that fits, keeping the event's
    /// id, namespace and key and saying what was left out.
    #[test]
    fn oversized_dead_letters_become_stubs() {
        let max = MIN_MAX_PAYLOAD;
        let mut framer = Framer::new(&pipeline(), max, 0).expect("framer");
        let stats = crate::metrics::pipeline("framer-test");
        let key = bson::rawdoc! { "_id": 7 };
        let full = bson::rawdoc! { "_id": 7, "blob": "b".repeat(2 * max) };
        let probe = crate::event::Change::probe();
        let mut fields = crate::event::Fields::new(
            probe.id(),
            probe.operation().clone(),
            probe.namespace().clone(),
        );
        fields.document_key = Some(std::borrow::Cow::Borrowed(&key));
        fields.full_document = Some(std::borrow::Cow::Borrowed(&full));
        let change = crate::event::Change::from_fields(fields, None).expect("change");
        let err = CallError {
            plugin: "p".into(),
            plugin_hash: "sha256:00".into(),
            kind: "plugin-error".into(),
            message: "e".repeat(5000),
        };
        let unit = framer.frame(&event(change), Verdict::DeadLetter(err), &stats);
        assert_eq!(unit.messages.len(), 1);
        let stub = &unit.messages[0];
        assert!(framer.fits(stub).is_ok());
        assert_eq!(kind(stub).as_deref(), Some("plugin-error"));
        let why = stub.headers.get("Tidegate-Stub").expect("stub").as_str();
        assert!(why.starts_with("documents left out: message is "), "{why}");
        let error = stub.headers.get("Tidegate-Error").expect("error").as_str();
        assert_eq!(error.len(), STUB_ERROR_CHARS);
        let body: serde_json::Value = serde_json::from_slice(&stub.payload).expect("json");
        assert_eq!(body["documentKey"]["_id"], 7);
        assert_eq!(body["ns"]["coll"], "coll");
        assert!(body.get("fullDocument").is_none(), "{body}");
    }
}
