//! Paths into raw BSON documents, for contract 0.2: reading a value in place (`get`, `find`)
//! and editing a document (`set`, `unset`, `rename`) without converting it to anything else.
//!
//! A path is a list of segments, one field name each (names may contain dots). A segment of
//! decimal digits applied to an array picks that element. `find` also follows MongoDB's array
//! rule (a non-numeric segment applied to an array applies to each document element); `get`
//! and the edits never fan out, so an edit names exactly one place.
//!
//! Edits rebuild only the documents on the path: every other element is copied as the bytes
//! it was, so untouched values keep their exact BSON types.

use bson::raw::{CStr, RawArray, RawArrayBuf, RawBson, RawBsonRef, RawDocument, RawDocumentBuf};

/// The value at an exact path (`None` when a segment is missing). An empty path is the
/// document itself.
pub fn get<'a>(doc: &'a RawDocument, path: &[String]) -> Option<RawBsonRef<'a>> {
    let mut current = RawBsonRef::Document(doc);
    for segment in path {
        current = child(current, segment)?;
    }
    Some(current)
}

/// The element `segment` names inside a document or (by index) an array.
fn child<'a>(value: RawBsonRef<'a>, segment: &str) -> Option<RawBsonRef<'a>> {
    match value {
        RawBsonRef::Document(d) => d.get(segment).ok().flatten(),
        RawBsonRef::Array(a) => index(segment).and_then(|i| a.get(i).ok().flatten()),
        _ => None,
    }
}

/// A segment as an array index: decimal digits only.
fn index(segment: &str) -> Option<usize> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    segment.parse().ok()
}

/// Every value `path` reaches under MongoDB's array rule, with its exact location (the path
/// with an index for every array passed through), in document order.
pub fn find<'a>(doc: &'a RawDocument, path: &[String]) -> Vec<(Vec<String>, RawBsonRef<'a>)> {
    let mut found = Vec::new();
    let mut at = Vec::with_capacity(path.len());
    find_in(RawBsonRef::Document(doc), path, &mut at, &mut found);
    found
}

fn find_in<'a>(
    value: RawBsonRef<'a>,
    path: &[String],
    at: &mut Vec<String>,
    found: &mut Vec<(Vec<String>, RawBsonRef<'a>)>,
) {
    let Some((first, rest)) = path.split_first() else {
        found.push((at.clone(), value));
        return;
    };
    match value {
        RawBsonRef::Document(d) => {
            if let Ok(Some(next)) = d.get(first) {
                at.push(first.clone());
                find_in(next, rest, at, found);
                at.pop();
            }
        }
        RawBsonRef::Array(a) => match index(first) {
            Some(i) => {
                if let Ok(Some(next)) = a.get(i) {
                    at.push(first.clone());
                    find_in(next, rest, at, found);
                    at.pop();
                }
            }
            None => {
                for (i, element) in a.into_iter().enumerate() {
                    if let Ok(element @ RawBsonRef::Document(_)) = element {
                        at.push(i.to_string());
                        find_in(element, path, at, found);
                        at.pop();
                    }
                }
            }
        },
        _ => {}
    }
}

/// One change at a path (see [`apply`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Set the value, creating missing documents on the way.
    Set(RawBson),
    /// Remove the field or array element.
    Unset,
    /// Rename the field in place.
    Rename(String),
}

/// `doc` with `change` made at `path` (not empty). `None` when nothing changes (`unset` or
/// `rename` of a missing path); an error names what stopped the edit.
pub fn apply(
    doc: &RawDocument,
    path: &[String],
    change: &Edit,
) -> Result<Option<RawDocumentBuf>, String> {
    let Some((first, rest)) = path.split_first() else {
        return Err("the path is empty".into());
    };
    edit_document(doc, first, rest, change)
}

fn key(name: &str) -> Result<&CStr, String> {
    name.try_into()
        .map_err(|_| format!("field name {name:?} contains a NUL byte"))
}

/// A copy of `doc` where the element `name` is replaced by `replacement` (`None`: removed),
/// renamed to `rename`, or appended when missing.
fn rebuild(
    doc: &RawDocument,
    name: &str,
    replacement: Option<RawBsonRef<'_>>,
    rename: Option<&str>,
) -> Result<RawDocumentBuf, String> {
    let mut out = RawDocumentBuf::new();
    let mut seen = false;
    for element in doc.iter() {
        let (k, v) = element.map_err(|e| format!("malformed BSON: {e}"))?;
        if k.as_str() != name {
            out.append(k, v);
            continue;
        }
        seen = true;
        let new_key = key(rename.unwrap_or(name))?;
        match (rename, replacement) {
            (Some(_), _) => out.append(new_key, v),
            (None, Some(value)) => out.append(new_key, value),
            (None, None) => {}
        }
    }
    if let (false, Some(value)) = (seen, replacement) {
        out.append(key(name)?, value);
    }
    Ok(out)
}

