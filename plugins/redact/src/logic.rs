//! Parsing the `fields` list and redacting documents, free of WIT bindings so it can be
//! unit-tested natively.

use serde_json::{Map, Value};

/// What every redacted value becomes.
pub const REDACTED: &str = "[redacted]";

/// The keys this plugin reads; `init` warns about any other key (probably a typo).
pub const KNOWN_KEYS: &[&str] = &["fields"];

/// The parsed configuration: the dotted paths to redact, split into segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub paths: Vec<Vec<String>>,
}

impl Config {
    /// Parses `fields`: comma-separated dotted paths such as `email,address.street`.
    pub fn parse(fields: Option<&str>) -> Result<Config, String> {
        let Some(fields) = fields else {
            return Err(
                "`fields` is required: comma-separated dotted paths to redact, \
                        e.g. \"email,address.street\""
                    .to_owned(),
            );
        };
        let mut paths: Vec<Vec<String>> = Vec::new();
        for item in fields.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!("`fields` has an empty entry in {fields:?}"));
            }
            let segments: Vec<String> = item.split('.').map(str::to_owned).collect();
            if segments.iter().any(|s| s.is_empty() || s.trim() != s) {
                return Err(format!(
                    "`fields`: bad path {item:?} (segments must be non-empty, without blanks)"
                ));
            }
            if !paths.contains(&segments) {
                paths.push(segments);
            }
        }
        Ok(Config { paths })
    }
}

/// Replaces the value at `path` inside `value` with [`REDACTED`]; returns how many values it
/// replaced.
///
/// Follows MongoDB's dotted-path rules: a numeric segment picks an array element, and any other
/// segment applied to an array applies to each of its (object) elements, so `addresses.street`
/// redacts the street of every address.
fn redact_at(value: &mut Value, path: &[String]) -> usize {
    match value {
        Value::Object(map) => redact_field(map, path),
        Value::Array(items) => {
            let Some((first, rest)) = path.split_first() else {
                return 0;
            };
            match first.parse::<usize>() {
                Ok(index) => items
                    .get_mut(index)
                    .map_or(0, |item| redact_leaf(item, rest)),
                Err(_) => items
                    .iter_mut()
                    .filter_map(Value::as_object_mut)
                    .map(|map| redact_field(map, path))
                    .sum(),
            }
        }
        _ => 0,
    }
}

/// [`redact_at`] for an object.
fn redact_field(map: &mut Map<String, Value>, path: &[String]) -> usize {
    match path.split_first() {
        Some((first, rest)) => map
            .get_mut(first.as_str())
            .map_or(0, |child| redact_leaf(child, rest)),
        None => 0,
    }
}

/// Redacts `value` itself when the path ends here, or goes on down.
fn redact_leaf(value: &mut Value, rest: &[String]) -> usize {
    if rest.is_empty() {
        *value = Value::String(REDACTED.to_owned());
        1
    } else {
        redact_at(value, rest)
    }
}

/// How an `updated-fields` key relates to a configured path.
#[derive(Debug, PartialEq, Eq)]
enum Relation<'p> {
    /// The key is the path or lies below it (`address.street` for path `address`): redact the
    /// whole value.
    Covers,
    /// The key lies above the path (`address` for path `address.street`): redact the rest of
    /// the path inside the value.
    Inside(&'p [String]),
    Unrelated,
}

/// Compares an `updated-fields` key with a path. Array indices appear in update keys
/// (`addresses.0.street`) but not in paths (`addresses.street`), so a numeric key segment that
/// does not match the path is skipped.
fn relate<'p>(key: &str, path: &'p [String]) -> Relation<'p> {
    let key: Vec<&str> = key.split('.').collect();
    let (mut i, mut j) = (0, 0);
    while i < key.len() && j < path.len() {
        if key[i] == path[j] {
            i += 1;
            j += 1;
        } else if !key[i].is_empty() && key[i].bytes().all(|b| b.is_ascii_digit()) {
            i += 1;
        } else {
            return Relation::Unrelated;
        }
    }
    if j == path.len() {
        Relation::Covers
    } else {
        Relation::Inside(&path[j..])
    }
}

/// Redacts the configured paths in a document whose top-level keys are field names
/// (`full-document`, `full-document-before-change`).
pub fn redact_document(doc: &mut Map<String, Value>, config: &Config) -> usize {
    config.paths.iter().map(|p| redact_field(doc, p)).sum()
}

/// Redacts the configured paths in an update's `updated-fields`, whose keys are dotted paths.
pub fn redact_updated_fields(fields: &mut Map<String, Value>, config: &Config) -> usize {
    let mut count = 0;
    for (key, value) in fields.iter_mut() {
        for path in &config.paths {
            match relate(key, path) {
                Relation::Covers => {
                    *value = Value::String(REDACTED.to_owned());
                    count += 1;
                    break;
                }
                Relation::Inside(rest) => count += redact_at(value, rest),
                Relation::Unrelated => {}
            }
        }
    }
    count
}

/// Which kind of document is being redacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Keys are field names.
    Document,
    /// Keys are dotted paths (`update-description.updated-fields`).
    UpdatedFields,
}

