//! The change event as tidegate carries it between source, plugin chain and sink.
//!
//! A change is raw BSON from the driver to the payload: the server's event bytes, never
//! deserialised through serde (see [`Change`]), so that an event no plugin touched is
//! published with every value exactly as stored. The plugin boundary converts documents to
//! and from the contract's JSON form (see `plugin::convert` and [`ejson`](super::ejson)).

use std::borrow::Cow;

use bson::raw::{cstr, CStr, RawBson, RawBsonRef, RawDocument, RawDocumentBuf, RawElement};
use bson::{rawdoc, DateTime, Timestamp};
use mongodb::change_stream::event::ResumeToken;

use super::token::token_from_raw;

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

impl Operation {
    /// The operation named `name` (MongoDB's `operationType` spelling; `read` for snapshot
    /// reads): the inverse of [`Operation::as_str`].
    pub fn from_name(name: &str) -> Operation {
        match name {
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "replace" => Operation::Replace,
            "delete" => Operation::Delete,
            "drop" => Operation::Drop,
            "rename" => Operation::Rename,
            "dropDatabase" => Operation::DropDatabase,
            "invalidate" => Operation::Invalidate,
            "read" => Operation::SnapshotRead,
            other => Operation::Other(other.to_string()),
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

/// One change event: the document that is published, plus the fields every stage reads.
///
/// The document is the server's change event as raw BSON, byte for byte, with one edit: the
/// resume token `_id: {"_data": "…"}` becomes `id: "<_data>"`, the first field. Every other
/// field keeps the server's bytes and order, including fields tidegate does not model
/// (`collectionUUID`, `operationDescription`, `updateDescription.disambiguatedPaths`, …).
/// Nothing in it is ever read through serde, whose BSON deserialiser takes sub-documents like
/// `{"$oid": …}` or `{"$numberLong": …}` for the types they resemble. Snapshot reads and
/// events a plugin rewrote are documents of the same shape, built by [`Change::snapshot_read`]
/// and [`Change::from_fields`].
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    document: RawDocumentBuf,
    id: String,
    operation: Operation,
    namespace: Namespace,
    to: Option<Namespace>,
}

/// The contract's fields of a change, for building one (see [`Change::from_fields`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Fields<'a> {
    /// `id`: the resume token's `_data`, or a snapshot read's id.
    pub id: String,
    /// `operationType`.
    pub operation: Operation,
    /// `ns`.
    pub namespace: Namespace,
    /// `to`, for renames.
    pub to: Option<Namespace>,
    /// `documentKey`.
    pub document_key: Option<Cow<'a, RawDocument>>,
    /// `fullDocument`.
    pub full_document: Option<Cow<'a, RawDocument>>,
    /// `fullDocumentBeforeChange`.
    pub full_document_before_change: Option<Cow<'a, RawDocument>>,
    /// `updateDescription`, whole (`updatedFields`, `removedFields`, `truncatedArrays`, …).
    pub update_description: Option<Cow<'a, RawDocument>>,
    /// `clusterTime`.
    pub cluster_time: Option<Timestamp>,
    /// `wallTime`.
    pub wall_time: Option<DateTime>,
    /// `lsid`, for changes made in a transaction.
    pub lsid: Option<Cow<'a, RawDocument>>,
    /// `txnNumber`, for changes made in a transaction.
    pub txn_number: Option<i64>,
}

impl Fields<'_> {
    /// An event with these header fields and nothing else.
    pub fn new(id: impl Into<String>, operation: Operation, namespace: Namespace) -> Self {
        Fields {
            id: id.into(),
            operation,
            namespace,
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

/// The fields [`Fields`] models, in the order a change built without a base lists them.
const MODELED: [&str; 11] = [
    "operationType",
    "ns",
    "to",
    "documentKey",
    "updateDescription",
    "fullDocument",
    "fullDocumentBeforeChange",
    "clusterTime",
    "wallTime",
    "lsid",
    "txnNumber",
];

impl Change {
    /// Parses a change event as the server sent it (see the type's docs for what is kept).
    /// Returns the event's resume token with it.
    pub fn from_server_event(event: &RawDocument) -> Result<(ResumeToken, Change), String> {
        let token = match event.get("_id") {
            Ok(Some(RawBsonRef::Document(token))) => token,
            _ => return Err("the change event has no resume token (_id)".into()),
        };
        let id = match token.get_str("_data") {
            Ok(data) => data.to_string(),
            // Not a MongoDB 4.2+ token: its canonical JSON is unique all the same.
            Err(_) => {
                let mut text = Vec::new();
                crate::model::ejson::write_document(
                    token,
                    crate::model::ejson::Mode::Canonical,
                    &mut text,
                )?;
                String::from_utf8_lossy(&text).into_owned()
            }
        };
        let resume = token_from_raw(token)?;
        Ok((resume, Change::assemble(id, event, "_id")?))
    }

    /// A change from a document in the published payload's shape (`id` optional: `id` is
    /// used without one), e.g. a message copied from the stream.
    pub fn from_payload(document: &RawDocument, id: &str) -> Result<Change, String> {
        let id = match document.get("id") {
            Ok(Some(RawBsonRef::String(own))) => own.to_string(),
            _ => id.to_string(),
        };
        Change::assemble(id, document, "id")
    }

    /// A document read by a snapshot: `operationType: "read"`, its `_id` as the document key,
    /// the document itself (as stored) as `fullDocument`, and the time it was read (now) as
    /// `wallTime`, so that reads carry a time like every change.
    pub fn snapshot_read(
        id: String,
        namespace: Namespace,
        document: &RawDocument,
    ) -> Result<Change, String> {
        let mut key = RawDocumentBuf::new();
        match document.get("_id") {
            Ok(Some(value)) => key.append(cstr!("_id"), value),
            _ => key.append(cstr!("_id"), RawBsonRef::Null),
        }
        let fields = Fields {
            document_key: Some(Cow::Owned(key)),
            full_document: Some(Cow::Borrowed(document)),
            wall_time: Some(DateTime::now()),
            ..Fields::new(id, Operation::SnapshotRead, namespace)
        };
        Change::from_fields(fields, None)
    }

    /// A change with these fields. With a `base` (the change a plugin rewrote), fields keep
    /// the base's order, the ones `fields` does not model are copied from it, and modeled
    /// values equal to the base's keep its bytes; without one they are listed in the
    /// change-stream order of [`MODELED`].
    pub fn from_fields(fields: Fields<'_>, base: Option<&Change>) -> Result<Change, String> {
        let mut out = Builder::new(256);
        out.string("id", &fields.id)?;
        let mut written = [false; MODELED.len()];
        if let Some(base) = base {
            for element in elements(&base.document) {
                let (element, bytes) = element?;
                let key = element.key().as_str();
                if key == "id" {
                    continue;
                }
                let Some(slot) = MODELED.iter().position(|m| *m == key) else {
                    out.raw(bytes);
                    continue;
                };
                written[slot] = true;
                match (modeled_value(&fields, key)?, element.value()) {
                    (Some(value), Ok(old)) if old == value.as_raw_bson_ref() => out.raw(bytes),
                    (Some(value), _) => out.value(key, value.as_raw_bson_ref())?,
                    // A `null` the contract cannot carry (`fullDocument: null` when no
                    // image was available) stays.
                    (None, Ok(RawBsonRef::Null)) => out.raw(bytes),
                    (None, _) => {}
                }
            }
        }
        for (slot, key) in MODELED.iter().enumerate() {
            if !written[slot] {
                if let Some(value) = modeled_value(&fields, key)? {
                    out.value(key, value.as_raw_bson_ref())?;
                }
            }
        }
        Ok(Change {
            document: out.finish()?,
            id: fields.id,
            operation: fields.operation,
            namespace: fields.namespace,
            to: fields.to,
        })
    }

    /// Builds the document from `source`'s elements, `id` first and `skip` left out, and reads
    /// the header fields from it.
    fn assemble(id: String, source: &RawDocument, skip: &str) -> Result<Change, String> {
        let mut out = Builder::new(source.as_bytes().len() + id.len() + 16);
        out.string("id", &id)?;
        let mut operation = None;
        let mut namespace = None;
        let mut to = None;
        for element in elements(source) {
            let (element, bytes) = element?;
            let key = element.key().as_str();
            if key == skip || key == "id" {
                continue;
            }
            out.raw(bytes);
            let value = || element.value().map_err(|e| format!("`{key}`: {e}"));
            match key {
                "operationType" => match value()? {
                    RawBsonRef::String(name) => operation = Some(Operation::from_name(name)),
                    _ => return Err("`operationType` is not a string".into()),
                },
                "ns" => namespace = Some(parse_namespace("ns", value()?)?),
                "to" => to = Some(parse_namespace("to", value()?)?),
                _ => {}
            }
        }
        Ok(Change {
            document: out.finish()?,
            id,
            operation: operation.ok_or("the change event has no `operationType`")?,
            // Invalidate events have no `ns` (the source names the watched one).
            namespace: namespace.unwrap_or_default(),
            to,
        })
    }

    /// Unix milliseconds of the change's commit: its `wallTime` (MongoDB 6.0+), else its
    /// cluster time (to the second). `None` for a snapshot read, which was not committed
    /// then (see [`Change::time_ms`]).
    pub fn commit_unix_ms(&self) -> Option<i64> {
        if self.operation == Operation::SnapshotRead {
            return None;
        }
        self.time_ms()
    }

    /// Unix milliseconds of the change: its `wallTime` (for a snapshot read, when it was
    /// read), else its cluster time's seconds × 1000; `None` when it has neither. The
    /// `tsMs` of published events.
    pub fn time_ms(&self) -> Option<i64> {
        self.wall_time()
            .map(|t| t.timestamp_millis())
            .or_else(|| self.cluster_time().map(|t| i64::from(t.time) * 1000))
    }

    /// A stand-in change, for checking what a subject template renders to.
    pub fn probe() -> Change {
        let namespace = Namespace {
            db: "db".into(),
            coll: Some("coll".into()),
        };
        Change {
            document: rawdoc! { "id": "probe", "operationType": "insert", "ns": { "db": "db", "coll": "coll" } },
            id: "probe".into(),
            operation: Operation::Insert,
            namespace,
            to: None,
        }
    }

    /// The published document (see the type's docs).
    pub fn document(&self) -> &RawDocument {
        &self.document
    }

    /// `id`: the resume token's `_data` (unique per change, stable across re-reads), or a
    /// snapshot read's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What happened.
    pub fn operation(&self) -> &Operation {
        &self.operation
    }

    /// Where it happened.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// For `rename`: the new namespace.
    pub fn to(&self) -> Option<&Namespace> {
        self.to.as_ref()
    }

    fn sub_document(&self, key: &str) -> Option<&RawDocument> {
        match self.document.get(key) {
            Ok(Some(RawBsonRef::Document(doc))) => Some(doc),
            _ => None,
        }
    }

    /// `_id` (and shard key) of the changed document.
    pub fn document_key(&self) -> Option<&RawDocument> {
        self.sub_document("documentKey")
    }

    /// The document after the change.
    pub fn full_document(&self) -> Option<&RawDocument> {
        self.sub_document("fullDocument")
    }

    /// The document before the change.
    pub fn full_document_before_change(&self) -> Option<&RawDocument> {
        self.sub_document("fullDocumentBeforeChange")
    }

    /// For updates: what changed (`updatedFields`, `removedFields`, `truncatedArrays`, …).
    pub fn update_description(&self) -> Option<&RawDocument> {
        self.sub_document("updateDescription")
    }

    /// Commit position in the oplog.
    pub fn cluster_time(&self) -> Option<Timestamp> {
        self.document.get_timestamp("clusterTime").ok()
    }

    /// Commit wall-clock time (for a snapshot read, when the document was read).
    pub fn wall_time(&self) -> Option<DateTime> {
        self.document.get_datetime("wallTime").ok()
    }

    /// Logical session id, for changes made in a transaction.
    pub fn lsid(&self) -> Option<&RawDocument> {
        self.sub_document("lsid")
    }

    /// Transaction number, for changes made in a transaction.
    pub fn txn_number(&self) -> Option<i64> {
        match self.document.get("txnNumber") {
            Ok(Some(RawBsonRef::Int64(n))) => Some(n),
            Ok(Some(RawBsonRef::Int32(n))) => Some(i64::from(n)),
            _ => None,
        }
    }

    /// The same change without the fields named in `keys` (a dead letter too large to carry
    /// its documents).
    pub fn without(&self, keys: &[&str]) -> Result<Change, String> {
        let mut out = Builder::new(self.document.as_bytes().len());
        for element in elements(&self.document) {
            let (element, bytes) = element?;
            if !keys.contains(&element.key().as_str()) {
                out.raw(bytes);
            }
        }
        Ok(Change {
            document: out.finish()?,
            ..self.clone_header()
        })
    }

    /// The same change with `ns` set to `namespace` (invalidate events come without one):
    /// placed after `operationType`, or replacing the one there is.
    pub fn with_namespace(&self, namespace: Namespace) -> Result<Change, String> {
        let ns = namespace_document(&namespace);
        let mut out = Builder::new(self.document.as_bytes().len() + 64);
        let mut placed = false;
        for element in elements(&self.document) {
            let (element, bytes) = element?;
            match element.key().as_str() {
                "ns" if !placed => {
                    out.value("ns", RawBsonRef::Document(&ns))?;
                    placed = true;
                }
                "ns" => {}
                "operationType" if !placed => {
                    out.raw(bytes);
                    out.value("ns", RawBsonRef::Document(&ns))?;
                    placed = true;
                }
                _ => out.raw(bytes),
            }
        }
        if !placed {
            out.value("ns", RawBsonRef::Document(&ns))?;
        }
        Ok(Change {
            document: out.finish()?,
            namespace,
            ..self.clone_header()
        })
    }

    fn clone_header(&self) -> Change {
        Change {
            document: RawDocumentBuf::new(),
            id: self.id.clone(),
            operation: self.operation.clone(),
            namespace: self.namespace.clone(),
            to: self.to.clone(),
        }
    }
}

/// `{db, coll}` (no `coll` for database-wide events).
fn namespace_document(ns: &Namespace) -> RawDocumentBuf {
    let mut doc = RawDocumentBuf::new();
    doc.append(cstr!("db"), ns.db.as_str());
    if let Some(coll) = &ns.coll {
        doc.append(cstr!("coll"), coll.as_str());
    }
    doc
}

fn parse_namespace(field: &str, value: RawBsonRef<'_>) -> Result<Namespace, String> {
    let RawBsonRef::Document(doc) = value else {
        return Err(format!("`{field}` must be a document {{db, coll}}"));
    };
    Ok(Namespace {
        db: doc
            .get_str("db")
            .map_err(|_| format!("`{field}.db` must be a string"))?
            .to_string(),
        coll: doc.get_str("coll").ok().map(str::to_string),
    })
}

/// The value `fields` gives the modeled field `key` (`None`: absent).
fn modeled_value(fields: &Fields<'_>, key: &str) -> Result<Option<RawBson>, String> {
    let document = |d: &Option<Cow<'_, RawDocument>>| {
        d.as_ref().map(|d| RawBson::Document(d.as_ref().to_owned()))
    };
    Ok(match key {
        "operationType" => Some(RawBson::String(fields.operation.as_str().to_string())),
        "ns" => Some(RawBson::Document(namespace_document(&fields.namespace))),
        "to" => fields
            .to
            .as_ref()
            .map(|to| RawBson::Document(namespace_document(to))),
        "documentKey" => document(&fields.document_key),
        "updateDescription" => document(&fields.update_description),
        "fullDocument" => document(&fields.full_document),
        "fullDocumentBeforeChange" => document(&fields.full_document_before_change),
        "clusterTime" => fields.cluster_time.map(RawBson::Timestamp),
        "wallTime" => fields.wall_time.map(RawBson::DateTime),
        "lsid" => document(&fields.lsid),
        "txnNumber" => fields.txn_number.map(RawBson::Int64),
        other => return Err(format!("`{other}` is not a modeled field")),
    })
}

/// Each top-level element of `doc` with its exact bytes (type byte, key, value), so that
/// copying it copies the server's bytes.
fn elements(doc: &RawDocument) -> impl Iterator<Item = Result<(RawElement<'_>, &[u8]), String>> {
    let bytes = doc.as_bytes();
    let mut offset = 4;
    doc.iter_elements().map(move |element| {
        let element = element.map_err(|e| format!("malformed BSON: {e}"))?;
        let len = 1 + element.key().len() + 1 + element.size();
        let slice = bytes
            .get(offset..offset + len)
            .ok_or("malformed BSON: element overruns its document")?;
        offset += len;
        Ok((element, slice))
    })
}

/// A BSON document written element by element.
struct Builder {
    bytes: Vec<u8>,
}

impl Builder {
    fn new(capacity: usize) -> Builder {
        let mut bytes = Vec::with_capacity(capacity);
        bytes.extend_from_slice(&[0; 4]);
        Builder { bytes }
    }

    /// An element's bytes, copied as they are.
    fn raw(&mut self, element: &[u8]) {
        self.bytes.extend_from_slice(element);
    }

    fn string(&mut self, key: &str, value: &str) -> Result<(), String> {
        self.value(key, RawBsonRef::String(value))
    }

    fn value(&mut self, key: &str, value: RawBsonRef<'_>) -> Result<(), String> {
        let name: &CStr = key
            .try_into()
            .map_err(|_| format!("field name {key:?} contains a NUL byte"))?;
        let mut one = RawDocumentBuf::new();
        one.append(name, value);
        let bytes = one.as_bytes();
        self.bytes.extend_from_slice(&bytes[4..bytes.len() - 1]);
        Ok(())
    }

    fn finish(mut self) -> Result<RawDocumentBuf, String> {
        self.bytes.push(0);
        let len = i32::try_from(self.bytes.len()).map_err(|_| "document too large")?;
        self.bytes[..4].copy_from_slice(&len.to_le_bytes());
        RawDocumentBuf::from_bytes(self.bytes).map_err(|e| format!("malformed BSON: {e}"))
    }
}

/// A change as read from the stream, with the token to resume after it.
#[derive(Debug, Clone)]
pub struct SourceEvent {
    /// Resume token of this event: checkpointing it means "everything up to here is done".
    pub token: ResumeToken,
    /// The event itself.
    pub change: Change,
    /// While a snapshot runs (for its reads, and for changes beside an incremental one), its
    /// progress once this event is published: saved with the checkpoint.
    pub snapshot: Option<crate::model::SnapshotProgress>,
}

impl SourceEvent {
    /// Parses one change event as the driver read it (raw, see [`Change`]).
    pub fn from_server_event(event: &RawDocument) -> Result<SourceEvent, String> {
        let (token, change) = Change::from_server_event(event)?;
        Ok(SourceEvent {
            token,
            change,
            snapshot: None,
        })
    }
}
