//! `map`: a tidegate `transform` plugin that projects collection documents to flat records —
//! chosen fields by dotted path, renamed (`author.id -> userId`) — with one mapping per variant
//! of a polymorphic collection, and a subject per mapping.
//!
//! Config keys:
//! - `fields`: the mapping when there are no variants: comma-separated `path` or
//!   `path -> name` entries, e.g. `_id, author.id -> userId, title`. A dotted path needs a
//!   name.
//! - `subject`: subject for the mapped events (default: the pipeline's template). Placeholders:
//!   `{db}`, `{coll}`, `{operation}`, `{variant}` (the discriminator value).
//! - `discriminator`: a dotted path whose value selects the mapping, for polymorphic
//!   collections. Requires `variants`, and replaces `fields` / `subject`.
//! - `variants`: JSON object from discriminator value to `{"fields": …, "subject": …}`, where
//!   `fields` is the list above or a JSON object `{"path": "name"}`. The key `"*"` catches
//!   values without their own variant.
//! - `unmatched`: what to do with a document whose discriminator has no variant (and no `"*"`):
//!   `error` (default: dead-letter it, so a new variant is noticed), `drop`, or `pass`
//!   (publish unchanged).
//! - `payload`: `event` (default) publishes the mapped event, encoded as the pipeline's sink
//!   says; `csv` publishes the record itself as one CSV line instead (contract 0.2's payload
//!   replacement, `Content-Type: text/csv; header=absent`): the mapped fields in mapping order,
//!   quoted as RFC 4180 says when needed, ending in `\n`. A missing field or `null` is empty,
//!   an Extended JSON wrapper with a string inside (`{"$oid": …}`, `{"$date": …}`,
//!   `{"$numberLong": …}`) is that string, other documents and arrays are their JSON text.
//!   The record is the mapped `full-document`, else `full-document-before-change`, else the
//!   mapped `updated-fields`; an event with none of these (a delete without pre-image, a drop)
//!   is published as the event.
//!
//! Each mapped value is read by itself (`Document::value`: the host looks up just that path of
//! a received document), so the rest of a document is never converted, and the record goes
//! back as a `replace` of the part.
//!
//! The mapping applies to `full-document` and `full-document-before-change` (fields missing
//! from the document are left out of the record), and to an update's `updated-fields`: a key
//! that is a mapped path is renamed, a key above mapped paths (`author` for `author.id`)
//! yields the mapped values inside it, other keys are left out; `removed-fields` likewise.
//! The variant is read from `full-document`, else `full-document-before-change`, else
//! `updated-fields`. Events with none of these (a delete without pre-image, a drop) pass
//! unchanged on the mapping's subject when there is a single mapping, else on the pipeline's.
//! `document-key` is never changed. Each output carries the header `X-Map-Variant` when a
//! variant was chosen.
//!
//! A large mapping can live in a file: the plugin's `config_file` (JSON or TOML, read by the
//! host — a plugin cannot read host files) supplies these keys, with `variants` written as a
//! plain object; the host passes it as its JSON text, which is what this plugin parses.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tidegate_plugin::{subject, Config, ConfigKeys, Document, Error, Event, Output, Transform};

/// The keys this plugin reads; `init` refuses any other key (a typo must not be ignored).
pub const KNOWN_KEYS: &[&str] = &[
    "fields",
    "subject",
    "discriminator",
    "variants",
    "unmatched",
    "payload",
];

/// The content type of `payload = "csv"` messages.
pub const CSV_CONTENT_TYPE: &str = "text/csv; header=absent";

/// One projection: `(path segments, output name)` in output order, and a subject template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    fields: Vec<(Vec<String>, String)>,
    subject: Option<String>,
}

/// What happens to a document whose variant has no mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmatched {
    /// Dead-letter it.
    Error,
    /// Drop it.
    Drop,
    /// Publish it unchanged.
    Pass,
}

