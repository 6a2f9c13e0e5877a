//! Payload shapes (`sink.format`): the change event as tidegate has always published it plus
//! `tsMs`, the value Debezium's MongoDB connector emits, or the document alone. Every shape
//! is written from the change's raw BSON (see `model::ejson`); `docs/formats.md` shows each.
//!
//! The Debezium and full-document shapes describe one document. Events that are not about
//! one (drop, rename, dropDatabase, invalidate, DDL) keep the change-event shape in every
//! format, with their own `Content-Type` (`…format=change-event`), so that no event is
//! dropped and none is dressed up as a document.

use bson::raw::{RawBsonRef, RawDocument};

use crate::config::{Encoding, Format};
use crate::model::ejson::{write_document, write_value, Mode};
use crate::model::failure::FailureKind;
use crate::model::{Change, Operation};
use crate::sink::encode;

/// A payload and its `Content-Type`.
#[derive(Debug)]
pub struct Payload {
    /// The encoded bytes (empty for a delete in the full-document shape).
    pub bytes: Vec<u8>,
    /// The `Content-Type` header's value.
    pub content_type: String,
}

/// Why a change cannot be published in the configured shape: the kind and reason a dead
/// letter carries.
pub type Refusal = (FailureKind, String);

/// Writes changes in one pipeline's format and encoding.
#[derive(Debug, Clone)]
pub struct Formatter {
    format: Format,
    encoding: Encoding,
    /// Debezium's `source.name` (the connector's logical name): the pipeline id.
    name: String,
    content_type: String,
    change_event_type: String,
}

impl Formatter {
    /// A formatter for pipeline `name`.
    pub fn new(format: Format, encoding: Encoding, name: &str) -> Formatter {
        Formatter {
            format,
            encoding,
            name: name.to_string(),
            content_type: format.content_type(encoding),
            change_event_type: match format {
                Format::ChangeEvent => format.content_type(encoding),
                _ => format!("{}; format=change-event", encoding.content_type()),
            },
        }
    }

    /// `change` as a payload in this formatter's shape.
    pub fn payload(&self, change: &Change) -> Result<Payload, Refusal> {
        let encoding_failed = |message: String| (FailureKind::Encoding, message);
        let about_a_document = matches!(
            change.operation(),
            Operation::Insert
                | Operation::Update
                | Operation::Replace
                | Operation::Delete
                | Operation::SnapshotRead
        );
        let (bytes, content_type) = match self.format {
            Format::Debezium if about_a_document => (
                debezium(change, self.mode(), &self.name).map_err(encoding_failed)?,
                &self.content_type,
            ),
            Format::FullDocument if about_a_document => {
                (self.full_document(change)?, &self.content_type)
            }
            Format::ChangeEvent => (
                change_event(change, self.encoding).map_err(encoding_failed)?,
                &self.content_type,
            ),
            _ => (
                change_event(change, self.encoding).map_err(encoding_failed)?,
                &self.change_event_type,
            ),
        };
        Ok(Payload {
            bytes,
            content_type: content_type.clone(),
        })
    }

    /// The Extended JSON mode of the JSON encodings (BSON, refused with `debezium` at
    /// validation, writes nested strings canonically).
    fn mode(&self) -> Mode {
        match self.encoding {
            Encoding::RelaxedJson => Mode::Relaxed,
            Encoding::CanonicalJson | Encoding::Bson => Mode::Canonical,
        }
    }

    /// The document itself; nothing for a delete; a refusal for an event that should carry
    /// one and does not (an update without `fullDocument`).
    fn full_document(&self, change: &Change) -> Result<Vec<u8>, Refusal> {
        if *change.operation() == Operation::Delete {
            return Ok(Vec::new());
        }
        let Some(document) = change.full_document() else {
            return Err((
                FailureKind::MissingDocument,
                format!(
                    "format = \"full-document\": this {} event carries no fullDocument (with \
                     full_document = \"update-lookup\" the document may have been deleted \
                     since; with \"when-available\" it has no post-image)",
                    change.operation().as_str()
                ),
            ));
        };
        match self.encoding {
            Encoding::Bson => Ok(document.as_bytes().to_vec()),
            _ => {
                let mut out = Vec::with_capacity(document.as_bytes().len() + 64);
                write_document(document, self.mode(), &mut out)
                    .map_err(|e| (FailureKind::Encoding, e))?;
                Ok(out)
            }
        }
    }
}

