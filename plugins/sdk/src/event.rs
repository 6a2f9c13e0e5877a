//! The change event a plugin receives, with typed access to every part of it.

use std::borrow::Cow;
use std::fmt;

use serde_json::{json, Value};

use crate::document::{collect_all, Document};
use crate::error::{Error, Result};

/// What kind of change an event describes (the change stream's `operationType`).
///
/// ```
/// use tidegate_plugin::Operation;
///
/// assert_eq!(Operation::parse("drop-database")?, Operation::DropDatabase);
/// assert_eq!(Operation::parse("dropDatabase")?, Operation::DropDatabase);
/// assert_eq!(Operation::DropDatabase.as_str(), "dropDatabase");
/// assert_eq!(Operation::parse("other:futureOp")?, Operation::Other("futureOp".into()));
/// assert!(Operation::parse("insrt").is_err());
/// # Ok::<(), tidegate_plugin::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    /// A document was inserted; `full_document` holds it.
    Insert,
    /// Fields of a document were updated; `update_description` says which.
    Update,
    /// A document was replaced whole; `full_document` holds the new version.
    Replace,
    /// A document was deleted; only `document_key` identifies it.
    Delete,
    /// A watched collection was dropped.
    Drop,
    /// A watched collection was renamed; `to` names the new namespace.
    Rename,
    /// A watched database was dropped.
    DropDatabase,
    /// The change stream was invalidated.
    Invalidate,
    /// A document read by a snapshot (reserved); treat it like `Insert`.
    SnapshotRead,
    /// Any other `operationType`, verbatim (for example `createIndexes`).
    Other(String),
}

/// `operationType` values the server emits that the contract carries as `other(…)`. Knowing
/// them lets configuration refuse typos such as `insrt`, which would otherwise silently match
/// nothing.
pub const KNOWN_OTHER_OPERATIONS: &[&str] = &[
    "create",
    "createIndexes",
    "dropIndexes",
    "modify",
    "shardCollection",
    "reshardCollection",
    "refineCollectionShardKey",
];

impl Operation {
    /// Parses an operation name as users write it in configuration: the contract's names
    /// (`drop-database`, `snapshot-read`), the server's spellings (`dropDatabase`), the
    /// server's other `operationType`s ([`KNOWN_OTHER_OPERATIONS`]), or `other:<name>` for one
    /// not known yet. Anything else is an [`Error::InvalidConfig`].
    ///
    /// ```
    /// # use tidegate_plugin::Operation;
    /// assert_eq!(Operation::parse("createIndexes")?, Operation::Other("createIndexes".into()));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn parse(name: &str) -> Result<Operation> {
        Ok(match name {
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "replace" => Operation::Replace,
            "delete" => Operation::Delete,
            "drop" => Operation::Drop,
            "rename" => Operation::Rename,
            "drop-database" | "dropDatabase" => Operation::DropDatabase,
            "invalidate" => Operation::Invalidate,
            "snapshot-read" => Operation::SnapshotRead,
            other if KNOWN_OTHER_OPERATIONS.contains(&other) => Operation::Other(other.to_owned()),
            other => match other.strip_prefix("other:") {
                Some(raw) if !raw.is_empty() && raw.chars().all(|c| c.is_ascii_alphanumeric()) => {
                    Operation::Other(raw.to_owned())
                }
                _ => {
                    return Err(Error::invalid_config(format!(
                        "unknown operation {other:?}; expected insert, update, replace, delete, \
                         drop, rename, drop-database, invalidate, snapshot-read, one of {}, or \
                         other:<operationType>",
                        KNOWN_OTHER_OPERATIONS.join(", ")
                    )))
                }
            },
        })
    }

    /// The server's `operationType` spelling, as in published payloads and subjects.
    ///
    /// ```
    /// # use tidegate_plugin::Operation;
    /// assert_eq!(Operation::Insert.as_str(), "insert");
    /// assert_eq!(Operation::Other("modify".into()).as_str(), "modify");
    /// ```
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

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A database and, except for database-wide events, a collection.
///
/// ```
/// use tidegate_plugin::Namespace;
/// assert_eq!(Namespace::new("shop", Some("orders")).to_string(), "shop.orders");
/// assert_eq!(Namespace::new("shop", None).to_string(), "shop");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// Database name.
    pub db: String,
    /// Collection name; `None` for database-wide events.
    pub coll: Option<String>,
}

