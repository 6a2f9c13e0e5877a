//! Contract 0.2 on the host side: the metadata a call carries, and a transform's output
//! (edits, new metadata) applied to the raw change it was given.
//!
//! Nothing here converts a whole document unless a plugin asked for that (`replace`): a
//! `set` parses one value, and [`path::apply`] rebuilds only the documents on its path.

use std::borrow::Cow;

use bson::raw::{cstr, RawArrayBuf, RawBson, RawBsonRef, RawDocument, RawDocumentBuf};

use super::contract::v0_2::types as wit;
use super::path::{self, Edit};
use crate::model::{ejson, Change, Fields, Namespace, Operation};

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

fn operation_from_wit(op: &wit::Operation) -> Operation {
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
        wit::Operation::Other(name) => Operation::Other(name.clone()),
    }
}

fn namespace_to_wit(ns: &Namespace) -> wit::Namespace {
    wit::Namespace {
        db: ns.db.clone(),
        coll: ns.coll.clone(),
    }
}

fn namespace_from_wit(ns: &wit::Namespace) -> Namespace {
    Namespace {
        db: ns.db.clone(),
        coll: ns.coll.clone(),
    }
}

/// `removedFields` of an update description.
fn removed_fields(update: Option<&RawDocument>) -> Vec<String> {
    let Some(Ok(fields)) = update.map(|u| u.get_array("removedFields")) else {
        return Vec::new();
    };
    fields
        .into_iter()
        .filter_map(|v| v.ok().and_then(|v| v.as_str()).map(str::to_string))
        .collect()
}

/// `truncatedArrays` of an update description.
fn truncated_arrays(update: Option<&RawDocument>) -> Vec<wit::TruncatedArray> {
    let Some(Ok(arrays)) = update.map(|u| u.get_array("truncatedArrays")) else {
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

/// What a 0.2 call carries of `change`: everything but the documents, which stay here, and
/// but `to` and an update's details, which the plugin reads on demand ([`update_details`]).
///
/// One pass over the event's top-level fields: each accessor of [`Change`] would search the
/// whole document again, and this runs once per event that meets a 0.2 plugin.
pub fn metadata(change: &Change) -> wit::ChangeEvent {
    let mut parts = wit::Parts::empty();
    let (mut cluster_time, mut wall_time_ms, mut txn_number) = (None, None, None);
    for element in change.document().iter() {
        let Ok((key, value)) = element else { break };
        let is_document = matches!(value, RawBsonRef::Document(_));
        match (key.as_str(), value) {
            ("documentKey", _) if is_document => parts |= wit::Parts::DOCUMENT_KEY,
            ("fullDocument", _) if is_document => parts |= wit::Parts::FULL_DOCUMENT,
            ("fullDocumentBeforeChange", _) if is_document => {
                parts |= wit::Parts::FULL_DOCUMENT_BEFORE_CHANGE
            }
            ("lsid", _) if is_document => parts |= wit::Parts::LSID,
            ("updateDescription", RawBsonRef::Document(_)) => parts |= wit::Parts::UPDATED_FIELDS,
            ("clusterTime", RawBsonRef::Timestamp(ts)) => {
                cluster_time = Some(wit::ClusterTime {
                    seconds: ts.time,
                    increment: ts.increment,
                })
            }
            ("wallTime", RawBsonRef::DateTime(t)) => wall_time_ms = Some(t.timestamp_millis()),
            ("txnNumber", RawBsonRef::Int64(n)) => txn_number = Some(n.max(0) as u64),
            ("txnNumber", RawBsonRef::Int32(n)) => txn_number = Some(n.max(0) as u64),
            _ => {}
        }
    }
    wit::ChangeEvent {
        id: change.id().to_string(),
        operation: operation_to_wit(change.operation()),
        namespace: change.namespace().to_string(),
        parts,
        cluster_time,
        wall_time_ms,
        txn_number,
    }
}

/// For a `rename`, the namespace `change` renamed its collection to (`event.to`).
pub fn to(change: &Change) -> Option<wit::Namespace> {
    change.to().map(namespace_to_wit)
}

/// The removed fields and truncated arrays of `change`'s update description, if it has one
/// (`event.update`).
pub fn update_details(change: &Change) -> Option<wit::UpdateDetails> {
    change.update_description().map(|u| wit::UpdateDetails {
        removed_fields: removed_fields(Some(u)),
        truncated_arrays: truncated_arrays(Some(u)),
    })
}

/// The contract's name of a part, for error messages.
fn part_name(part: wit::Part) -> &'static str {
    match part {
        wit::Part::DocumentKey => "document-key",
        wit::Part::FullDocument => "full-document",
        wit::Part::FullDocumentBeforeChange => "full-document-before-change",
        wit::Part::UpdatedFields => "updated-fields",
        wit::Part::Lsid => "lsid",
    }
}

/// One value given as relaxed Extended JSON text.
fn parse_value(text: &str) -> Result<RawBson, String> {
    let mut wrapped = String::with_capacity(text.len() + 6);
    wrapped.push_str("{\"v\":");
    wrapped.push_str(text);
    wrapped.push('}');
    let doc = ejson::parse_document("value", wrapped.as_bytes(), None)?;
    match doc.get("v") {
        Ok(Some(value)) => Ok(RawBson::from(value)),
        _ => Err("no value".into()),
    }
}

/// The documents of a change while edits are applied to them.
struct Parts<'a> {
    document_key: Option<Cow<'a, RawDocument>>,
    full_document: Option<Cow<'a, RawDocument>>,
    full_document_before_change: Option<Cow<'a, RawDocument>>,
    update_description: Option<Cow<'a, RawDocument>>,
    lsid: Option<Cow<'a, RawDocument>>,
}