/// The parsed configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// One mapping for every document.
    Single(Mapping),
    /// A mapping per discriminator value.
    Variants {
        discriminator: String,
        variants: BTreeMap<String, Mapping>,
        fallback: Option<Mapping>,
        unmatched: Unmatched,
    },
}

/// The plugin: its mapping(s), and whether it publishes records as CSV payloads.
#[derive(Debug)]
pub struct MapPlugin(Plan, bool);

fn bad(message: impl Into<String>) -> Error {
    Error::invalid_config(message.into())
}

/// Parses `path`, `path -> name`, checking both.
fn parse_entry(key: &str, entry: &str, name: Option<&str>) -> Result<(Vec<String>, String), Error> {
    let (path, name) = match name {
        Some(n) => (entry.trim(), n.trim()),
        None => match entry.split_once("->") {
            Some((p, n)) => (p.trim(), n.trim()),
            None => {
                let p = entry.trim();
                if p.contains('.') {
                    return Err(bad(format!(
                        "`{key}`: dotted path {p:?} needs a name: \"{p} -> someName\""
                    )));
                }
                (p, p)
            }
        },
    };
    let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
    if segments.iter().any(|s| s.is_empty() || s.trim() != s) {
        return Err(bad(format!("`{key}`: bad path {path:?}")));
    }
    if name.is_empty() || name.contains('.') || name.starts_with('$') {
        return Err(bad(format!(
            "`{key}`: bad name {name:?} (non-empty, no dots, not starting with $)"
        )));
    }
    Ok((segments, name.to_owned()))
}

fn parse_fields(key: &str, value: &Value) -> Result<Vec<(Vec<String>, String)>, Error> {
    let fields: Vec<(Vec<String>, String)> = match value {
        Value::String(list) => list
            .split(',')
            .map(|e| parse_entry(key, e, None))
            .collect::<Result<_, _>>()?,
        Value::Object(map) => map
            .iter()
            .map(|(path, name)| match name {
                Value::String(n) => parse_entry(key, path, Some(n)),
                _ => Err(bad(format!(
                    "`{key}`: the name of {path:?} must be a string"
                ))),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(bad(format!(
                "`{key}` must be a list string or a JSON object"
            )))
        }
    };
    if fields.is_empty() {
        return Err(bad(format!("`{key}` maps no field")));
    }
    let mut names: Vec<&str> = fields.iter().map(|(_, n)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(format!("`{key}`: name {:?} is used twice", w[0])));
    }
    Ok(fields)
}

fn check_subject(key: &str, s: &str) -> Result<String, Error> {
    let probe = render(s, "db", "coll", "insert", "v");
    let ok = !probe.is_empty()
        && probe
            .split('.')
            .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ', '{', '}']));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(bad(format!(
            "`{key}`: {s:?} is not a NATS subject (placeholders: {{db}} {{coll}} {{operation}} {{variant}})"
        )))
    }
}

fn render(template: &str, db: &str, coll: &str, op: &str, variant: &str) -> String {
    let token = |t: &str| subject(&[t]);
    template
        .replace("{db}", &token(db))
        .replace("{coll}", &token(coll))
        .replace("{operation}", &token(op))
        .replace("{variant}", &token(variant))
}

impl Mapping {
    fn parse(key: &str, fields: &Value, subject: Option<&str>) -> Result<Mapping, Error> {
        Ok(Mapping {
            fields: parse_fields(key, fields)?,
            subject: subject.map(|s| check_subject(key, s)).transpose()?,
        })
    }

    /// The record for one document, each value read by itself.
    fn project(&self, doc: &Document) -> Result<Map<String, Value>, Error> {
        let mut out = Map::new();
        for (path, name) in &self.fields {
            if let Some(v) = doc.value(&path.join("."))? {
                out.insert(name.clone(), v);
            }
        }
        Ok(out)
    }

