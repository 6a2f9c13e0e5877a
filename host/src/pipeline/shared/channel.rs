//! A lane's channel: the router's shares for one attached tenant, counted in events and in
//! bytes.
//!
//! A bound in messages does not bound what a tenant holds: a share may be one event (a
//! thousand tenants by key, each getting a fraction of a reader batch) or a reader batch's
//! every event (one tenant). And it made the router detach tenants that were not behind:
//! a large getMore routed at once put several dozen one-event shares into every lane, so a
//! lane whose tenant had not had its turn yet looked full while another's, just served,
//! looked empty. Counted in events, the router can gather what the reader has queued into
//! one pass, give each tenant one share per pass, and bound the events held across all
//! lanes (see `route.rs`: the router decides what counts as full; this channel only counts).
//! Bytes are counted beside events because documents run up to 16 MiB: a bound in events
//! alone would let a lane of large documents hold gigabytes.
//!
//! The channel itself is unbounded; only the router sends, and it sends only while the
//! count says there is room (or the lane is empty), so the messages are bounded by the
//! events. A share is sent as pieces of at most [`PIECE`] events, so that one tenant on its
//! own still hands its chain stage batches of the usual size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use crate::source::SourceItem;

/// The most events in one message: the size of the source's own hand-off batches.
const PIECE: usize = crate::source::HANDOFF_BATCH;

/// What a lane holds, or may hold: events, and their documents' bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Load {
    pub(crate) events: usize,
    pub(crate) bytes: usize,
}

impl Load {
    /// The load of `items` (a heartbeat counts as an event of no bytes).
    pub(crate) fn of(items: &[SourceItem]) -> Load {
        let bytes = items
            .iter()
            .map(|item| match item {
                SourceItem::Event(event) | SourceItem::Oversize { event, .. } => {
                    event.change.document().as_bytes().len()
                }
                SourceItem::Heartbeat(..) => 0,
            })
            .sum();
        Load {
            events: items.len(),
            bytes,
        }
    }

    /// Whether this load is at `limit` in events or in bytes.
    pub(crate) fn reaches(self, limit: Load) -> bool {
        self.events >= limit.events || self.bytes >= limit.bytes
    }

    /// Whether this load is under half of `limit` in both events and bytes.
    pub(crate) fn under_half(self, limit: Load) -> bool {
        self.events * 2 < limit.events && self.bytes * 2 < limit.bytes
    }