impl<'a> Parts<'a> {
    fn of(change: &'a Change) -> Parts<'a> {
        Parts {
            document_key: change.document_key().map(Cow::Borrowed),
            full_document: change.full_document().map(Cow::Borrowed),
            full_document_before_change: change.full_document_before_change().map(Cow::Borrowed),
            update_description: change.update_description().map(Cow::Borrowed),
            lsid: change.lsid().map(Cow::Borrowed),
        }
    }

    fn current(&self, part: wit::Part) -> Option<&RawDocument> {
        match part {
            wit::Part::DocumentKey => self.document_key.as_deref(),
            wit::Part::FullDocument => self.full_document.as_deref(),
            wit::Part::FullDocumentBeforeChange => self.full_document_before_change.as_deref(),
            wit::Part::UpdatedFields => self
                .update_description
                .as_deref()
                .and_then(|u| u.get_document("updatedFields").ok()),
            wit::Part::Lsid => self.lsid.as_deref(),
        }
    }

    /// Puts a new version of a part (`None`: removed) in place.
    fn put(&mut self, part: wit::Part, doc: Option<RawDocumentBuf>) -> Result<(), String> {
        let slot = match part {
            wit::Part::DocumentKey => &mut self.document_key,
            wit::Part::FullDocument => &mut self.full_document,
            wit::Part::FullDocumentBeforeChange => &mut self.full_document_before_change,
            wit::Part::Lsid => &mut self.lsid,
            wit::Part::UpdatedFields => {
                let Some(update) = self.update_description.as_deref() else {
                    return Err(
                        "the event has no update description to hold `updated-fields`".into(),
                    );
                };
                let fields = doc.unwrap_or_default();
                let key = ["updatedFields".to_string()];
                let rebuilt = path::apply(update, &key, &Edit::Set(RawBson::Document(fields)))?;
                if let Some(rebuilt) = rebuilt {
                    self.update_description = Some(Cow::Owned(rebuilt));
                }
                return Ok(());
            }
        };
        *slot = doc.map(Cow::Owned);
        Ok(())
    }

    /// Applies one edit.
    fn apply(&mut self, edit: &wit::Edit) -> Result<(), String> {
        let (part, path, change) = match edit {
            wit::Edit::Set(set) => {
                let value = parse_value(&set.value)
                    .map_err(|e| format!("value set at {}: {e}", describe(set.part, &set.path)))?;
                (set.part, &set.path, Edit::Set(value))
            }
            wit::Edit::Unset(at) => (at.part, &at.path, Edit::Unset),
            wit::Edit::Rename(r) => (r.part, &r.path, Edit::Rename(r.to.clone())),
            wit::Edit::Replace(r) => {
                let doc = match &r.document {
                    None => None,
                    Some(text) => Some(ejson::parse_document(
                        part_name(r.part),
                        text.as_bytes(),
                        self.current(r.part),
                    )?),
                };
                return self.put(r.part, doc);
            }
        };
        if path.is_empty() {
            return Err(format!(
                "an edit of {} has an empty path (use `replace` for a whole part)",
                part_name(part)
            ));
        }
        let Some(current) = self.current(part) else {
            return match change {
                Edit::Set(_) => Err(format!(
                    "cannot set {}: the event has no {} part",
                    describe(part, path),
                    part_name(part)
                )),
                Edit::Unset | Edit::Rename(_) => Ok(()),
            };
        };
        match path::apply(current, path, &change) {
            Ok(Some(edited)) => self.put(part, Some(edited)),
            Ok(None) => Ok(()),
            Err(err) => Err(format!("cannot edit {}: {err}", describe(part, path))),
        }
    }
}

/// `part` and `path` as an error message names them (`full-document a.b`).
fn describe(part: wit::Part, path: &[String]) -> String {
    format!("{} '{}'", part_name(part), path.join("."))
}

/// An update description with `removed` and `truncated` in place of its own lists (created,
/// with empty `updatedFields`, when the change had none).
fn update_with_lists(
    update: Option<&RawDocument>,
    removed: &[String],
    truncated: &[wit::TruncatedArray],
) -> Result<RawDocumentBuf, String> {
    let mut removed_array = RawArrayBuf::new();
    for field in removed {
        removed_array.push(field.as_str());
    }
    let mut truncated_array = RawArrayBuf::new();
    for t in truncated {
        let mut entry = RawDocumentBuf::new();
        entry.append(cstr!("field"), t.field.as_str());
        match i32::try_from(t.new_size) {
            Ok(size) => entry.append(cstr!("newSize"), size),
            Err(_) => entry.append(cstr!("newSize"), i64::from(t.new_size)),
        }
        truncated_array.push(entry);
    }
    let mut doc = match update {
        Some(u) => u.to_owned(),
        None => {
            let mut d = RawDocumentBuf::new();
            d.append(cstr!("updatedFields"), RawDocumentBuf::new());
            d
        }
    };
    for (key, value) in [
        ("removedFields", RawBson::Array(removed_array)),
        ("truncatedArrays", RawBson::Array(truncated_array)),
    ] {
        if let Some(edited) = path::apply(&doc, &[key.to_string()], &Edit::Set(value))? {
            doc = edited;
        }
    }
    Ok(doc)
}

/// The change an output of a 0.2 transform describes: `change` (the call's event) with the
/// output's edits and metadata applied. `None` when the output changes nothing, so the
/// chain keeps the very change it had. An error says which edit could not apply.
pub fn apply(change: &Change, output: &wit::Output) -> Result<Option<Change>, String> {
    if output.edits.is_empty() && output.metadata.is_none() {
        return Ok(None);
    }
    let mut parts = Parts::of(change);
    for edit in &output.edits {
        parts.apply(edit)?;
    }
    let mut fields = Fields {
        document_key: parts.document_key,
        full_document: parts.full_document,
        full_document_before_change: parts.full_document_before_change,
        update_description: parts.update_description,
        cluster_time: change.cluster_time(),
        wall_time: change.wall_time(),
        lsid: parts.lsid,
        txn_number: change.txn_number(),
        to: change.to().cloned(),
        ..Fields::new(
            change.id(),
            change.operation().clone(),
            change.namespace().clone(),
        )
    };
    if let Some(meta) = &output.metadata {
        if meta.id != change.id() {
            return Err(format!(
                "output changed the event id from '{}' to '{}'; ids are how duplicates are \
                 dropped",
                change.id(),
                meta.id
            ));
        }
        fields.operation = operation_from_wit(&meta.operation);
        fields.namespace = namespace_from_wit(&meta.namespace);
        fields.to = meta.to.as_ref().map(namespace_from_wit);
        fields.cluster_time = meta.cluster_time.map(|ts| bson::Timestamp {
            time: ts.seconds,
            increment: ts.increment,
        });
        fields.wall_time = meta.wall_time_ms.map(bson::DateTime::from_millis);
        fields.txn_number = meta.txn_number.map(|n| n.min(i64::MAX as u64) as i64);
        let update = fields.update_description.as_deref();
        let pairs = |arrays: &[wit::TruncatedArray]| -> Vec<(String, u32)> {
            arrays
                .iter()
                .map(|t| (t.field.clone(), t.new_size))
                .collect()
        };
        let (removed, truncated) = match &meta.update {
            Some(u) => (u.removed_fields.as_slice(), u.truncated_arrays.as_slice()),
            None => (&[][..], &[][..]),
        };
        let lists_changed = removed_fields(update) != removed
            || pairs(&truncated_arrays(update)) != pairs(truncated);
        if lists_changed {
            let rebuilt = update_with_lists(update, removed, truncated)?;
            fields.update_description = Some(Cow::Owned(rebuilt));
        }
    }
    Change::from_fields(fields, Some(change)).map(Some)
}

/// Bytes an output carries into the host (edit values and paths, headers): what the output
/// limits count.
pub fn output_bytes(output: &wit::Output) -> usize {
    let path_len = |p: &[String]| p.iter().map(String::len).sum::<usize>();
    output
        .edits
        .iter()
        .map(|e| match e {
            wit::Edit::Set(s) => path_len(&s.path) + s.value.len(),
            wit::Edit::Unset(u) => path_len(&u.path),
            wit::Edit::Rename(r) => path_len(&r.path) + r.to.len(),
            wit::Edit::Replace(r) => r.document.as_ref().map_or(0, String::len),
        })
        .sum::<usize>()
        + output
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum::<usize>()
        + output
            .payload
            .as_ref()
            .map_or(0, |p| p.bytes.len() + p.content_type.len())
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
            "collectionUUID": bson::Binary { subtype: bson::spec::BinarySubtype::Uuid, bytes: vec![1; 16] },
            "ns": { "db": "d", "coll": "c" },
            "documentKey": { "_id": 1 },
            "updateDescription": {
                "updatedFields": { "a.b": 1, "email": "x@y" },
                "removedFields": ["x"],
                "truncatedArrays": [],
            },
            "fullDocument": {
                "_id": 1, "big": 7_i64, "email": "x@y",
                "addr": [{ "street": "s" }], "name": "a",
            },
        };
        Change::from_server_event(&event).unwrap().1
    }

    fn p(path: &str) -> Vec<String> {
        path.split('.').map(str::to_string).collect()
    }

    fn output(edits: Vec<wit::Edit>) -> wit::Output {
        wit::Output {
            payload: None,
            edits,
            metadata: None,
            subject: None,
            headers: Vec::new(),
        }
    }

    fn set(part: wit::Part, path: &str, value: &str) -> wit::Edit {
        wit::Edit::Set(wit::SetValue {
            part,
            path: p(path),
            value: value.into(),
        })
    }

    /// Everything but the documents of `change`, as a transform would hand it back.
    fn full_metadata(change: &Change) -> wit::Metadata {
        let m = metadata(change);
        wit::Metadata {
            id: m.id,
            operation: m.operation,
            namespace: namespace_to_wit(change.namespace()),
            to: to(change),
            parts: m.parts,
            update: update_details(change),
            cluster_time: m.cluster_time,
            wall_time_ms: m.wall_time_ms,
            txn_number: m.txn_number,
        }
    }

    /// The metadata carries what the change says, and which parts it has; an update's
    /// details are read on demand.
    #[test]
    fn metadata_of_an_update() {
        let m = metadata(&change());
        assert_eq!(m.id, "8200");
        assert!(matches!(m.operation, wit::Operation::Update));
        assert_eq!(m.namespace, "d.c");
        let update = update_details(&change()).expect("an update's details");
        assert_eq!(update.removed_fields, ["x"]);
        assert!(m
            .parts
            .contains(wit::Parts::FULL_DOCUMENT | wit::Parts::UPDATED_FIELDS));
        assert!(!m.parts.contains(wit::Parts::LSID));
    }

    /// No edits and no metadata: the chain keeps the change it had.
    #[test]
    fn nothing_to_apply() {
        assert_eq!(apply(&change(), &output(Vec::new())).unwrap(), None);
    }

    /// Set, unset and rename on nested paths and arrays, in several parts; everything else
    /// keeps its bytes (the int64, the unmodeled `collectionUUID`, the field order).
    #[test]
    fn edits_apply_to_the_raw_change() {
        let original = change();
        let out = output(vec![
            set(wit::Part::FullDocument, "email", r#""[redacted]""#),
            set(
                wit::Part::FullDocument,
                "addr.0.street",
                r#"{"$numberLong":"5"}"#,
            ),
            wit::Edit::Unset(wit::Location {
                part: wit::Part::FullDocument,
                path: p("name"),
            }),
            wit::Edit::Rename(wit::RenameField {
                part: wit::Part::FullDocument,
                path: p("big"),
                to: "large".into(),
            }),
            set(wit::Part::UpdatedFields, "email", r#""[redacted]""#),
        ]);
        let edited = apply(&original, &out).unwrap().unwrap();
        let full = edited.full_document().unwrap();
        let expected = rawdoc! {
            "_id": 1, "large": 7_i64, "email": "[redacted]", "addr": [{ "street": 5_i64 }],
        };
        assert_eq!(full.as_bytes(), expected.as_bytes());
        let fields = part_of_updated(&edited);
        assert_eq!(fields.get_str("email").unwrap(), "[redacted]");
        assert_eq!(fields.get_i32("a.b").unwrap(), 1);
        let keys: Vec<&str> = edited
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
                "collectionUUID",
                "ns",
                "documentKey",
                "updateDescription",
                "fullDocument"
            ]
        );
        assert_eq!(edited.document_key(), original.document_key());
    }

    fn part_of_updated(change: &Change) -> &RawDocument {
        change
            .update_description()
            .unwrap()
            .get_document("updatedFields")
            .unwrap()
    }

    /// Missing paths: unset and rename change nothing, set creates the documents on the way.
    #[test]
    fn missing_paths() {
        let original = change();
        let out = output(vec![
            wit::Edit::Unset(wit::Location {
                part: wit::Part::FullDocument,
                path: p("no.such"),
            }),
            wit::Edit::Unset(wit::Location {
                part: wit::Part::FullDocumentBeforeChange,
                path: p("x"),
            }),
            set(wit::Part::FullDocument, "meta.source", r#""cdc""#),
        ]);
        let edited = apply(&original, &out).unwrap().unwrap();
        let full = edited.full_document().unwrap();
        assert_eq!(
            full.get_document("meta")
                .unwrap()
                .get_str("source")
                .unwrap(),
            "cdc"
        );
    }

    /// Invalid edits are errors that name the part and path (the chain dead-letters them).
    #[test]
    fn invalid_edits_name_the_problem() {
        let original = change();
        let cases = [
            (
                set(wit::Part::FullDocument, "email.x", "1"),
                "full-document 'email.x'",
            ),
            (
                set(wit::Part::FullDocument, "email", "{bad"),
                "value set at full-document 'email'",
            ),
            (
                set(wit::Part::FullDocument, "addr.3", "1"),
                "element 3 of an array of 1",
            ),
            (set(wit::Part::Lsid, "id", "1"), "no lsid part"),
            (
                wit::Edit::Rename(wit::RenameField {
                    part: wit::Part::FullDocument,
                    path: p("email"),
                    to: "name".into(),
                }),
                "has a field 'name'",
            ),
            (
                wit::Edit::Unset(wit::Location {
                    part: wit::Part::FullDocument,
                    path: Vec::new(),
                }),
                "empty path",
            ),
        ];
        for (edit, expected) in cases {
            let err = apply(&original, &output(vec![edit])).unwrap_err();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }

    /// Replacing a whole part keeps the types of values the JSON leaves as they were;
    /// metadata changes apply, and changing the id is refused.
    #[test]
    fn replace_and_metadata() {
        let original = change();
        let mut out = output(vec![wit::Edit::Replace(wit::ReplacePart {
            part: wit::Part::FullDocument,
            document: Some(r#"{"_id":1,"big":7}"#.into()),
        })]);
        let mut meta = full_metadata(&original);
        meta.namespace.coll = Some("other".into());
        if let Some(u) = meta.update.as_mut() {
            u.removed_fields = vec!["x".into(), "y".into()];
        }
        out.metadata = Some(meta.clone());
        let edited = apply(&original, &out).unwrap().unwrap();
        assert_eq!(edited.full_document().unwrap().get_i64("big").unwrap(), 7);
        assert_eq!(edited.namespace().coll.as_deref(), Some("other"));
        let details = update_details(&edited).expect("still an update");
        assert_eq!(details.removed_fields, ["x", "y"]);
        meta.id = "other".into();
        out.metadata = Some(meta);
        assert!(apply(&original, &out).unwrap_err().contains("event id"));
    }
}
