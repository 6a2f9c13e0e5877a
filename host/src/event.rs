//! The change event as tidegate carries it between source, plugin chain and sink.
//!
//! Documents stay BSON here, as the driver delivered them, so that an event no plugin touched
//! is published with every BSON type intact. The plugin boundary converts to and from the
//! contract's JSON form (see `plugin::convert`).

use bson::{DateTime, Document, Timestamp};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};

/// What kind of change an event describes (the change stream's `operationType`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// A document was inserted.
    Insert,
    /// Fields of a document were updated.
    Update,
    /// A document was replaced whole.
    Replace,
    /// A document was deleted.
    Delete,
    /// A collection was dropped.
    Drop,
    /// A collection was renamed.
    Rename,
    /// A database was dropped.
    DropDatabase,
    /// The change stream was invalidated.
    Invalidate,
    /// A document read by a snapshot (reserved for snapshots).
    SnapshotRead,
    /// Any other `operationType`, verbatim.
    Other(String),
}

impl Operation {
    /// The name used in subjects and payloads: MongoDB's `operationType` spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Replace => "replace",
            Operation::Delete => "delete",
            Operation::Drop => "drop",
            Operation::Rename => "rename",
            Operation::DropDatabase => "dropDatabase",
            Operation::Invalidate => "invalidate",
            Operation::SnapshotRead => "read",
            Operation::Other(name) => name,
        }
    }
}

impl From<OperationType> for Operation {
    fn from(op: OperationType) -> Self {
        match op {
            OperationType::Insert => Operation::Insert,
            OperationType::Update => Operation::Update,
            OperationType::Replace => Operation::Replace,
            OperationType::Delete => Operation::Delete,
            OperationType::Drop => Operation::Drop,
            OperationType::Rename => Operation::Rename,
            OperationType::DropDatabase => Operation::DropDatabase,
            OperationType::Invalidate => Operation::Invalidate,
            OperationType::Other(name) => Operation::Other(name),
            // Variants a newer driver adds: keep the server's spelling.
            other => Operation::Other(match bson::serialize_to_bson(&other) {
                Ok(bson::Bson::String(name)) => name,
                _ => format!("{other:?}"),
            }),
        }
    }
}

/// A database and, except for database-wide events, a collection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace {
    /// Database name.
    pub db: String,
    /// Collection name.
    pub coll: Option<String>,
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.coll {
            Some(coll) => write!(f, "{}.{coll}", self.db),
            None => write!(f, "{}", self.db),
        }
    }
}

/// What an update changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpdateDescription {
    /// Updated fields, keyed by dotted path.
    pub updated_fields: Document,
    /// Dotted paths of removed fields.
    pub removed_fields: Vec<String>,
    /// `(field, new size)` of arrays truncated in place.
    pub truncated_arrays: Vec<(String, u32)>,
}

/// One change event.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The resume token's `_data`: unique per change, stable across re-reads.
    pub id: String,
    /// What happened.
    pub operation: Operation,
    /// Where it happened.
    pub namespace: Namespace,
    /// For `rename`: the new namespace.
    pub to: Option<Namespace>,
    /// `_id` (and shard key) of the changed document.
    pub document_key: Option<Document>,
    /// The document after the change.
    pub full_document: Option<Document>,
    /// The document before the change.
    pub full_document_before_change: Option<Document>,
    /// For updates: what changed.
    pub update_description: Option<UpdateDescription>,
    /// Commit position in the oplog.
    pub cluster_time: Option<Timestamp>,
    /// Commit wall-clock time.
    pub wall_time: Option<DateTime>,
    /// Logical session id, for changes made in a transaction.
    pub lsid: Option<Document>,
    /// Transaction number, for changes made in a transaction.
    pub txn_number: Option<i64>,
}

