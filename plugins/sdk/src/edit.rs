//! Edits to documents, and reads that locate values: what a contract 0.2 plugin hands the
//! host instead of a rewritten document, and the same operations on a local copy (for
//! documents a plugin built, for native unit tests, and for reads after an edit).

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which document of an event (contract 0.2's `part`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// `document_key`.
    DocumentKey,
    /// `full_document`.
    FullDocument,
    /// `full_document_before_change`.
    FullDocumentBeforeChange,
    /// `update_description.updated_fields`.
    UpdatedFields,
    /// `transaction.lsid`.
    Lsid,
}

/// One change to a received document, recorded by [`Document::set`](crate::Document::set),
/// [`Document::unset`](crate::Document::unset) or [`Document::rename`](crate::Document::rename)
/// and applied by the host to the original BSON. Paths are segments: one field name each, a
/// decimal segment picks an array element.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Set the value at the path (creating missing objects on the way).
    Set(Vec<String>, Value),
    /// Remove the field or array element at the path.
    Unset(Vec<String>),
    /// Rename the field at the path to the given name.
    Rename(Vec<String>, String),
}

/// A value [`Document::find`](crate::Document::find) found, with its exact location.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    /// The searched path with an index in place of every array the search went through.
    pub path: Vec<String>,
    /// The value.
    pub value: Value,
}

/// A dotted path as segments.
pub(crate) fn segments(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

fn index(segment: &str) -> Option<usize> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    segment.parse().ok()
}

fn bad(path: &[String], why: &str) -> Error {
    Error::invalid_event(format!("cannot edit `{}`: {why}", path.join(".")))
}

/// Applies one edit to a local copy, with the host's rules (see the WIT `edit` variant).
pub(crate) fn apply(map: &mut Map<String, Value>, edit: &Edit) -> Result<()> {
    let path = match edit {
        Edit::Set(p, _) | Edit::Unset(p) | Edit::Rename(p, _) => p,
    };
    let Some((first, rest)) = path.split_first() else {
        return Err(bad(path, "the path is empty"));
    };
    in_map(map, first, rest, edit, path)
}

fn in_map(
    map: &mut Map<String, Value>,
    name: &str,
    rest: &[String],
    edit: &Edit,
    path: &[String],
) -> Result<()> {
    if rest.is_empty() {
        return edit_in_map(map, name, edit, path);
    }
    if !map.contains_key(name) {
        if !matches!(edit, Edit::Set(..)) {
            return Ok(());
        }
        // `$set` creates the documents on the way.
        map.insert(name.to_owned(), Value::Object(Map::new()));
    }
    match map.get_mut(name) {
        Some(value) => in_value(value, rest, edit, path),
        None => Ok(()),
    }
}

/// Goes on down `rest` (not empty) inside `value`.
fn in_value(value: &mut Value, rest: &[String], edit: &Edit, path: &[String]) -> Result<()> {
    let Some((first, more)) = rest.split_first() else {
        return Ok(());
    };
    let set = matches!(edit, Edit::Set(..));
    match value {
        Value::Object(map) => in_map(map, first, more, edit, path),
        Value::Array(items) if more.is_empty() => edit_in_array(items, first, edit, path),
        Value::Array(items) => match index(first) {
            Some(i) if i < items.len() => in_value(&mut items[i], more, edit, path),
            _ if set => Err(bad(path, "it names no element of an array")),
            _ => Ok(()),
        },
        _ if set => Err(bad(
            path,
            "a value on the way is neither a document nor an array",
        )),
        _ => Ok(()),
    }
}

fn edit_in_map(
    map: &mut Map<String, Value>,
    last: &str,
    edit: &Edit,
    path: &[String],
) -> Result<()> {
    match edit {
        Edit::Set(_, value) => {
            map.insert(last.to_owned(), value.clone());
        }
        Edit::Unset(_) => {
            map.shift_remove(last);
        }
        Edit::Rename(_, to) => {
            if to != last && map.contains_key(to) {
                return Err(bad(path, &format!("the document has a field `{to}`")));
            }
            if map.contains_key(last) {
                // Rebuilt in order, so the field keeps its position.
                for (key, value) in std::mem::take(map) {
                    let key = if key == last { to.clone() } else { key };
                    map.insert(key, value);
                }
            }
        }
    }
    Ok(())
}

fn edit_in_array(items: &mut Vec<Value>, last: &str, edit: &Edit, path: &[String]) -> Result<()> {
    let at = index(last);
    match (edit, at) {
        (Edit::Set(_, value), Some(i)) if i < items.len() => items[i] = value.clone(),
        (Edit::Set(..), _) => return Err(bad(path, "only existing array elements can be set")),
        (Edit::Unset(_), Some(i)) if i < items.len() => {
            items.remove(i);
        }
        (Edit::Unset(_), _) => {}
        (Edit::Rename(..), Some(i)) if i < items.len() => {
            return Err(bad(path, "array elements have no name"))
        }
        (Edit::Rename(..), _) => {}
    }
    Ok(())
}

