//! The publishing loop: framed events from the chain stage into the windowed publisher, its
//! acknowledgements settled, the acknowledged position posted to the checkpointer, and the
//! drain once shutdown is asked for.
//!
//! A tenant on a stream its pipeline's tenants share is the exception on the way in: its
//! chain stage pushes to the stream's publisher itself while this loop holds none of its
//! events and the window has room (`sink::Direct`), and the loop takes events only when the
//! window is full. The rest (the position, the stop, the fence) stays here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Interval, MissedTickBehavior};

use crate::config::PipelineConfig;
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::model::Position;
use crate::ops::telemetry::PipelineStats;
use crate::sink::{EventMessages, Outlet, Settled};

/// What the loop owns; it stays with the run after the loop ends, so that what was left
/// can be reported and the last position saved.
pub(super) struct Drain {
    pub(super) id: String,
    pub(super) publisher: Outlet,
    /// Framed events received but not yet published, waiting for room in the window.
    pub(super) backlog: VecDeque<EventMessages>,
    framed: mpsc::Receiver<Vec<EventMessages>>,
    inputs_open: bool,
    shutdown: watch::Receiver<bool>,
    /// Tells the source to stop reading.
    pub(super) source_stop: watch::Sender<bool>,
    /// The acknowledged position, for the checkpointer.
    pub(super) positions: watch::Sender<Option<Position>>,
    checkpoint_timer: Interval,
    summary_timer: Interval,
    stats: Arc<PipelineStats>,
    fence: Fence,
}

/// The parts of the run that each stage hands the loop.
pub(super) struct DrainIo {
    pub(super) framed: mpsc::Receiver<Vec<EventMessages>>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) source_stop: watch::Sender<bool>,
    pub(super) positions: watch::Sender<Option<Position>>,
}

impl Drain {
    pub(super) fn new(
        pipeline: &PipelineConfig,
        publisher: Outlet,
        io: DrainIo,
        stats: Arc<PipelineStats>,
        fence: Fence,
    ) -> Drain {
        let mut checkpoint_timer =
            tokio::time::interval(Duration::from_millis(pipeline.checkpoint.interval_ms));
        let summary_every = Duration::from_secs(30);
        let mut summary_timer =
            tokio::time::interval_at(tokio::time::Instant::now() + summary_every, summary_every);
        // After a stall (NATS away) missed ticks are skipped, not fired all at once.
        checkpoint_timer.set_missed_tick_behavior(MissedTickBehavior::Skip);
        summary_timer.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Drain {
            id: pipeline.id.clone(),
            publisher,
            backlog: VecDeque::new(),
            framed: io.framed,
            inputs_open: true,
            shutdown: io.shutdown,
            source_stop: io.source_stop,
            positions: io.positions,
            checkpoint_timer,
            summary_timer,
            stats,
            fence,
        }
    }

