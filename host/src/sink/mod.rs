//! The JetStream side: preparing the stream, and publishing in order with a bounded window.
//!
//! # Delivery
//! Every message carries `Nats-Msg-Id = <pipeline>:<event id>:<output index>` (or
//! `…:dead-letter`), so the stream drops a message it already holds, within its duplicate
//! window. Messages are published asynchronously, at most `max_in_flight` unacknowledged, in
//! change-stream order. Each also carries `Nats-Expected-Last-Msg-Id` naming the message
//! before it, so the stream refuses to store a message whose predecessor it did not store:
//! a lost message can never leave a gap that a retry would fill out of order.
//!
//! When a publish fails (timeout, NATS down, refused), the sink stops taking new work, waits
//! with backoff, and re-publishes everything from the oldest unacknowledged message on.
//! Messages that had in fact been stored come back as duplicates and are skipped.
//!
//! A [`Unit`] is everything one source event produced (possibly nothing). The sink reports
//! a unit's resume token as the pipeline's [`Position`] only once all of its messages, and
//! all earlier units' messages, are acknowledged; only then may it be checkpointed.
//!
//! # The stream as a floor
//! The checkpoint trails the stream by up to one checkpoint interval (and a crash can come
//! before it is written). So at every start the publisher also learns the stream's own last
//! message of this unit ([`stream_tail`]); its id names the event it came from, and a
//! [`Floor`] drops what the restarted pipeline re-reads up to and including it (for a
//! multi-output event, only the outputs already stored), and the ordering chain continues
//! from it. Duplicates after a restart therefore do not depend on the duplicate window.

pub mod encode;
pub mod framer;

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use bytes::Bytes;
use mongodb::change_stream::event::ResumeToken;

use crate::config::{PipelineConfig, SinkConfig};
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::model::subject::subject_covers;
use crate::model::token::token_id;
use crate::model::Position;
use crate::ops::metrics::PipelineMetrics;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its subject.
    pub subject: String,
    /// Its `Nats-Msg-Id`.
    pub msg_id: String,
    /// Headers other than the ones the sink adds (`Nats-Msg-Id`, `Nats-Expected-Last-Msg-Id`).
    pub headers: HeaderMap,
    /// The encoded event.
    pub payload: Bytes,
}

/// Everything one source event produced, and the token to resume after it.
#[derive(Debug)]
pub struct Unit {
    /// Messages to publish, in order; empty when the event was filtered out (or for an idle
    /// heartbeat that only moves the position).
    pub messages: Vec<Message>,
    /// Resume token after this unit.
    pub token: ResumeToken,
    /// Snapshot progress after this unit, while a snapshot runs.
    pub snapshot: Option<crate::model::SnapshotProgress>,
    /// Unix milliseconds of the change's commit in MongoDB, for the end-to-end lag; `None`
    /// for heartbeats and snapshot reads.
    pub commit_unix_ms: Option<i64>,
}

