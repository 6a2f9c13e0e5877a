//! The chain stage's input: the unit's source queue, and, for a tenant attached to its
//! pipeline's shared reader, the router's lane channel read directly.
//!
//! A tenant's lane (`shared::lane`) forwards what it reads into the source queue. Once it is
//! attached to the shared reader and past the hand-over's overlap, every item the router
//! puts into its lane channel goes downstream unchanged, so the lane steps aside: it hands
//! the channel to the chain stage ([`hand_over`]) and waits. That takes a task and a
//! channel out of each event's path, which at a thousand tenants (an event or two per tenant
//! per batch) is a wake-up, a queue and a task switch per event.
//!
//! Order is kept by three rules:
//! 1. The lane hands the channel over only once the stage has taken every batch it forwarded
//!    to the queue (the queue is empty), and then sends an empty batch (a wake-up) behind it.
//!    The stage looks for a channel only after a batch from the queue, so everything the lane
//!    forwarded before comes first. (Handing over while forwarded batches were still queued
//!    let the stage take the channel after the first of them, when it gathered no more than
//!    [`GATHER`] items: the rest waited behind the channel's newer events, unread until the
//!    next detach, while the checkpoint moved past them.)
//! 2. While the stage reads the channel, the lane forwards nothing: the queue carries only
//!    empty batches (hot reloads' wake-ups), which are handed on at once.
//! 3. When the router detaches the tenant it drops its end; the stage reads the channel to
//!    its end and only then tells the lane the last token it read, so the lane catches up
//!    from there and everything it forwards again comes after.

use mongodb::change_stream::event::ResumeToken;
use tokio::sync::{mpsc, oneshot};

use crate::pipeline::shared::LaneReceiver;
use crate::source::SourceItem;

/// The most items the stage gathers into one batch from what is queued (see [`gather`]).
const GATHER: usize = crate::source::HANDOFF_BATCH;

/// A lane channel handed to the chain stage, and where to say it ended.
pub(crate) struct Direct {
    channel: LaneReceiver,
    /// Answered with the token of the last item read from `channel`, once it has closed
    /// and been read to its end (`None` if nothing was read). Dropped unanswered when the
    /// stage ends first.
    ended: oneshot::Sender<Option<ResumeToken>>,
}

/// The lane's side: where it hands a lane channel over.
pub(crate) type Bypass = mpsc::UnboundedSender<Direct>;

/// Hands `channel` to the chain stage behind everything already forwarded into `events`
/// (see the module docs); the answer comes once the channel has ended and been read to its
/// end, with the token of the last item read. `None` when the stage is gone.
pub(crate) async fn hand_over(
    bypass: &Bypass,
    events: &mpsc::Sender<Vec<SourceItem>>,
    channel: LaneReceiver,
) -> Option<oneshot::Receiver<Option<ResumeToken>>> {
    // Every slot free: the stage has taken everything forwarded before (rule 1). Holding
    // them, nothing else enters the queue until the wake-up is in.
    let mut drained = events.reserve_many(events.max_capacity()).await.ok()?;
    let (ended, answer) = oneshot::channel();
    bypass.send(Direct { channel, ended }).ok()?;
    drained.next()?.send(Vec::new());
    Some(answer)
}

/// What the chain stage reads from.
pub(crate) struct Inlet {
    events: mpsc::Receiver<Vec<SourceItem>>,
    /// Whether `events` may still bring something (all its senders may be gone while a
    /// handed-over channel is still open).
    events_open: bool,
    bypasses: mpsc::UnboundedReceiver<Direct>,
    /// The handed-over channel being read, and the last token read from it.
    direct: Option<(Direct, Option<ResumeToken>)>,
    /// A batch from `events` that came while a handed-over channel was open (the lane
    /// never sends one then; kept for after the channel, should it).
    held: Option<Vec<SourceItem>>,
}

