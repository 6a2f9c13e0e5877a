//! Conversions between tidegate's [`Change`] (raw BSON) and the contract's `change-event`
//! (documents as relaxed Extended JSON bytes).
//!
//! Why relaxed EJSON at the boundary: every guest language parses JSON with its standard
//! library, and it is the default published encoding. The JSON is written straight from the
//! raw documents ([`ejson`]). On the way back, a document returned byte-for-byte as it was
//! sent keeps its original BSON untouched; a rewritten one is read with the original beside it,
//! so every value the plugin left as it was keeps its BSON type and bytes (an Int64 that
//! relaxed JSON shows as a plain number, a sub-document whose keys look like a type wrapper),
//! and the change keeps the original's field order and the fields the contract does not carry.

use std::borrow::Cow;

use bson::raw::{cstr, RawArrayBuf, RawBsonRef, RawDocument, RawDocumentBuf};

use super::contract::v0_1::types as wit;
use crate::model::ejson;
use crate::model::{Change, Fields, Namespace, Operation};

fn operation_to_wit(op: &Operation) -> wit::Operation {
    match op {
        Operation::Insert => wit::Operation::Insert,
        Operation::Update => wit::Operation::Update,
        Operation::Replace => wit::Operation::Replace,
        Operation::Delete => wit::Operation::Delete,
        Operation::Drop => wit::Operation::Drop,
        Operation::Rename => wit::Operation::Rename,
        Operation::DropDatabase => wit::Operation::DropDatabase,
        Operation::Invalidate => wit::Operation::Invalidate,
        Operation::SnapshotRead => wit::Operation::SnapshotRead,
        Operation::Other(name) => wit::Operation::Other(name.clone()),
    }
}

fn operation_from_wit(op: wit::Operation) -> Operation {
    match op {
        wit::Operation::Insert => Operation::Insert,
        wit::Operation::Update => Operation::Update,
        wit::Operation::Replace => Operation::Replace,
        wit::Operation::Delete => Operation::Delete,
        wit::Operation::Drop => Operation::Drop,
        wit::Operation::Rename => Operation::Rename,
        wit::Operation::DropDatabase => Operation::DropDatabase,
        wit::Operation::Invalidate => Operation::Invalidate,
        wit::Operation::SnapshotRead => Operation::SnapshotRead,
        wit::Operation::Other(name) => Operation::Other(name),
    }
}

fn namespace_to_wit(ns: &Namespace) -> wit::Namespace {
    wit::Namespace {
        db: ns.db.clone(),
        coll: ns.coll.clone(),
    }
}

fn namespace_from_wit(ns: wit::Namespace) -> Namespace {
    Namespace {
        db: ns.db,
        coll: ns.coll,
    }
}

fn json(field: &str, doc: Option<&RawDocument>) -> Result<Option<Vec<u8>>, String> {
    doc.map(|d| ejson::relaxed(d).map_err(|e| format!("`{field}`: {e}")))
        .transpose()
}

