//! A stream shared by a pipeline's tenants: one publisher, and so one ordering chain, for
//! all of them.
//!
//! ```text
//!  tenant a: drain ─┐  (events, by tenant)            ┌─▶ a's progress (position, settled)
//!  tenant b: drain ─┼──────────────▶ publisher task ──┼─▶ b's progress
//!  tenant c: drain ─┘                 (one chain)     └─▶ …           └─▶ JetStream stream
//! ```
//!
//! A thousand streams cost nats-server about three times the CPU per message of one stream
//! holding a subject space per tenant (BENCHMARKS.md, "A stream per tenant or one shared"),
//! so tenants without a sink of their own publish into their pipeline's stream, each under
//! `<pipeline prefix>.<tenant id>`. `Nats-Expected-Last-Msg-Id` guards a whole stream, not a
//! subject space: two writers would break each other's chain. So the stream has one
//! [`Publisher`], run by a task of its own; each tenant run is a unit of it ([`Handle`]),
//! with its own floor (its last message under its own subjects) and its own acknowledged
//! position, posted back as [`Progress`]. A failure re-publishes everything in flight, every
//! tenant's, in order.
//!
//! The publisher lives while any tenant run holds a handle, and one stream has at most one
//! at a time: a new one (the next high-availability term) starts only once the last one has
//! stopped sending.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use async_nats::jetstream::{self, Context};
use futures::FutureExt;
use tokio::sync::{mpsc, watch};

use super::publisher::{Progress, UnitKey};
use super::{EventMessages, Floor, Publisher};
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::model::Position;

/// What a tenant run asks of its stream's publisher task.
enum Request {
    Open {
        key: UnitKey,
        id: String,
        start: Option<Position>,
        floor: Option<Floor>,
        progress: watch::Sender<Progress>,
    },
    Push {
        key: UnitKey,
        event: EventMessages,
    },
    Close {
        key: UnitKey,
    },
}

/// One shared stream's publisher task.
pub struct SharedStream {
    requests: mpsc::UnboundedSender<Request>,
    next_key: AtomicU64,
    max_in_flight: usize,
    /// The longest message id any unit has framed for this stream: a message's
    /// `Nats-Expected-Last-Msg-Id` names its predecessor, which may be another tenant's.
    longest_id: Arc<AtomicUsize>,
    /// Dropped with the last handle: the task stops sending at once.
    _gone: watch::Sender<()>,
}

/// The running shared streams, by (pipeline id, stream name): the publisher, and a lock the
/// task holds while it runs.
type Registry = tokio::sync::Mutex<
    HashMap<(String, String), (Weak<SharedStream>, Arc<tokio::sync::Mutex<()>>)>,
>;

fn registry() -> &'static Registry {
    static STREAMS: OnceLock<Registry> = OnceLock::new();
    STREAMS.get_or_init(Registry::default)
}

