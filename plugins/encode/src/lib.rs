//! `encode`: a tidegate `transform` plugin for the encodings consumers ask for — arrays and
//! nested documents as JSON or as strings, Extended JSON relaxed or canonical, and a clear
//! choice for the types JSON cannot hold.
//!
//! Config keys (all optional; with none the plugin changes nothing):
//! - `arrays`: `array` (default) keeps arrays; `string` turns every array field into its JSON
//!   text (Kafka Connect's `Array_String`).
//! - `documents`: `document` (default) keeps nested documents; `string` turns every nested
//!   document (below the top level) into its JSON text.
//! - `special`: what happens to the types JSON cannot hold (ObjectId, dates, 64-bit and
//!   decimal numbers, binary, timestamps, regular expressions, min/max keys…), which the host
//!   sends as Extended JSON wrappers (`{"$oid": …}`). `ejson` (default) keeps the wrappers, so
//!   the host restores the BSON types and the sink's `encoding` decides how they are printed;
//!   `string` replaces them by plain JSON: ObjectId → hex string, date → ISO-8601 string,
//!   `$numberLong` → number, decimal and non-finite doubles → string, binary → base64 string,
//!   timestamp → `{"t": …, "i": …}`, regular expression → `/pattern/options`, min/max key →
//!   `"MinKey"`/`"MaxKey"`, anything else → its EJSON text.
//! - `ejson`: `relaxed` (default) or `canonical`: the Extended JSON flavour of the text that
//!   `arrays = "string"` and `documents = "string"` produce. Canonical keeps every number's
//!   type (`{"$numberInt": "1"}`, `{"$numberDouble": "1.5"}`) and dates as milliseconds.
//!   (The flavour of the published payload itself is the sink's `encoding` setting:
//!   `relaxed-json` or `canonical-json`.)
//!
//! Applied to `full-document`, `full-document-before-change` and the values of an update's
//! `updated-fields`. `document-key` is never changed. Each changed top-level field is handed
//! back as one `set` edit, so the fields the settings leave alone keep their exact bytes and
//! BSON types, and a document they leave unchanged is not touched at all.

use serde_json::{Map, Number, Value};
use tidegate_plugin::document::{as_i64, date_millis};
use tidegate_plugin::{Config, ConfigKeys, Document, Error, Event, Output, Transform};

/// The keys this plugin reads; `init` refuses any other key (a typo must not be ignored).
pub const KNOWN_KEYS: &[&str] = &["arrays", "documents", "special", "ejson"];

/// The parsed configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encode {
    /// Arrays become strings.
    pub arrays_as_strings: bool,
    /// Nested documents become strings.
    pub documents_as_strings: bool,
    /// EJSON wrappers become plain JSON.
    pub special_as_plain: bool,
    /// Stringified values use canonical EJSON.
    pub canonical: bool,
}

fn choice(config: &Config, key: &str, default: &str, other: &str) -> Result<bool, Error> {
    match config.get(key).map(str::trim) {
        None => Ok(false),
        Some(v) if v == default => Ok(false),
        Some(v) if v == other => Ok(true),
        Some(v) => Err(Error::invalid_config(format!(
            "`{key}` must be {default} or {other}, got {v:?}"
        ))),
    }
}

/// EJSON wrapper keys: an object whose first key is one of these is a value, not a document.
const WRAPPERS: &[&str] = &[
    "$oid",
    "$date",
    "$numberLong",
    "$numberInt",
    "$numberDouble",
    "$numberDecimal",
    "$binary",
    "$uuid",
    "$timestamp",
    "$regularExpression",
    "$minKey",
    "$maxKey",
    "$symbol",
    "$code",
    "$dbPointer",
    "$undefined",
];

fn is_wrapper(map: &Map<String, Value>) -> bool {
    map.keys()
        .next()
        .is_some_and(|k| WRAPPERS.contains(&k.as_str()))
}

impl Encode {
    /// A field's value, re-encoded (the top-level document itself is never stringified).
    fn value(&self, value: Value) -> Value {
        match value {
            Value::Object(map) if is_wrapper(&map) => {
                if self.special_as_plain {
                    plain(map)
                } else {
                    Value::Object(map)
                }
            }
            Value::Object(map) => {
                let map: Map<String, Value> =
                    map.into_iter().map(|(k, v)| (k, self.value(v))).collect();
                if self.documents_as_strings {
                    Value::String(self.text(Value::Object(map)))
                } else {
                    Value::Object(map)
                }
            }
            Value::Array(items) => {
                let items: Vec<Value> = items.into_iter().map(|v| self.value(v)).collect();
                if self.arrays_as_strings {
                    Value::String(self.text(Value::Array(items)))
                } else {
                    Value::Array(items)
                }
            }
            scalar => scalar,
        }
    }

