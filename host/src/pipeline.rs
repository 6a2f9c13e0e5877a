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
//! Shutdown: the source stops reading, the chain finishes what it has, the sink publishes
//! and settles every unit it was given, and the final position is checkpointed.

use std::collections::VecDeque;
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
use crate::sink::{self, Message, Position, Publisher, Unit};
use crate::source::{self, SourceItem};
use crate::telemetry::PipelineStats;

/// Batches (of up to `source::HANDOFF_BATCH` events) read ahead of the plugin chain: several
/// change-stream batches, so the next getMore overlaps plugin and publish work.
const SOURCE_QUEUE_BATCHES: usize = 16;

/// Batches of units framed ahead of the publisher.
const UNIT_QUEUE_BATCHES: usize = 4;

/// NATS's default `max_payload`, assumed if the server did not say.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

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
    let mongo = crate::security::mongo_client(&pipeline.mongodb_uri)
        .await
        .map_err(|err| Error::Source {
            pipeline: id.clone(),
            message: format!("invalid MongoDB URI: {err}"),
        })?;
    source::check_images(&mongo, &pipeline).await?;
    sink::prepare_stream(&js, &pipeline).await?;
    // Known only once connected (the client may have started before NATS was up).
    let max_payload = match js.client().server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        n => n,
    };
    let checkpoints =
        CheckpointStore::open(&pipeline.checkpoint, &id, &js, &mongo, fence.clone()).await?;
    let start = checkpoints.load().await?;
    match &start {
        Some(_) => tracing::info!(pipeline = %id, "resuming after checkpoint"),
        None => tracing::info!(pipeline = %id, "no checkpoint: starting from now"),
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
    let framer = Framer::new(&pipeline, max_payload)?;
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
    let mut saved = start;
    let mut checkpoint_timer =
        tokio::time::interval(Duration::from_millis(pipeline.checkpoint.interval_ms));
    let summary_every = Duration::from_secs(30);
    let mut summary_timer =
        tokio::time::interval_at(tokio::time::Instant::now() + summary_every, summary_every);
    let mut outcome: Result<(), Error> = Ok(());
    let mut inputs_open = true;
    // Units received but not yet published, waiting for room in the window.
    let mut backlog: VecDeque<Unit> = VecDeque::new();

    loop {
        while publisher.has_room() {
            let Some(unit) = backlog.pop_front() else {
                break;
            };
            publisher.push(unit).await;
        }
        if !inputs_open && backlog.is_empty() && publisher.is_idle() {
            break;
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
                // Settle acknowledgements that have already arrived without another turn of
                // the loop.
                while !publisher.is_idle() {
                    match publisher.next_ack().now_or_never() {
                        Some(result) => publisher.handle_ack(result).await,
                        None => break,
                    }
                }
            }
            _ = checkpoint_timer.tick() => {
                save_if_moved(&checkpoints, publisher.position(), &mut saved).await;
            }
            _ = summary_timer.tick() => stats.log(),
            _ = fence.lost() => {
                let _ = source_stop_tx.send(true);
                outcome = Err(Error::Fenced { pipeline: id.clone(), message: fence.reason() });
                break;
            }
        }
    }
    // Unblocks the chain thread if the loop ended early (fenced).
    drop(unit_rx);
    save_if_moved(&checkpoints, publisher.position(), &mut saved).await;
    stats.log();
    // The loop ends once the chain's input closed, i.e. once the source task returned: by
    // shutdown, or with a fatal error that everything read before it was published ahead of.
    // (When fenced, the source is still stopping: await it before blocking on the thread.)
    let source_result = source_task.await.unwrap_or_else(|err| {
        Err(Error::Source {
            pipeline: id.clone(),
            message: format!("source task failed: {err}"),
        })
    });
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

