//! A tenant's source under a shared reader: it catches up on a change stream of its own
//! (narrowed on the server to its namespaces and key values) from its own position, joins
//! the shared reader once it has caught up, and falls back to catching up whenever the
//! router detaches it. Downstream (plugin chain, framer, publisher, checkpoint) sees one
//! ordered stream of `SourceItem` batches, exactly as from `source::run`.
//!
//! # The hand-over
//!
//! Positions are compared by resume token: a token's `_data` is MongoDB's KeyString, whose
//! byte order is the change stream's order (cluster time first), and the same event has the
//! same token in the shared stream and in the tenant's own (both watch at the same level).
//!
//! 1. Catching up, the lane forwards its own stream's items and remembers the last token
//!    forwarded, `last`. Once `last`'s cluster time reaches the reader's position, it asks
//!    to join with a fresh lane channel.
//! 2. The router installs the channel between two batches and answers with its position
//!    `T`: every event of the tenant after `T` goes into the channel from then on.
//! 3. The lane keeps forwarding its own stream's items up to `T` and stops it at the first
//!    item after `T` (or at once if `last` is already at or past `T`). Its stream has then
//!    delivered every event of the tenant up to `last ≥ T`.
//! 4. It forwards the channel's items, dropping those at or before `last` (the ones its own
//!    stream already delivered): nothing lost, nothing twice.
//!
//! 5. Once an item past `last` has gone downstream, everything the channel brings is new:
//!    the lane hands the channel itself to the chain stage (`pipeline::inlet`) and waits,
//!    out of the events' path.
//!
//! When the router finds the channel full it drops it; the chain stage reads what the
//! channel still holds and tells the lane the last token it read (before step 5, the lane
//! forwards the rest itself), and the lane goes back to 1 from there.

use std::sync::Arc;

use mongodb::change_stream::event::ResumeToken;
use tokio::sync::{mpsc, oneshot, watch};

use super::channel::{lane_channel, LaneReceiver};
use super::route::Command;
use super::SharedReader;
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::model::token::{token_id, token_time};
use crate::model::Position;
use crate::pipeline::inlet::{self, Bypass};
use crate::sink::stream_order;
use crate::source::{self, SourceItem};

/// How long a starting tenant waits for the reader's first position before reading alone.
const FIRST_POSITION: std::time::Duration = std::time::Duration::from_secs(5);

/// Batches read ahead by a catching-up tenant's own stream.
const CATCH_UP_BATCHES: usize = 4;

/// Reads tenant unit `pipeline`'s events after `start` (or at `at_time`) into `events`
/// through `reader`, until `shutdown` turns true, `events` closes, or the tenant's own
/// stream fails (its error is returned, as from `source::run`). Attached to the reader, it
/// hands its lane channel to the chain stage by `bypass`.
pub(crate) async fn run(
    reader: Arc<SharedReader>,
    pipeline: PipelineConfig,
    (start, at_time): (Option<Position>, Option<bson::Timestamp>),
    (events, bypass): (mpsc::Sender<Vec<SourceItem>>, Bypass),
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let Some(scope) = pipeline.tenant.clone() else {
        return Err(Error::Source {
            pipeline: pipeline.id.clone(),
            message: "a shared reader serves tenant units only".into(),
        });
    };
    let _registered = Registration::new(&reader, scope);
    let mut lane = Lane {
        last: start.as_ref().map(|p| p.token.clone()),
        reader,
        pipeline,
        events,
        bypass,
        shutdown,
    };
    let (mut start, mut at_time) = (start, at_time);
    loop {
        let Some(channel) = lane.catch_up(start.clone(), at_time).await? else {
            return Ok(());
        };
        tracing::info!(pipeline = %lane.pipeline.id, "reading from the shared change stream");
        // A tenant that joins at once never opens a stream of its own, whose opening would
        // otherwise be what marks the unit running (for `/readyz` and `/status`).
        crate::ops::metrics::pipeline(&lane.pipeline.id)
            .set_state(crate::ops::metrics::State::Running);
        if !lane.attached(channel).await {
            return Ok(());
        }
        // Detached: on from the last token forwarded (the first start again if none was).
        if let Some(token) = &lane.last {
            (start, at_time) = (
                Some(Position {
                    token: token.clone(),
                    last_msg_id: None,
                    snapshot: None,
                }),
                None,
            );
        }
    }
}