impl Inlet {
    /// The stage's input from the source queue `events`, and the bypass a tenant's lane
    /// hands its channel over by.
    pub(crate) fn new(events: mpsc::Receiver<Vec<SourceItem>>) -> (Inlet, Bypass) {
        let (bypass, bypasses) = mpsc::unbounded_channel();
        let inlet = Inlet {
            events,
            events_open: true,
            bypasses,
            direct: None,
            held: None,
        };
        (inlet, bypass)
    }

    /// The next batch, with what is queued behind it gathered in, in order (see
    /// [`gather`]); an empty batch is a hot reload's wake-up. `None` once every input has
    /// ended.
    pub(crate) async fn next(&mut self) -> Option<Vec<SourceItem>> {
        loop {
            if let Some((direct, last)) = &mut self.direct {
                let listen = self.events_open && self.held.is_none();
                tokio::select! {
                    biased;
                    batch = direct.channel.recv() => match batch {
                        Some(first) => {
                            let batch = gather(first, || direct.channel.try_recv());
                            if let Some(item) = batch.last() {
                                *last = Some(item.token().clone());
                            }
                            return Some(batch);
                        }
                        None => {
                            if let Some((direct, last)) = self.direct.take() {
                                let _ = direct.ended.send(last);
                            }
                        }
                    },
                    batch = self.events.recv(), if listen => match batch {
                        Some(batch) if batch.is_empty() => return Some(batch),
                        Some(batch) => self.held = Some(batch),
                        None => self.events_open = false,
                    },
                }
                continue;
            }
            let first = match self.held.take() {
                Some(batch) => batch,
                None if self.events_open => self.events.recv().await?,
                None => return None,
            };
            let batch = gather(first, || self.events.try_recv().ok());
            if let Ok(direct) = self.bypasses.try_recv() {
                self.direct = Some((direct, None));
            }
            return Some(batch);
        }
    }
}