    /// The JSON text of a stringified value, in the configured flavour.
    fn text(&self, value: Value) -> String {
        if self.canonical {
            canonical(value).to_string()
        } else {
            value.to_string()
        }
    }

    /// The top-level fields of `doc` the settings change, with their new values (empty when
    /// nothing changes). They become one `set` edit each: the host rewrites only those
    /// fields of the original BSON, so every other field keeps its bytes and exact type, and
    /// neither side converts the whole document back.
    pub fn changes(&self, doc: &Document) -> Result<Vec<(String, Value)>, Error> {
        if *self == Encode::default() {
            return Ok(Vec::new());
        }
        Ok(doc
            .map()?
            .iter()
            .filter_map(|(key, value)| {
                let after = self.value(value.clone());
                (after != *value).then(|| (key.clone(), after))
            })
            .collect())
    }

    /// Applies [`Encode::changes`] to `doc` as edits.
    fn encode(&self, doc: &mut Document) -> Result<(), Error> {
        for (key, value) in self.changes(doc)? {
            doc.set_at(vec![key], value)?;
        }
        Ok(())
    }
}

/// Plain JSON for an EJSON wrapper (see the crate docs).
fn plain(map: Map<String, Value>) -> Value {
    let Some((key, inner)) = map.iter().next() else {
        return Value::Object(map);
    };
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let converted = match key.as_str() {
        "$oid" | "$symbol" | "$code" | "$uuid" => s(inner).map(Value::String),
        "$date" => match inner {
            Value::String(iso) => Some(Value::String(iso.clone())),
            other => date_millis(other).map(|ms| Value::String(iso_from_millis(ms))),
        },
        "$numberLong" | "$numberInt" => as_i64(&Value::Object(map.clone())).map(Value::from),
        "$numberDouble" => {
            s(inner).map(|d| match d.parse::<f64>().ok().and_then(Number::from_f64) {
                Some(n) => Value::Number(n),
                None => Value::String(d),
            })
        }
        "$numberDecimal" => s(inner).map(Value::String),
        "$binary" => inner.get("base64").and_then(s).map(Value::String),
        "$timestamp" => Some(inner.clone()),
        "$regularExpression" => Some(Value::String(format!(
            "/{}/{}",
            inner
                .get("pattern")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            inner
                .get("options")
                .and_then(Value::as_str)
                .unwrap_or_default()
        ))),
        "$minKey" => Some(Value::String("MinKey".into())),
        "$maxKey" => Some(Value::String("MaxKey".into())),
        _ => None,
    };
    converted.unwrap_or_else(|| Value::String(Value::Object(map).to_string()))
}