/// Registers the tenant with the router while its unit runs.
struct Registration {
    commands: mpsc::UnboundedSender<Command>,
    tenant: String,
}

impl Registration {
    fn new(reader: &SharedReader, scope: crate::config::TenantScope) -> Registration {
        let tenant = scope.id.clone();
        let _ = reader.commands.send(Command::Register(scope));
        Registration {
            commands: reader.commands.clone(),
            tenant,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Leave(self.tenant.clone()));
    }
}

/// One tenant's reading state.
struct Lane {
    reader: Arc<SharedReader>,
    pipeline: PipelineConfig,
    events: mpsc::Sender<Vec<SourceItem>>,
    bypass: Bypass,
    shutdown: watch::Receiver<bool>,
    /// The token of the last item forwarded downstream.
    last: Option<ResumeToken>,
}

/// A tenant's turn to read a change stream of its own; counted in its pipeline's
/// `tidegate_tenants_catching_up` while held.
struct CatchUpTurn {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    stats: Arc<crate::ops::metrics::PipelineMetrics>,
}

impl Drop for CatchUpTurn {
    fn drop(&mut self) {
        self.stats.tenant_catching_up(-1);
    }
}

/// A join under way: the channel the router fills, and where it took over (once it said).
struct Joining {
    channel: LaneReceiver,
    boundary: Option<ResumeToken>,
}

impl Lane {
    /// Reads the tenant's own stream from `start` until it hands over to the shared reader
    /// (returns the lane channel) or stops (`None`: shut down or downstream gone).
    async fn catch_up(
        &mut self,
        start: Option<Position>,
        at_time: Option<bson::Timestamp>,
    ) -> Result<Option<LaneReceiver>, Error> {
        let mut position = self.reader.position.clone();
        // Once the reader is gone (its stream failed), the tenant reads on alone.
        let mut reader_gone = false;
        let mut joining: Option<Joining> = None;
        let mut reply: Option<oneshot::Receiver<ResumeToken>> = None;
        // A tenant already at the reader's position joins without a stream of its own (and a
        // stream is never stopped while it opens: the server would keep its cursor).
        match self.join_at_once(&mut position).await {
            Some(Joining {
                channel,
                boundary: Some(boundary),
            }) if self.reached(&boundary) => return Ok(Some(channel)),
            Some(early) => joining = Some(early),
            None => {}
        }
        if *self.shutdown.borrow() {
            return Ok(None);
        }
        // Held while the tenant's own stream is open.
        let Some(_turn) = self.catch_up_turn().await else {
            return Ok(None);
        };
        let (tx, mut own) = mpsc::channel(CATCH_UP_BATCHES);
        let (stop, stop_rx) = watch::channel(false);
        let client = self.reader.client.clone();
        let config = self.pipeline.clone();
        let source = tokio::spawn(source::run(client, config, start, at_time, tx, stop_rx));
        loop {
            let boundary = joining.as_ref().and_then(|j| j.boundary.as_ref());
            if boundary.is_some_and(|b| self.reached(b)) {
                let _ = end(stop, own, source).await;
                return Ok(joining.map(|j| j.channel));
            }
            tokio::select! {
                _ = self.shutdown.changed() => {
                    return stopped(end(stop, own, source).await, &self.pipeline.id);
                }
                changed = position.changed(), if !reader_gone => reader_gone = changed.is_err(),
                answer = async {
                    match reply.as_mut() {
                        Some(reply) => reply.await,
                        None => std::future::pending().await,
                    }
                } => {
                    reply = None;
                    match (answer, joining.as_mut()) {
                        (Ok(boundary), Some(j)) => j.boundary = Some(boundary),
                        _ => {
                            joining = None;
                            reader_gone = true;
                        }
                    }
                }
                batch = own.recv() => {
                    let Some(batch) = batch else {
                        return stopped(source.await, &self.pipeline.id);
                    };
                    let boundary = joining.as_ref().and_then(|j| j.boundary.as_ref());
                    let (keep, crossed) = up_to(batch, boundary);
                    if !self.forward(keep).await {
                        return stopped(end(stop, own, source).await, &self.pipeline.id);
                    }
                    if crossed {
                        let _ = end(stop, own, source).await;
                        return Ok(joining.map(|j| j.channel));
                    }
                }
            }
            if joining.is_none() && !reader_gone && self.close_to(&position) {
                match self.join() {
                    Some((channel, answer)) => {
                        joining = Some(Joining {
                            channel,
                            boundary: None,
                        });
                        reply = Some(answer);
                    }
                    None => reader_gone = true,
                }
            }
        }
    }