/// Aborts a task when dropped, on every way out of a function.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn save_if_moved(
    checkpoints: &CheckpointStore,
    position: Option<&Position>,
    saved: &mut Option<Position>,
) {
    let Some(position) = position else { return };
    if saved.as_ref() == Some(position) {
        return;
    }
    match checkpoints.save(position).await {
        Ok(()) => *saved = Some(position.clone()),
        // Deposed: the pipeline is stopping (the lease keeper logs why).
        Err(Error::Fenced { .. }) => {}
        // The position is kept and saved on the next tick; a crash meanwhile only replays
        // events JetStream deduplicates.
        Err(err) => {
            crate::metrics::pipeline(checkpoints.pipeline()).set_error(&err.to_string());
            tracing::warn!(error = %err, "checkpoint not saved; will retry")
        }
    }
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
                };
                stats.read();
                let verdict = if self.scope.may_see(&event.change.namespace) {
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
struct Framer {
    pipeline: String,
    subjects: SubjectTemplate,
    dead_letter_subject: String,
    encoding: Encoding,
    max_payload: usize,
    /// The headers every message starts with, built once.
    common_headers: HeaderMap,
    /// `heartbeat_publish_ms`, and when the last heartbeat message was framed.
    heartbeat_every: Option<std::time::Duration>,
    last_heartbeat: Option<std::time::Instant>,
    heartbeat_subject: String,
}

impl Framer {
    fn new(pipeline: &PipelineConfig, max_payload: usize) -> Result<Framer, Error> {
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
        vec![Message {
            subject: self.heartbeat_subject.clone(),
            msg_id: format!(
                "{}:{}:heartbeat",
                self.pipeline,
                crate::event::token_id(token)
            ),
            headers: self.headers(),
            payload: payload.to_string().into(),
        }]
    }

    fn frame(&self, event: &SourceEvent, verdict: Verdict, stats: &PipelineStats) -> Unit {
        let change = &event.change;
        let outputs = match verdict {
            Verdict::DeadLetter(err) => {
                return Unit {
                    messages: vec![self.dead_letter(event, &err, stats)],
                    token: event.token.clone(),
                    snapshot: event.snapshot.clone(),
                    commit_unix_ms: event.change.commit_unix_ms(),
                }
            }
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
                Ok(payload) if payload.len() + 1024 <= self.max_payload => payload,
                Ok(payload) => {
                    let err = CallError {
                        plugin: String::new(),
                        plugin_hash: String::new(),
                        kind: "too-large".into(),
                        message: format!(
                            "encoded event is {} bytes; the NATS server accepts at most {}",
                            payload.len(),
                            self.max_payload
                        ),
                    };
                    return Unit {
                        messages: vec![self.dead_letter(event, &err, stats)],
                        token: event.token.clone(),
                        snapshot: event.snapshot.clone(),
                        commit_unix_ms: event.change.commit_unix_ms(),
                    };
                }
                Err(message) => {
                    let err = CallError {
                        plugin: String::new(),
                        plugin_hash: String::new(),
                        kind: "encoding".into(),
                        message,
                    };
                    return Unit {
                        messages: vec![self.dead_letter(event, &err, stats)],
                        token: event.token.clone(),
                        snapshot: event.snapshot.clone(),
                        commit_unix_ms: event.change.commit_unix_ms(),
                    };
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
            messages.push(Message {
                subject,
                msg_id: format!("{}:{}:{index}", self.pipeline, change.id),
                headers,
                payload: payload.into(),
            });
        }
        Unit {
            messages,
            token: event.token.clone(),
            snapshot: event.snapshot.clone(),
            commit_unix_ms: event.change.commit_unix_ms(),
        }
    }

    /// The original event, to the dead-letter subject, with the reason in headers. If even
    /// the original is too large, its documents are left out (the key still identifies it).
    fn dead_letter(&self, event: &SourceEvent, err: &CallError, stats: &PipelineStats) -> Message {
        stats.dead_lettered(&err.plugin, &err.kind);
        tracing::warn!(
            pipeline = %self.pipeline,
            plugin = %err.plugin,
            kind = %err.kind,
            error = %err.message,
            event = %event.change.id,
            "event dead-lettered"
        );
        let mut payload = encode::payload(&event.change, self.encoding).unwrap_or_default();
        if payload.is_empty() || payload.len() + 4096 > self.max_payload {
            let mut slim = event.change.clone();
            slim.full_document = None;
            slim.full_document_before_change = None;
            slim.update_description = None;
            payload = encode::payload(&slim, self.encoding).unwrap_or_default();
        }
        let mut headers = self.headers();
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(1000)
                .collect()
        };
        headers.insert("Tidegate-Error-Kind", clean(&err.kind).as_str());
        headers.insert("Tidegate-Error", clean(&err.message).as_str());
        if !err.plugin.is_empty() {
            headers.insert("Tidegate-Plugin", clean(&err.plugin).as_str());
            headers.insert("Tidegate-Plugin-Hash", clean(&err.plugin_hash).as_str());
        }
        headers.insert(
            "Tidegate-Original-Subject",
            self.subjects.render(&event.change).as_str(),
        );
        Message {
            subject: self.dead_letter_subject.clone(),
            msg_id: format!("{}:{}:dead-letter", self.pipeline, event.change.id),
            headers,
            payload: payload.into(),
        }
    }
}