    /// `record` as one CSV line, columns in mapping order (see the crate docs).
    pub fn csv(&self, record: &Map<String, Value>) -> Vec<u8> {
        let mut line = String::new();
        for (i, (_, name)) in self.fields.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let text = match record.get(name) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(m)) => match m.iter().next() {
                    Some((k, Value::String(s))) if m.len() == 1 && k.starts_with('$') => s.clone(),
                    _ => Value::Object(m.clone()).to_string(),
                },
                Some(other) => other.to_string(),
            };
            if text.contains([',', '"', '\r', '\n']) {
                line.push('"');
                line.push_str(&text.replace('"', "\"\""));
                line.push('"');
            } else {
                line.push_str(&text);
            }
        }
        line.push('\n');
        line.into_bytes()
    }

    /// An update's `updated-fields` (keys are dotted paths) in record terms.
    fn project_updated(&self, fields: &Map<String, Value>) -> Map<String, Value> {
        let mut out = Map::new();
        for (key, value) in fields {
            let key: Vec<&str> = key.split('.').collect();
            for (path, name) in &self.fields {
                if path.len() >= key.len() && path.iter().zip(&key).all(|(p, k)| p == k) {
                    if let Some(v) = get(value, &path[key.len()..]) {
                        out.insert(name.clone(), v.clone());
                    }
                }
            }
        }
        out
    }

    /// Removed dotted paths in record terms: the names of mapped paths at or below them.
    fn project_removed(&self, removed: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for r in removed {
            let r: Vec<&str> = r.split('.').collect();
            for (path, name) in &self.fields {
                if path.len() >= r.len()
                    && path.iter().zip(&r).all(|(p, k)| p == k)
                    && !out.contains(name)
                {
                    out.push(name.clone());
                }
            }
        }
        out
    }
}

fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, seg| match v {
        Value::Object(m) => m.get(seg.as_str()),
        Value::Array(items) => items.get(seg.parse::<usize>().ok()?),
        _ => None,
    })
}

impl Transform for MapPlugin {
    const CONFIG_KEYS: ConfigKeys = ConfigKeys::Only(KNOWN_KEYS);

    fn init(config: &Config) -> Result<Self, Error> {
        let csv = match config.get("payload").map(str::trim) {
            None | Some("event") => false,
            Some("csv") => true,
            Some(other) => {
                return Err(bad(format!(
                    "`payload` must be event or csv, got {other:?}"
                )))
            }
        };
        let Some(discriminator) = config.get("discriminator") else {
            if config.get("variants").is_some() || config.get("unmatched").is_some() {
                return Err(bad("`variants` and `unmatched` need a `discriminator`"));
            }
            let fields = config.require("fields")?;
            return Ok(MapPlugin(
                Plan::Single(Mapping::parse(
                    "fields",
                    &Value::String(fields.to_owned()),
                    config.get("subject"),
                )?),
                csv,
            ));
        };
        if config.get("fields").is_some() || config.get("subject").is_some() {
            return Err(bad(
                "with a `discriminator`, give `fields` and `subject` per variant in `variants`",
            ));
        }
        let discriminator = discriminator.trim().to_owned();
        if discriminator.is_empty() || discriminator.split('.').any(str::is_empty) {
            return Err(bad(format!("`discriminator`: bad path {discriminator:?}")));
        }
        let Some(Value::Object(table)) = config.json("variants")? else {
            return Err(bad(
                "`variants` is required with a `discriminator`: a JSON object",
            ));
        };
        let mut variants = BTreeMap::new();
        let mut fallback = None;
        for (value, spec) in table {
            let key = format!("variants.{value}");
            let Value::Object(spec) = spec else {
                return Err(bad(format!("`{key}` must be an object with `fields`")));
            };
            if let Some(extra) = spec.keys().find(|k| *k != "fields" && *k != "subject") {
                return Err(bad(format!("`{key}`: unknown key {extra:?}")));
            }
            let fields = spec
                .get("fields")
                .ok_or_else(|| bad(format!("`{key}` needs `fields`")))?;
            let subject = match spec.get("subject") {
                None => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(_) => return Err(bad(format!("`{key}.subject` must be a string"))),
            };
            let mapping = Mapping::parse(&key, fields, subject)?;
            if value == "*" {
                fallback = Some(mapping);
            } else {
                variants.insert(value, mapping);
            }
        }
        let unmatched = match config.get("unmatched").map(str::trim) {
            None | Some("error") => Unmatched::Error,
            Some("drop") => Unmatched::Drop,
            Some("pass") => Unmatched::Pass,
            Some(other) => {
                return Err(bad(format!(
                    "`unmatched` must be error, drop or pass, got {other:?}"
                )))
            }
        };
        Ok(MapPlugin(
            Plan::Variants {
                discriminator,
                variants,
                fallback,
                unmatched,
            },
            csv,
        ))
    }