/// Canonical Extended JSON of a relaxed value: numbers and dates wrapped with their type.
fn canonical(value: Value) -> Value {
    match value {
        Value::Number(n) => {
            let (key, text) = match n.as_i64() {
                Some(i) if i32::try_from(i).is_ok() => ("$numberInt", i.to_string()),
                Some(i) => ("$numberLong", i.to_string()),
                None => ("$numberDouble", {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    if f.fract() == 0.0 && f.abs() < 1e15 {
                        format!("{f:.1}")
                    } else {
                        f.to_string()
                    }
                }),
            };
            Value::Object(Map::from_iter([(key.to_owned(), Value::String(text))]))
        }
        Value::Object(map) if map.len() == 1 && map.contains_key("$date") => {
            match date_millis(&map["$date"]) {
                Some(ms) => serde_json::json!({"$date": {"$numberLong": ms.to_string()}}),
                None => Value::Object(map),
            }
        }
        Value::Object(map) if is_wrapper(&map) => Value::Object(map),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// `YYYY-MM-DDTHH:MM:SS.fffZ` for milliseconds since the epoch.
fn iso_from_millis(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

impl Transform for Encode {
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(KNOWN_KEYS);

    fn init(config: &Config) -> Result<Self, Error> {
        Ok(Encode {
            arrays_as_strings: choice(config, "arrays", "array", "string")?,
            documents_as_strings: choice(config, "documents", "document", "string")?,
            special_as_plain: choice(config, "special", "ejson", "string")?,
            canonical: choice(config, "ejson", "relaxed", "canonical")?,
        })
    }

    fn transform(&self, mut event: Event) -> Result<Vec<Output>, Error> {
        for doc in [
            &mut event.full_document,
            &mut event.full_document_before_change,
        ]
        .into_iter()
        .flatten()
        {
            self.encode(doc)?;
        }
        if let Some(u) = &mut event.update_description {
            self.encode(&mut u.updated_fields)?;
        }
        Ok(vec![Output::new(event)])
    }
}

tidegate_plugin::transform!(Encode);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(pairs: &[(&str, &str)], doc: Value) -> Value {
        let e = Encode::init_checked(&Config::from_pairs(pairs.iter().copied())).unwrap();
        let out = e.transform(Event::insert("a", "b", doc)).unwrap();
        Value::Object(
            out[0]
                .event
                .full_document
                .as_ref()
                .unwrap()
                .to_map()
                .unwrap(),
        )
    }

    fn sample() -> Value {
        json!({
            "_id": {"$oid": "65a1b2c3d4e5f60718293a4b"},
            "tags": ["a", 1],
            "author": {"id": 7, "at": {"$date": "2024-01-02T03:04:05.678Z"}},
            "big": {"$numberLong": "9007199254740993"},
            "price": {"$numberDecimal": "9.99"},
            "n": 1.5,
        })
    }

    #[test]
    fn defaults_change_nothing_byte_for_byte() {
        let e = Encode::init_checked(&Config::default()).unwrap();
        let doc = |text: &[u8]| Document::from_bytes(text.to_vec());
        let bytes = br#"{"a": [1], "b": {"$oid": "x"}}"#;
        assert!(e.changes(&doc(bytes)).unwrap().is_empty());
        let e = Encode::init_checked(&Config::from_pairs([("arrays", "string")])).unwrap();
        assert!(
            e.changes(&doc(br#"{"a": 1}"#)).unwrap().is_empty(),
            "nothing to change"
        );
        assert_eq!(
            e.changes(&doc(bytes)).unwrap(),
            vec![("a".to_string(), Value::String("[1]".into()))],
            "only the array field changes"
        );
    }

    #[test]
    fn arrays_and_documents_as_strings() {
        let out = run(&[("arrays", "string")], sample());
        assert_eq!(out["tags"], r#"["a",1]"#);
        assert_eq!(out["author"]["id"], 7, "documents stay");
        let out = run(&[("documents", "string")], sample());
        assert_eq!(
            out["author"],
            r#"{"id":7,"at":{"$date":"2024-01-02T03:04:05.678Z"}}"#
        );
        assert_eq!(
            out["_id"],
            json!({"$oid": "65a1b2c3d4e5f60718293a4b"}),
            "wrappers are values"
        );
        assert_eq!(out["tags"], json!(["a", 1]));
    }

    #[test]
    fn special_types_as_plain_json() {
        let out = run(&[("special", "string")], sample());
        assert_eq!(out["_id"], "65a1b2c3d4e5f60718293a4b");
        assert_eq!(out["author"]["at"], "2024-01-02T03:04:05.678Z");
        assert_eq!(out["big"], json!(9007199254740993_i64));
        assert_eq!(out["price"], "9.99");
        let out = run(
            &[("special", "string")],
            json!({
                "bin": {"$binary": {"base64": "AQI=", "subType": "00"}},
                "old": {"$date": {"$numberLong": "-1000"}},
                "nan": {"$numberDouble": "NaN"},
                "re": {"$regularExpression": {"pattern": "^a", "options": "i"}},
                "min": {"$minKey": 1},
                "ts": {"$timestamp": {"t": 5, "i": 1}},
            }),
        );
        assert_eq!(out["bin"], "AQI=");
        assert_eq!(out["old"], "1969-12-31T23:59:59.000Z");
        assert_eq!(out["nan"], "NaN");
        assert_eq!(out["re"], "/^a/i");
        assert_eq!(out["min"], "MinKey");
        assert_eq!(out["ts"], json!({"t": 5, "i": 1}));
    }

    #[test]
    fn canonical_strings() {
        let out = run(&[("documents", "string"), ("ejson", "canonical")], sample());
        assert_eq!(
            out["author"],
            r#"{"id":{"$numberInt":"7"},"at":{"$date":{"$numberLong":"1704164645678"}}}"#
        );
        let out = run(
            &[("arrays", "string"), ("ejson", "canonical")],
            json!({"a": [1.0, 3000000000_i64, 0.5]}),
        );
        assert_eq!(
            out["a"],
            r#"[{"$numberDouble":"1.0"},{"$numberLong":"3000000000"},{"$numberDouble":"0.5"}]"#
        );
    }

    #[test]
    fn updated_fields_and_bad_config() {
        let e = Encode::init_checked(&Config::from_pairs([("arrays", "string")])).unwrap();
        let ev = Event::update("a", "b", json!(1), json!({"tags": [1, 2], "n": 1}), None);
        let out = e.transform(ev).unwrap();
        let f = &out[0]
            .event
            .update_description
            .as_ref()
            .unwrap()
            .updated_fields;
        assert_eq!(f.get_str("tags").unwrap(), Some("[1,2]"));
        for (k, v) in [
            ("arrays", "strings"),
            ("documents", "x"),
            ("special", "plain"),
            ("ejson", "strict"),
        ] {
            assert!(
                Encode::init_checked(&Config::from_pairs([(k, v)])).is_err(),
                "{k}={v}"
            );
        }
        assert_eq!(iso_from_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_from_millis(951_868_800_250), "2000-03-01T00:00:00.250Z");
    }
}
