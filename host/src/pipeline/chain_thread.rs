//! The chain stage: events through the plugin chain and framed as messages, with hot
//! reloads swapped in between two events.
//!
//! Plugin calls are synchronous CPU work, so they do not run on the async runtime: the
//! unit's async task hands its batches to the process's worker pool (`sandbox::pool`) in
//! short turns, scheduled fairly against every other unit, and passes what each turn framed
//! on to the sink. Between turns it waits out the unit's quota rates and the breach pause it
//! owes (see `throttle`), so a throttled unit reads its change stream more slowly (the
//! bounded queues pass the wait back) and drops nothing. (The module keeps its name from
//! the time each unit had a plugin thread of its own.)

mod throttle;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use self::throttle::{Throttle, TurnUse};
use super::inlet::Inlet;
use super::AbortOnDrop;
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::model::Position;
use crate::ops::telemetry::PipelineStats;
use crate::plugin::reload::ChainUpdate;
use crate::plugin::{CallError, Chain, Verdict};
use crate::sandbox::{PoolAccount, Ran};
use crate::sink::framer::Framer;
use crate::sink::{Direct, EventMessages};
use crate::source::SourceItem;

/// The longest a turn on the worker pool goes on before the unit gives way to the next one
/// (one call is never cut: a turn ends after the event that crosses it).
const TURN: Duration = Duration::from_millis(2);

/// The run's hold on the unit's [`crate::plugin::reload::Updates`].
pub(super) type UpdatesGuard = tokio::sync::OwnedMutexGuard<mpsc::UnboundedReceiver<ChainUpdate>>;

/// Forwards hot reloads to the chain stage. Reloads reach the chain between two events; an
/// empty batch wakes the stage when the stream is idle. The weak sender never keeps the event
/// channel open on its own, and the forwarder (holding the lock on `updates`) ends with this
/// run.
pub(super) fn forward_reloads(
    mut updates: UpdatesGuard,
    wake: mpsc::WeakSender<Vec<SourceItem>>,
) -> (AbortOnDrop, std::sync::mpsc::Receiver<ChainUpdate>) {
    let (reload_tx, reloads) = std::sync::mpsc::channel();
    let forwarder = AbortOnDrop(tokio::spawn(async move {
        while let Some(update) = updates.recv().await {
            let Some(wake) = wake.upgrade() else { return };
            if reload_tx.send(update).is_err() || wake.send(Vec::new()).await.is_err() {
                return;
            }
        }
    }));
    (forwarder, reloads)
}

/// Starts the chain stage for `chain`, framing for a server whose `max_payload` is given;
/// message ids after `start` may be as long as the one it names, and on a stream shared by
/// the pipeline's tenants as long as any of theirs (`shared_ids`). Its turns run on the
/// process's worker pool under an account of their own.
pub(super) fn spawn(
    mut chain: Chain,
    pipeline: &PipelineConfig,
    max_payload: usize,
    (start, shared_ids): (
        &Option<Position>,
        Option<Arc<std::sync::atomic::AtomicUsize>>,
    ),
    stages_io: (Inlet, Output, watch::Receiver<bool>),
    reloads: std::sync::mpsc::Receiver<ChainUpdate>,
    stats: Arc<PipelineStats>,
) -> Result<tokio::task::JoinHandle<Result<(), Error>>, Error> {
    let id = &pipeline.id;
    cap_output_bytes(&mut chain, id, max_payload, true);
    let longest_id = start
        .as_ref()
        .and_then(|p| p.last_msg_id.as_ref())
        .map_or(0, String::len);
    let mut framer = Framer::new(pipeline, max_payload, longest_id)?;
    if let Some(shared_ids) = shared_ids {
        framer.share_longest_id(shared_ids);
    }
    let account = crate::sandbox::pool::pool()
        .map_err(|message| Error::Sink {
            pipeline: id.clone(),
            message,
        })?
        .account();
    let stages = ChainStages {
        chain,
        scope: pipeline.clone(),
        framer,
        reloads,
    };
    let throttle = Throttle::new(&pipeline.quota, Instant::now());
    Ok(tokio::spawn(
        stages.run(stages_io, stats, account, throttle),
    ))
}

