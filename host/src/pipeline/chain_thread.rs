//! The plugin thread: events through the chain and framed as messages, with hot reloads
//! swapped in between two events. Plugin calls are synchronous CPU work, so they run on an OS
//! thread of their own rather than on the async runtime.

use tokio::sync::mpsc;

use super::AbortOnDrop;
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::model::Position;
use crate::ops::telemetry::PipelineStats;
use crate::plugin::reload::ChainUpdate;
use crate::plugin::{CallError, Chain, Verdict};
use crate::sink::framer::Framer;
use crate::sink::EventMessages;
use crate::source::SourceItem;

/// The run's hold on the unit's [`crate::plugin::reload::Updates`].
pub(super) type UpdatesGuard = tokio::sync::OwnedMutexGuard<mpsc::UnboundedReceiver<ChainUpdate>>;

/// Forwards hot reloads to the plugin thread. Reloads reach the thread between two events; an
/// empty batch wakes it when the stream is idle. The weak sender never keeps the event channel
/// open on its own, and the forwarder (holding the lock on `updates`) ends with this run.
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

/// Starts the plugin thread for `chain`, framing for a server whose `max_payload` is given;
/// message ids after `start` may be as long as the one it names.
pub(super) fn spawn(
    mut chain: Chain,
    pipeline: &PipelineConfig,
    max_payload: usize,
    start: &Option<Position>,
    stages_io: (
        mpsc::Receiver<Vec<SourceItem>>,
        mpsc::Sender<Vec<EventMessages>>,
    ),
    reloads: std::sync::mpsc::Receiver<ChainUpdate>,
    stats: std::sync::Arc<PipelineStats>,
) -> Result<std::thread::JoinHandle<Result<(), Error>>, Error> {
    let id = &pipeline.id;
    cap_output_bytes(&mut chain, id, max_payload, true);
    let longest_id = start
        .as_ref()
        .and_then(|p| p.last_msg_id.as_ref())
        .map_or(0, String::len);
    let framer = Framer::new(pipeline, max_payload, longest_id)?;
    let scope = pipeline.clone();
    let (events, to_sink) = stages_io;
    std::thread::Builder::new()
        .name(format!("tidegate-chain-{id}"))
        .spawn(move || {
            let stages = ChainStages {
                chain,
                scope,
                framer,
                reloads,
            };
            stages.run(events, to_sink, &stats)
        })
        .map_err(|err| Error::Sink {
            pipeline: id.clone(),
            message: format!("cannot start plugin thread: {err}"),
        })
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
        to_sink: mpsc::Sender<Vec<EventMessages>>,
        stats: &PipelineStats,
    ) -> Result<(), Error> {
        while let Some(batch) = events.blocking_recv() {
            self.apply_updates(stats);
            if batch.is_empty() {
                continue;
            }
            let (framed, halted) = self.frame_batch(batch, stats);
            if to_sink.blocking_send(framed).is_err() {
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

    /// Runs one batch through the chain; stops before the event a halting plugin refused,
    /// returning its error beside what was framed before it.
    fn frame_batch(
        &mut self,
        batch: Vec<SourceItem>,
        stats: &PipelineStats,
    ) -> (Vec<EventMessages>, Option<CallError>) {
        let mut framed = Vec::with_capacity(batch.len());
        for item in batch {
            self.apply_updates(stats);
            let event = match item {
                SourceItem::Heartbeat(token, snapshot) => {
                    framed.push(EventMessages {
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
                return (framed, Some(err));
            }
            framed.push(self.framer.frame(&event, verdict, stats));
        }
        (framed, None)
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