/// The publisher of tenant unit `unit`'s shared stream (`sink.shared_prefix` is set),
/// started on first use, publishing while `fence` holds.
pub(crate) async fn shared_stream(
    js: &Context,
    unit: &PipelineConfig,
    fence: Fence,
) -> Result<Arc<SharedStream>, Error> {
    let pipeline = unit.pipeline_id();
    let key = (pipeline.to_string(), unit.sink.stream.clone());
    let mut streams = registry().lock().await;
    if let Some(running) = streams.get(&key).and_then(|(running, _)| running.upgrade()) {
        return Ok(running);
    }
    let life = streams
        .get(&key)
        .map(|(_, life)| life.clone())
        .unwrap_or_default();
    // The previous task (of an earlier term) stops sending as soon as its last handle is
    // gone; wait for it, so that the stream never has two writers.
    let running = life.clone().lock_owned().await;
    let tail = super::stream::last_message_under(js, &unit.sink.stream, unit.sink.stream_prefix())
        .await
        .map_err(|message| Error::Sink {
            pipeline: unit.id.clone(),
            message,
        })?;
    let publisher =
        Publisher::for_stream(js.clone(), pipeline, unit.sink.max_in_flight, tail, fence);
    let (requests, requests_rx) = mpsc::unbounded_channel();
    let (gone, gone_rx) = watch::channel(());
    tokio::spawn(async move {
        let _running = running;
        // Stops sending at once when the last handle is gone, wherever the task is.
        let mut gone = gone_rx;
        tokio::select! {
            _ = gone.changed() => {}
            () = drive(publisher, requests_rx) => {}
        }
    });
    let stream = Arc::new(SharedStream {
        requests,
        next_key: AtomicU64::new(1),
        max_in_flight: unit.sink.max_in_flight,
        longest_id: Arc::default(),
        _gone: gone,
    });
    // Forgotten once stopped: neither a handle nor a task is left.
    streams.retain(|_, (running, life)| running.strong_count() > 0 || life.try_lock().is_err());
    streams.insert(key, (Arc::downgrade(&stream), life));
    tracing::info!(pipeline, stream = %unit.sink.stream, "one publisher for the tenants' shared stream");
    Ok(stream)
}

/// The publisher task: takes each unit's events, in order, as the window has room, and
/// settles acknowledgements (a failure backs off and re-publishes).
async fn drive(mut publisher: Publisher, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut waiting = std::collections::VecDeque::new();
    loop {
        while publisher.has_room() {
            let Some((key, event)) = waiting.pop_front() else {
                break;
            };
            publisher.push_for(key, event).await;
        }
        // What the pushes and the acknowledgements settled, posted once per turn.
        publisher.post_progress();
        tokio::select! {
            request = requests.recv(), if waiting.is_empty() || publisher.has_room() => {
                match request {
                    Some(Request::Open { key, id, start, floor, progress }) => {
                        publisher.open_unit(key, &id, start, floor, Some(progress));
                    }
                    Some(Request::Push { key, event }) => waiting.push_back((key, event)),
                    Some(Request::Close { key }) => {
                        // Its events not yet sent are not sent: the run is over, and its
                        // position never reaches them.
                        waiting.retain(|(k, _)| *k != key);
                        publisher.close_unit(key);
                    }
                    None => return,
                }
            }
            result = publisher.next_ack(), if !publisher.is_idle() => {
                publisher.handle_ack(result).await;
                while !publisher.is_idle() {
                    match publisher.next_ack().now_or_never() {
                        Some(result) => publisher.handle_ack(result).await,
                        None => break,
                    }
                }
            }
        }
    }
}

impl SharedStream {
    /// A unit of the stream for the run of tenant unit `unit` (its id), continuing after
    /// `start` and dropping what it re-reads up to `floor`.
    pub(crate) fn open(
        self: &Arc<Self>,
        unit: &str,
        start: Option<Position>,
        floor: Option<Floor>,
    ) -> Handle {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (progress_tx, progress) = watch::channel(Progress {
            acked: start.clone(),
            ..Progress::default()
        });
        let _ = self.requests.send(Request::Open {
            key,
            id: unit.to_string(),
            start,
            floor,
            progress: progress_tx,
        });
        Handle {
            stream: self.clone(),
            key,
            progress,
            counts: Arc::default(),
        }
    }

    /// The longest message id framed for the stream so far, shared by its units' framers.
    pub(crate) fn longest_id(&self) -> Arc<AtomicUsize> {
        self.longest_id.clone()
    }
}

/// One tenant run's share of a shared stream: what [`Publisher`] is to a pipeline's own
/// stream.
pub struct Handle {
    stream: Arc<SharedStream>,
    key: UnitKey,
    progress: watch::Receiver<Progress>,
    /// Shared with the run's [`Direct`], if any.
    counts: Arc<Counts>,
}