    /// A turn to read a change stream of its own: waits, detached, while
    /// `pipeline.tenant_catch_up_streams` other tenants hold one (counted in the pipeline's
    /// gauges). No wait once the reader is gone (every tenant then reads alone, for good).
    /// `None` on shutdown.
    async fn catch_up_turn(&mut self) -> Option<CatchUpTurn> {
        let stats = crate::ops::metrics::pipeline(&self.reader.id);
        let permit = if self.reader.position.has_changed().is_err() {
            None
        } else if let Ok(permit) = self.reader.catch_up.clone().try_acquire_owned() {
            Some(permit)
        } else {
            tracing::info!(pipeline = %self.pipeline.id, "waiting for a catch-up turn (pipeline.tenant_catch_up_streams are in use)");
            stats.tenant_waiting_to_catch_up(1);
            let permit = tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => None,
                permit = self.reader.catch_up.clone().acquire_owned() => permit.ok(),
            };
            stats.tenant_waiting_to_catch_up(-1);
            Some(permit?)
        };
        stats.tenant_catching_up(1);
        Some(CatchUpTurn {
            _permit: permit,
            stats,
        })
    }

    /// Before a stream of its own is opened: waits (a few seconds at most) for the reader's
    /// first position and, if the tenant's own position is as recent, joins; the join and
    /// the reader's answer, if it did.
    async fn join_at_once(
        &mut self,
        position: &mut watch::Receiver<Option<ResumeToken>>,
    ) -> Option<Joining> {
        let first = tokio::time::timeout(FIRST_POSITION, position.wait_for(Option::is_some));
        let ready = tokio::select! {
            _ = self.shutdown.changed() => return None,
            waited = first => matches!(waited, Ok(Ok(_))),
        };
        if !ready || !self.close_to(position) {
            return None;
        }
        let (channel, reply) = self.join()?;
        let boundary = tokio::select! {
            _ = self.shutdown.changed() => return None,
            boundary = reply => boundary.ok()?,
        };
        Some(Joining {
            channel,
            boundary: Some(boundary),
        })
    }

    /// Whether the last item forwarded is at or past `boundary`.
    fn reached(&self, boundary: &ResumeToken) -> bool {
        self.last
            .as_ref()
            .is_some_and(|last| at_or_after(last, boundary))
    }

    /// Whether the tenant's own stream has reached the reader's cluster time (then the
    /// rest is little enough for the lane channel to hold while the hand-over completes).
    fn close_to(&self, reader: &watch::Receiver<Option<ResumeToken>>) -> bool {
        let reader = reader.borrow();
        let (Some(last), Some(reader)) = (self.last.as_ref(), reader.as_ref()) else {
            return false;
        };
        match (token_time(last), token_time(reader)) {
            (Some(mine), Some(theirs)) => {
                (mine.time, mine.increment) >= (theirs.time, theirs.increment)
            }
            _ => false,
        }
    }

    /// Asks the router for a lane: its channel and the router's answer; `None` when the
    /// reader is gone.
    fn join(&self) -> Option<(LaneReceiver, oneshot::Receiver<ResumeToken>)> {
        let (lane, channel) = lane_channel();
        let (reply_tx, reply) = oneshot::channel();
        let tenant = self.pipeline.tenant.as_ref()?.id.clone();
        let asked = self.reader.commands.send(Command::Join {
            tenant,
            lane,
            reply: reply_tx,
        });
        asked.ok().map(|()| (channel, reply))
    }

    /// Delivers the shared reader's items until the router detaches the tenant (`true`)
    /// or the unit stops (`false`): forwards them through the hand-over's overlap, then
    /// hands the channel to the chain stage and waits for it to end there.
    async fn attached(&mut self, mut channel: LaneReceiver) -> bool {
        let mut stopping = std::pin::pin!(crate::pipeline::signalled(&self.shutdown));
        // Until the first item past the hand-over, compare tokens; after it, every item is new.
        while let Some(last) = self.last.clone() {
            if *self.shutdown.borrow() {
                return false;
            }
            let batch = tokio::select! {
                () = &mut stopping => return false,
                batch = channel.recv() => batch,
            };
            let Some(mut batch) = batch else {
                return true;
            };
            // What the own stream delivered before the hand-over is not delivered twice.
            batch.retain(|item| !at_or_after(&last, item.token()));
            if !batch.is_empty() {
                if !self.forward(batch).await {
                    return false;
                }
                break;
            }
        }
        // The hand-over waits for the stage to take what was forwarded: not past a stop.
        let handed = tokio::select! {
            () = &mut stopping => return false,
            handed = inlet::hand_over(&self.bypass, &self.events, channel) => handed,
        };
        let Some(ended) = handed else {
            return false;
        };
        tokio::select! {
            () = &mut stopping => false,
            ended = ended => match ended {
                Ok(last) => {
                    self.last = last.or(self.last.take());
                    true
                }
                // The chain stage ended first: the unit is stopping.
                Err(_) => false,
            },
        }
    }

    /// Sends `batch` downstream, remembering its last token; false when downstream is gone.
    async fn forward(&mut self, batch: Vec<SourceItem>) -> bool {
        let Some(last) = batch.last().map(SourceItem::token) else {
            return true;
        };
        self.last = Some(last.clone());
        self.events.send(batch).await.is_ok()
    }
}