impl Change {
    /// Unix milliseconds of the change's commit: its `wallTime` (MongoDB 6.0+), else its
    /// cluster time (to the second). `None` for a snapshot read, which was not committed
    /// then.
    pub fn commit_unix_ms(&self) -> Option<i64> {
        if self.operation == Operation::SnapshotRead {
            return None;
        }
        self.wall_time
            .map(|t| t.timestamp_millis())
            .or_else(|| self.cluster_time.map(|t| i64::from(t.time) * 1000))
    }

    /// A stand-in change, for checking what a subject template renders to.
    pub fn probe() -> Change {
        Change {
            id: "probe".into(),
            operation: Operation::Insert,
            namespace: Namespace {
                db: "db".into(),
                coll: Some("coll".into()),
            },
            to: None,
            document_key: None,
            full_document: None,
            full_document_before_change: None,
            update_description: None,
            cluster_time: None,
            wall_time: None,
            lsid: None,
            txn_number: None,
        }
    }
}

/// A change as read from the stream, with the token to resume after it.
#[derive(Debug, Clone)]
pub struct SourceEvent {
    /// Resume token of this event: checkpointing it means "everything up to here is done".
    pub token: ResumeToken,
    /// The event itself.
    pub change: Change,
    /// For a snapshot read, the snapshot's progress once this event is published (saved
    /// with the checkpoint; see `snapshot`). `None` for change events.
    pub snapshot: Option<bson::Document>,
}

/// The `_data` string of a resume token; tokens from MongoDB 4.2+ are `{_data: "<hex>"}`.
/// Falls back to the token's canonical JSON for anything else, which is still unique.
pub fn token_id(token: &ResumeToken) -> String {
    match bson::serialize_to_bson(token) {
        Ok(bson::Bson::Document(doc)) => match doc.get_str("_data") {
            Ok(data) => data.to_string(),
            Err(_) => bson::Bson::Document(doc)
                .into_canonical_extjson()
                .to_string(),
        },
        Ok(other) => other.into_canonical_extjson().to_string(),
        Err(_) => String::new(),
    }
}

/// The cluster time a resume token stands for, read from its `_data` (MongoDB's KeyString
/// encoding starts with a timestamp: type byte 0x82, then seconds and increment, big-endian).
/// `None` for tokens of another shape.
pub fn token_time(token: &ResumeToken) -> Option<bson::Timestamp> {
    let data = token_id(token);
    let hex = data.strip_prefix("82")?;
    let time = u32::from_str_radix(hex.get(0..8)?, 16).ok()?;
    let increment = u32::from_str_radix(hex.get(8..16)?, 16).ok()?;
    Some(bson::Timestamp { time, increment })
}

/// A resume token from its document form (`{"_data": …}`).
pub fn token_from_document(document: bson::Document) -> Result<ResumeToken, String> {
    bson::deserialize_from_bson(bson::Bson::Document(document)).map_err(|e| e.to_string())
}

impl SourceEvent {
    /// Converts the driver's event.
    pub fn from_driver(event: ChangeStreamEvent<Document>) -> SourceEvent {
        let namespace = |ns: mongodb::change_stream::event::ChangeNamespace| Namespace {
            db: ns.db,
            coll: ns.coll,
        };
        let change = Change {
            id: token_id(&event.id),
            operation: event.operation_type.into(),
            namespace: event.ns.map(namespace).unwrap_or_default(),
            to: event.to.map(namespace),
            document_key: event.document_key,
            full_document: event.full_document,
            full_document_before_change: event.full_document_before_change,
            update_description: event.update_description.map(|u| UpdateDescription {
                updated_fields: u.updated_fields,
                removed_fields: u.removed_fields,
                truncated_arrays: u
                    .truncated_arrays
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| (t.field, t.new_size.max(0) as u32))
                    .collect(),
            }),
            cluster_time: event.cluster_time,
            wall_time: event.wall_time,
            lsid: event.lsid,
            txn_number: event.txn_number,
        };
        SourceEvent {
            token: event.id,
            change,
            snapshot: None,
        }
    }
}
