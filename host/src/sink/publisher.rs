//! The ordered, windowed publisher: messages sent asynchronously in change-stream order, each
//! chained to its predecessor, acknowledgements settled oldest first, and on a failure a
//! backoff and a re-publish of everything unacknowledged.
//!
//! One publisher writes one stream, and the ordering chain is the stream's. A pipeline's own
//! stream has one unit ([`Publisher::new`]); a stream shared by a pipeline's tenants has one
//! publisher for all of them ([`Publisher::for_stream`], driven by `sink::shared`), each
//! tenant run a unit of it with its own floor and acknowledged position: a tenant's position
//! moves once its messages, and every message before them in the stream, are stored.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Context};
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::watch;

use super::{EventMessages, Floor, Message};
use crate::config::SinkConfig;
use crate::ha::fence::Fence;
use crate::model::Position;
use crate::ops::metrics::PipelineMetrics;

type AckFuture =
    Pin<Box<dyn Future<Output = Result<jetstream::publish::PublishAck, PublishError>> + Send>>;

/// A unit of a publisher: the pipeline itself for its own stream ([`OWN`]), or one run of a
/// tenant unit on a shared stream (a new key per run, so a run that ended with messages in
/// flight never moves the next run's position).
pub type UnitKey = u64;

/// The one unit of a pipeline's own publisher.
const OWN: UnitKey = 0;

struct Slot {
    /// Whose message it is.
    unit: UnitKey,
    /// Its place in the publisher's sequence of slots (see [`UnitState::last_slot`]).
    seq: u64,
    /// The message, headers packed as the framer built them: each send makes the client's
    /// `HeaderMap` from them (a kept map, cloned per send and dropped per ack, cost more than
    /// a tenth of the no-plugin path's CPU).
    message: Message,
    ack: Option<AckFuture>,
    /// When it was (last) handed to the client.
    sent_at: Instant,
    /// Set on an event's last message: the position (token and snapshot progress)
    /// reached once this is acknowledged.
    advance_to: Option<(ResumeToken, Option<crate::model::SnapshotProgress>)>,
    /// The unit's events settled once this is acknowledged: its own event (on its last
    /// message) and the events without messages pushed after it.
    settles: u64,
    /// Set on an event's last message: its change's commit time (see [`EventMessages`]).
    commit_unix_ms: Option<i64>,
}

/// What a unit of a shared stream learns of its messages (see `sink::shared`).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The acknowledged position.
    pub acked: Option<Position>,
    /// Events pushed whose position has been reached (stored, or found stored, or without
    /// messages and after stored ones).
    pub settled: u64,
    /// Messages handed to the client and not yet acknowledged.
    pub in_flight: usize,
    /// Events with messages in flight.
    pub events_in_flight: usize,
}

/// One unit's share of the publisher.
struct UnitState {
    /// The unit's id, for logs.
    id: String,
    metrics: Arc<PipelineMetrics>,
    /// The stream's tail at start, while the re-read events have not passed it yet.
    floor: Option<Floor>,
    /// Messages the floor found already stored.
    skipped: usize,
    /// The sequence number of its newest slot, while that is in flight.
    last_slot: Option<u64>,
    progress: Progress,
    /// Where the progress is posted, for a unit of a shared stream.
    posted: Option<watch::Sender<Progress>>,
    /// The run is over: forgotten once its last message in flight settles.
    closed: bool,
    /// Its progress changed since it was last posted.
    changed: bool,
}