/// The change event (see [`Change`]) with `tsMs` ([`Change::time_ms`]) as its last field,
/// unless it has no time or already holds a `tsMs` of its own.
pub fn change_event(change: &Change, encoding: Encoding) -> Result<Vec<u8>, String> {
    let mut out = encode::payload(change, encoding)?;
    let Some(ts_ms) = change
        .time_ms()
        .filter(|_| matches!(change.document().get("tsMs"), Ok(None)))
    else {
        return Ok(out);
    };
    let mode = match encoding {
        Encoding::Bson => {
            append_i64(&mut out, "tsMs", ts_ms)?;
            return Ok(out);
        }
        Encoding::RelaxedJson => Mode::Relaxed,
        Encoding::CanonicalJson => Mode::Canonical,
    };
    out.pop(); // the closing brace
    if out.len() > 1 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"tsMs\":");
    write_value(RawBsonRef::Int64(ts_ms), mode, &mut out)?;
    out.push(b'}');
    Ok(out)
}

/// Appends an Int64 element `key: value` to the BSON document in `bytes`.
fn append_i64(bytes: &mut Vec<u8>, key: &str, value: i64) -> Result<(), String> {
    bytes.pop(); // the document's terminating NUL
    bytes.push(0x12);
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&value.to_le_bytes());
    bytes.push(0);
    let len = i32::try_from(bytes.len()).map_err(|_| "document too large")?;
    bytes
        .get_mut(..4)
        .ok_or("malformed BSON: no length")?
        .copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// The value Debezium's MongoDB connector emits for `change`, as Kafka Connect's
/// `JsonConverter` writes it with `schemas.enable=false`: `before`, `after` and
/// `updateDescription.updatedFields` are JSON *strings* holding Extended JSON, `op` is
/// `c`/`u`/`d`/`r` (a replace is `u`, as Debezium maps it), top-level `ts_ms` is when
/// tidegate wrote the event and `source.ts_ms` when the change happened.
fn debezium(change: &Change, mode: Mode, name: &str) -> Result<Vec<u8>, String> {
    let op = match change.operation() {
        Operation::Insert => "c",
        Operation::Update | Operation::Replace => "u",
        Operation::Delete => "d",
        _ => "r",
    };
    let snapshot = *change.operation() == Operation::SnapshotRead;
    let mut out = Vec::with_capacity(change.document().as_bytes().len() * 2 + 512);
    out.extend_from_slice(b"{\"before\":");
    json_string_of(change.full_document_before_change(), mode, &mut out)?;
    out.extend_from_slice(b",\"after\":");
    // Debezium puts a document in `after` for creates, reads, and updates that carry one.
    let after = match op {
        "d" => None,
        _ => change.full_document(),
    };
    json_string_of(after, mode, &mut out)?;
    out.extend_from_slice(b",\"updateDescription\":");
    match change.update_description().filter(|_| op == "u") {
        Some(description) => update_description(description, mode, &mut out)?,
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"source\":");
    source(change, snapshot, name, mode, &mut out)?;
    let now = now_nanos();
    out.extend_from_slice(b",\"op\":");
    serde(&op, &mut out);
    out.extend_from_slice(b",\"ts_ms\":");
    serde(&(now / 1_000_000), &mut out);
    out.extend_from_slice(b",\"ts_us\":");
    serde(&(now / 1_000), &mut out);
    out.extend_from_slice(b",\"ts_ns\":");
    serde(&now, &mut out);
    out.extend_from_slice(b",\"transaction\":null}");
    Ok(out)
}

/// `source`: Debezium's MongoDB source block. `ts_ms` is the cluster time's seconds × 1000
/// and `ord` its increment, as Debezium fills them (a snapshot read: when it was read, and
/// 0); `wallTime` the commit's wall clock in milliseconds.
fn source(
    change: &Change,
    snapshot: bool,
    name: &str,
    mode: Mode,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let cluster = change.cluster_time();
    let ts_ms = match (snapshot, cluster) {
        (false, Some(time)) => i64::from(time.time) * 1000,
        _ => change.time_ms().unwrap_or_default(),
    };
    let namespace = change.namespace();
    out.extend_from_slice(b"{\"version\":");
    serde(&concat!("tidegate-", env!("CARGO_PKG_VERSION")), out);
    out.extend_from_slice(b",\"connector\":\"mongodb\",\"name\":");
    serde(name, out);
    out.extend_from_slice(b",\"ts_ms\":");
    serde(&ts_ms, out);
    out.extend_from_slice(b",\"snapshot\":");
    serde(if snapshot { "true" } else { "false" }, out);
    out.extend_from_slice(b",\"db\":");
    serde(&namespace.db, out);
    out.extend_from_slice(b",\"sequence\":null,\"ts_us\":");
    serde(&(ts_ms * 1_000), out);
    out.extend_from_slice(b",\"ts_ns\":");
    serde(&(i128::from(ts_ms) * 1_000_000), out);
    out.extend_from_slice(b",\"collection\":");
    serde(&namespace.coll, out);
    out.extend_from_slice(b",\"ord\":");
    serde(
        &cluster.filter(|_| !snapshot).map_or(0, |t| t.increment),
        out,
    );
    out.extend_from_slice(b",\"lsid\":");
    json_string_of(change.lsid(), mode, out)?;
    out.extend_from_slice(b",\"txnNumber\":");
    serde(&change.txn_number(), out);
    out.extend_from_slice(b",\"wallTime\":");
    serde(&change.wall_time().map(|t| t.timestamp_millis()), out);
    out.push(b'}');
    Ok(())
}

