//! Snapshots: the documents that exist before (or apart from) the change stream, published as
//! `snapshot-read` events through the same plugin chain, sink and deduplication as changes.
//!
//! Two kinds, because they trade stalling the stream against reading beside it:
//!
//! - *initial* snapshots (`initial.rs`: at first start, on `snapshot = "always"`, after lost
//!   history, or from a *blocking* signal) hold the stream while they read. The stream's
//!   position is captured *before* the first document is read and streaming resumes from
//!   exactly there, so nothing changed meanwhile is missed: a document changed during the
//!   snapshot is published as read, then its changes follow, and consumers end at the
//!   current state.
//! - *incremental* snapshots (`incremental.rs`, from an *incremental* signal) read chunk by
//!   chunk between watermarks while the stream goes on, so a long snapshot does not stall
//!   capture. `signals.rs` acts on the signals that start and steer them; `scope.rs` picks
//!   the collections either kind reads.
//!
//! Collections are read in chunks ordered by `_id`; every event carries the snapshot's
//! progress, which the checkpoint saves with the acknowledged position, so a crash resumes
//! after the last acknowledged document instead of starting over. Event ids name the
//! snapshot, the namespace and the `_id`, so documents re-read after a crash are dropped by
//! JetStream as duplicates.
//!
//! The oplog must still hold the captured position when an initial snapshot ends (long
//! snapshots need an oplog window to match; the checkpoint-age warnings watch it).

mod incremental;
mod initial;
mod scope;
mod signals;

use bson::{doc, Bson, Document, RawDocument};

pub use self::incremental::Incremental;
pub use self::initial::next_chunk;
pub(crate) use self::initial::{begin_snapshot, take_snapshot, SnapshotPlan};
pub use self::scope::{check_filter, match_patterns, namespaces, requested_namespaces, Matched};
pub(crate) use self::signals::{finished, on_signal, AfterSignal};
use crate::model::Namespace;

/// The server's estimate of how many documents `namespaces` hold, for the progress bar.
pub async fn estimated_total(client: &mongodb::Client, namespaces: &[Namespace]) -> u64 {
    let mut total = 0;
    for ns in namespaces {
        let collection = client
            .database(&ns.db)
            .collection::<Document>(ns.coll.as_deref().unwrap_or_default());
        total += collection.estimated_document_count().await.unwrap_or(0);
    }
    total
}

/// The query of one chunk: documents after `last_id` (in `_id` order) that match `filter`.
fn chunk_query(last_id: &Option<Bson>, filter: Option<&Document>) -> Document {
    let after = last_id
        .as_ref()
        .map(|last| doc! { "_id": { "$gt": last.clone() } });
    match (after, filter.filter(|f| !f.is_empty())) {
        (Some(after), Some(filter)) => doc! { "$and": [after, filter.clone()] },
        (Some(after), None) => after,
        (None, Some(filter)) => filter.clone(),
        (None, None) => doc! {},
    }
}

/// A stored document's `_id` (`null` if it has none), as the progress and event ids keep it.
fn document_id(document: &RawDocument) -> Bson {
    match document.get("_id") {
        Ok(Some(id)) => Bson::try_from(id).unwrap_or(Bson::Null),
        _ => Bson::Null,
    }
}

/// A document the driver read but tidegate cannot frame (malformed BSON): an error that
/// retries the chunk, naming the problem.
fn unreadable(message: String) -> mongodb::error::Error {
    mongodb::error::Error::from(std::io::Error::other(format!(
        "unreadable snapshot document: {message}"
    )))
}