impl Namespace {
    /// A namespace.
    ///
    /// ```
    /// # use tidegate_plugin::Namespace;
    /// assert_eq!(Namespace::new("a", Some("b")).coll.as_deref(), Some("b"));
    /// ```
    pub fn new(db: impl Into<String>, coll: Option<&str>) -> Namespace {
        Namespace {
            db: db.into(),
            coll: coll.map(str::to_owned),
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.coll {
            Some(coll) => write!(f, "{}.{coll}", self.db),
            None => f.write_str(&self.db),
        }
    }
}

/// A namespace pattern from configuration: `db.coll` (that collection) or `db.*` (every
/// collection of `db`, and `db`'s database-wide events).
///
/// The first dot separates database from collection, because database names cannot contain
/// dots but collection names can: `app.system.views` is collection `system.views`.
///
/// ```
/// use tidegate_plugin::NamespacePattern;
///
/// let p = NamespacePattern::parse("shop.*")?;
/// assert!(p.matches("shop", Some("orders")));
/// assert!(p.matches("shop", None));
/// assert!(!p.matches("audit", Some("orders")));
/// assert!(NamespacePattern::parse("shop.ord*").is_err());
/// # Ok::<(), tidegate_plugin::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespacePattern {
    /// `db.coll`: exactly that collection.
    Collection {
        /// Database name.
        db: String,
        /// Collection name.
        coll: String,
    },
    /// `db.*`: every collection of the database, and its database-wide events.
    Database(String),
}

impl NamespacePattern {
    /// Parses `db.coll` or `db.*`; anything else is an [`Error::InvalidConfig`].
    ///
    /// ```
    /// # use tidegate_plugin::NamespacePattern;
    /// assert!(NamespacePattern::parse("shop").is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn parse(s: &str) -> Result<NamespacePattern> {
        let bad = |why: &str| {
            Err(Error::invalid_config(format!(
                "bad namespace pattern {s:?}: {why}"
            )))
        };
        let Some((db, coll)) = s.split_once('.') else {
            return bad("expected db.collection or db.*");
        };
        if db.is_empty() || coll.is_empty() {
            return bad("expected db.collection or db.*");
        }
        if db.contains('*') {
            return bad("the database part cannot be a wildcard");
        }
        if coll == "*" {
            return Ok(NamespacePattern::Database(db.to_owned()));
        }
        if coll.contains('*') {
            return bad("only a whole-collection wildcard (db.*) is supported");
        }
        Ok(NamespacePattern::Collection {
            db: db.to_owned(),
            coll: coll.to_owned(),
        })
    }

    /// Whether the namespace `db`/`coll` matches.
    ///
    /// ```
    /// # use tidegate_plugin::NamespacePattern;
    /// assert!(NamespacePattern::parse("a.b")?.matches("a", Some("b")));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn matches(&self, db: &str, coll: Option<&str>) -> bool {
        match self {
            NamespacePattern::Database(d) => d == db,
            NamespacePattern::Collection { db: d, coll: c } => d == db && coll == Some(c.as_str()),
        }
    }
}

/// An array the server shortened in place during an update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruncatedArray {
    /// Dotted path of the array field.
    pub field: String,
    /// Its length after the update.
    pub new_size: u32,
}

/// What an `update` changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateDescription {
    /// The updated fields, as a document whose keys are dotted paths (`"a.b": 1`).
    pub updated_fields: Document,
    /// Dotted paths of the removed fields.
    pub removed_fields: Vec<String>,
    /// Arrays truncated by the update.
    pub truncated_arrays: Vec<TruncatedArray>,
}

/// A MongoDB cluster time: the position of the change in the oplog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterTime {
    /// Seconds since the Unix epoch.
    pub seconds: u32,
    /// Ordinal of the operation within that second.
    pub increment: u32,
}

/// Present when the change was part of a multi-document transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// The logical session id.
    pub lsid: Document,
    /// The transaction number within that session.
    pub txn_number: u64,
}

/// One change, as read from the change stream.
///
/// Fields are public: read them directly, or by change-stream path with [`Event::lookup`].
/// The constructors ([`Event::insert`], [`Event::update`], [`Event::delete`]) build events for
/// unit tests.
///
/// ```
/// use serde_json::json;
/// use tidegate_plugin::{Event, Operation};
///
/// let event = Event::insert("shop", "orders", json!({"_id": 1, "author": {"id": 42}}));
/// assert_eq!(event.operation, Operation::Insert);
/// assert_eq!(event.namespace.to_string(), "shop.orders");
/// let doc = event.full_document.as_ref().expect("inserts carry the document");
/// assert_eq!(doc.get_i64("author.id")?, Some(42));
/// assert_eq!(event.key()?, Some(&json!(1)));
/// # Ok::<(), tidegate_plugin::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Unique, opaque id of the change (the resume token's `_data`). Outputs must keep it.
    pub id: String,
    /// What kind of change this is.
    pub operation: Operation,
    /// Where it happened.
    pub namespace: Namespace,
    /// For `Rename`: the new namespace.
    pub to: Option<Namespace>,
    /// `{"_id": …}` (plus the shard key on sharded collections) of the changed document.
    pub document_key: Option<Document>,
    /// The document after the change (inserts, replaces; updates with `full_document` set).
    pub full_document: Option<Document>,
    /// The document before the change, when pre-images are recorded and requested.
    pub full_document_before_change: Option<Document>,
    /// For `Update`: what changed.
    pub update_description: Option<UpdateDescription>,
    /// When the change was committed, in cluster time.
    pub cluster_time: Option<ClusterTime>,
    /// When the change was committed, in milliseconds since the Unix epoch.
    pub wall_time_ms: Option<i64>,
    /// Transaction details, when the change was part of one.
    pub transaction: Option<Transaction>,
}

