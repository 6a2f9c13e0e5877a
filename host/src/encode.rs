//! How a change becomes a NATS message: its subject and its payload.
//!
//! The payload is the change stream's own event shape (`operationType`, `ns`, `documentKey`,
//! `fullDocument`, …) so that anyone who knows MongoDB change events can read it, plus `id`
//! (the resume token's `_data`).

use bson::{doc, Bson, Document};

use crate::config::Encoding;
use crate::event::{Change, Namespace};

/// Renders the subject template for a change. Characters that would split or wildcard a
/// subject token (`.`, `*`, `>`, whitespace) in database or collection names become `_`.
pub fn subject(template: &str, prefix: &str, change: &Change) -> String {
    let coll = change.namespace.coll.as_deref().unwrap_or("_");
    template
        .replace("{prefix}", prefix)
        .replace("{db}", &subject_token(&change.namespace.db))
        .replace("{coll}", &subject_token(coll))
        .replace("{operation}", &subject_token(change.operation.as_str()))
}

/// Makes `name` safe to use as one subject token.
pub fn subject_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_string();
    }
    name.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The change as one BSON document in the change stream's field names.
pub fn envelope(change: &Change) -> Document {
    let ns = |n: &Namespace| match &n.coll {
        Some(coll) => doc! { "db": &n.db, "coll": coll },
        None => doc! { "db": &n.db },
    };
    let mut out = doc! {
        "id": &change.id,
        "operationType": change.operation.as_str(),
        "ns": ns(&change.namespace),
    };
    if let Some(to) = &change.to {
        out.insert("to", ns(to));
    }
    if let Some(key) = &change.document_key {
        out.insert("documentKey", key.clone());
    }
    if let Some(update) = &change.update_description {
        let truncated: Vec<Bson> = update
            .truncated_arrays
            .iter()
            .map(|(field, size)| Bson::Document(doc! { "field": field, "newSize": *size as i64 }))
            .collect();
        out.insert(
            "updateDescription",
            doc! {
                "updatedFields": update.updated_fields.clone(),
                "removedFields": update.removed_fields.clone(),
                "truncatedArrays": truncated,
            },
        );
    }
    if let Some(full) = &change.full_document {
        out.insert("fullDocument", full.clone());
    }
    if let Some(before) = &change.full_document_before_change {
        out.insert("fullDocumentBeforeChange", before.clone());
    }
    if let Some(ts) = change.cluster_time {
        out.insert("clusterTime", ts);
    }
    if let Some(wall) = change.wall_time {
        out.insert("wallTime", wall);
    }
    if let Some(lsid) = &change.lsid {
        out.insert("lsid", lsid.clone());
    }
    if let Some(txn) = change.txn_number {
        out.insert("txnNumber", txn);
    }
    out
}

/// Encodes a change as a message payload.
pub fn payload(change: &Change, encoding: Encoding) -> Result<Vec<u8>, String> {
    let envelope = envelope(change);
    match encoding {
        Encoding::RelaxedJson => {
            serde_json::to_vec(&Bson::Document(envelope).into_relaxed_extjson())
                .map_err(|err| format!("cannot encode relaxed JSON: {err}"))
        }
        Encoding::CanonicalJson => {
            serde_json::to_vec(&Bson::Document(envelope).into_canonical_extjson())
                .map_err(|err| format!("cannot encode canonical JSON: {err}"))
        }
        Encoding::Bson => {
            bson::serialize_to_vec(&envelope).map_err(|err| format!("cannot encode BSON: {err}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Operation;

    fn change() -> Change {
        Change {
            id: "82abc".into(),
            operation: Operation::Insert,
            namespace: Namespace {
                db: "shop".into(),
                coll: Some("orders.v2".into()),
            },
            to: None,
            document_key: Some(doc! { "_id": 1 }),
            full_document: Some(doc! { "_id": 1, "n": 5_i64 }),
            full_document_before_change: None,
            update_description: None,
            cluster_time: Some(bson::Timestamp {
                time: 10,
                increment: 2,
            }),
            wall_time: None,
            lsid: None,
            txn_number: None,
        }
    }

    /// Dots in collection names must not create extra subject tokens.
    #[test]
    fn subject_escapes_dots() {
        let s = subject("{prefix}.{db}.{coll}.{operation}", "cdc", &change());
        assert_eq!(s, "cdc.shop.orders_v2.insert");
    }

    /// Canonical JSON keeps int64 distinct from int32; relaxed JSON does not.
    #[test]
    fn encodings_differ_in_fidelity() {
        let relaxed: serde_json::Value =
            serde_json::from_slice(&payload(&change(), Encoding::RelaxedJson).unwrap()).unwrap();
        assert_eq!(relaxed["fullDocument"]["n"], 5);
        assert_eq!(relaxed["operationType"], "insert");
        let canonical: serde_json::Value =
            serde_json::from_slice(&payload(&change(), Encoding::CanonicalJson).unwrap()).unwrap();
        assert_eq!(canonical["fullDocument"]["n"]["$numberLong"], "5");
        let raw = payload(&change(), Encoding::Bson).unwrap();
        let back: Document = bson::deserialize_from_slice(&raw).unwrap();
        assert_eq!(
            back.get_document("fullDocument")
                .unwrap()
                .get_i64("n")
                .unwrap(),
            5
        );
    }
}