/// What a run's drain and its chain stage's [`Direct`] both push, counted.
#[derive(Default)]
struct Counts {
    /// Events pushed, by either.
    submitted: AtomicU64,
    /// Events the chain stage handed to the drain that the drain has not pushed yet.
    queued: AtomicUsize,
}

/// Unsettled events of a unit that has pushed `submitted` and is at `progress`.
fn unsettled(counts: &Counts, progress: &watch::Receiver<Progress>) -> u64 {
    // `settled` first: the publisher never settles more than was pushed before it read them.
    let settled = progress.borrow().settled;
    counts
        .submitted
        .load(Ordering::Acquire)
        .saturating_sub(settled)
}

impl Handle {
    fn unsettled(&self) -> u64 {
        unsettled(&self.counts, &self.progress)
    }

    /// Whether another event may be pushed: at most `max_in_flight` of the unit's events
    /// are waiting for the publisher at once.
    pub fn has_room(&self) -> bool {
        self.unsettled() < self.stream.max_in_flight as u64
    }

    /// Hands an event's messages to the stream's publisher: one the chain stage handed to
    /// the drain (see [`Direct`]).
    pub fn push(&mut self, event: EventMessages) {
        self.counts.submitted.fetch_add(1, Ordering::AcqRel);
        let _ = self.stream.requests.send(Request::Push {
            key: self.key,
            event,
        });
        // After the send: a chain stage that sees nothing queued pushes behind it.
        let _ = self
            .counts
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                Some(queued.saturating_sub(1))
            });
    }

    /// The way for the run's chain stage to push past the drain.
    pub fn direct(&self) -> Direct {
        Direct {
            stream: Arc::downgrade(&self.stream),
            key: self.key,
            progress: self.progress.clone(),
            counts: self.counts.clone(),
        }
    }

    /// Whether every event pushed is settled.
    pub fn is_idle(&self) -> bool {
        self.unsettled() == 0
    }

    /// Waits until the publisher posts new progress; `false` once the publisher is gone
    /// (its task ended while this run still holds a handle: a bug, reported rather than
    /// waited on). Cancel-safe.
    pub async fn changed(&mut self) -> bool {
        self.progress.changed().await.is_ok()
    }

    /// [`Handle::changed`] if it would not wait: `Some(true)` for new progress (now seen),
    /// `Some(false)` for a publisher gone, `None` for nothing new. Without a wait made and
    /// dropped, which a drain asking after every settlement would otherwise pay per event.
    pub fn changed_now(&mut self) -> Option<bool> {
        match self.progress.has_changed() {
            Ok(true) => {
                self.progress.borrow_and_update();
                Some(true)
            }
            Ok(false) => None,
            // Closed: what was posted last, if not seen yet, before the end.
            Err(_) => self.changed().now_or_never(),
        }
    }

    /// The acknowledged position.
    pub fn position(&self) -> Option<Position> {
        self.progress.borrow().acked.clone()
    }

    /// Whether the publisher is gone (its task ended while this run holds a handle).
    pub fn is_gone(&self) -> bool {
        self.progress.has_changed().is_err()
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.progress.borrow().in_flight
    }

    /// Events with messages in flight.
    pub fn events_in_flight(&self) -> usize {
        self.progress.borrow().events_in_flight
    }
}

/// A tenant run's chain stage pushing its framed events straight to the shared stream's
/// publisher, past the run's drain, while the drain holds none of its events and the unit's
/// window has room for them: the drain then steps aside, as the lane does for the chain
/// stage (`pipeline::inlet`), and an event costs its tenant one task's wake-up fewer. The
/// publisher settles and posts the progress either way; the drain still reads it for the
/// checkpoint, and waits for it to drain on a stop.
///
/// Order is kept by counting: the chain stage counts what it hands to the drain
/// ([`Direct::queue`]), the drain counts down as it pushes ([`Handle::push`]), and the chain
/// stage pushes directly only when the count is zero, so behind everything the drain pushed.
pub struct Direct {
    /// Weak: the publisher lives while a run holds its [`Handle`], not while a chain stage
    /// finishes a turn after its run has ended.
    stream: Weak<SharedStream>,
    key: UnitKey,
    progress: watch::Receiver<Progress>,
    counts: Arc<Counts>,
}