/// Where the chain stage's framed events go: to the drain (`pipeline::drain`), or, for a
/// tenant on a stream its pipeline's tenants share, straight to the stream's publisher
/// while the drain holds none of the unit's events and the window has room (see
/// [`Direct`]): at a thousand tenants, each with about one event per change-stream batch,
/// that is one wake-up of the unit's drain task fewer per event.
pub(super) struct Output {
    drain: mpsc::Sender<Vec<EventMessages>>,
    direct: Option<Direct>,
}

impl Output {
    pub(super) fn new(drain: mpsc::Sender<Vec<EventMessages>>, direct: Option<Direct>) -> Output {
        Output { drain, direct }
    }

    /// Sends `framed` on; false once the drain is gone (the run is ending: fenced, timed
    /// out, or failed), when nothing more is sent either way.
    async fn send(&self, framed: Vec<EventMessages>) -> bool {
        if self.drain.is_closed() {
            return false;
        }
        let framed = match &self.direct {
            Some(direct) => match direct.try_push(framed) {
                Ok(()) => return true,
                Err(framed) => {
                    direct.queue(framed.len());
                    framed
                }
            },
            None => framed,
        };
        self.drain.send(framed).await.is_ok()
    }
}

/// Waits out a quota or breach-pause `wait`, unless the unit is stopping (`shutdown` true) or
/// starts to: a stop drains what the unit has read at once. The waits bound the unit's rate
/// while it runs; a breach pause doubled up to 5 s per event would otherwise hold a drain of
/// a few queued hostile events past `shutdown_timeout_secs`. A closed `shutdown` channel
/// (no one can ask for a stop) leaves the wait whole.
async fn wait_unless_stopping(wait: Duration, shutdown: &mut watch::Receiver<bool>) {
    let stopping = async {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = stopping => {}
    }
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

/// What the chain stage owns (moved to a worker for each turn, and back).
struct ChainStages {
    chain: Chain,
    /// The unit's config, for the tenant scope check.
    scope: PipelineConfig,
    framer: Framer,
    reloads: std::sync::mpsc::Receiver<ChainUpdate>,
}

/// What one turn on the pool did.
struct Turn {
    framed: Vec<EventMessages>,
    /// Change events taken from the batch (heartbeats not counted).
    events: usize,
    /// The error of a quarantined plugin under `halt`: the unit stops before its event.
    halted: Option<CallError>,
}

impl ChainStages {
    /// The stage: hands each batch to the worker pool in turns of at most [`TURN`], passes
    /// what each turn framed on to the sink, and waits out the unit's quota and breach pause
    /// between turns (until `shutdown`: a stop drains what was read without them). Reloaded plugins are swapped in between two events. A quarantined
    /// plugin under the `halt` policy ends the stage with an error before the event it would
    /// have seen, so that event is neither published nor checkpointed.
    async fn run(
        self,
        (mut inlet, to_sink, mut shutdown): (Inlet, Output, watch::Receiver<bool>),
        stats: Arc<PipelineStats>,
        account: PoolAccount,
        mut throttle: Throttle,
    ) -> Result<(), Error> {
        let unit = self.scope.id.clone();
        // Boxed: it moves to a worker and back on every turn, which at a thousand tenants is
        // every event or two, and is 1.5 KB unboxed.
        let mut stages = Box::new(self);
        while let Some(batch) = inlet.next().await {
            // An empty batch is a reload's wake-up; gathered, it may come with events or
            // heartbeats: the reload is applied before them.
            stages.apply_updates(&stats);
            if batch.is_empty() {
                continue;
            }
            // A batch of heartbeats calls no plugin: framed here, without a turn on the pool
            // (a shared reader hands every idle tenant one).
            if batch
                .iter()
                .all(|item| matches!(item, SourceItem::Heartbeat(..)))
            {
                let framed = batch
                    .into_iter()
                    .filter_map(|item| match item {
                        SourceItem::Heartbeat(token, snapshot) => {
                            Some(stages.heartbeat(token, snapshot))
                        }
                        _ => None,
                    })
                    .collect();
                if !to_sink.send(framed).await {
                    return Ok(());
                }
                continue;
            }
            let mut items: VecDeque<SourceItem> = batch.into();
            while !items.is_empty() {
                let turn_stats = stats.clone();
                let ran = account
                    .run(move || {
                        let turn = stages.turn(&mut items, &turn_stats);
                        let pause = stages.chain.take_pause();
                        let strain = stages.chain.take_strain();
                        ((stages, items, turn, pause), strain)
                    })
                    .await;
                let Ran {
                    value: (back, rest, turn, breach_pause),
                    cpu,
                    heavy,
                } = ran.map_err(|message| Error::Sink {
                    pipeline: unit.clone(),
                    message,
                })?;
                (stages, items) = (back, rest);
                stats.chain_turn(cpu, heavy);
                let used = TurnUse {
                    events: turn.events,
                    bytes: turn.framed.iter().map(framed_bytes).sum(),
                    cpu,
                    breach_pause,
                };
                if !to_sink.send(turn.framed).await {
                    return Ok(());
                }
                if let Some(err) = turn.halted {
                    return Err(Error::Plugin {
                        name: err.plugin,
                        path: Default::default(),
                        message: format!(
                            "unit '{}' halted: {} (quarantine action `halt`; fix the plugin \
                             and restart, or send SIGHUP once it is replaced)",
                            unit, err.message
                        ),
                    });
                }
                if let Some((why, wait)) = throttle.after_turn(&used, Instant::now()) {
                    stats.quota_wait(why, wait);
                    wait_unless_stopping(wait, &mut shutdown).await;
                }
            }
        }
        Ok(())
    }

    /// One turn: events from the front of `items` through the chain and framed, until the
    /// batch is done, [`TURN`] has passed, a plugin broke a limit (its breach pause is owed
    /// before anything else of this unit runs) or a halting plugin refused an event (the
    /// turn stops before it; the rest of the batch is never handled).
    fn turn(&mut self, items: &mut VecDeque<SourceItem>, stats: &PipelineStats) -> Turn {
        let started = Instant::now();
        let mut framed = Vec::with_capacity(items.len().min(64));
        let mut events = 0;
        while let Some(item) = items.pop_front() {
            self.apply_updates(stats);
            let event = match item {
                SourceItem::Heartbeat(token, snapshot) => {
                    framed.push(self.heartbeat(token, snapshot));
                    continue;
                }
                SourceItem::Event(event) => event,
                SourceItem::Oversize { event, size } => {
                    stats.read();
                    events += 1;
                    framed.push(if self.scope.may_see(event.change.namespace()) {
                        self.framer.oversize(&event, size, stats)
                    } else {
                        self.framer.frame(&event, Verdict::OutOfScope, stats)
                    });
                    continue;
                }
            };
            stats.read();
            events += 1;
            let verdict = if self.scope.may_see(event.change.namespace()) {
                self.chain.run(&event.change)
            } else {
                Verdict::OutOfScope
            };
            if let Verdict::Halt(err) = verdict {
                items.clear();
                return Turn {
                    framed,
                    events,
                    halted: Some(err),
                };
            }
            framed.push(self.framer.frame(&event, verdict, stats));
            if started.elapsed() >= TURN || self.chain.owes_pause() {
                break;
            }
        }
        Turn {
            framed,
            events,
            halted: None,
        }
    }

    /// A heartbeat's position, with the heartbeat message if one is due.
    fn heartbeat(
        &mut self,
        token: mongodb::change_stream::event::ResumeToken,
        snapshot: Option<crate::model::SnapshotProgress>,
    ) -> EventMessages {
        EventMessages {
            messages: self.framer.heartbeat(&token),
            token,
            snapshot,
            commit_unix_ms: None,
        }
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

/// Bytes of one event's messages: payloads and subjects (what `quota.bytes_per_sec` counts).
fn framed_bytes(event: &EventMessages) -> usize {
    event
        .messages
        .iter()
        .map(|m| m.payload.len() + m.subject.len())
        .sum()
}