/// Creates the pipeline's stream, or checks that an existing one can deduplicate and holds
/// every subject the pipeline publishes.
pub async fn prepare_stream(js: &Context, pipeline: &PipelineConfig) -> Result<(), Error> {
    let sink = &pipeline.sink;
    let fail = |message: String| Error::Sink {
        pipeline: pipeline.id.clone(),
        message,
    };
    let wanted_subject = format!("{}.>", sink.subject_prefix);
    let window = Duration::from_secs(sink.duplicate_window_secs);
    match js.get_stream(&sink.stream).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|err| fail(format!("cannot read stream '{}': {err}", sink.stream)))?;
            let config = &info.config;
            if !config
                .subjects
                .iter()
                .any(|s| subject_covers(s, &wanted_subject))
            {
                return Err(fail(format!(
                    "stream '{}' has subjects [{}], which do not cover '{wanted_subject}'; add it to \
                     the stream or change sink.subject_prefix",
                    sink.stream,
                    config.subjects.join(", ")
                )));
            }
            if config.duplicate_window < window {
                return Err(fail(format!(
                    "stream '{}' keeps message ids for {}s, less than sink.duplicate_window_secs = {}; \
                     restarts could then publish duplicates. Raise the stream's duplicate window \
                     (nats stream edit {} --dupe-window {}s) or lower the setting",
                    sink.stream,
                    config.duplicate_window.as_secs(),
                    sink.duplicate_window_secs,
                    sink.stream,
                    sink.duplicate_window_secs
                )));
            }
            if config.no_ack {
                return Err(fail(format!(
                    "stream '{}' has no_ack set, so publishes cannot be confirmed",
                    sink.stream
                )));
            }
            Ok(())
        }
        Err(err) if is_stream_not_found(&err) => {
            let config = StreamConfig {
                name: sink.stream.clone(),
                subjects: vec![wanted_subject.clone()],
                duplicate_window: window,
                storage: StorageType::File,
                ..Default::default()
            };
            if let Err(err) = js.create_stream(config).await {
                let overlapping = matches!(
                    err.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
                );
                return Err(fail(match overlapping {
                    true => overlap_message(js, &sink.stream, &wanted_subject).await,
                    false => format!("cannot create stream '{}': {err}", sink.stream),
                }));
            }
            tracing::info!(pipeline = %pipeline.id, stream = %sink.stream, subjects = %wanted_subject, "created stream");
            Ok(())
        }
        Err(err) if jetstream_off(&err) => Err(fail(format!(
            "JetStream is not enabled on the NATS server at {} (its JetStream API does not \
             answer); start nats-server with -js (or add `jetstream {{}}` to its config file), \
             and make sure this account has JetStream",
            server_address(js)
        ))),
        Err(err) => Err(fail(format!(
            "cannot look up stream '{}': {err}",
            sink.stream
        ))),
    }
}

/// The id (`Nats-Msg-Id`) of the last message stored under the pipeline's subject prefix, if
/// any: the stream's real tail, whatever the checkpoint says.
pub async fn stream_tail(js: &Context, pipeline: &PipelineConfig) -> Result<Option<String>, Error> {
    let sink = &pipeline.sink;
    let fail = |message: String| Error::Sink {
        pipeline: pipeline.id.clone(),
        message,
    };
    let stream = js
        .get_stream_no_info(&sink.stream)
        .await
        .map_err(|err| fail(format!("cannot open stream '{}': {err}", sink.stream)))?;
    let subjects = format!("{}.>", sink.subject_prefix);
    match stream.get_last_raw_message_by_subject(&subjects).await {
        Ok(message) => Ok(message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|id| id.as_str().to_string())),
        Err(err) if err.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(err) => Err(fail(format!(
            "cannot read the last message on '{subjects}' in stream '{}': {err}",
            sink.stream
        ))),
    }
}

/// The stream's last stored message of this unit, as found at start: the units the restarted
/// pipeline re-reads up to it are already stored, and [`Publisher::push`] drops them.
///
/// Ids are `<unit>:<event id>:<output>`, where the event id is the resume token's `_data`
/// (or `snapshot.<start>.<ns>.<_id>` for a snapshot read) and the output an index,
/// `dead-letter` or `heartbeat`. `_data` is MongoDB's KeyString in hex, whose byte order is
/// the change stream's order (a sharded cluster merges its shards' streams by it), so units
/// are placed before or after the tail by comparing their tokens' `_data` with the tail's.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    /// The tail's full message id.
    msg_id: String,
    /// `<unit>:<event id>:`, the prefix every message of the tail's event carries.
    event_prefix: String,
    /// The tail's output index, when it is a numbered output.
    output: Option<usize>,
    /// The tail's place in the stream order (a token's `_data`), when known: for a change
    /// event, its token; for an initial snapshot read, the snapshot's start (every read
    /// shares it, so reads are matched by id only).
    position: Option<String>,
    /// Whether the tail is a snapshot read.
    snapshot: bool,
}

/// How two tokens' `_data` compare in stream order; `None` unless both are hex KeyStrings
/// beginning with a timestamp (MongoDB 4.2+ tokens), the only shape whose order is known.
pub fn stream_order(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let keystring = |data: &str| {
        data.starts_with("82") && data.len() >= 18 && data.bytes().all(|c| c.is_ascii_hexdigit())
    };
    (keystring(a) && keystring(b)).then(|| a.to_ascii_uppercase().cmp(&b.to_ascii_uppercase()))
}