    /// The loop, until everything framed is published and acknowledged, or the fence is lost. It is
    /// raced against the shutdown deadline: every await inside leaves the publisher and the
    /// backlog consistent if it is cancelled there.
    pub(super) async fn run(&mut self) -> Result<(), Error> {
        // Made once, not on every turn of the loop (see `signalled`).
        let mut stop_asked = std::pin::pin!(super::signalled(&self.shutdown));
        let fence = self.fence.clone();
        let mut fence_lost = std::pin::pin!(fence.lost().fuse());
        loop {
            while self.publisher.has_room() {
                let Some(event) = self.backlog.pop_front() else {
                    break;
                };
                self.publisher.push(event).await;
            }
            if !self.inputs_open && self.backlog.is_empty() && self.publisher.is_idle() {
                return Ok(());
            }
            let listen = self.awaits_settling();
            tokio::select! {
                () = &mut stop_asked, if !*self.source_stop.borrow() => {
                    tracing::info!(pipeline = %self.id, "stopping: draining in-flight messages");
                    let _ = self.source_stop.send(true);
                }
                framed = self.framed.recv(), if self.inputs_open && self.backlog.is_empty() => {
                    match framed {
                        Some(framed) => self.backlog.extend(framed),
                        None => self.inputs_open = false,
                    }
                }
                settled = self.publisher.next_settled(), if listen => {
                    if matches!(settled, Settled::Gone) {
                        return Err(self.publisher_gone());
                    }
                    self.publisher.settle(settled).await;
                    // Settle acknowledgements that have already arrived without another turn
                    // of the loop.
                    while !self.publisher.is_idle() {
                        match self.publisher.settled_now() {
                            // A publisher gone is reported by the next turn of the loop.
                            Some(Settled::Gone) | None => break,
                            Some(settled) => self.publisher.settle(settled).await,
                        }
                    }
                }
                _ = self.checkpoint_timer.tick() => {
                    // Noticed here too: the loop may not be waiting for the publisher's posts.
                    if self.publisher.is_gone() {
                        return Err(self.publisher_gone());
                    }
                    self.positions.send_replace(self.publisher.position());
                }
                _ = self.summary_timer.tick() => self.stats.log(),
                () = &mut fence_lost => {
                    let _ = self.source_stop.send(true);
                    return Err(Error::Fenced { pipeline: self.id.clone(), message: self.fence.reason() });
                }
            }
        }
    }

    /// Whether the loop waits for acknowledgements on this turn. Its own stream's are settled
    /// by the loop itself, so it always does while any are outstanding. A shared stream's
    /// publisher settles them and posts the unit's progress, which the loop reads when it
    /// needs it (room in the window, the position, idleness); it waits for a post only when
    /// it cannot go on without one: events held back for room, or its inputs ended and the
    /// drain waiting for the last acknowledgements. At a thousand tenants every event was
    /// otherwise a second wake-up of its unit's loop, for a post nothing needed yet.
    fn awaits_settling(&self) -> bool {
        if self.publisher.is_idle() {
            return false;
        }
        match self.publisher {
            Outlet::Own(_) => true,
            Outlet::Shared(_) => !self.inputs_open || !self.backlog.is_empty(),
        }
    }

    /// Stops the source: the publisher of the stream the unit shares has stopped (a bug:
    /// it lives while any unit holds a handle).
    fn publisher_gone(&self) -> Error {
        let _ = self.source_stop.send(true);
        Error::Sink {
            pipeline: self.id.clone(),
            message: "the publisher of the stream this tenant shares stopped; what is \
                      acknowledged is checkpointed, the rest is read again on restart"
                .into(),
        }
    }

    /// Stops the source and reports what the shutdown deadline left unpublished.
    pub(super) fn timed_out(&self, shutdown_timeout: Duration) -> Error {
        let _ = self.source_stop.send(true);
        let queued: usize = self.backlog.iter().map(|u| u.messages.len()).sum();
        tracing::error!(
            pipeline = %self.id,
            timeout_s = shutdown_timeout.as_secs(),
            unacknowledged_messages = self.publisher.in_flight(),
            unacknowledged_units = self.publisher.events_in_flight(),
            queued_units = self.backlog.len(),
            queued_messages = queued,
            "shutdown timeout: stopping with messages unpublished; what is acknowledged is \
             checkpointed, the rest is read again on restart"
        );
        Error::Shutdown {
            pipeline: self.id.clone(),
            message: format!(
                "not drained within shutdown_timeout_secs = {}: {} messages in flight and {} \
                 units queued were left unpublished (they are read again on restart)",
                shutdown_timeout.as_secs(),
                self.publisher.in_flight(),
                self.backlog.len()
            ),
        }
    }

    /// Ends the loop's hold on its inputs: unblocks the chain stage if the loop ended early
    /// (fenced, timed out), and posts the last acknowledged position to the checkpointer,
    /// whose channel then closes. The source's stop signal is handed back: it must outlive
    /// the source task.
    pub(super) fn close(self) -> watch::Sender<bool> {
        drop(self.framed);
        self.positions.send_replace(self.publisher.position());
        drop(self.positions);
        self.source_stop
    }
}