/// Publishes events' messages in order and reports the acknowledged position.
pub struct Publisher {
    js: Context,
    /// The pipeline whose stream this is, for logs.
    pipeline: String,
    max_in_flight: usize,
    slots: VecDeque<Slot>,
    /// The sequence number the next slot gets.
    next_seq: u64,
    /// Id of the newest message handed to the stream, the predecessor of the next one.
    last_sent_msg_id: Option<String>,
    /// Id of the newest message known to be stored: the predecessor of the oldest one in
    /// flight.
    stored_msg_id: Option<String>,
    units: HashMap<UnitKey, UnitState>,
    /// Units of a shared stream whose progress changed since [`Publisher::post_progress`].
    changed: Vec<UnitKey>,
    backoff: Duration,
    /// Nothing is sent once it no longer holds.
    fence: Fence,
    /// The NATS server's `max_payload`, which every message was framed to fit.
    max_payload: usize,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Publisher {
    /// A publisher of pipeline `pipeline`'s own stream, continuing after `start` (the
    /// checkpoint), if any, publishing only while `fence` holds.
    pub fn new(
        js: Context,
        pipeline: &str,
        sink: &SinkConfig,
        start: Option<Position>,
        fence: Fence,
    ) -> Publisher {
        let stored = start.as_ref().and_then(|p| p.last_msg_id.clone());
        let mut publisher = Publisher::for_stream(js, pipeline, sink.max_in_flight, stored, fence);
        publisher.open_unit(OWN, pipeline, start, None, None);
        publisher
    }

    /// A publisher of a stream whose last stored message is `tail`, shared by pipeline
    /// `pipeline`'s units (none yet: see [`Publisher::open_unit`]).
    pub(crate) fn for_stream(
        js: Context,
        pipeline: &str,
        max_in_flight: usize,
        tail: Option<String>,
        fence: Fence,
    ) -> Publisher {
        let max_payload = match js.client().server_info().max_payload {
            0 => super::framer::DEFAULT_MAX_PAYLOAD,
            n => n,
        };
        Publisher {
            js,
            max_payload,
            pipeline: pipeline.to_string(),
            max_in_flight,
            slots: VecDeque::new(),
            next_seq: 0,
            last_sent_msg_id: tail.clone(),
            stored_msg_id: tail,
            units: HashMap::new(),
            changed: Vec::new(),
            backoff: MIN_BACKOFF,
            fence,
        }
    }

    /// Adds unit `key` (unit `id`), continuing after `start`, dropping what it re-reads up
    /// to `floor`, and posting its progress to `posted`, if given.
    pub(crate) fn open_unit(
        &mut self,
        key: UnitKey,
        id: &str,
        start: Option<Position>,
        floor: Option<Floor>,
        posted: Option<watch::Sender<Progress>>,
    ) {
        let unit = UnitState {
            id: id.to_string(),
            metrics: crate::ops::metrics::pipeline(id),
            floor,
            skipped: 0,
            last_slot: None,
            progress: Progress {
                acked: start,
                ..Progress::default()
            },
            posted,
            closed: false,
            changed: false,
        };
        self.units.insert(key, unit);
    }

    /// Posts the progress of every unit whose progress changed (once per batch of
    /// acknowledgements, not per message: each post wakes the unit's drain).
    pub(crate) fn post_progress(&mut self) {
        for key in self.changed.drain(..) {
            if let Some(unit) = self.units.get_mut(&key) {
                unit.changed = false;
                if let Some(posted) = &unit.posted {
                    posted.send_replace(unit.progress.clone());
                }
            }
        }
    }

    /// Ends unit `key`'s run: it is forgotten once none of its messages is in flight (those
    /// still are go on, in their place in the stream's order).
    pub(crate) fn close_unit(&mut self, key: UnitKey) {
        if let Some(unit) = self.units.get_mut(&key) {
            unit.closed = true;
            unit.posted = None;
            if unit.progress.in_flight == 0 {
                self.units.remove(&key);
            }
        }
    }

    /// Continues after the stream's real last message `tail` (see `sink::stream_tail`) rather
    /// than the one the checkpoint names: the ordering chain starts from it, and `floor`, if
    /// any, drops what is re-read up to it.
    pub fn continue_after(&mut self, tail: Option<String>, floor: Option<Floor>) {
        let Some(unit) = self.units.get_mut(&OWN) else {
            return;
        };
        if let Some(tail) = tail {
            self.last_sent_msg_id = Some(tail.clone());
            self.stored_msg_id = Some(tail.clone());
            if let Some(position) = &mut unit.progress.acked {
                position.last_msg_id = Some(tail);
            }
        }
        unit.floor = floor;
    }

    /// Messages handed to the client and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Events with messages in flight (each event's last message carries its position).
    pub fn events_in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.advance_to.is_some()).count()
    }

    /// Whether another event's messages may be accepted now.
    pub fn has_room(&self) -> bool {
        self.slots.len() < self.max_in_flight
    }

    /// Whether nothing is waiting for an acknowledgement.
    pub fn is_idle(&self) -> bool {
        self.slots.is_empty()
    }

    /// The acknowledged position (of the pipeline's own stream).
    pub fn position(&self) -> Option<&Position> {
        self.units.get(&OWN)?.progress.acked.as_ref()
    }

    /// Queues and publishes an event's messages, except those the stream already holds (see
    /// `sink::Floor`).
    pub async fn push(&mut self, event: EventMessages) {
        self.push_for(OWN, event).await
    }

    /// [`Publisher::push`] for unit `key` (nothing happens for a unit not open).
    pub(crate) async fn push_for(&mut self, key: UnitKey, mut event: EventMessages) {
        // A closed unit's run is over (a chain stage pushing past its drain may still be
        // finishing): nothing more of it is sent.
        let Some(unit) = self.units.get_mut(&key).filter(|unit| !unit.closed) else {
            return;
        };
        if let Some(floor) = &unit.floor {
            let (stored, passed) = floor.stored(&event);
            if stored > 0 {
                unit.skipped += stored;
                event.messages.drain(..stored);
            }
            if passed {
                tracing::info!(
                    pipeline = %unit.id,
                    tail = %floor.msg_id(),
                    skipped = unit.skipped,
                    "caught up with the stream's last message; publishing from here"
                );
                unit.floor = None;
            }
        }
        if event.messages.is_empty() {
            let front = self.slots.front().map(|s| s.seq);
            let last = unit
                .last_slot
                .zip(front)
                .and_then(|(seq, front)| usize::try_from(seq.checked_sub(front)?).ok())
                .and_then(|index| self.slots.get_mut(index));
            match last {
                // Earlier messages are still in flight: move the position once they land.
                Some(last) => {
                    last.advance_to = Some((event.token, event.snapshot));
                    last.settles += 1;
                }
                None => {
                    unit.progress.acked = Some(Position {
                        token: event.token,
                        last_msg_id: self.stored_msg_id.clone(),
                        snapshot: event.snapshot,
                    });
                    unit.progress.settled += 1;
                    if unit.posted.is_some() && !unit.changed {
                        unit.changed = true;
                        self.changed.push(key);
                    }
                }
            }
            return;
        }
        let count = event.messages.len();
        unit.progress.in_flight += count;
        unit.progress.events_in_flight += 1;
        unit.last_slot = Some(self.next_seq + count as u64 - 1);
        let mut token = Some((event.token, event.snapshot));
        for (i, message) in event.messages.into_iter().enumerate() {
            let last = i + 1 == count;
            let advance_to = if last { token.take() } else { None };
            let ack = self.send(&message).await;
            let seq = self.next_seq;
            self.next_seq += 1;
            self.slots.push_back(Slot {
                unit: key,
                seq,
                message,
                ack,
                sent_at: Instant::now(),
                advance_to,
                settles: u64::from(last),
                commit_unix_ms: event.commit_unix_ms.filter(|_| last),
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
            .headers(message.headers.to_map())
            .message_id(&message.msg_id);
        if let Some(previous) = &self.last_sent_msg_id {
            if self.predecessor_fits(message, previous) {
                publish = publish.expected_last_message_id(previous);
            }
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

    /// Whether `message` still fits the server's `max_payload` once it names `previous` as
    /// its predecessor. The framer sized it for the longest id it knew (at least
    /// `EXPECTED_ID_ALLOWANCE`); on a stream shared by tenants, another tenant may have framed
    /// a longer one since. Such a message is sent without the header, rather than make the
    /// server close the connection every unit shares: only it goes unguarded by the chain.
    fn predecessor_fits(&self, message: &Message, previous: &str) -> bool {
        let budgeted = super::framer::EXPECTED_ID_ALLOWANCE.max(message.msg_id.len());
        if previous.len() <= budgeted
            || super::framer::wire_size(message, previous.len()).total() <= self.max_payload
        {
            return true;
        }
        tracing::warn!(
            pipeline = %self.pipeline,
            message_id = %message.msg_id,
            predecessor_bytes = previous.len(),
            "a message would outgrow max_payload naming its predecessor's long id: sent \
             without Nats-Expected-Last-Msg-Id (the duplicate window still applies)"
        );
        false
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
                if let Some(front) = self.slots.front() {
                    if let Some(unit) = self.units.get(&front.unit) {
                        unit.metrics
                            .acked(ack.duplicate, Some(front.sent_at.elapsed()));
                    }
                }
                self.backoff = MIN_BACKOFF;
                self.pop_acked();
            }
            Err(err) => self.recover(err).await,
        }
    }

    /// Settles the oldest message: it is stored.
    fn pop_acked(&mut self) {
        let Some(slot) = self.slots.pop_front() else {
            return;
        };
        self.stored_msg_id = Some(slot.message.msg_id.clone());
        let Some(unit) = self.units.get_mut(&slot.unit) else {
            return;
        };
        if let Some(commit) = slot.commit_unix_ms {
            unit.metrics.change_acked(commit);
        }
        let progress = &mut unit.progress;
        let reached = slot.advance_to.or_else(|| {
            progress
                .acked
                .as_ref()
                .map(|p| (p.token.clone(), p.snapshot.clone()))
        });
        if let Some((token, snapshot)) = reached {
            progress.acked = Some(Position {
                token,
                last_msg_id: Some(slot.message.msg_id),
                snapshot,
            });
        }
        progress.settled += slot.settles;
        progress.in_flight = progress.in_flight.saturating_sub(1);
        if slot.settles > 0 {
            progress.events_in_flight = progress.events_in_flight.saturating_sub(1);
        }
        if unit.last_slot == Some(slot.seq) {
            unit.last_slot = None;
        }
        if unit.closed && progress.in_flight == 0 {
            self.units.remove(&slot.unit);
        } else if unit.posted.is_some() && !unit.changed {
            unit.changed = true;
            self.changed.push(slot.unit);
        }
    }

    /// The units with messages in flight.
    fn units_in_flight(&self) -> impl Iterator<Item = &UnitState> {
        self.units.values().filter(|u| u.progress.in_flight > 0)
    }

    async fn recover(&mut self, err: PublishError) {
        if !self.fence.holds() {
            // Deposed: the pipeline is stopping; nothing more may be sent.
            return;
        }
        for unit in self.units_in_flight() {
            unit.metrics.retried();
        }
        let text = error_chain(&err);
        if err.kind() == PublishErrorKind::WrongLastMessageId {
            if !self.skip_stored(&text) {
                return;
            }
        } else {
            for unit in self.units_in_flight() {
                unit.metrics
                    .set_error(&format!("publish failed; re-publishing: {text}"));
            }
            let client = self.js.client();
            let oldest = self.slots.front();
            tracing::warn!(
                pipeline = %self.pipeline,
                unit = oldest.and_then(|s| self.units.get(&s.unit)).map(|u| u.id.as_str()).unwrap_or_default(),
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
            self.last_sent_msg_id = self.stored_msg_id.clone();
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

    /// Settles a refusal naming another last message than the predecessor we named, from its
    /// `text`; `false` when the pipeline must stop (another instance owns it now).
    fn skip_stored(&mut self, text: &str) -> bool {
        // The stream's last message is not the predecessor we named. If it is one of
        // ours still in flight, everything up to it was stored: count those as done.
        // (Ids are derived from the events, so a new owner of the pipeline publishes the
        // same ids for the same events: if X is one of ours, the event is stored, whoever
        // stored it.)
        let stored = last_msg_id_in(text);
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
                return false;
            }
            Some(i) => {
                for _ in 0..=i {
                    if let Some(unit) = self.slots.front().and_then(|s| self.units.get(&s.unit)) {
                        unit.metrics.acked(true, None);
                    }
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
        true
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