fn edit_document(
    doc: &RawDocument,
    name: &str,
    rest: &[String],
    change: &Edit,
) -> Result<Option<RawDocumentBuf>, String> {
    let current = doc
        .get(name)
        .map_err(|e| format!("malformed BSON at '{name}': {e}"))?;
    if rest.is_empty() {
        return Ok(match (change, current) {
            (Edit::Set(value), _) => Some(rebuild(doc, name, Some(value.as_raw_bson_ref()), None)?),
            (Edit::Unset, None) | (Edit::Rename(_), None) => None,
            (Edit::Unset, Some(_)) => Some(rebuild(doc, name, None, None)?),
            (Edit::Rename(to), Some(_)) => {
                if to != name && doc.get(to.as_str()).ok().flatten().is_some() {
                    return Err(format!(
                        "cannot rename '{name}' to '{to}': the document has a field '{to}'"
                    ));
                }
                Some(rebuild(doc, name, None, Some(to))?)
            }
        });
    }
    let inner = match current {
        None => match change {
            // `$set` creates the documents on the way.
            Edit::Set(_) => edit_document(&RawDocumentBuf::new(), &rest[0], &rest[1..], change)?
                .map(RawBson::Document),
            Edit::Unset | Edit::Rename(_) => None,
        },
        Some(value) => edit_value(value, name, rest, change)?,
    };
    match inner {
        None => Ok(None),
        Some(value) => Ok(Some(rebuild(
            doc,
            name,
            Some(value.as_raw_bson_ref()),
            None,
        )?)),
    }
}

/// The edited value of a document or array at `rest` (not empty) below it.
fn edit_value(
    value: RawBsonRef<'_>,
    name: &str,
    rest: &[String],
    change: &Edit,
) -> Result<Option<RawBson>, String> {
    match value {
        RawBsonRef::Document(d) => {
            Ok(edit_document(d, &rest[0], &rest[1..], change)?.map(RawBson::Document))
        }
        RawBsonRef::Array(a) => {
            Ok(edit_array(a, &rest[0], &rest[1..], change)?.map(RawBson::Array))
        }
        other => match change {
            Edit::Unset | Edit::Rename(_) => Ok(None),
            Edit::Set(_) => Err(format!(
                "cannot set '{}' inside '{name}': it is a {:?}, not a document or array",
                rest[0],
                other.element_type()
            )),
        },
    }
}