impl Direct {
    /// Pushes `events` to the publisher if the drain holds none of the unit's events and
    /// the window has room for all of them; otherwise hands them back, for the drain
    /// (after [`Direct::queue`]).
    pub fn try_push(&self, events: Vec<EventMessages>) -> Result<(), Vec<EventMessages>> {
        if self.counts.queued.load(Ordering::Acquire) != 0 {
            return Err(events);
        }
        let Some(stream) = self.stream.upgrade() else {
            // The run's handle is gone: the drain decides what that means.
            return Err(events);
        };
        let unsettled = unsettled(&self.counts, &self.progress);
        if unsettled + events.len() as u64 > stream.max_in_flight as u64 {
            return Err(events);
        }
        for event in events {
            self.counts.submitted.fetch_add(1, Ordering::AcqRel);
            let _ = stream.requests.send(Request::Push {
                key: self.key,
                event,
            });
        }
        Ok(())
    }

    /// Counts `events` handed to the drain instead: until it has pushed them, nothing is
    /// pushed directly.
    pub fn queue(&self, events: usize) {
        self.counts.queued.fetch_add(events, Ordering::AcqRel);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.stream.requests.send(Request::Close { key: self.key });
    }
}

/// Where a unit's events are published: its own stream's publisher, or its share of its
/// pipeline's stream.
pub enum Outlet {
    /// The unit's own stream.
    Own(Box<Publisher>),
    /// A stream shared by the pipeline's tenants.
    Shared(Handle),
}

/// What [`Outlet::next_settled`] saw.
pub enum Settled {
    /// The own publisher's oldest acknowledgement, for [`Outlet::settle`].
    Own(Result<jetstream::publish::PublishAck, jetstream::context::PublishError>),
    /// The shared publisher posted progress.
    Shared,
    /// The shared publisher is gone: the unit must stop.
    Gone,
}

impl Outlet {
    /// Whether another event may be pushed now.
    pub fn has_room(&self) -> bool {
        match self {
            Outlet::Own(publisher) => publisher.has_room(),
            Outlet::Shared(handle) => handle.has_room(),
        }
    }

    /// Publishes an event's messages (see [`Publisher::push`]).
    pub async fn push(&mut self, event: EventMessages) {
        match self {
            Outlet::Own(publisher) => publisher.push(event).await,
            Outlet::Shared(handle) => handle.push(event),
        }
    }

    /// Whether nothing pushed is waiting to be settled.
    pub fn is_idle(&self) -> bool {
        match self {
            Outlet::Own(publisher) => publisher.is_idle(),
            Outlet::Shared(handle) => handle.is_idle(),
        }
    }

    /// Waits for the next acknowledgement (own) or progress (shared). Cancel-safe; pass the
    /// result to [`Outlet::settle`].
    pub async fn next_settled(&mut self) -> Settled {
        match self {
            Outlet::Own(publisher) => Settled::Own(publisher.next_ack().await),
            Outlet::Shared(handle) => match handle.changed().await {
                true => Settled::Shared,
                false => Settled::Gone,
            },
        }
    }

    /// The next acknowledgement or progress if it is already there.
    pub fn settled_now(&mut self) -> Option<Settled> {
        match self {
            Outlet::Own(_) => self.next_settled().now_or_never(),
            Outlet::Shared(handle) => handle.changed_now().map(|alive| match alive {
                true => Settled::Shared,
                false => Settled::Gone,
            }),
        }
    }