impl Floor {
    /// The floor for `msg_id`, if it is one of unit `unit`'s message ids.
    pub fn parse(unit: &str, msg_id: &str) -> Option<Floor> {
        let rest = msg_id.strip_prefix(unit)?.strip_prefix(':')?;
        let (event, output) = rest.rsplit_once(':')?;
        if event.is_empty() {
            return None;
        }
        let snapshot = event.starts_with("snapshot.");
        let position = match event.strip_prefix("snapshot.") {
            // An initial snapshot's id names its start; an incremental one's (`i…`) does not.
            Some(rest) => rest.split('.').next().map(str::to_string),
            None => Some(event.to_string()),
        };
        Some(Floor {
            msg_id: msg_id.to_string(),
            event_prefix: format!("{unit}:{event}:"),
            output: output.parse().ok(),
            position: position.filter(|p| stream_order(p, p).is_some()),
            snapshot,
        })
    }

    /// The tail's message id.
    pub fn msg_id(&self) -> &str {
        &self.msg_id
    }

    /// The cluster time of the tail's event, for a change event's tail (not a snapshot read).
    pub fn time(&self) -> Option<bson::Timestamp> {
        if self.snapshot {
            return None;
        }
        let data = self.position.as_deref()?;
        let time = u32::from_str_radix(data.get(2..10)?, 16).ok()?;
        let increment = u32::from_str_radix(data.get(10..18)?, 16).ok()?;
        Some(bson::Timestamp { time, increment })
    }

    /// Whether a pipeline resuming after `token` may re-read messages the tail holds: unless
    /// the tail lies at or before `token` in the stream's order (then the checkpointed unit,
    /// complete, ends at or after it). A snapshot read always may: reads share the token of
    /// the snapshot's start.
    pub fn lies_after(&self, token: &ResumeToken) -> bool {
        if self.snapshot {
            return true;
        }
        let tail = self.position.as_deref().unwrap_or_default();
        matches!(
            stream_order(tail, &token_id(token)),
            Some(std::cmp::Ordering::Greater) | None
        )
    }

    /// How many of `unit`'s leading messages the stream already holds, and whether the
    /// units after it lie past the tail (the floor is then done).
    fn stored(&self, unit: &Unit) -> (usize, bool) {
        if unit
            .messages
            .iter()
            .any(|m| m.msg_id.starts_with(&self.event_prefix))
        {
            // The tail's own event: its outputs up to the tail are stored.
            let stored = unit
                .messages
                .iter()
                .take_while(|m| {
                    m.msg_id == self.msg_id
                        || (m.msg_id.starts_with(&self.event_prefix)
                            && matches!(
                                (output_index(&m.msg_id), self.output),
                                (Some(i), Some(tail)) if i <= tail
                            ))
                })
                .count();
            let stored = match unit.messages.iter().position(|m| m.msg_id == self.msg_id) {
                Some(i) => stored.max(i + 1),
                None => stored,
            };
            return (stored, true);
        }
        let Some(tail) = self.position.as_deref() else {
            return (0, false);
        };
        match stream_order(&token_id(&unit.token), tail) {
            // Before the tail in the stream: stored, all of it.
            Some(std::cmp::Ordering::Less) => (unit.messages.len(), false),
            Some(std::cmp::Ordering::Greater) => (0, true),
            // Another snapshot read of the same snapshot, or an unknown order: publish it,
            // and let the duplicate window drop it if it was stored.
            _ => (0, false),
        }
    }
}

/// The output index at the end of a message id (`…:<index>`), if it is one.
fn output_index(msg_id: &str) -> Option<usize> {
    msg_id.rsplit_once(':')?.1.parse().ok()
}

// First contact: JetStream refusals as messages naming the problem and what to do.

/// Whether a stream lookup failed because JetStream is off: no one answers its API (a
/// server started without `-js`) or the server says it is not enabled (for the account).
fn jetstream_off(err: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::{GetStreamErrorKind, RequestError, RequestErrorKind};
    match err.kind() {
        GetStreamErrorKind::JetStream(e) => {
            e.error_code() == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED
                || e.error_code() == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        }
        GetStreamErrorKind::Request => std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<RequestError>())
            .is_some_and(|request| request.kind() == RequestErrorKind::NoResponders),
        _ => false,
    }
}

