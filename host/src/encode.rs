//! How a change becomes a NATS message: its subject and its payload.
//!
//! The payload is the change stream's own event shape (`operationType`, `ns`, `documentKey`,
//! `fullDocument`, …) so that anyone who knows MongoDB change events can read it, plus `id`
//! (the resume token's `_data`).

use bson::{doc, Bson, Document};

use crate::config::Encoding;
use crate::event::{Change, Namespace};

/// A parsed subject template (`{prefix}.{db}.{coll}.{operation}`), rendered per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Db,
    Coll,
    Operation,
}

impl SubjectTemplate {
    /// Parses `template`, substituting `prefix` for `{prefix}` once and for all. Placeholders:
    /// `{prefix}`, `{db}`, `{coll}`, `{operation}`; anything else in braces is an error.
    pub fn parse(template: &str, prefix: &str) -> Result<SubjectTemplate, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in '{template}'"))?;
            let part = match &rest[open + 1..open + close] {
                "prefix" => {
                    literal.push_str(prefix);
                    None
                }
                "db" => Some(Part::Db),
                "coll" => Some(Part::Coll),
                "operation" => Some(Part::Operation),
                other => return Err(format!("unknown placeholder '{{{other}}}' in '{template}'")),
            };
            if let Some(part) = part {
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(part);
            }
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched '}}' in '{template}'"));
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(SubjectTemplate { parts })
    }

    /// The subject of `change`. Characters that would split or wildcard a subject token (`.`,
    /// `*`, `>`, whitespace) in database or collection names become `_`.
    pub fn render(&self, change: &Change) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Db => push_token(&mut out, &change.namespace.db),
                Part::Coll => push_token(&mut out, change.namespace.coll.as_deref().unwrap_or("")),
                Part::Operation => push_token(&mut out, change.operation.as_str()),
            }
        }
        out
    }
}

fn push_token(out: &mut String, name: &str) {
    if name.is_empty() {
        out.push('_');
        return;
    }
    out.extend(name.chars().map(|c| {
        if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
            '_'
        } else {
            c
        }
    }));
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
    match encoding {
        Encoding::RelaxedJson => {
            let mut out = Vec::with_capacity(1024);
            write_relaxed_change(change, &mut out);
            Ok(out)
        }
        Encoding::CanonicalJson => {
            serde_json::to_vec(&Bson::Document(envelope(change)).into_canonical_extjson())
                .map_err(|err| format!("cannot encode canonical JSON: {err}"))
        }
        Encoding::Bson => bson::serialize_to_vec(&envelope(change))
            .map_err(|err| format!("cannot encode BSON: {err}")),
    }
}

/// A document as relaxed Extended JSON bytes (the plugin boundary's encoding).
pub fn relaxed_json(doc: &Document) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_relaxed_document(doc, &mut out);
    out
}

// Relaxed Extended JSON is the default payload and the plugin boundary's encoding, so it is on
// every event's path: it is written straight into bytes, in the document's own field order,
// instead of through `Bson::into_relaxed_extjson`'s intermediate JSON tree (about 3x slower).
// The output is the same JSON (see the `relaxed_writer_matches_bson_crate` test); rare types
// are delegated to the bson crate.

/// Serialises a value that cannot fail to serialise (strings, numbers, JSON trees) into a
/// `Vec`, whose writes cannot fail either.
fn write_serde<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let _infallible = serde_json::to_writer(&mut *out, value);
}

fn write_relaxed(value: &Bson, out: &mut Vec<u8>) {
    match value {
        Bson::String(s) => write_serde(s, out),
        Bson::Int32(n) => write_serde(n, out),
        Bson::Int64(n) => write_serde(n, out),
        Bson::Double(f) if f.is_finite() => write_serde(f, out),
        Bson::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Bson::Null => out.extend_from_slice(b"null"),
        Bson::Document(doc) => write_relaxed_document(doc, out),
        Bson::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_relaxed(item, out);
            }
            out.push(b']');
        }
        other => write_serde(&other.clone().into_relaxed_extjson(), out),
    }
}

fn write_relaxed_document(doc: &Document, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (key, value)) in doc.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_serde(key, out);
        out.push(b':');
        write_relaxed(value, out);
    }
    out.push(b'}');
}

/// Writes `"key":` preceded by a comma unless it is the object's first field.
fn write_key(key: &str, first: &mut bool, out: &mut Vec<u8>) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    write_serde(key, out);
    out.push(b':');
}

fn write_namespace(ns: &Namespace, out: &mut Vec<u8>) {
    let mut first = true;
    out.push(b'{');
    write_key("db", &mut first, out);
    write_serde(&ns.db, out);
    if let Some(coll) = &ns.coll {
        write_key("coll", &mut first, out);
        write_serde(coll, out);
    }
    out.push(b'}');
}