/// Debezium's `updateDescription`: `removedFields` (a list, `null` when empty),
/// `updatedFields` (Extended JSON as a string), `truncatedArrays` (`[{field, size}]`, `null`
/// when empty).
fn update_description(
    description: &RawDocument,
    mode: Mode,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let malformed = |e: bson::error::Error| format!("malformed updateDescription: {e}");
    out.extend_from_slice(b"{\"removedFields\":");
    let removed: Vec<&str> = match description.get_array("removedFields") {
        Ok(list) => list.into_iter().filter_map(|v| v.ok()?.as_str()).collect(),
        Err(_) => Vec::new(),
    };
    match removed.is_empty() {
        true => out.extend_from_slice(b"null"),
        false => serde(&removed, out),
    }
    out.extend_from_slice(b",\"updatedFields\":");
    json_string_of(description.get_document("updatedFields").ok(), mode, out)?;
    out.extend_from_slice(b",\"truncatedArrays\":");
    let mut truncated = Vec::new();
    if let Ok(list) = description.get_array("truncatedArrays") {
        for entry in list {
            let Some(entry) = entry.map_err(malformed)?.as_document() else {
                continue;
            };
            let field = entry.get_str("field").map_err(malformed)?;
            let size = match entry.get("newSize").map_err(malformed)? {
                Some(RawBsonRef::Int32(n)) => i64::from(n),
                Some(RawBsonRef::Int64(n)) => n,
                _ => continue,
            };
            truncated.push(serde_json::json!({ "field": field, "size": size }));
        }
    }
    match truncated.is_empty() {
        true => out.extend_from_slice(b"null"),
        false => serde(&truncated, out),
    }
    out.push(b'}');
    Ok(())
}

/// `document` as a JSON string holding its Extended JSON text in `mode`, or `null`.
fn json_string_of(
    document: Option<&RawDocument>,
    mode: Mode,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    match document {
        Some(document) => {
            let mut text = Vec::with_capacity(document.as_bytes().len() + 64);
            write_document(document, mode, &mut text)?;
            serde(String::from_utf8_lossy(&text).as_ref(), out);
        }
        None => out.extend_from_slice(b"null"),
    }
    Ok(())
}