    /// Records what [`Outlet::next_settled`] saw (own: on failure, backs off and
    /// re-publishes).
    pub async fn settle(&mut self, settled: Settled) {
        if let (Outlet::Own(publisher), Settled::Own(result)) = (self, settled) {
            publisher.handle_ack(result).await;
        }
    }

    /// The acknowledged position.
    pub fn position(&self) -> Option<Position> {
        match self {
            Outlet::Own(publisher) => publisher.position().cloned(),
            Outlet::Shared(handle) => handle.position(),
        }
    }

    /// Whether the shared publisher is gone: the unit must stop (an own publisher is the
    /// unit's, never gone).
    pub fn is_gone(&self) -> bool {
        match self {
            Outlet::Own(_) => false,
            Outlet::Shared(handle) => handle.is_gone(),
        }
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        match self {
            Outlet::Own(publisher) => publisher.in_flight(),
            Outlet::Shared(handle) => handle.in_flight(),
        }
    }

    /// Events with messages in flight.
    pub fn events_in_flight(&self) -> usize {
        match self {
            Outlet::Own(publisher) => publisher.events_in_flight(),
            Outlet::Shared(handle) => handle.events_in_flight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event without messages whose token is `n`.
    fn event(n: u32) -> EventMessages {
        EventMessages {
            messages: Vec::new(),
            token: crate::model::token::token_from_document(
                bson::doc! { "_data": format!("{n:08}") },
            )
            .expect("token"),
            snapshot: None,
            commit_unix_ms: None,
        }
    }

    /// The tokens of the events pushed so far, in the order the publisher task would take
    /// them.
    fn pushed(requests: &mut mpsc::UnboundedReceiver<Request>) -> Vec<String> {
        let mut tokens = Vec::new();
        while let Ok(request) = requests.try_recv() {
            if let Request::Push { event, .. } = request {
                tokens.push(crate::model::token::token_id(&event.token));
            }
        }
        tokens
    }

    /// The chain stage pushes past the drain only while the drain holds none of the unit's
    /// events and the window has room: an event framed after events handed to the drain
    /// waits behind them even when the window has room again, so the publisher takes the
    /// unit's events in the order they were framed.
    #[test]
    fn the_chain_stage_pushes_directly_only_behind_everything_the_drain_holds() {
        let (requests, mut requests_rx) = mpsc::unbounded_channel();
        let (gone, _gone_rx) = watch::channel(());
        let stream = Arc::new(SharedStream {
            requests,
            next_key: AtomicU64::new(1),
            max_in_flight: 2,
            longest_id: Arc::default(),
            _gone: gone,
        });
        let mut handle = stream.open("p.t", None, None);
        let Ok(Request::Open { progress, .. }) = requests_rx.try_recv() else {
            panic!("the unit is opened first");
        };
        let direct = handle.direct();
        let settle = |settled: u64| progress.send_modify(|p| p.settled = settled);

        assert!(direct.try_push(vec![event(1)]).is_ok());
        // One in flight: two more do not fit, and go to the drain.
        let held = direct
            .try_push(vec![event(2), event(3)])
            .expect_err("no room");
        direct.queue(held.len());
        let mut held = held.into_iter();
        handle.push(held.next().expect("2"));
        // The window has room again, but 3 is still with the drain: 4 waits behind it.
        settle(2);
        let later = direct
            .try_push(vec![event(4)])
            .expect_err("behind the drain");
        direct.queue(later.len());
        handle.push(held.next().expect("3"));
        handle.push(later.into_iter().next().expect("4"));
        // The drain holds nothing: the next one goes directly again.
        settle(4);
        assert!(direct.try_push(vec![event(5)]).is_ok());
        assert!(!handle.is_idle());
        settle(5);
        assert!(handle.is_idle());

        let order: Vec<String> = (1..=5)
            .map(|n| crate::model::token::token_id(&event(n).token))
            .collect();
        assert_eq!(pushed(&mut requests_rx), order);
    }
}