/// Redacts one relaxed-EJSON document given as bytes.
///
/// Returns the number of values redacted and, only when that is non-zero, the rewritten bytes.
/// An untouched document is handed back as the original bytes, so the host publishes the
/// original BSON with full type fidelity. Anything but a JSON object is an error.
pub fn redact_bytes(
    bytes: &[u8],
    kind: Kind,
    config: &Config,
) -> Result<(usize, Option<Vec<u8>>), String> {
    let mut map = match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err("not a JSON object".to_owned()),
        Err(e) => return Err(format!("not valid JSON: {e}")),
    };
    let count = match kind {
        Kind::Document => redact_document(&mut map, config),
        Kind::UpdatedFields => redact_updated_fields(&mut map, config),
    };
    if count == 0 {
        return Ok((0, None));
    }
    let out = serde_json::to_vec(&Value::Object(map)).map_err(|e| format!("re-encoding: {e}"))?;
    Ok((count, Some(out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(s: &str) -> Config {
        Config::parse(Some(s)).unwrap()
    }

    fn run(kind: Kind, doc: Value, fields: &str) -> (usize, Value) {
        let bytes = serde_json::to_vec(&doc).unwrap();
        let (n, out) = redact_bytes(&bytes, kind, &cfg(fields)).unwrap();
        let out = out
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(doc);
        (n, out)
    }

    #[test]
    fn config_parsing() {
        assert_eq!(
            cfg(" email , address.street,email").paths,
            vec![
                vec!["email".to_owned()],
                vec!["address".to_owned(), "street".to_owned()]
            ]
        );
        assert!(Config::parse(None)
            .unwrap_err()
            .contains("`fields` is required"));
        for bad in ["", "a,", "a,,b", "a..b", ".a", "a.", "a. b"] {
            assert!(Config::parse(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn top_level_and_nested() {
        let (n, out) = run(
            Kind::Document,
            json!({"_id": 1, "email": "a@b.c", "address": {"street": "x", "city": "y"}}),
            "email,address.street,missing,address.zip",
        );
        assert_eq!(n, 2);
        assert_eq!(
            out,
            json!({"_id": 1, "email": "[redacted]", "address": {"street": "[redacted]", "city": "y"}})
        );
    }

    #[test]
    fn whole_subdocument_and_ejson_wrappers() {
        let (n, out) = run(
            Kind::Document,
            json!({"address": {"street": "x"}, "born": {"$date": "2000-01-01T00:00:00Z"}}),
            "address,born",
        );
        assert_eq!(n, 2);
        assert_eq!(out, json!({"address": "[redacted]", "born": "[redacted]"}));
    }

    #[test]
    fn arrays() {
        let doc = json!({"addresses": [{"street": "a"}, {"city": "b"}, {"street": "c"}, 5]});
        let (n, out) = run(Kind::Document, doc.clone(), "addresses.street");
        assert_eq!(n, 2);
        assert_eq!(
            out,
            json!({"addresses": [{"street": "[redacted]"}, {"city": "b"}, {"street": "[redacted]"}, 5]})
        );
        let (n, out) = run(Kind::Document, doc, "addresses.2.street");
        assert_eq!(n, 1);
        assert_eq!(out["addresses"][0]["street"], "a");
        assert_eq!(out["addresses"][2]["street"], "[redacted]");
    }

    #[test]
    fn path_through_scalar_is_ignored() {
        let (n, _) = run(
            Kind::Document,
            json!({"address": "one line"}),
            "address.street",
        );
        assert_eq!(n, 0);
    }

    #[test]
    fn untouched_document_keeps_its_bytes() {
        let bytes = br#"{"b": 1.0, "a": {"$numberLong": "1"}}"#;
        let (n, out) = redact_bytes(bytes, Kind::Document, &cfg("email")).unwrap();
        assert_eq!((n, out), (0, None));
    }

    #[test]
    fn rewritten_document_keeps_order_and_numbers() {
        let bytes = br#"{"z":1.0,"email":"x","a":-9223372036854775808,"b":9223372036854775807,"c":0.1,"d":-0.0}"#;
        let (n, out) = redact_bytes(bytes, Kind::Document, &cfg("email")).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            String::from_utf8(out.unwrap()).unwrap(),
            r#"{"z":1.0,"email":"[redacted]","a":-9223372036854775808,"b":9223372036854775807,"c":0.1,"d":-0.0}"#
        );
    }

    #[test]
    fn updated_fields() {
        let (n, out) = run(
            Kind::UpdatedFields,
            json!({
                "email": "a@b.c",
                "address.street": "x",
                "address.city": "y",
                "profile": {"email": "p@q.r", "nick": "n"},
                "addresses.1.street": "z",
                "addresses.1": {"street": "w", "city": "v"},
                "name": "kept",
            }),
            "email,address.street,profile.email,addresses.street",
        );
        assert_eq!(n, 5);
        assert_eq!(
            out,
            json!({
                "email": "[redacted]",
                "address.street": "[redacted]",
                "address.city": "y",
                "profile": {"email": "[redacted]", "nick": "n"},
                "addresses.1.street": "[redacted]",
                "addresses.1": {"street": "[redacted]", "city": "v"},
                "name": "kept",
            })
        );
    }

    #[test]
    fn updated_field_below_path_is_covered() {
        let (n, out) = run(
            Kind::UpdatedFields,
            json!({"address.geo.lat": 1, "addressee": 2}),
            "address",
        );
        assert_eq!(n, 1);
        assert_eq!(
            out,
            json!({"address.geo.lat": "[redacted]", "addressee": 2})
        );
    }

    #[test]
    fn bad_documents() {
        let c = cfg("email");
        assert!(redact_bytes(b"[1,2]", Kind::Document, &c)
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(redact_bytes(b"{", Kind::Document, &c)
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(redact_bytes(b"\xff", Kind::UpdatedFields, &c).is_err());
    }
}
