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
//! An [`EventMessages`] is everything one source event produced (possibly nothing). The sink
//! reports its resume token as the pipeline's [`Position`](crate::model::Position) only once all of its messages, and
//! all earlier events' messages, are acknowledged; only then may it be checkpointed.
//!
//! # A stream shared by tenants
//! The chain is the stream's, so a stream has one publisher: a pipeline's own, or, for the
//! stream its tenants share, one publisher task with a unit per tenant run (`shared`), each
//! unit with its own floor and acknowledged position.
//!
//! # The stream as a floor
//! The checkpoint trails the stream by up to one checkpoint interval (and a crash can come
//! before it is written). So at every start the publisher also learns the stream's own last
//! message of this unit ([`stream_tail`]); its id names the event it came from, and a
//! [`Floor`] drops what the restarted pipeline re-reads up to and including it (for a
//! multi-output event, only the outputs already stored), and the ordering chain continues
//! from it. Duplicates after a restart therefore do not depend on the duplicate window.

pub mod encode;
pub mod format;
pub mod framer;
mod headers;
mod publisher;
mod shared;
mod stream;

use bytes::Bytes;
use mongodb::change_stream::event::ResumeToken;

pub use headers::Headers;
pub use publisher::Publisher;
pub(crate) use shared::shared_stream;
pub use shared::{Direct, Handle, Outlet, Settled, SharedStream};
pub use stream::{is_stream_not_found, jetstream_off};
pub(crate) use stream::{prepare_stream, stream_order, stream_tail, Floor};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its subject.
    pub subject: String,
    /// Its `Nats-Msg-Id`.
    pub msg_id: String,
    /// Headers other than the ones the sink adds (`Nats-Msg-Id`, `Nats-Expected-Last-Msg-Id`).
    pub headers: Headers,
    /// The encoded event.
    pub payload: Bytes,
}

/// Everything one source event produced, and the token to resume after it: the position
/// moves past an event only once all of its messages are stored.
#[derive(Debug)]
pub struct EventMessages {
    /// Messages to publish, in order; empty when the event was filtered out (or for an idle
    /// heartbeat that only moves the position).
    pub messages: Vec<Message>,
    /// Resume token after this event.
    pub token: ResumeToken,
    /// Snapshot progress after this event, while a snapshot runs.
    pub snapshot: Option<crate::model::SnapshotProgress>,
    /// Unix milliseconds of the change's commit in MongoDB, for the end-to-end lag; `None`
    /// for heartbeats and snapshot reads.
    pub commit_unix_ms: Option<i64>,
}