fn edit_array(
    array: &RawArray,
    segment: &str,
    rest: &[String],
    change: &Edit,
) -> Result<Option<RawArrayBuf>, String> {
    let Some(at) = index(segment) else {
        return match change {
            Edit::Unset | Edit::Rename(_) => Ok(None),
            Edit::Set(_) => Err(format!(
                "cannot set field '{segment}' of an array (use an index to pick an element)"
            )),
        };
    };
    let items = array
        .into_iter()
        .collect::<Result<Vec<RawBsonRef<'_>>, _>>()
        .map_err(|e| format!("malformed BSON in an array: {e}"))?;
    let replacement: Option<Option<RawBson>> = match (items.get(at), rest.is_empty(), change) {
        (None, _, Edit::Set(_)) => {
            return Err(format!(
                "cannot set element {at} of an array of {} (only existing elements)",
                items.len()
            ))
        }
        (None, _, _) => return Ok(None),
        (Some(_), true, Edit::Set(value)) => Some(Some(value.clone())),
        (Some(_), true, Edit::Unset) => Some(None),
        (Some(_), true, Edit::Rename(_)) => {
            return Err(format!(
                "cannot rename array element {at}: elements have no name"
            ))
        }
        (Some(item), false, _) => edit_value(*item, segment, rest, change)?.map(Some),
    };
    let Some(replacement) = replacement else {
        return Ok(None);
    };
    let mut out = RawArrayBuf::new();
    for (i, item) in items.into_iter().enumerate() {
        match (i == at, &replacement) {
            (false, _) => out.push(item),
            (true, Some(value)) => out.push(value.as_raw_bson_ref()),
            (true, None) => {}
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    fn p(path: &str) -> Vec<String> {
        path.split('.').map(str::to_string).collect()
    }

    fn doc() -> RawDocumentBuf {
        rawdoc! {
            "_id": 1,
            "email": "a@b.c",
            "big": 7_i64,
            "addr": [ { "street": "s1", "no": 1 }, 5, { "street": "s2" } ],
            "a": { "b": { "c": 1 }, "d.e": 2 },
        }
    }

    /// Exact reads: nested documents, array indices, keys with dots, missing paths.
    #[test]
    fn get_reads_exact_paths() {
        let d = doc();
        assert_eq!(get(&d, &p("a.b.c")), Some(RawBsonRef::Int32(1)));
        assert_eq!(get(&d, &p("addr.2.street")), Some(RawBsonRef::String("s2")));
        assert_eq!(
            get(&d, &["a".into(), "d.e".into()]),
            Some(RawBsonRef::Int32(2))
        );
        assert_eq!(get(&d, &p("addr.street")), None);
        assert_eq!(get(&d, &p("nope.x")), None);
        assert_eq!(get(&d, &p("email.x")), None);
    }

    /// `find` fans out over array elements that are documents and reports exact paths.
    #[test]
    fn find_follows_the_array_rule() {
        let d = doc();
        let found: Vec<(Vec<String>, RawBsonRef<'_>)> = find(&d, &p("addr.street"));
        assert_eq!(
            found,
            vec![
                (p("addr.0.street"), RawBsonRef::String("s1")),
                (p("addr.2.street"), RawBsonRef::String("s2")),
            ]
        );
        assert_eq!(
            find(&d, &p("addr.1")),
            vec![(p("addr.1"), RawBsonRef::Int32(5))]
        );
        assert!(find(&d, &p("addr.9")).is_empty());
        assert!(find(&d, &p("missing")).is_empty());
    }

    /// Set replaces in place (order kept, other values' types kept), appends a new field,
    /// and creates documents on the way.
    #[test]
    fn set_replaces_appends_and_creates() {
        let d = doc();
        let out = apply(&d, &p("email"), &Edit::Set(RawBson::String("x".into())))
            .unwrap()
            .unwrap();
        let keys: Vec<&str> = out.iter().map(|e| e.unwrap().0.as_str()).collect();
        assert_eq!(keys, ["_id", "email", "big", "addr", "a"]);
        assert_eq!(out.get_str("email").unwrap(), "x");
        assert_eq!(out.get_i64("big").unwrap(), 7);
        let out = apply(&d, &p("a.new.deep"), &Edit::Set(RawBson::Int32(3)))
            .unwrap()
            .unwrap();
        assert_eq!(get(&out, &p("a.new.deep")), Some(RawBsonRef::Int32(3)));
        assert_eq!(get(&out, &p("a.b.c")), Some(RawBsonRef::Int32(1)));
        let out = apply(&d, &p("addr.0.street"), &Edit::Set(RawBson::Null))
            .unwrap()
            .unwrap();
        assert_eq!(get(&out, &p("addr.0.street")), Some(RawBsonRef::Null));
        assert_eq!(get(&out, &p("addr.0.no")), Some(RawBsonRef::Int32(1)));
    }

    /// Invalid sets are errors naming the problem, never panics.
    #[test]
    fn invalid_sets_are_errors() {
        let d = doc();
        let err = apply(&d, &p("email.x"), &Edit::Set(RawBson::Int32(1))).unwrap_err();
        assert!(err.contains("inside 'email'"), "{err}");
        let err = apply(&d, &p("addr.7"), &Edit::Set(RawBson::Int32(1))).unwrap_err();
        assert!(err.contains("element 7 of an array of 3"), "{err}");
        let err = apply(&d, &p("addr.street"), &Edit::Set(RawBson::Int32(1))).unwrap_err();
        assert!(err.contains("use an index"), "{err}");
        assert!(apply(&d, &[], &Edit::Unset).is_err());
    }

    /// Unset removes fields and array elements; a missing path changes nothing.
    #[test]
    fn unset_removes_fields_and_elements() {
        let d = doc();
        let out = apply(&d, &p("a.b"), &Edit::Unset).unwrap().unwrap();
        assert_eq!(get(&out, &p("a.b")), None);
        assert_eq!(
            get(&out, &["a".into(), "d.e".into()]),
            Some(RawBsonRef::Int32(2))
        );
        let out = apply(&d, &p("addr.0"), &Edit::Unset).unwrap().unwrap();
        assert_eq!(
            get(&out, &p("addr.1.street")),
            Some(RawBsonRef::String("s2"))
        );
        assert_eq!(apply(&d, &p("nope.x"), &Edit::Unset).unwrap(), None);
        assert_eq!(apply(&d, &p("addr.9"), &Edit::Unset).unwrap(), None);
    }

    /// Rename keeps the position and value; clashes and array elements are errors.
    #[test]
    fn rename_in_place() {
        let d = doc();
        let out = apply(&d, &p("email"), &Edit::Rename("mail".into()))
            .unwrap()
            .unwrap();
        let keys: Vec<&str> = out.iter().map(|e| e.unwrap().0.as_str()).collect();
        assert_eq!(keys, ["_id", "mail", "big", "addr", "a"]);
        let out = apply(&d, &p("addr.0.street"), &Edit::Rename("road".into()))
            .unwrap()
            .unwrap();
        assert_eq!(get(&out, &p("addr.0.road")), Some(RawBsonRef::String("s1")));
        assert_eq!(
            apply(&d, &p("nope"), &Edit::Rename("x".into())).unwrap(),
            None
        );
        let err = apply(&d, &p("email"), &Edit::Rename("big".into())).unwrap_err();
        assert!(err.contains("has a field 'big'"), "{err}");
        let err = apply(&d, &p("addr.0"), &Edit::Rename("x".into())).unwrap_err();
        assert!(err.contains("elements have no name"), "{err}");
    }
}