/// Every value `path` reaches in a local copy, MongoDB's array rule applied.
pub(crate) fn find(map: &Map<String, Value>, path: &[String]) -> Vec<Found> {
    let mut found = Vec::new();
    let Some((first, rest)) = path.split_first() else {
        found.push(Found {
            path: Vec::new(),
            value: Value::Object(map.clone()),
        });
        return found;
    };
    if let Some(v) = map.get(first) {
        let mut at = vec![first.clone()];
        find_in(v, rest, &mut at, &mut found);
    }
    found
}

fn find_in(value: &Value, path: &[String], at: &mut Vec<String>, found: &mut Vec<Found>) {
    let Some((first, rest)) = path.split_first() else {
        found.push(Found {
            path: at.clone(),
            value: value.clone(),
        });
        return;
    };
    match value {
        Value::Object(map) => {
            if let Some(v) = map.get(first) {
                at.push(first.clone());
                find_in(v, rest, at, found);
                at.pop();
            }
        }
        Value::Array(items) => match index(first) {
            Some(i) => {
                if let Some(v) = items.get(i) {
                    at.push(first.clone());
                    find_in(v, rest, at, found);
                    at.pop();
                }
            }
            None => {
                for (i, item) in items.iter().enumerate() {
                    if item.is_object() {
                        at.push(i.to_string());
                        find_in(item, path, at, found);
                        at.pop();
                    }
                }
            }
        },
        _ => {}
    }
}

/// A value the host sent as relaxed EJSON text.
#[cfg_attr(
    not(all(target_arch = "wasm32", not(feature = "contract-0-1"))),
    allow(dead_code)
)]
fn parse_value(text: &str) -> Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| Error::failed(format!("the host sent a value that is not JSON: {e}")))
}

#[cfg(all(target_arch = "wasm32", not(feature = "contract-0-1")))]
pub(crate) use host::{fetch, host_find, host_get};

#[cfg(all(target_arch = "wasm32", not(feature = "contract-0-1")))]
mod host {
    use super::*;

    /// A received document's whole text.
    pub(crate) fn fetch(part: Part) -> Vec<u8> {
        crate::guest::document(part).unwrap_or_else(|| b"{}".to_vec())
    }

    pub(crate) fn host_get(part: Part, path: &[String]) -> Result<Option<Value>> {
        crate::guest::get(part, path)
            .map(|text| parse_value(&text))
            .transpose()
    }

    pub(crate) fn host_find(part: Part, path: &[String]) -> Result<Vec<Found>> {
        crate::guest::find(part, path)
            .into_iter()
            .map(|(path, text)| {
                Ok(Found {
                    path,
                    value: parse_value(&text)?,
                })
            })
            .collect()
    }
}

// Natively (and for contract 0.1) no document is ever in the host: these are never called.
#[cfg(not(all(target_arch = "wasm32", not(feature = "contract-0-1"))))]
pub(crate) fn fetch(_part: Part) -> Vec<u8> {
    b"{}".to_vec()
}

#[cfg(not(all(target_arch = "wasm32", not(feature = "contract-0-1"))))]
pub(crate) fn host_get(_part: Part, _path: &[String]) -> Result<Option<Value>> {
    Ok(None)
}

#[cfg(not(all(target_arch = "wasm32", not(feature = "contract-0-1"))))]
pub(crate) fn host_find(_part: Part, _path: &[String]) -> Result<Vec<Found>> {
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn p(s: &str) -> Vec<String> {
        segments(s)
    }

    /// Local edits follow the host's rules: creation on set, removal of array elements,
    /// rename in place, errors for impossible sets, no-ops for missing unsets.
    #[test]
    fn local_edits() {
        let mut m = map(json!({"a": {"b": 1}, "l": [{"s": 1}, 2], "x": "s"}));
        apply(&mut m, &Edit::Set(p("a.c.d"), json!(2))).unwrap();
        apply(&mut m, &Edit::Set(p("l.0.s"), json!("r"))).unwrap();
        apply(&mut m, &Edit::Unset(p("l.1"))).unwrap();
        apply(&mut m, &Edit::Unset(p("zz.y"))).unwrap();
        apply(&mut m, &Edit::Rename(p("a.b"), "bb".into())).unwrap();
        assert_eq!(
            Value::Object(m.clone()),
            json!({"a": {"bb": 1, "c": {"d": 2}}, "l": [{"s": "r"}], "x": "s"})
        );
        assert!(apply(&mut m, &Edit::Set(p("x.y"), json!(1))).is_err());
        assert!(apply(&mut m, &Edit::Set(p("l.5"), json!(1))).is_err());
        assert!(apply(&mut m, &Edit::Set(p("l.k"), json!(1))).is_err());
        assert!(apply(&mut m, &Edit::Rename(p("x"), "a".into())).is_err());
        assert!(apply(&mut m, &Edit::Unset(Vec::new())).is_err());
    }

    /// `find` reports exact locations through arrays.
    #[test]
    fn local_find() {
        let m = map(json!({"a": [{"s": 1}, 2, {"s": {"t": 3}}]}));
        let found = find(&m, &p("a.s.t"));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, p("a.2.s.t"));
        assert_eq!(find(&m, &p("a.1"))[0].value, json!(2));
        assert!(find(&m, &p("b")).is_empty());
    }
}