/// Stops the tenant's own stream and waits for it: its queue is closed first, so that a
/// reader blocked handing a batch over sees it and stops.
async fn end(
    stop: watch::Sender<bool>,
    own: mpsc::Receiver<Vec<SourceItem>>,
    source: tokio::task::JoinHandle<Result<(), Error>>,
) -> Result<Result<(), Error>, tokio::task::JoinError> {
    let _ = stop.send(true);
    drop(own);
    source.await
}

/// How the tenant's own stream ended: its error, or `None` (stopped).
fn stopped<T>(
    ended: Result<Result<(), Error>, tokio::task::JoinError>,
    unit: &str,
) -> Result<Option<T>, Error> {
    match ended {
        Ok(result) => result.map(|()| None),
        Err(err) => Err(Error::Source {
            pipeline: unit.to_string(),
            message: format!("the tenant's change stream task failed: {err}"),
        }),
    }
}

/// The items of `batch` at or before `boundary` (all without one), and whether one after
/// it was met (the rest is the shared reader's to deliver). Snapshot reads never cross:
/// they all carry the snapshot's start.
fn up_to(mut batch: Vec<SourceItem>, boundary: Option<&ResumeToken>) -> (Vec<SourceItem>, bool) {
    let Some(boundary) = boundary else {
        return (batch, false);
    };
    match batch
        .iter()
        .position(|item| !is_snapshot_read(item) && !at_or_after(boundary, item.token()))
    {
        Some(after) => {
            batch.truncate(after);
            (batch, true)
        }
        None => (batch, false),
    }
}

fn is_snapshot_read(item: &SourceItem) -> bool {
    match item {
        SourceItem::Event(event) | SourceItem::Oversize { event, .. } => event.snapshot.is_some(),
        SourceItem::Heartbeat(_, progress) => progress.is_some(),
    }
}

/// Whether `a` is at or after `b` in the change stream's order (false when either token is
/// of a shape whose order is unknown: such a tenant never hands over, it reads on alone).
fn at_or_after(a: &ResumeToken, b: &ResumeToken) -> bool {
    stream_order(&token_id(a), &token_id(b)).is_some_and(|order| order.is_ge())
}