/// A stand-in event id for events built in tests.
const TEST_ID: &str = "8200000001";

impl Event {
    /// A bare event: no documents, no times. The starting point for building test events.
    ///
    /// ```
    /// # use tidegate_plugin::{Event, Namespace, Operation};
    /// let e = Event::new("1", Operation::Drop, Namespace::new("shop", Some("orders")));
    /// assert!(e.full_document.is_none());
    /// ```
    pub fn new(id: impl Into<String>, operation: Operation, namespace: Namespace) -> Event {
        Event {
            id: id.into(),
            operation,
            namespace,
            to: None,
            document_key: None,
            full_document: None,
            full_document_before_change: None,
            update_description: None,
            cluster_time: None,
            wall_time_ms: None,
            transaction: None,
        }
    }

    /// An insert of `document` into `db.coll`, its `_id` as the document key (for tests).
    ///
    /// ```
    /// # use tidegate_plugin::Event;
    /// let e = Event::insert("shop", "orders", serde_json::json!({"_id": 7}));
    /// assert_eq!(e.key()?, Some(&serde_json::json!(7)));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn insert(db: &str, coll: &str, document: Value) -> Event {
        let key = json!({ "_id": document.get("_id").cloned().unwrap_or(Value::Null) });
        let mut e = Event::new(TEST_ID, Operation::Insert, Namespace::new(db, Some(coll)));
        e.document_key = Some(Document::from_json(key));
        e.full_document = Some(Document::from_json(document));
        e
    }

    /// An update of the document with `_id` `id` (for tests): `updated_fields` is keyed by
    /// dotted paths; `full_document` is the looked-up document, if any.
    ///
    /// ```
    /// # use serde_json::json;
    /// # use tidegate_plugin::Event;
    /// let e = Event::update("shop", "orders", json!(7), json!({"total": 3}), None);
    /// let fields = &e.update_description.as_ref().unwrap().updated_fields;
    /// assert_eq!(fields.get_i64("total")?, Some(3));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn update(
        db: &str,
        coll: &str,
        id: Value,
        updated_fields: Value,
        full_document: Option<Value>,
    ) -> Event {
        let mut e = Event::new(TEST_ID, Operation::Update, Namespace::new(db, Some(coll)));
        e.document_key = Some(Document::from_json(json!({ "_id": id })));
        e.full_document = full_document.map(Document::from_json);
        e.update_description = Some(UpdateDescription {
            updated_fields: Document::from_json(updated_fields),
            removed_fields: Vec::new(),
            truncated_arrays: Vec::new(),
        });
        e
    }

    /// A delete of the document with `_id` `id` (for tests).
    ///
    /// ```
    /// # use tidegate_plugin::{Event, Operation};
    /// assert_eq!(Event::delete("a", "b", serde_json::json!(1)).operation, Operation::Delete);
    /// ```
    pub fn delete(db: &str, coll: &str, id: Value) -> Event {
        let mut e = Event::new(TEST_ID, Operation::Delete, Namespace::new(db, Some(coll)));
        e.document_key = Some(Document::from_json(json!({ "_id": id })));
        e
    }

    /// The changed document's `_id`, from `document_key`.
    ///
    /// ```
    /// # use tidegate_plugin::Event;
    /// assert_eq!(Event::delete("a", "b", serde_json::json!("x")).key()?, Some(&serde_json::json!("x")));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn key(&self) -> Result<Option<&Value>> {
        match &self.document_key {
            Some(doc) => doc.get("_id"),
            None => Ok(None),
        }
    }

    /// The most complete document the event carries: `full_document`, else
    /// `full_document_before_change` (a delete with a pre-image).
    ///
    /// ```
    /// # use tidegate_plugin::Event;
    /// assert!(Event::insert("a", "b", serde_json::json!({})).document().is_some());
    /// assert!(Event::delete("a", "b", serde_json::json!(1)).document().is_none());
    /// ```
    pub fn document(&self) -> Option<&Document> {
        self.full_document
            .as_ref()
            .or(self.full_document_before_change.as_ref())
    }

    /// Every value a path in the published event's shape reaches, with MongoDB's array rule
    /// (see [`Document::get_all`]). The first segment names the part of the change-stream
    /// event, exactly as in a published payload or a change stream `$match`:
    /// `operationType`, `ns.db`, `ns.coll`, `to.db`, `to.coll`, `documentKey.…`,
    /// `fullDocument.…`, `fullDocumentBeforeChange.…`,
    /// `updateDescription.updatedFields.<key>`, `updateDescription.removedFields`, `wallTime`
    /// (milliseconds), `txnNumber`, `id`.
    ///
    /// ```
    /// use serde_json::json;
    /// # use tidegate_plugin::Event;
    /// let e = Event::insert("shop", "orders", json!({"_id": 1, "lines": [{"sku": "a"}, {"sku": "b"}]}));
    /// let values = |path| -> Result<Vec<serde_json::Value>, tidegate_plugin::Error> {
    ///     Ok(e.lookup(path)?.into_iter().map(|v| v.into_owned()).collect())
    /// };
    /// assert_eq!(values("operationType")?, [json!("insert")]);
    /// assert_eq!(values("ns.coll")?, [json!("orders")]);
    /// assert_eq!(values("fullDocument.lines.sku")?, [json!("a"), json!("b")]);
    /// assert!(values("updateDescription.removedFields")?.is_empty());
    /// assert!(e.lookup("fullDocument.nope")?.is_empty());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn lookup(&self, path: &str) -> Result<Vec<Cow<'_, Value>>> {
        let (first, rest) = match path.split_once('.') {
            Some((first, rest)) => (first, Some(rest)),
            None => (path, None),
        };
        let rest: Vec<&str> = rest.map(|r| r.split('.').collect()).unwrap_or_default();
        let synthetic = |value: Value| -> Vec<Cow<'_, Value>> {
            let mut found = Vec::new();
            collect_all(&value, &rest, &mut found);
            found.into_iter().cloned().map(Cow::Owned).collect()
        };
        let ns = |ns: &Namespace| json!({ "db": ns.db, "coll": ns.coll });
        Ok(match first {
            "id" => synthetic(json!(self.id)),
            "operationType" => synthetic(json!(self.operation.as_str())),
            "ns" => synthetic(ns(&self.namespace)),
            "to" => match &self.to {
                Some(to) => synthetic(ns(to)),
                None => Vec::new(),
            },
            "documentKey" => doc_lookup(self.document_key.as_ref(), &rest)?,
            "fullDocument" => doc_lookup(self.full_document.as_ref(), &rest)?,
            "fullDocumentBeforeChange" => {
                doc_lookup(self.full_document_before_change.as_ref(), &rest)?
            }
            "updateDescription" => match &self.update_description {
                None => Vec::new(),
                Some(u) => match rest.split_first() {
                    Some((&"updatedFields", [])) => {
                        vec![Cow::Owned(Value::Object(u.updated_fields.to_map()?))]
                    }
                    // Keys of updatedFields are dotted paths themselves: the rest is one key.
                    Some((&"updatedFields", key)) => u
                        .updated_fields
                        .map()?
                        .get(&key.join("."))
                        .map(Cow::Borrowed)
                        .into_iter()
                        .collect(),
                    _ => synthetic(json!({ "removedFields": u.removed_fields })),
                },
            },
            "wallTime" => self
                .wall_time_ms
                .map(|t| synthetic(json!(t)))
                .unwrap_or_default(),
            "txnNumber" => self
                .transaction
                .as_ref()
                .map(|t| synthetic(json!(t.txn_number)))
                .unwrap_or_default(),
            _ => Vec::new(),
        })
    }
}

/// The values `rest` reaches inside an optional document (the whole document when empty).
fn doc_lookup<'a>(doc: Option<&'a Document>, rest: &[&str]) -> Result<Vec<Cow<'a, Value>>> {
    let Some(doc) = doc else {
        return Ok(Vec::new());
    };
    if rest.is_empty() {
        return Ok(vec![Cow::Owned(Value::Object(doc.to_map()?))]);
    }
    if doc.is_in_host() {
        // The host searches its BSON: the document is not converted for one path.
        return Ok(doc
            .find(&rest.join("."))?
            .into_iter()
            .map(|f| Cow::Owned(f.value))
            .collect());
    }
    Ok(doc
        .get_all(&rest.join("."))?
        .into_iter()
        .map(Cow::Borrowed)
        .collect())
}