/// The server this client is connected to, `host:port`.
fn server_address(js: &Context) -> String {
    let info = js.client().server_info();
    format!("{}:{}", info.host, info.port)
}

/// Why JetStream refused to create stream `stream` for `wanted`: the other streams whose
/// subjects overlap it, named, and what to do.
async fn overlap_message(js: &Context, stream: &str, wanted: &str) -> String {
    let mut others = Vec::new();
    let mut streams = js.streams();
    while let Some(Ok(info)) = futures::StreamExt::next(&mut streams).await {
        let overlapping: Vec<&String> = info
            .config
            .subjects
            .iter()
            .filter(|s| subject_covers(s, wanted) || subject_covers(wanted, s))
            .collect();
        if !overlapping.is_empty() {
            others.push(format!(
                "'{}' (subjects [{}])",
                info.config.name,
                info.config
                    .subjects
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let others = match others.is_empty() {
        true => "another stream (could not list which)".to_string(),
        false => format!("stream {}", others.join(" and ")),
    };
    format!(
        "cannot create stream '{stream}' for '{wanted}': {others} already takes these \
         subjects, and JetStream lets one stream own a subject. Set sink.stream to that \
         stream to publish into it (it must cover '{wanted}'), or choose a sink.subject_prefix \
         it does not cover"
    )
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

type AckFuture =
    Pin<Box<dyn Future<Output = Result<jetstream::publish::PublishAck, PublishError>> + Send>>;

struct Slot {
    message: Message,
    ack: Option<AckFuture>,
    /// When it was (last) handed to the client.
    sent_at: Instant,
    /// Set on the last message of a unit: the position (token and snapshot progress)
    /// reached once this is acknowledged.
    advance_to: Option<(ResumeToken, Option<crate::model::SnapshotProgress>)>,
    /// Set on the last message of a unit: its change's commit time (see [`Unit`]).
    commit_unix_ms: Option<i64>,
}

/// Publishes units in order and reports the acknowledged position.
pub struct Publisher {
    js: Context,
    pipeline: String,
    max_in_flight: usize,
    slots: VecDeque<Slot>,
    /// Id of the newest message handed to the stream, the predecessor of the next one.
    last_sent_msg_id: Option<String>,
    acked: Option<Position>,
    metrics: Arc<PipelineMetrics>,
    backoff: Duration,
    /// Nothing is sent once it no longer holds.
    fence: Fence,
    /// The stream's tail at start, while the re-read units have not passed it yet.
    floor: Option<Floor>,
    /// Messages the floor found already stored.
    skipped: usize,
    /// The stream's last message at start, when there is no checkpoint to name it.
    tail_at_start: Option<String>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Publisher {
    /// A publisher continuing after `start` (the checkpoint), if any, publishing only while
    /// `fence` holds.
    pub fn new(
        js: Context,
        pipeline: &str,
        sink: &SinkConfig,
        start: Option<Position>,
        fence: Fence,
    ) -> Publisher {
        Publisher {
            js,
            pipeline: pipeline.to_string(),
            max_in_flight: sink.max_in_flight,
            slots: VecDeque::new(),
            last_sent_msg_id: start.as_ref().and_then(|p| p.last_msg_id.clone()),
            acked: start,
            metrics: crate::ops::metrics::pipeline(pipeline),
            backoff: MIN_BACKOFF,
            fence,
            floor: None,
            skipped: 0,
            tail_at_start: None,
        }
    }

    /// Continues after the stream's real last message `tail` (see [`stream_tail`]) rather
    /// than the one the checkpoint names: the ordering chain starts from it, and `floor`, if
    /// any, drops what is re-read up to it.
    pub fn continue_after(&mut self, tail: Option<String>, floor: Option<Floor>) {
        if let Some(tail) = tail {
            self.last_sent_msg_id = Some(tail.clone());
            match &mut self.acked {
                Some(position) => position.last_msg_id = Some(tail),
                None => self.tail_at_start = Some(tail),
            }
        }
        self.floor = floor;
    }

    /// The id of the newest message known to be stored: the predecessor of the oldest one
    /// in flight.
    fn stored_msg_id(&self) -> Option<String> {
        self.acked
            .as_ref()
            .and_then(|p| p.last_msg_id.clone())
            .or_else(|| self.tail_at_start.clone())
    }

    /// Messages handed to the client and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Units with messages in flight (each unit's last message carries its position).
    pub fn units_in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.advance_to.is_some()).count()
    }

    /// Whether another unit may be accepted now.
    pub fn has_room(&self) -> bool {
        self.slots.len() < self.max_in_flight
    }

    /// Whether nothing is waiting for an acknowledgement.
    pub fn is_idle(&self) -> bool {
        self.slots.is_empty()
    }

    /// The acknowledged position.
    pub fn position(&self) -> Option<&Position> {
        self.acked.as_ref()
    }

    /// Queues and publishes a unit's messages, except those the stream already holds (see
    /// [`Floor`]).
    pub async fn push(&mut self, mut unit: Unit) {
        if let Some(floor) = &self.floor {
            let (stored, passed) = floor.stored(&unit);
            if stored > 0 {
                self.skipped += stored;
                unit.messages.drain(..stored);
            }
            if passed {
                tracing::info!(
                    pipeline = %self.pipeline,
                    tail = %floor.msg_id(),
                    skipped = self.skipped,
                    "caught up with the stream's last message; publishing from here"
                );
                self.floor = None;
            }
        }
        if unit.messages.is_empty() {
            match self.slots.back_mut() {
                // Earlier messages are still in flight: move the position once they land.
                Some(last) => last.advance_to = Some((unit.token, unit.snapshot)),
                None => {
                    let last_msg_id = self.stored_msg_id();
                    self.acked = Some(Position {
                        token: unit.token,
                        last_msg_id,
                        snapshot: unit.snapshot,
                    });
                }
            }
            return;
        }
        let count = unit.messages.len();
        let mut token = Some((unit.token, unit.snapshot));
        for (i, message) in unit.messages.into_iter().enumerate() {
            let last = i + 1 == count;
            let advance_to = if last { token.take() } else { None };
            let ack = self.send(&message).await;
            self.slots.push_back(Slot {
                message,
                ack,
                sent_at: Instant::now(),
                advance_to,
                commit_unix_ms: unit.commit_unix_ms.filter(|_| last),
            });
        }
    }

    /// Sends one message; `None` when it could not even be handed to the client (the retry
    /// path treats that like a failed acknowledgement).
    async fn send(&mut self, message: &Message) -> Option<AckFuture> {
        if !self.fence.holds() {
            return None;
        }
        let mut publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(message.headers.clone())
            .message_id(&message.msg_id);
        if let Some(previous) = &self.last_sent_msg_id {
            publish = publish.expected_last_message_id(previous);
        }
        self.last_sent_msg_id = Some(message.msg_id.clone());
        match self.js.send_publish(message.subject.clone(), publish).await {
            Ok(ack) => Some(ack.into_future()),
            Err(err) => {
                tracing::debug!(pipeline = %self.pipeline, error = %err, "publish not sent");
                None
            }
        }
    }

    /// Waits for the oldest in-flight message's acknowledgement. Cancel-safe: dropping the
    /// returned future leaves the acknowledgement pending. Pass the result to
    /// [`Publisher::handle_ack`]. Never resolves once the fence is lost.
    pub async fn next_ack(&mut self) -> Result<jetstream::publish::PublishAck, PublishError> {
        if !self.fence.holds() {
            // Deposed: nothing more is sent or settled; the pipeline stops on its fence.
            return std::future::pending().await;
        }
        let Some(front) = self.slots.front_mut() else {
            return Err(PublishError::new(PublishErrorKind::Other));
        };
        let result = match front.ack.as_mut() {
            Some(ack) => ack.await,
            None => Err(PublishError::new(PublishErrorKind::Other)),
        };
        // A completed future must never be polled again.
        front.ack = None;
        result
    }

    /// Records the oldest message's acknowledgement; on failure, backs off and re-publishes
    /// everything in flight, in order.
    pub async fn handle_ack(
        &mut self,
        result: Result<jetstream::publish::PublishAck, PublishError>,
    ) {
        match result {
            Ok(ack) => {
                let latency = self.slots.front().map(|s| s.sent_at.elapsed());
                self.metrics.acked(ack.duplicate, latency);
                self.backoff = MIN_BACKOFF;
                self.pop_acked();
            }
            Err(err) => self.recover(err).await,
        }
    }

    fn pop_acked(&mut self) {
        if let Some(slot) = self.slots.pop_front() {
            if let Some(commit) = slot.commit_unix_ms {
                self.metrics.change_acked(commit);
            }
            let reached = slot.advance_to.or_else(|| {
                self.acked
                    .as_ref()
                    .map(|p| (p.token.clone(), p.snapshot.clone()))
            });
            if let Some((token, snapshot)) = reached {
                self.acked = Some(Position {
                    token,
                    last_msg_id: Some(slot.message.msg_id),
                    snapshot,
                });
            }
        }
    }

    async fn recover(&mut self, err: PublishError) {
        if !self.fence.holds() {
            // Deposed: the pipeline is stopping; nothing more may be sent.
            return;
        }
        self.metrics.retried();
        let text = error_chain(&err);
        if err.kind() == PublishErrorKind::WrongLastMessageId {
            // The stream's last message is not the predecessor we named. If it is one of
            // ours still in flight, everything up to it was stored: count those as done.
            // (Ids are derived from the events, so a new owner of the pipeline publishes the
            // same ids for the same events: if X is one of ours, the event is stored, whoever
            // stored it.)
            let stored = last_msg_id_in(&text);
            match stored
                .as_deref()
                .and_then(|id| self.slots.iter().position(|s| s.message.msg_id == id))
            {
                // Not ours, with high availability on: another instance has published past
                // us, so it owns the pipeline now. Stop; never skip ahead. (The lease keeper
                // checks whether the lease was in fact lost; see `Fence`.)
                None if self.fence.stops_on_foreign_tail() => {
                    self.fence.revoke_foreign_tail(&format!(
                        "the stream's last message ({}) was published by another instance",
                        stored.as_deref().unwrap_or("?")
                    ));
                    return;
                }
                Some(i) => {
                    for _ in 0..=i {
                        self.metrics.acked(true, None);
                        self.pop_acked();
                    }
                    self.last_sent_msg_id = stored;
                }
                None => {
                    tracing::warn!(
                        pipeline = %self.pipeline,
                        stream_last = ?stored,
                        "the stream's last message is not the one this pipeline expected (another \
                         writer, or a purge?); continuing, relying on the duplicate window alone \
                         for the next message"
                    );
                    self.last_sent_msg_id = None;
                }
            }
        } else {
            self.metrics
                .set_error(&format!("publish failed; re-publishing: {text}"));
            let client = self.js.client();
            let oldest = self.slots.front();
            tracing::warn!(
                pipeline = %self.pipeline,
                error = %text,
                kind = ?err.kind(),
                message_id = oldest.map(|s| s.message.msg_id.as_str()).unwrap_or_default(),
                subject = oldest.map(|s| s.message.subject.as_str()).unwrap_or_default(),
                waited_ms = oldest.map(|s| s.sent_at.elapsed().as_millis() as u64).unwrap_or_default(),
                connection = ?client.connection_state(),
                in_flight = self.slots.len(),
                retry_in_ms = self.backoff.as_millis() as u64,
                "publish failed; will re-publish everything unacknowledged, in order"
            );
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            // While disconnected, re-publishing would only pile copies up in the client's
            // buffer: wait for the connection first.
            while client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.last_sent_msg_id = self.stored_msg_id();
        }
        // Re-publish everything still unacknowledged, in order, chaining from
        // `last_sent_msg_id`. Messages the stream already holds come back as duplicates.
        // Slot by slot in place, so that a shutdown deadline cancelling this half-way loses
        // track of nothing.
        for i in 0..self.slots.len() {
            let message = self.slots[i].message.clone();
            let ack = self.send(&message).await;
            let slot = &mut self.slots[i];
            slot.ack = ack;
            slot.sent_at = Instant::now();
        }
    }
}

/// An error with every cause it carries, `a: b: c`; never a dangling `: ` when there is none.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Extracts `X` from a JetStream "wrong last msg ID: X" error text.
fn last_msg_id_in(text: &str) -> Option<String> {
    let start = text.find("wrong last msg ID: ")? + "wrong last msg ID: ".len();
    let id: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ')' && *c != ',')
        .collect();
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers() {
        assert!(subject_covers("cdc.>", "cdc.>"));
        assert!(subject_covers(">", "cdc.>"));
        assert!(subject_covers("*.>", "cdc.>"));
        assert!(!subject_covers("cdc.*", "cdc.>"));
        assert!(!subject_covers("cdc.a.>", "cdc.>"));
        assert!(!subject_covers("other.>", "cdc.>"));
        assert!(subject_covers("cdc.a", "cdc.a"));
    }

    fn token(data: &str) -> ResumeToken {
        crate::model::token::token_from_document(bson::doc! { "_data": data }).expect("token")
    }

    /// A unit for `data` with `outputs` numbered messages.
    fn unit(data: &str, outputs: usize) -> Unit {
        Unit {
            messages: (0..outputs)
                .map(|i| Message {
                    subject: "cdc.x".into(),
                    msg_id: format!("p:{data}:{i}"),
                    headers: HeaderMap::new(),
                    payload: Bytes::new(),
                })
                .collect(),
            token: token(data),
            snapshot: None,
            commit_unix_ms: None,
        }
    }

    const T1: &str = "8200000001000000012B0429296E1404";
    const T2: &str = "8200000002000000012B0429296E1404";
    const T3: &str = "8200000002000000022B0429296E1404";

    /// Units before the tail are stored, the tail's own unit up to its output, later units
    /// not at all; the floor is passed at the tail's unit.
    #[test]
    fn floor_skips_what_the_stream_holds() {
        let floor = Floor::parse("p", &format!("p:{T2}:1")).expect("ours");
        assert_eq!(floor.stored(&unit(T1, 2)), (2, false));
        assert_eq!(floor.stored(&unit(T2, 3)), (2, true));
        assert_eq!(floor.stored(&unit(T3, 1)), (0, true));
        assert_eq!(
            floor.time(),
            Some(bson::Timestamp {
                time: 2,
                increment: 1
            })
        );
        // Another unit's ids, or a tenant unit's, are not this unit's floor.
        assert!(Floor::parse("q", &format!("p:{T2}:1")).is_none());
        assert!(Floor::parse("p", &format!("p.t:{T2}:1")).is_none());
    }

    /// The checkpoint's own (complete) unit and anything before it need no floor.
    #[test]
    fn floor_only_past_the_checkpoint() {
        let floor = Floor::parse("p", &format!("p:{T2}:0")).expect("ours");
        assert!(floor.lies_after(&token(T1)));
        assert!(!floor.lies_after(&token(T2)));
        assert!(!floor.lies_after(&token(T3)));
        let heartbeat = Floor::parse("p", &format!("p:{T2}:heartbeat")).expect("ours");
        assert!(!heartbeat.lies_after(&token(T2)));
        assert_eq!(heartbeat.stored(&unit(T1, 1)), (1, false));
    }

    /// Snapshot reads share the snapshot's token: only the tail's own read is skipped, and
    /// the floor ends at it.
    #[test]
    fn snapshot_floor_matches_the_read_itself() {
        let tail = format!("p:snapshot.{T1}.shop.orders.5:0");
        let floor = Floor::parse("p", &tail).expect("ours");
        assert!(floor.lies_after(&token(T1)));
        assert_eq!(floor.time(), None);
        let mut read = unit(T1, 1);
        read.messages[0].msg_id = format!("p:snapshot.{T1}.shop.orders.4:0");
        assert_eq!(floor.stored(&read), (0, false));
        read.messages[0].msg_id = tail.clone();
        assert_eq!(floor.stored(&read), (1, true));
        assert_eq!(floor.stored(&unit(T2, 1)), (0, true));
    }

    #[test]
    fn error_chains_have_no_empty_detail() {
        let err = PublishError::new(PublishErrorKind::TimedOut);
        assert!(!error_chain(&err).ends_with(": "), "{}", error_chain(&err));
    }

    #[test]
    fn parses_wrong_last_msg_id() {
        assert_eq!(
            last_msg_id_in("wrong last message id: wrong last msg ID: p:82ab:0 (10071)").as_deref(),
            Some("p:82ab:0")
        );
        assert_eq!(last_msg_id_in("wrong last msg ID: "), None);
    }
}