/// The strings of an array field (`removedFields`).
fn strings(doc: &RawDocument, key: &str) -> Vec<String> {
    doc.get_array(key)
        .map(|a| {
            a.into_iter()
                .filter_map(|v| v.ok().and_then(|v| v.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `truncatedArrays` as the contract has it.
fn truncated(doc: &RawDocument) -> Vec<wit::TruncatedArray> {
    let Ok(arrays) = doc.get_array("truncatedArrays") else {
        return Vec::new();
    };
    arrays
        .into_iter()
        .filter_map(|t| {
            let t = t.ok()?.as_document()?;
            let new_size = match t.get("newSize").ok()?? {
                RawBsonRef::Int32(n) => i64::from(n),
                RawBsonRef::Int64(n) => n,
                _ => return None,
            };
            Some(wit::TruncatedArray {
                field: t.get_str("field").ok()?.to_string(),
                new_size: new_size.clamp(0, i64::from(u32::MAX)) as u32,
            })
        })
        .collect()
}

/// The contract's view of a change. Fails only on malformed BSON.
pub fn to_wit(change: &Change) -> Result<wit::ChangeEvent, String> {
    let update_description = match change.update_description() {
        None => None,
        Some(u) => Some(wit::UpdateDescription {
            updated_fields: match u.get_document("updatedFields") {
                Ok(fields) => ejson::relaxed(fields)
                    .map_err(|e| format!("`updateDescription.updatedFields`: {e}"))?,
                Err(_) => b"{}".to_vec(),
            },
            removed_fields: strings(u, "removedFields"),
            truncated_arrays: truncated(u),
        }),
    };
    let transaction = match (change.lsid(), change.txn_number()) {
        (Some(lsid), Some(txn)) => Some(wit::Transaction {
            lsid: ejson::relaxed(lsid).map_err(|e| format!("`lsid`: {e}"))?,
            txn_number: txn.max(0) as u64,
        }),
        _ => None,
    };
    Ok(wit::ChangeEvent {
        id: change.id().to_string(),
        operation: operation_to_wit(change.operation()),
        namespace: namespace_to_wit(change.namespace()),
        to: change.to().map(namespace_to_wit),
        document_key: json("documentKey", change.document_key())?,
        full_document: json("fullDocument", change.full_document())?,
        full_document_before_change: json(
            "fullDocumentBeforeChange",
            change.full_document_before_change(),
        )?,
        update_description,
        cluster_time: change.cluster_time().map(|ts| wit::ClusterTime {
            seconds: ts.time,
            increment: ts.increment,
        }),
        wall_time_ms: change.wall_time().map(|t| t.timestamp_millis()),
        transaction,
    })
}

/// A document field coming back from the chain: the original when the bytes are the ones
/// that were sent, otherwise the plugin's JSON read against the original.
fn document_back<'a>(
    field: &str,
    returned: Option<Vec<u8>>,
    sent: Option<&Vec<u8>>,
    original: Option<&'a RawDocument>,
) -> Result<Option<Cow<'a, RawDocument>>, String> {
    match (returned, original) {
        (None, _) => Ok(None),
        (Some(bytes), Some(original)) if sent == Some(&bytes) => Ok(Some(Cow::Borrowed(original))),
        (Some(bytes), original) => {
            ejson::parse_document(field, &bytes, original).map(|d| Some(Cow::Owned(d)))
        }
    }
}

/// `updateDescription` coming back: the original when nothing in it changed, else rebuilt in
/// the original's field order (keeping fields the contract does not carry).
fn update_back<'a>(
    returned: wit::UpdateDescription,
    sent: Option<&wit::UpdateDescription>,
    original: Option<&'a RawDocument>,
) -> Result<Cow<'a, RawDocument>, String> {
    if let (Some(sent), Some(original)) = (sent, original) {
        let same_truncated = sent.truncated_arrays.len() == returned.truncated_arrays.len()
            && sent
                .truncated_arrays
                .iter()
                .zip(&returned.truncated_arrays)
                .all(|(a, b)| a.field == b.field && a.new_size == b.new_size);
        if sent.updated_fields == returned.updated_fields
            && sent.removed_fields == returned.removed_fields
            && same_truncated
        {
            return Ok(Cow::Borrowed(original));
        }
    }
    let old_fields = original.and_then(|o| o.get_document("updatedFields").ok());
    let updated = match (sent, old_fields) {
        (Some(sent), Some(old)) if sent.updated_fields == returned.updated_fields => old.to_owned(),
        _ => ejson::parse_document(
            "updateDescription.updatedFields",
            &returned.updated_fields,
            old_fields,
        )?,
    };
    let mut removed = RawArrayBuf::new();
    for field in &returned.removed_fields {
        removed.push(field.as_str());
    }
    let mut truncated = RawArrayBuf::new();
    for t in &returned.truncated_arrays {
        let mut entry = RawDocumentBuf::new();
        entry.append(cstr!("field"), t.field.as_str());
        // The server's type: int32.
        match i32::try_from(t.new_size) {
            Ok(size) => entry.append(cstr!("newSize"), size),
            Err(_) => entry.append(cstr!("newSize"), i64::from(t.new_size)),
        }
        truncated.push(entry);
    }
    let mut out = RawDocumentBuf::new();
    let mut written = [false; 3];
    let put = |out: &mut RawDocumentBuf, key: &str| match key {
        "updatedFields" => out.append(cstr!("updatedFields"), &updated),
        "removedFields" => out.append(cstr!("removedFields"), &removed),
        _ => out.append(cstr!("truncatedArrays"), &truncated),
    };
    const OWN: [&str; 3] = ["updatedFields", "removedFields", "truncatedArrays"];
    if let Some(original) = original {
        for element in original.iter_elements() {
            let element = element.map_err(|e| format!("malformed BSON: {e}"))?;
            let key = element.key();
            match OWN.iter().position(|k| *k == key.as_str()) {
                Some(slot) => {
                    written[slot] = true;
                    put(&mut out, OWN[slot]);
                }
                None => {
                    let value = element
                        .value()
                        .map_err(|e| format!("malformed BSON: {e}"))?;
                    out.append(key, value);
                }
            }
        }
    }
    for (slot, key) in OWN.iter().enumerate() {
        if !written[slot] {
            put(&mut out, key);
        }
    }
    Ok(Cow::Owned(out))
}

/// A change as a plugin chain handed it back. `sent` is what the chain was given and
/// `original` the change it came from; together they let untouched values keep their
/// original BSON.
pub fn from_wit(
    event: wit::ChangeEvent,
    sent: &wit::ChangeEvent,
    original: &Change,
) -> Result<Change, String> {
    let update_description = match event.update_description {
        None => None,
        Some(u) => Some(update_back(
            u,
            sent.update_description.as_ref(),
            original.update_description(),
        )?),
    };
    let (lsid, txn_number) = match event.transaction {
        None => (None, None),
        Some(t) => {
            let sent_lsid = sent.transaction.as_ref().map(|s| &s.lsid);
            let lsid = document_back("lsid", Some(t.lsid), sent_lsid, original.lsid())?;
            (lsid, Some(t.txn_number as i64))
        }
    };
    let fields = Fields {
        id: event.id,
        operation: operation_from_wit(event.operation),
        namespace: namespace_from_wit(event.namespace),
        to: event.to.map(namespace_from_wit),
        document_key: document_back(
            "documentKey",
            event.document_key,
            sent.document_key.as_ref(),
            original.document_key(),
        )?,
        full_document: document_back(
            "fullDocument",
            event.full_document,
            sent.full_document.as_ref(),
            original.full_document(),
        )?,
        full_document_before_change: document_back(
            "fullDocumentBeforeChange",
            event.full_document_before_change,
            sent.full_document_before_change.as_ref(),
            original.full_document_before_change(),
        )?,
        update_description,
        cluster_time: event.cluster_time.map(|ts| bson::Timestamp {
            time: ts.seconds,
            increment: ts.increment,
        }),
        wall_time: event.wall_time_ms.map(bson::DateTime::from_millis),
        lsid,
        txn_number,
    };
    Change::from_fields(fields, Some(original))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    /// An update as the server sends it, with a field the contract does not model.
    fn change() -> Change {
        let event = rawdoc! {
            "_id": { "_data": "8200" },
            "operationType": "update",
            "clusterTime": bson::Timestamp { time: 1, increment: 2 },
            "wallTime": bson::DateTime::from_millis(1000),
            "collectionUUID": bson::Binary { subtype: bson::spec::BinarySubtype::Uuid, bytes: vec![1; 16] },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": bson::oid::ObjectId::new() },
            "updateDescription": {
                "updatedFields": { "a.b": 1, "odd": { "$oid": "not-an-oid" } },
                "removedFields": ["x"],
                "truncatedArrays": [{ "field": "arr", "newSize": 2 }],
                "disambiguatedPaths": {},
            },
            "fullDocument": {
                "_id": 1, "big": 7_i64, "when": bson::DateTime::from_millis(5),
                "odd": { "$oid": "not-an-oid" }, "n": { "$numberLong": "5" }, "name": "a",
            },
        };
        Change::from_server_event(&event).unwrap().1
    }

    /// An event the chain hands back untouched converts back to exactly the original bytes.
    #[test]
    fn untouched_round_trip_is_exact() {
        let original = change();
        let sent = to_wit(&original).unwrap();
        let back = from_wit(sent.clone(), &sent, &original).unwrap();
        assert_eq!(back.document().as_bytes(), original.document().as_bytes());
    }

    /// A rewritten document keeps the original's bytes for every value the plugin left
    /// alone (int64 shown as a number, `$`-keyed sub-documents), the change keeps its field
    /// order and unmodeled fields, and new wrappers are read as their types.
    #[test]
    fn rewritten_document_keeps_untouched_values() {
        let original = change();
        let sent = to_wit(&original).unwrap();
        let text = String::from_utf8(sent.full_document.clone().unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"_id":1,"big":7,"when":{"$date":"1970-01-01T00:00:00.005Z"},"odd":{"$oid":"not-an-oid"},"n":{"$numberLong":"5"},"name":"a"}"#
        );
        let mut event = sent.clone();
        event.full_document = Some(
            text.replace(
                r#""name":"a""#,
                r#""name":"b","added":{"$numberLong":"9"},"big2":8"#,
            )
            .into_bytes(),
        );
        let back = from_wit(event, &sent, &original).unwrap();
        let full = back.full_document().unwrap();
        let expected = rawdoc! {
            "_id": 1, "big": 7_i64, "when": bson::DateTime::from_millis(5),
            "odd": { "$oid": "not-an-oid" }, "n": { "$numberLong": "5" }, "name": "b",
            "added": 9_i64, "big2": 8,
        };
        assert_eq!(full.as_bytes(), expected.as_bytes());
        let keys: Vec<&str> = back
            .document()
            .iter_elements()
            .map(|e| e.unwrap().key().as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "operationType",
                "clusterTime",
                "wallTime",
                "collectionUUID",
                "ns",
                "documentKey",
                "updateDescription",
                "fullDocument"
            ]
        );
        assert_eq!(
            back.update_description().unwrap().as_bytes(),
            original.update_description().unwrap().as_bytes()
        );
    }

    /// An edited updateDescription keeps its unmodeled fields and untouched values.
    #[test]
    fn rewritten_update_description() {
        let original = change();
        let sent = to_wit(&original).unwrap();
        let mut event = sent.clone();
        if let Some(u) = event.update_description.as_mut() {
            u.removed_fields.push("y".into());
        }
        let back = from_wit(event, &sent, &original).unwrap();
        let u = back.update_description().unwrap();
        let expected = rawdoc! {
            "updatedFields": { "a.b": 1, "odd": { "$oid": "not-an-oid" } },
            "removedFields": ["x", "y"],
            "truncatedArrays": [{ "field": "arr", "newSize": 2 }],
            "disambiguatedPaths": {},
        };
        assert_eq!(u.as_bytes(), expected.as_bytes());
    }

    /// Garbage from a plugin is an error naming the field, not a panic; so is a type
    /// wrapper with a value of the wrong type.
    #[test]
    fn invalid_output_names_the_field() {
        let original = change();
        let sent = to_wit(&original).unwrap();
        let mut event = sent.clone();
        event.full_document = Some(b"[1,2".to_vec());
        let err = from_wit(event, &sent, &original).unwrap_err();
        assert!(err.contains("fullDocument"), "{err}");
        let mut event = sent.clone();
        event.full_document = Some(br#"{"_id": 1, "x": {"$oid": "zz"}}"#.to_vec());
        let err = from_wit(event, &sent, &original).unwrap_err();
        assert!(err.contains("fullDocument.x"), "{err}");
    }
}