    fn transform(&self, mut event: Event) -> Result<Vec<Output>, Error> {
        let (mapping, variant) = match &self.0 {
            Plan::Single(m) => (m, String::new()),
            Plan::Variants {
                discriminator,
                variants,
                fallback,
                unmatched,
            } => {
                let Some(value) = discriminator_value(&event, discriminator)? else {
                    return Ok(vec![Output::new(event)]);
                };
                match variants.get(&value).or(fallback.as_ref()) {
                    Some(m) => (m, value),
                    None => match unmatched {
                        Unmatched::Drop => return Ok(Vec::new()),
                        Unmatched::Pass => return Ok(vec![Output::new(event)]),
                        Unmatched::Error => {
                            return Err(Error::invalid_event(format!(
                            "no mapping for `{discriminator}` = {value:?} (add it to `variants`, \
                                 or a \"*\" variant)"
                        )))
                        }
                    },
                }
            }
        };
        let mut touched = false;
        let mut record = None;
        for doc in [
            &mut event.full_document,
            &mut event.full_document_before_change,
        ]
        .into_iter()
        .flatten()
        {
            let projected = mapping.project(doc)?;
            if self.1 && record.is_none() {
                record = Some(projected.clone());
            }
            *doc = Document::from_map(projected);
            touched = true;
        }
        if let Some(u) = &mut event.update_description {
            let projected = mapping.project_updated(u.updated_fields.map()?);
            if self.1 && record.is_none() {
                record = Some(projected.clone());
            }
            u.updated_fields = Document::from_map(projected);
            u.removed_fields = mapping.project_removed(&u.removed_fields);
            u.truncated_arrays.clear();
            touched = true;
        }
        let mut out = Output::new(event);
        if let Some(record) = record {
            out = out.payload(mapping.csv(&record), CSV_CONTENT_TYPE);
        }
        if let Some(template) = &mapping.subject {
            let e = &out.event;
            let s = render(
                template,
                &e.namespace.db,
                e.namespace.coll.as_deref().unwrap_or("_"),
                e.operation.as_str(),
                if variant.is_empty() { "_" } else { &variant },
            );
            out = out.subject(s);
        }
        if touched && !variant.is_empty() {
            out = out.header("X-Map-Variant", variant);
        }
        Ok(vec![out])
    }
}

/// The discriminator's value as text (strings as is, other scalars as JSON), from the first
/// document that has one; `None` when the event carries no document.
fn discriminator_value(event: &Event, path: &str) -> Result<Option<String>, Error> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if let Some(doc) = event.document() {
        return Ok(Some(doc.get(path)?.map(text).unwrap_or_default()));
    }
    if let Some(u) = &event.update_description {
        if let Some(v) = u.updated_fields.map()?.get(path) {
            return Ok(Some(text(v)));
        }
    }
    Ok(None)
}