/// The same fields, in the same order, as [`envelope`].
fn write_relaxed_change(change: &Change, out: &mut Vec<u8>) {
    let mut first = true;
    out.push(b'{');
    write_key("id", &mut first, out);
    write_serde(&change.id, out);
    write_key("operationType", &mut first, out);
    write_serde(change.operation.as_str(), out);
    write_key("ns", &mut first, out);
    write_namespace(&change.namespace, out);
    if let Some(to) = &change.to {
        write_key("to", &mut first, out);
        write_namespace(to, out);
    }
    if let Some(key) = &change.document_key {
        write_key("documentKey", &mut first, out);
        write_relaxed_document(key, out);
    }
    if let Some(update) = &change.update_description {
        write_key("updateDescription", &mut first, out);
        let mut inner = true;
        out.push(b'{');
        write_key("updatedFields", &mut inner, out);
        write_relaxed_document(&update.updated_fields, out);
        write_key("removedFields", &mut inner, out);
        write_serde(&update.removed_fields, out);
        write_key("truncatedArrays", &mut inner, out);
        out.push(b'[');
        for (i, (field, size)) in update.truncated_arrays.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"field\":");
            write_serde(field, out);
            out.extend_from_slice(b",\"newSize\":");
            write_serde(size, out);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
    }
    if let Some(full) = &change.full_document {
        write_key("fullDocument", &mut first, out);
        write_relaxed_document(full, out);
    }
    if let Some(before) = &change.full_document_before_change {
        write_key("fullDocumentBeforeChange", &mut first, out);
        write_relaxed_document(before, out);
    }
    if let Some(ts) = change.cluster_time {
        write_key("clusterTime", &mut first, out);
        write_relaxed(&Bson::Timestamp(ts), out);
    }
    if let Some(wall) = change.wall_time {
        write_key("wallTime", &mut first, out);
        write_relaxed(&Bson::DateTime(wall), out);
    }
    if let Some(lsid) = &change.lsid {
        write_key("lsid", &mut first, out);
        write_relaxed_document(lsid, out);
    }
    if let Some(txn) = change.txn_number {
        write_key("txnNumber", &mut first, out);
        write_serde(&txn, out);
    }
    out.push(b'}');
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

    /// The direct relaxed-JSON writer produces the same JSON as the bson crate's
    /// `into_relaxed_extjson` for every BSON type, including the awkward ones.
    #[test]
    fn relaxed_writer_matches_bson_crate() {
        let mut c = change();
        c.full_document = Some(doc! {
            "s": "quote \" and \\ and \u{1}",
            "i32": 1, "i64": 1_i64 << 40, "f": 1.5, "whole": 2.0, "nan": f64::NAN, "inf": f64::NEG_INFINITY,
            "b": true, "null": Bson::Null, "oid": bson::oid::ObjectId::new(),
            "date": bson::DateTime::from_millis(1_700_000_000_000), "old": bson::DateTime::from_millis(-5),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "dec": "1.25".parse::<bson::Decimal128>().unwrap(),
            "re": bson::Regex { pattern: "a+".try_into().unwrap(), options: "ix".try_into().unwrap() },
            "arr": [1, "two", { "three": [3.5] }], "nested": { "a": { "b": [] } },
            "ts": bson::Timestamp { time: 1, increment: 2 }, "min": Bson::MinKey,
        });
        c.update_description = Some(crate::event::UpdateDescription {
            updated_fields: doc! { "a.b": 1 },
            removed_fields: vec!["x".into()],
            truncated_arrays: vec![("arr".into(), 2)],
        });
        c.to = Some(Namespace {
            db: "d".into(),
            coll: None,
        });
        c.wall_time = Some(bson::DateTime::from_millis(1000));
        c.lsid = Some(doc! { "id": 1 });
        c.txn_number = Some(3);
        let fast: serde_json::Value =
            serde_json::from_slice(&payload(&c, Encoding::RelaxedJson).unwrap()).unwrap();
        let reference = Bson::Document(envelope(&c)).into_relaxed_extjson();
        assert_eq!(fast, reference);
        let key_order: Vec<&str> = fast["fullDocument"]
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert!(key_order.len() == 19, "{key_order:?}");
    }

    /// Dots in collection names must not create extra subject tokens.
    #[test]
    fn subject_escapes_dots() {
        let template = SubjectTemplate::parse("{prefix}.{db}.{coll}.{operation}", "cdc").unwrap();
        assert_eq!(template.render(&change()), "cdc.shop.orders_v2.insert");
        let mut db_wide = change();
        db_wide.namespace.coll = None;
        assert_eq!(template.render(&db_wide), "cdc.shop._.insert");
    }

    /// Unknown or unbalanced placeholders are errors naming the template.
    #[test]
    fn bad_templates_are_refused() {
        assert!(SubjectTemplate::parse("{prefix}.{nope}", "p")
            .unwrap_err()
            .contains("{nope}"));
        assert!(SubjectTemplate::parse("{prefix}.{db", "p")
            .unwrap_err()
            .contains("unclosed"));
        assert!(SubjectTemplate::parse("{prefix}.db}", "p")
            .unwrap_err()
            .contains("unmatched"));
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
