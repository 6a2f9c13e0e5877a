//! Conversions between tidegate's [`Change`] (BSON documents) and the contract's
//! `change-event` (documents as relaxed Extended JSON bytes).
//!
//! Why relaxed EJSON at the boundary: every guest language parses JSON with its standard
//! library, and it is the default published encoding. Its cost is lossy numbers (an int64
//! that fits in 32 bits reads back as int32), so a document that comes back from the chain
//! byte-for-byte as it was sent keeps its original BSON; only documents a plugin actually
//! rewrote are re-parsed.

use bson::{Bson, Document};

use super::bindings::wit;
use crate::event::{Change, Namespace, Operation, UpdateDescription};

use crate::encode::relaxed_json as document_json;

/// Parses relaxed (or canonical) Extended JSON bytes back into a BSON document.
pub fn json_document(field: &str, bytes: &[u8]) -> Result<Document, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|err| format!("field '{field}' is not valid JSON: {err}"))?;
    match Bson::try_from(value) {
        Ok(Bson::Document(doc)) => Ok(doc),
        Ok(other) => Err(format!(
            "field '{field}' must be a JSON object, got {:?}",
            other.element_type()
        )),
        Err(err) => Err(format!("field '{field}' is not valid Extended JSON: {err}")),
    }
}

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

/// The contract's view of a change.
pub fn to_wit(change: &Change) -> wit::ChangeEvent {
    wit::ChangeEvent {
        id: change.id.clone(),
        operation: operation_to_wit(&change.operation),
        namespace: namespace_to_wit(&change.namespace),
        to: change.to.as_ref().map(namespace_to_wit),
        document_key: change.document_key.as_ref().map(document_json),
        full_document: change.full_document.as_ref().map(document_json),
        full_document_before_change: change
            .full_document_before_change
            .as_ref()
            .map(document_json),
        update_description: change
            .update_description
            .as_ref()
            .map(|u| wit::UpdateDescription {
                updated_fields: document_json(&u.updated_fields),
                removed_fields: u.removed_fields.clone(),
                truncated_arrays: u
                    .truncated_arrays
                    .iter()
                    .map(|(field, new_size)| wit::TruncatedArray {
                        field: field.clone(),
                        new_size: *new_size,
                    })
                    .collect(),
            }),
        cluster_time: change.cluster_time.map(|ts| wit::ClusterTime {
            seconds: ts.time,
            increment: ts.increment,
        }),
        wall_time_ms: change.wall_time.map(|t| t.timestamp_millis()),
        transaction: match (&change.lsid, change.txn_number) {
            (Some(lsid), Some(txn)) => Some(wit::Transaction {
                lsid: document_json(lsid),
                txn_number: txn.max(0) as u64,
            }),
            _ => None,
        },
    }
}

/// A document field coming back from the chain: the original BSON when the bytes are the
/// ones that were sent, otherwise the plugin's JSON parsed.
fn document_back(
    field: &str,
    returned: Option<Vec<u8>>,
    sent: &Option<Vec<u8>>,
    original: &Option<Document>,
) -> Result<Option<Document>, String> {
    match returned {
        None => Ok(None),
        Some(bytes) if sent.as_ref() == Some(&bytes) => Ok(original.clone()),
        Some(bytes) => json_document(field, &bytes).map(Some),
    }
}