tidegate_plugin::transform!(MapPlugin);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(pairs: &[(&str, &str)]) -> Result<MapPlugin, Error> {
        MapPlugin::init_checked(&Config::from_pairs(pairs.iter().copied()))
    }

    fn doc(out: &Output) -> Value {
        Value::Object(out.event.full_document.as_ref().unwrap().to_map().unwrap())
    }

    #[test]
    fn single_mapping_projects_and_renames() {
        let m = plugin(&[
            (
                "fields",
                "_id -> id, author.id -> userId, title, tags.0 -> firstTag",
            ),
            ("subject", "cdc.flat.{coll}.{operation}"),
        ])
        .unwrap();
        let out = m
            .transform(Event::insert(
                "blog",
                "posts",
                json!({"_id": 1, "author": {"id": 7, "name": "A"}, "title": "T", "tags": ["x"], "body": "…"}),
            ))
            .unwrap();
        assert_eq!(
            doc(&out[0]),
            json!({"id": 1, "userId": 7, "title": "T", "firstTag": "x"})
        );
        let keys: Vec<String> = out[0]
            .event
            .full_document
            .as_ref()
            .unwrap()
            .map()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["id", "userId", "title", "firstTag"], "mapping order");
        assert_eq!(out[0].subject.as_deref(), Some("cdc.flat.posts.insert"));
    }

    #[test]
    fn missing_fields_are_left_out_and_deletes_pass() {
        let m = plugin(&[("fields", "a, b.c -> c")]).unwrap();
        let out = m
            .transform(Event::insert("d", "c", json!({"a": 1})))
            .unwrap();
        assert_eq!(doc(&out[0]), json!({"a": 1}));
        let del = Event::delete("d", "c", json!(1));
        assert_eq!(m.transform(del.clone()).unwrap()[0].event, del);
    }

    #[test]
    fn updates_are_mapped() {
        let m = plugin(&[("fields", "_id -> id, author.id -> userId, title")]).unwrap();
        let mut e = Event::update(
            "blog",
            "posts",
            json!(1),
            json!({"author": {"id": 8, "name": "B"}, "title": "New", "body": "x"}),
            None,
        );
        e.update_description.as_mut().unwrap().removed_fields =
            vec!["author".into(), "body".into()];
        let out = m.transform(e).unwrap();
        let u = out[0].event.update_description.as_ref().unwrap();
        assert_eq!(
            Value::Object(u.updated_fields.to_map().unwrap()),
            json!({"userId": 8, "title": "New"})
        );
        assert_eq!(u.removed_fields, ["userId"]);
        let mut e = Event::update("blog", "posts", json!(1), json!({"author.id": 9}), None);
        e.update_description
            .as_mut()
            .unwrap()
            .removed_fields
            .clear();
        let out = m.transform(e).unwrap();
        let u = out[0].event.update_description.as_ref().unwrap();
        assert_eq!(
            Value::Object(u.updated_fields.to_map().unwrap()),
            json!({"userId": 9})
        );
    }

    fn variants() -> MapPlugin {
        plugin(&[
            ("discriminator", "kind"),
            (
                "variants",
                r#"{"post": {"fields": "_id -> id, title", "subject": "cdc.posts.{operation}"},
                    "comment": {"fields": {"_id": "id", "post.id": "postId"}, "subject": "cdc.comments.{variant}"}}"#,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn a_mapping_per_variant() {
        let m = variants();
        let out = m
            .transform(Event::insert(
                "b",
                "items",
                json!({"_id": 1, "kind": "post", "title": "T", "x": 1}),
            ))
            .unwrap();
        assert_eq!(doc(&out[0]), json!({"id": 1, "title": "T"}));
        assert_eq!(out[0].subject.as_deref(), Some("cdc.posts.insert"));
        assert_eq!(out[0].headers[0].value, "post");
        let out = m
            .transform(Event::insert(
                "b",
                "items",
                json!({"_id": 2, "kind": "comment", "post": {"id": 1}}),
            ))
            .unwrap();
        assert_eq!(doc(&out[0]), json!({"id": 2, "postId": 1}));
        assert_eq!(out[0].subject.as_deref(), Some("cdc.comments.comment"));
    }

    #[test]
    fn unmatched_variants() {
        let e = Event::insert("b", "items", json!({"_id": 3, "kind": "like"}));
        let err = variants().transform(e.clone()).unwrap_err();
        assert!(matches!(err, Error::InvalidEvent(m) if m.contains("\"like\"")));
        let base = r#"{"post": {"fields": "title"}}"#;
        let drop = plugin(&[
            ("discriminator", "kind"),
            ("variants", base),
            ("unmatched", "drop"),
        ])
        .unwrap();
        assert!(drop.transform(e.clone()).unwrap().is_empty());
        let pass = plugin(&[
            ("discriminator", "kind"),
            ("variants", base),
            ("unmatched", "pass"),
        ])
        .unwrap();
        assert_eq!(pass.transform(e.clone()).unwrap()[0].event, e);
        let star = r#"{"post": {"fields": "title"}, "*": {"fields": "_id -> id"}}"#;
        let fallback = plugin(&[("discriminator", "kind"), ("variants", star)]).unwrap();
        assert_eq!(doc(&fallback.transform(e).unwrap()[0]), json!({"id": 3}));
    }

    #[test]
    fn csv_payload_is_the_record_as_one_line() {
        let m = plugin(&[
            ("fields", "_id -> id, name, address.city -> city, note, n"),
            ("payload", "csv"),
        ])
        .unwrap();
        let record = json!({"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "name": "Doe, \"Jane\"",
            "address": {"city": "Lyon"}, "note": null, "n": 2.5, "other": 1});
        let out = m.transform(Event::insert("d", "c", record)).unwrap();
        let payload = out[0].payload.as_ref().expect("a payload");
        assert_eq!(payload.content_type, CSV_CONTENT_TYPE);
        assert!(payload.check().is_ok());
        assert_eq!(
            String::from_utf8(payload.bytes.clone()).unwrap(),
            "65a1b2c3d4e5f60718293a4b,\"Doe, \"\"Jane\"\"\",Lyon,,2.5\n"
        );
        // The event is still mapped (it goes on down the chain).
        assert_eq!(doc(&out[0])["city"], "Lyon");
        let del = m.transform(Event::delete("d", "c", json!(1))).unwrap();
        assert!(
            del[0].payload.is_none(),
            "no document, no record: the event is published"
        );
        let event = plugin(&[("fields", "a")]).unwrap();
        let out = event
            .transform(Event::insert("d", "c", json!({"a": 1})))
            .unwrap();
        assert!(out[0].payload.is_none(), "payload = event by default");
        assert!(plugin(&[("fields", "a"), ("payload", "xml")]).is_err());
    }

    #[test]
    fn bad_configs() {
        for pairs in [
            vec![],
            vec![("fields", "a.b")],
            vec![("fields", "a -> b.c")],
            vec![("fields", "a -> x, b -> x")],
            vec![("fields", "a,,b")],
            vec![("fields", "a"), ("subject", "cdc.*")],
            vec![("fields", "a"), ("variants", "{}")],
            vec![("discriminator", "kind")],
            vec![("discriminator", "kind"), ("variants", "[]")],
            vec![
                ("discriminator", "kind"),
                ("variants", r#"{"a": {"fields": "x", "subj": "y"}}"#),
            ],
            vec![
                ("discriminator", "kind"),
                ("variants", r#"{"a": {"fields": "x"}}"#),
                ("unmatched", "keep"),
            ],
            vec![
                ("discriminator", "kind"),
                ("fields", "a"),
                ("variants", r#"{"a": {"fields": "x"}}"#),
            ],
        ] {
            assert!(plugin(&pairs).is_err(), "{pairs:?}");
        }
    }
}