/// Writes a value that cannot fail to serialise (strings, numbers, small JSON trees).
fn serde<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let _infallible = serde_json::to_writer(&mut *out, value);
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
fn now_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Fields, Namespace};
    use bson::rawdoc;
    use std::borrow::Cow;

    fn change(operation: Operation) -> Change {
        let key = rawdoc! { "_id": 7 };
        let full = rawdoc! { "_id": 7, "n": 5_i64, "name": "x" };
        let before = rawdoc! { "_id": 7, "n": 4_i64 };
        let description = rawdoc! {
            "updatedFields": { "n": 5_i64, "name": "x" },
            "removedFields": ["gone"],
            "truncatedArrays": [{ "field": "list", "newSize": 2 }],
        };
        let update = operation == Operation::Update;
        let fields = Fields {
            document_key: Some(Cow::Owned(key)),
            full_document: (operation != Operation::Delete).then_some(Cow::Owned(full)),
            full_document_before_change: Some(Cow::Owned(before)),
            update_description: update.then_some(Cow::Owned(description)),
            cluster_time: Some(bson::Timestamp {
                time: 1_700_000_000,
                increment: 3,
            }),
            wall_time: Some(bson::DateTime::from_millis(1_700_000_000_123)),
            ..Fields::new(
                "82abc",
                operation,
                Namespace {
                    db: "shop".into(),
                    coll: Some("orders".into()),
                },
            )
        };
        Change::from_fields(fields, None).unwrap()
    }

    fn json(formatter: &Formatter, change: &Change) -> serde_json::Value {
        serde_json::from_slice(&formatter.payload(change).unwrap().bytes).unwrap()
    }

    /// `tsMs` comes last, from `wallTime`, in every encoding.
    #[test]
    fn change_event_gains_ts_ms() {
        let change = change(Operation::Insert);
        let relaxed =
            String::from_utf8(change_event(&change, Encoding::RelaxedJson).unwrap()).unwrap();
        assert!(relaxed.ends_with(r#","tsMs":1700000000123}"#), "{relaxed}");
        assert!(
            relaxed.starts_with(r#"{"id":"82abc","operationType":"insert""#),
            "{relaxed}"
        );
        let canonical =
            String::from_utf8(change_event(&change, Encoding::CanonicalJson).unwrap()).unwrap();
        assert!(
            canonical.ends_with(r#","tsMs":{"$numberLong":"1700000000123"}}"#),
            "{canonical}"
        );
        let bytes = change_event(&change, Encoding::Bson).unwrap();
        let doc = RawDocument::from_bytes(&bytes).unwrap();
        assert_eq!(doc.get_i64("tsMs").unwrap(), 1_700_000_000_123);
        assert_eq!(doc.get_str("id").unwrap(), "82abc");
    }

    /// Debezium's fields and forms: strings of Extended JSON, `op` letters, the source block.
    #[test]
    fn debezium_envelope() {
        let formatter = Formatter::new(Format::Debezium, Encoding::RelaxedJson, "orders");
        let update = json(&formatter, &change(Operation::Update));
        assert_eq!(update["op"], "u");
        assert_eq!(update["after"], r#"{"_id":7,"n":5,"name":"x"}"#);
        assert_eq!(update["before"], r#"{"_id":7,"n":4}"#);
        let description = &update["updateDescription"];
        assert_eq!(description["updatedFields"], r#"{"n":5,"name":"x"}"#);
        assert_eq!(description["removedFields"], serde_json::json!(["gone"]));
        assert_eq!(
            description["truncatedArrays"],
            serde_json::json!([{ "field": "list", "size": 2 }])
        );
        let source = &update["source"];
        assert_eq!(source["connector"], "mongodb");
        assert_eq!(source["name"], "orders");
        assert_eq!(source["ts_ms"], 1_700_000_000_000_i64);
        assert_eq!(source["ord"], 3);
        assert_eq!(source["wallTime"], 1_700_000_000_123_i64);
        assert_eq!(source["snapshot"], "false");
        assert_eq!(source["db"], "shop");
        assert_eq!(source["collection"], "orders");
        assert!(source["lsid"].is_null() && source["txnNumber"].is_null());
        assert!(update["ts_ms"].as_i64().unwrap() > 1_700_000_000_000);

        let replace = json(&formatter, &change(Operation::Replace));
        assert_eq!(replace["op"], "u");
        assert!(replace["updateDescription"].is_null());
        let delete = json(&formatter, &change(Operation::Delete));
        assert_eq!(delete["op"], "d");
        assert!(delete["after"].is_null());
        assert_eq!(delete["before"], r#"{"_id":7,"n":4}"#);
        assert_eq!(json(&formatter, &change(Operation::Insert))["op"], "c");

        let canonical = Formatter::new(Format::Debezium, Encoding::CanonicalJson, "orders");
        let insert = json(&canonical, &change(Operation::Insert));
        assert_eq!(
            insert["after"],
            r#"{"_id":{"$numberInt":"7"},"n":{"$numberLong":"5"},"name":"x"}"#
        );
    }

    /// The document alone; deletes empty; an update without a document refused; events
    /// about no document keep the change-event shape and say so.
    #[test]
    fn full_document_shape() {
        let formatter = Formatter::new(Format::FullDocument, Encoding::RelaxedJson, "orders");
        let insert = formatter.payload(&change(Operation::Insert)).unwrap();
        assert_eq!(insert.bytes, br#"{"_id":7,"n":5,"name":"x"}"#);
        assert_eq!(
            insert.content_type,
            "application/json; ejson=relaxed; format=full-document"
        );
        assert!(formatter
            .payload(&change(Operation::Delete))
            .unwrap()
            .bytes
            .is_empty());
        let bare = change(Operation::Update)
            .without(&["fullDocument"])
            .unwrap();
        let (kind, reason) = formatter.payload(&bare).unwrap_err();
        assert_eq!(kind, FailureKind::MissingDocument);
        assert!(
            reason.contains("update event carries no fullDocument"),
            "{reason}"
        );
        let drop = Change::from_fields(
            Fields::new(
                "82abd",
                Operation::Drop,
                change(Operation::Insert).namespace().clone(),
            ),
            None,
        )
        .unwrap();
        let payload = formatter.payload(&drop).unwrap();
        assert_eq!(
            payload.content_type,
            "application/json; ejson=relaxed; format=change-event"
        );
        assert!(String::from_utf8(payload.bytes)
            .unwrap()
            .contains(r#""operationType":"drop""#));
        let bson = Formatter::new(Format::FullDocument, Encoding::Bson, "orders");
        let raw = bson.payload(&change(Operation::Insert)).unwrap().bytes;
        assert_eq!(
            RawDocument::from_bytes(&raw).unwrap().get_i64("n").unwrap(),
            5
        );
    }
}