/// A change as a plugin chain handed it back. `sent` is what the chain was given and
/// `original` the change it came from; together they let untouched documents keep their
/// original BSON.
pub fn from_wit(
    event: wit::ChangeEvent,
    sent: &wit::ChangeEvent,
    original: &Change,
) -> Result<Change, String> {
    let sent_update = sent.update_description.as_ref();
    let original_update = original.update_description.as_ref();
    let update_description = match event.update_description {
        None => None,
        Some(u) => {
            let updated_fields =
                if sent_update.map(|s| &s.updated_fields) == Some(&u.updated_fields) {
                    original_update
                        .map(|o| o.updated_fields.clone())
                        .unwrap_or_default()
                } else {
                    json_document("updateDescription.updatedFields", &u.updated_fields)?
                };
            Some(UpdateDescription {
                updated_fields,
                removed_fields: u.removed_fields,
                truncated_arrays: u
                    .truncated_arrays
                    .into_iter()
                    .map(|t| (t.field, t.new_size))
                    .collect(),
            })
        }
    };
    let (lsid, txn_number) = match event.transaction {
        None => (None, None),
        Some(t) => {
            let sent_lsid = sent.transaction.as_ref().map(|s| s.lsid.clone());
            let lsid = document_back("lsid", Some(t.lsid), &sent_lsid, &original.lsid)?;
            (lsid, Some(t.txn_number as i64))
        }
    };
    Ok(Change {
        id: event.id,
        operation: operation_from_wit(event.operation),
        namespace: namespace_from_wit(event.namespace),
        to: event.to.map(namespace_from_wit),
        document_key: document_back(
            "documentKey",
            event.document_key,
            &sent.document_key,
            &original.document_key,
        )?,
        full_document: document_back(
            "fullDocument",
            event.full_document,
            &sent.full_document,
            &original.full_document,
        )?,
        full_document_before_change: document_back(
            "fullDocumentBeforeChange",
            event.full_document_before_change,
            &sent.full_document_before_change,
            &original.full_document_before_change,
        )?,
        update_description,
        cluster_time: event.cluster_time.map(|ts| bson::Timestamp {
            time: ts.seconds,
            increment: ts.increment,
        }),
        wall_time: event.wall_time_ms.map(bson::DateTime::from_millis),
        lsid,
        txn_number,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn change() -> Change {
        Change {
            id: "8200".into(),
            operation: Operation::Update,
            namespace: Namespace {
                db: "d".into(),
                coll: Some("c".into()),
            },
            to: None,
            document_key: Some(doc! { "_id": bson::oid::ObjectId::new() }),
            full_document: Some(
                doc! { "_id": 1, "big": 7_i64, "when": bson::DateTime::from_millis(5) },
            ),
            full_document_before_change: None,
            update_description: Some(UpdateDescription {
                updated_fields: doc! { "a.b": 1 },
                removed_fields: vec!["x".into()],
                truncated_arrays: vec![("arr".into(), 2)],
            }),
            cluster_time: Some(bson::Timestamp {
                time: 1,
                increment: 2,
            }),
            wall_time: Some(bson::DateTime::from_millis(1000)),
            lsid: None,
            txn_number: None,
        }
    }

    /// An event the chain hands back untouched converts back to exactly the original,
    /// int64 included (relaxed JSON alone would turn `7_i64` into an int32).
    #[test]
    fn untouched_round_trip_is_lossless() {
        let original = change();
        let sent = to_wit(&original);
        let back = from_wit(sent.clone(), &sent, &original).unwrap();
        assert_eq!(back, original);
    }

    /// A rewritten document is parsed from the plugin's JSON; EJSON wrappers keep types.
    #[test]
    fn rewritten_document_is_parsed() {
        let original = change();
        let sent = to_wit(&original);
        let mut event = sent.clone();
        event.full_document = Some(br#"{"_id": 1, "n": {"$numberLong": "9"}}"#.to_vec());
        let back = from_wit(event, &sent, &original).unwrap();
        assert_eq!(back.full_document, Some(doc! { "_id": 1, "n": 9_i64 }));
    }

    /// Garbage from a plugin is an error naming the field, not a panic.
    #[test]
    fn invalid_json_names_the_field() {
        let original = change();
        let sent = to_wit(&original);
        let mut event = sent.clone();
        event.full_document = Some(b"[1,2".to_vec());
        let err = from_wit(event, &sent, &original).unwrap_err();
        assert!(err.contains("fullDocument"), "{err}");
    }
}