    /// The sum of two loads.
    pub(crate) fn plus(self, other: Load) -> Load {
        Load {
            events: self.events + other.events,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// What both ends share: the load in flight, and the sender's wake-up.
#[derive(Default)]
struct Count {
    /// Events sent and not yet received.
    events: AtomicUsize,
    /// Their bytes.
    bytes: AtomicUsize,
    /// Notified whenever the receiver takes a message (the router waits on it for room).
    taken: Notify,
}

impl Count {
    fn add(&self, load: Load) {
        self.events.fetch_add(load.events, Ordering::AcqRel);
        self.bytes.fetch_add(load.bytes, Ordering::AcqRel);
    }

    fn sub(&self, load: Load) {
        self.events.fetch_sub(load.events, Ordering::AcqRel);
        self.bytes.fetch_sub(load.bytes, Ordering::AcqRel);
    }
}

/// The router's end.
#[derive(Clone)]
pub(crate) struct LaneSender {
    /// Each message with its load, counted once on the way in and taken off as it was.
    messages: mpsc::UnboundedSender<(Vec<SourceItem>, Load)>,
    count: Arc<Count>,
}

/// The tenant's end: the lane's, during a hand-over, then the chain stage's.
pub(crate) struct LaneReceiver {
    messages: mpsc::UnboundedReceiver<(Vec<SourceItem>, Load)>,
    count: Arc<Count>,
}

/// A new lane channel.
pub(crate) fn lane_channel() -> (LaneSender, LaneReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let count = Arc::new(Count::default());
    let sender = LaneSender {
        messages: sender,
        count: count.clone(),
    };
    (
        sender,
        LaneReceiver {
            messages: receiver,
            count,
        },
    )
}

impl LaneSender {
    /// What was sent and not yet taken by the receiver.
    pub(crate) fn queued(&self) -> Load {
        Load {
            events: self.count.events.load(Ordering::Acquire),
            bytes: self.count.bytes.load(Ordering::Acquire),
        }
    }

    /// Whether `share` more fits under `limit`, in events and in bytes: an empty lane takes
    /// any share, so that a share larger than the limit is never refused for good.
    pub(crate) fn has_room(&self, share: Load, limit: Load) -> bool {
        let queued = self.queued();
        let after = queued.plus(share);
        queued.events == 0 || (after.events <= limit.events && after.bytes <= limit.bytes)
    }

    /// Sends `share` in pieces of at most [`PIECE`] events; false when the receiver is gone.
    pub(crate) fn send(&self, mut share: Vec<SourceItem>) -> bool {
        while !share.is_empty() {
            let rest = share.split_off(share.len().min(PIECE));
            // Counted before it can be taken, so that the count never goes below zero.
            let load = Load::of(&share);
            self.count.add(load);
            if self.messages.send((share, load)).is_err() {
                self.count.sub(load);
                return false;
            }
            share = rest;
        }
        true
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.messages.is_closed()
    }

    /// Returns once the receiver has taken a message or is gone (at once if it took one
    /// since the last call: a wake-up is never lost between a look at the count and here).
    pub(crate) async fn taken_or_closed(&self) {
        tokio::select! {
            () = self.count.taken.notified() => {}
            () = self.messages.closed() => {}
        }
    }
}

impl LaneReceiver {
    /// The next message; `None` once the sender is gone and everything has been taken.
    pub(crate) async fn recv(&mut self) -> Option<Vec<SourceItem>> {
        let message = self.messages.recv().await?;
        Some(self.took(message))
    }

    /// The next message if one is there.
    pub(crate) fn try_recv(&mut self) -> Option<Vec<SourceItem>> {
        let message = self.messages.try_recv().ok()?;
        Some(self.took(message))
    }

    /// Whether the router has dropped its end (it still may have left messages).
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.messages.is_closed()
    }

    fn took(&self, (message, load): (Vec<SourceItem>, Load)) -> Vec<SourceItem> {
        self.count.sub(load);
        self.count.taken.notify_one();
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeats(n: usize) -> Vec<SourceItem> {
        (0..n)
            .map(|i| {
                let token = crate::model::token::token_from_document(
                    bson::doc! { "_data": format!("{i:08X}") },
                )
                .expect("token");
                SourceItem::Heartbeat(token, None)
            })
            .collect()
    }

    /// Events are counted from the send until the receiver takes them; a large share
    /// arrives in pieces of the usual size, in order.
    #[tokio::test]
    async fn events_are_counted_until_taken() {
        let events = |n: usize| Load {
            events: n,
            bytes: 0,
        };
        let limit = |n: usize| Load {
            events: n,
            bytes: usize::MAX,
        };
        let (sender, mut receiver) = lane_channel();
        assert!(
            sender.has_room(events(5 * PIECE), limit(10)),
            "an empty lane takes any share"
        );
        assert!(sender.send(heartbeats(PIECE + 3)));
        assert_eq!(sender.queued(), events(PIECE + 3));
        assert!(!sender.has_room(events(1), limit(PIECE + 3)));
        assert!(sender.has_room(events(1), limit(PIECE + 4)));
        assert_eq!(receiver.recv().await.map(|m| m.len()), Some(PIECE));
        assert_eq!(sender.queued(), events(3));
        // The wake-up for that take is kept for the next wait.
        sender.taken_or_closed().await;
        assert_eq!(receiver.try_recv().map(|m| m.len()), Some(3));
        assert_eq!(sender.queued(), events(0));
        assert!(receiver.try_recv().is_none());
        drop(receiver);
        assert!(sender.is_closed());
        sender.taken_or_closed().await;
        assert!(!sender.send(heartbeats(1)));
        assert_eq!(sender.queued(), events(0));
    }

    /// A document's bytes are counted with it: a lane of a few large documents is full by
    /// its bytes long before its events.
    #[tokio::test]
    async fn bytes_are_counted_with_the_events() {
        let big = |n: i32| {
            let pad = "x".repeat(1 << 20);
            let event = bson::doc! {
                "_id": { "_data": format!("{n:08X}") },
                "operationType": "insert",
                "ns": { "db": "db", "coll": "c" },
                "documentKey": { "_id": n },
                "fullDocument": { "_id": n, "pad": pad },
            };
            let raw = bson::RawDocumentBuf::try_from(&event).expect("raw");
            let (token, change) = crate::model::Change::from_server_event(&raw).expect("change");
            SourceItem::Event(Box::new(crate::model::SourceEvent {
                token,
                change,
                snapshot: None,
            }))
        };
        let (sender, mut receiver) = lane_channel();
        assert!(sender.send(vec![big(1), big(2)]));
        let queued = sender.queued();
        assert_eq!(queued.events, 2);
        assert!(queued.bytes > 2 << 20, "{queued:?}");
        let limit = Load {
            events: 1000,
            bytes: 3 << 20,
        };
        let one = Load::of(&[big(3)]);
        assert!(
            !sender.has_room(one, limit),
            "a third MiB document is over 3 MiB"
        );
        assert!(queued.under_half(Load {
            events: 1000,
            bytes: 8 << 20
        }));
        assert!(queued.reaches(Load {
            events: 1000,
            bytes: 2 << 20
        }));
        receiver.recv().await.expect("the share");
        assert_eq!(sender.queued(), Load::default());
    }
}