/// `batch` with the batches queued behind it, in order, up to [`GATHER`] items. A tenant of
/// a shared reader is handed its events a few at a time (each reader batch is spread over
/// every tenant: at K = 1000, a quarter of an event each), and every batch handed over alone
/// is a turn on the pool, a hand-over to the sink and their wake-ups; what queued while the
/// last turn waited for a worker goes in one.
fn gather(
    mut batch: Vec<SourceItem>,
    mut queued: impl FnMut() -> Option<Vec<SourceItem>>,
) -> Vec<SourceItem> {
    while batch.len() < GATHER {
        match queued() {
            Some(more) => batch.extend(more),
            None => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::shared::lane_channel;

    fn heartbeat(n: u32) -> SourceItem {
        let token =
            crate::model::token::token_from_document(bson::doc! { "_data": format!("{n:08X}") })
                .expect("token");
        SourceItem::Heartbeat(token, None)
    }

    fn numbers(batch: &[SourceItem]) -> Vec<u32> {
        batch
            .iter()
            .map(|item| {
                let data = crate::model::token::token_id(item.token());
                u32::from_str_radix(&data, 16).expect("number")
            })
            .collect()
    }

    /// Everything in the order it was sent, whichever way it came: what the lane forwarded
    /// before the hand-over, the channel, reload wake-ups in between (at once), and what the
    /// lane forwards after the channel ended; the lane learns the channel's last token only
    /// once the stage has read it to its end.
    #[tokio::test]
    async fn a_handed_over_channel_keeps_the_order() {
        let (events_tx, events) = mpsc::channel(16);
        let (mut inlet, bypass) = Inlet::new(events);
        let (lane_tx, lane) = lane_channel();
        events_tx.send(vec![heartbeat(1)]).await.expect("send");
        assert!(lane_tx.send(vec![heartbeat(2), heartbeat(3)]));
        // The hand-over waits for the stage to take the forwarded batch.
        let forwarded = events_tx.clone();
        let handing = tokio::spawn(async move {
            let ended = hand_over(&bypass, &forwarded, lane).await;
            (ended, bypass)
        });

        let mut seen = Vec::new();
        while seen.len() < 3 {
            seen.extend(numbers(&inlet.next().await.expect("batch")));
        }
        assert_eq!(seen, [1, 2, 3]);
        let (ended, _bypass) = handing.await.expect("handed over");
        let mut ended = ended.expect("stage there");

        // A reload's wake-up while the channel is open comes through at once.
        events_tx.send(Vec::new()).await.expect("send");
        assert_eq!(inlet.next().await.map(|b| b.len()), Some(0));

        assert!(lane_tx.send(vec![heartbeat(4)]));
        drop(lane_tx);
        assert_eq!(numbers(&inlet.next().await.expect("batch")), [4]);
        assert!(
            ended.try_recv().is_err(),
            "not ended before it is read to its end"
        );
        events_tx.send(vec![heartbeat(5)]).await.expect("send");
        assert_eq!(numbers(&inlet.next().await.expect("batch")), [5]);
        let last = ended.await.expect("answered").expect("a token");
        assert_eq!(numbers(&[SourceItem::Heartbeat(last, None)]), [4]);

        drop(events_tx);
        assert!(inlet.next().await.is_none());
    }

    /// Batches forwarded before a hand-over, more than one gather's worth, all come before
    /// the channel's first item, however early the lane hands the channel over.
    #[tokio::test]
    async fn everything_forwarded_comes_before_the_channel() {
        let (events_tx, events) = mpsc::channel(16);
        let (mut inlet, bypass) = Inlet::new(events);
        let per = GATHER as u32 / 2 + 1;
        for b in 0..3 {
            let batch = (b * per..(b + 1) * per).map(|n| heartbeat(n + 1)).collect();
            events_tx.send(batch).await.expect("send");
        }
        let (lane_tx, lane) = lane_channel();
        assert!(lane_tx.send(vec![heartbeat(100_000)]));
        let handing = tokio::spawn(async move {
            let ended = hand_over(&bypass, &events_tx, lane).await;
            (ended, events_tx, bypass)
        });
        // The lane hands over before the stage has read anything.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let mut seen = Vec::new();
        while seen.len() < 3 * per as usize + 1 {
            // A batch left behind the channel would never come: stop looking, show the order.
            let wait = std::time::Duration::from_secs(10);
            match tokio::time::timeout(wait, inlet.next()).await {
                Ok(batch) => seen.extend(numbers(&batch.expect("batch"))),
                Err(_) => break,
            }
        }
        let expected: Vec<u32> = (1..=3 * per).chain([100_000]).collect();
        assert_eq!(seen, expected);
        let (ended, _events_tx, _bypass) = handing.await.expect("handed over");
        assert!(ended.is_some(), "the stage took the channel");
        drop(lane_tx);
    }

    /// The stage ending while it holds a channel answers the lane by dropping the answer,
    /// and a hand-over to a stage that is gone fails at once.
    #[tokio::test]
    async fn a_stage_that_is_gone_is_noticed() {
        let (events_tx, events) = mpsc::channel(16);
        let (mut inlet, bypass) = Inlet::new(events);
        let (_lane_tx, lane) = lane_channel();
        let ended = hand_over(&bypass, &events_tx, lane)
            .await
            .expect("stage there");
        assert_eq!(inlet.next().await.map(|b| b.len()), Some(0));
        drop(inlet);
        assert!(ended.await.is_err());
        let (_lane_tx, lane) = lane_channel();
        assert!(hand_over(&bypass, &events_tx, lane).await.is_none());
    }

    /// The source queue closing while a channel is open ends the input only after the
    /// channel has ended.
    #[tokio::test]
    async fn the_channel_outlives_a_closed_queue() {
        let (events_tx, events) = mpsc::channel(16);
        let (mut inlet, bypass) = Inlet::new(events);
        let (lane_tx, lane) = lane_channel();
        let _ended = hand_over(&bypass, &events_tx, lane)
            .await
            .expect("stage there");
        drop(events_tx);
        assert_eq!(inlet.next().await.map(|b| b.len()), Some(0));
        assert!(lane_tx.send(vec![heartbeat(7)]));
        assert_eq!(numbers(&inlet.next().await.expect("batch")), [7]);
        drop(lane_tx);
        assert!(inlet.next().await.is_none());
    }
}
