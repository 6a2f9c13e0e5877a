//! Documents as the contract carries them (relaxed Extended JSON bytes), read by dotted path.

use std::cell::OnceCell;
use std::fmt;

use serde_json::{Map, Value};

use crate::edit::{self, Edit, Found, Part};
use crate::error::{Error, Result};

/// A BSON document as UTF-8 relaxed Extended JSON, parsed on first use.
///
/// The host hands documents to plugins as relaxed EJSON text; types JSON cannot hold keep their
/// EJSON wrapper (`{"$oid": …}`, `{"$date": …}`, `{"$numberDecimal": …}`). A document handed
/// back with its bytes unchanged is published as the original BSON, so leave documents you do
/// not change alone (keep the `Document`, do not rebuild it) to keep full type fidelity.
///
/// Reads use MongoDB's dotted paths: `author.id` reads field `id` of the object in `author`,
/// and a numeric segment picks an array element (`items.0.sku`).
///
/// ```
/// use serde_json::json;
/// use tidegate_plugin::Document;
///
/// let doc = Document::from_json(json!({"author": {"id": 7, "name": "Ada"}, "tags": ["a", "b"]}));
/// assert_eq!(doc.get_i64("author.id")?, Some(7));
/// assert_eq!(doc.get_str("author.name")?, Some("Ada"));
/// assert_eq!(doc.get_str("tags.1")?, Some("b"));
/// assert_eq!(doc.get("author.missing")?, None);
/// # Ok::<(), tidegate_plugin::Error>(())
/// ```
///
/// Under contract 0.2 (the default) a document the plugin received stays in the host until it
/// is read: [`Document::value`] and [`Document::find`] ask the host for just the values they
/// name, and [`Document::set`], [`Document::unset`] and [`Document::rename`] record edits the
/// host applies to the original BSON. Only the readers that borrow from a parsed copy
/// ([`Document::get`], [`Document::map`], [`Document::as_bytes`], …) fetch the whole document.
pub struct Document {
    /// The host's part this document is (a received, never replaced document); `None` for a
    /// document built by the plugin, and always natively.
    origin: Option<Part>,
    /// The relaxed EJSON text: set for built documents, fetched on first need for received
    /// ones (with `edits` applied).
    bytes: OnceCell<Vec<u8>>,
    parsed: OnceCell<std::result::Result<Map<String, Value>, String>>,
    /// Edits made to a received document, for the host to apply.
    edits: Vec<Edit>,
}

impl Document {
    /// A document from relaxed Extended JSON bytes, as the host sends them. Nothing is parsed
    /// until a read needs it.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_bytes(br#"{"a": 1}"#.to_vec());
    /// assert_eq!(doc.get_i64("a")?, Some(1));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn from_bytes(bytes: Vec<u8>) -> Document {
        Document {
            origin: None,
            bytes: OnceCell::from(bytes),
            parsed: OnceCell::new(),
            edits: Vec::new(),
        }
    }

    /// A received document that stays in the host until read (contract 0.2 guests).
    #[doc(hidden)]
    pub fn in_host(part: Part) -> Document {
        Document {
            origin: Some(part),
            bytes: OnceCell::new(),
            parsed: OnceCell::new(),
            edits: Vec::new(),
        }
    }

    /// The host part this document still is, if it is one (contract 0.2 guests).
    #[doc(hidden)]
    pub fn origin(&self) -> Option<Part> {
        self.origin
    }

    /// The edits made to this document since it was received, in order (what the host will
    /// apply to the original). Empty for documents the plugin built.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let mut doc = Document::from_json(serde_json::json!({"a": 1}));
    /// doc.set("a", 2)?;
    /// assert!(doc.edits().is_empty()); // built by the plugin: nothing for the host to edit
    /// assert_eq!(doc.get_i64("a")?, Some(2));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn edits(&self) -> &[Edit] {
        &self.edits
    }

    /// The text, fetched from the host (edits applied) on first need, or written from the
    /// edited local copy.
    fn text(&self) -> &Vec<u8> {
        self.bytes.get_or_init(|| {
            // Edited since it was parsed: the parsed copy is the current one.
            if let Some(Ok(map)) = self.parsed.get() {
                return serde_json::to_vec(map).unwrap_or_else(|_| b"{}".to_vec());
            }
            let fetched = match self.origin {
                Some(part) => edit::fetch(part),
                None => b"{}".to_vec(),
            };
            if self.edits.is_empty() {
                return fetched;
            }
            let mut value = serde_json::from_slice::<Value>(&fetched).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut value {
                for e in &self.edits {
                    // The host refuses an edit that cannot apply; the local copy skips it.
                    let _ = edit::apply(map, e);
                }
            }
            value.to_string().into_bytes()
        })
    }

    /// Whether this is a received document still only in the host (never fetched nor
    /// edited): reads that return owned values ([`Document::value`], [`Document::find`]) ask
    /// the host for just those values.
    #[doc(hidden)]
    pub fn is_in_host(&self) -> bool {
        !self.is_local() && self.edits.is_empty()
    }

    /// Whether reads are served from a local copy (built, fetched, or native).
    fn is_local(&self) -> bool {
        self.origin.is_none() || self.bytes.get().is_some() || self.parsed.get().is_some()
    }

    /// Records `e`, and applies it to the local copy if there is one. The copy is edited
    /// parsed and written out again only when its bytes are read: a transform making many
    /// edits (the `encode` plugin, one per changed field) pays for one text at most, and
    /// none when nothing reads it back.
    fn edit(&mut self, e: Edit) -> Result<()> {
        if self.is_local() {
            let mut map = match self.parsed.take() {
                Some(Ok(map)) => map,
                _ => self.to_map()?,
            };
            let applied = edit::apply(&mut map, &e);
            self.bytes = OnceCell::new();
            self.parsed = OnceCell::from(Ok(map));
            applied?;
        }
        if self.origin.is_some() {
            self.edits.push(e);
        }
        Ok(())
    }

    /// Sets the value at a dotted path, creating missing objects on the way (like MongoDB's
    /// `$set`). On a received document this is an edit the host applies to the original BSON,
    /// so every other value keeps its exact type and bytes; nothing is fetched.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let mut doc = Document::from_json(serde_json::json!({"a": {"b": 1}, "c": [1, 2]}));
    /// doc.set("a.b", "x")?;
    /// doc.set("d.e", true)?;
    /// doc.set("c.1", 5)?;
    /// assert_eq!(doc.as_bytes(), br#"{"a":{"b":"x"},"c":[1,5],"d":{"e":true}}"#);
    /// assert!(doc.set("c.9", 1).is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn set(&mut self, path: &str, value: impl Into<Value>) -> Result<()> {
        self.set_at(edit::segments(path), value)
    }

    /// [`Document::set`] with the path as segments (for field names containing dots, such as
    /// the keys of an update's `updated_fields`).
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let mut doc = Document::from_json(serde_json::json!({"a.b": 1}));
    /// doc.set_at(vec!["a.b".into()], 2)?;
    /// assert_eq!(doc.as_bytes(), br#"{"a.b":2}"#);
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn set_at(&mut self, path: Vec<String>, value: impl Into<Value>) -> Result<()> {
        self.edit(Edit::Set(path, value.into()))
    }

    /// Removes the field (or, for a numeric last segment, the array element) at a dotted
    /// path. A path that reaches nothing is no error.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let mut doc = Document::from_json(serde_json::json!({"a": 1, "b": [1, 2, 3]}));
    /// doc.unset("a")?;
    /// doc.unset("b.0")?;
    /// doc.unset("nope.x")?;
    /// assert_eq!(doc.as_bytes(), br#"{"b":[2,3]}"#);
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn unset(&mut self, path: &str) -> Result<()> {
        self.unset_at(edit::segments(path))
    }

    /// [`Document::unset`] with the path as segments.
    pub fn unset_at(&mut self, path: Vec<String>) -> Result<()> {
        self.edit(Edit::Unset(path))
    }

    /// Renames the field at a dotted path in place (position and value kept). A path that
    /// reaches nothing is no error; a name the document already has is.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let mut doc = Document::from_json(serde_json::json!({"a": {"b": 1}, "c": 2}));
    /// doc.rename("a.b", "x")?;
    /// assert_eq!(doc.as_bytes(), br#"{"a":{"x":1},"c":2}"#);
    /// assert!(doc.rename("c", "a").is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn rename(&mut self, path: &str, to: &str) -> Result<()> {
        self.rename_at(edit::segments(path), to)
    }

    /// [`Document::rename`] with the path as segments.
    pub fn rename_at(&mut self, path: Vec<String>, to: &str) -> Result<()> {
        self.edit(Edit::Rename(path, to.to_owned()))
    }

    /// The value at a dotted path, owned. On a received document that was not fetched, the
    /// host looks up just this value: the cheap read for a plugin that needs a few fields.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"a": {"b": [10, 20]}}));
    /// assert_eq!(doc.value("a.b.1")?, Some(serde_json::json!(20)));
    /// assert_eq!(doc.value("a.c")?, None);
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn value(&self, path: &str) -> Result<Option<Value>> {
        match self.origin {
            Some(part) if self.is_in_host() => edit::host_get(part, &edit::segments(path)),
            _ => Ok(self.get(path)?.cloned()),
        }
    }

    /// Every value a dotted path reaches under MongoDB's array rule (see
    /// [`Document::get_all`]), each with its exact location: the path with an index in place
    /// of every array passed through, ready for [`Document::set_at`] or
    /// [`Document::unset_at`]. On a received document that was not fetched, the host does
    /// the search.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"a": [{"s": 1}, 2, {"s": 3}]}));
    /// let found = doc.find("a.s")?;
    /// assert_eq!(found[1].path, ["a", "2", "s"]);
    /// assert_eq!(found[1].value, serde_json::json!(3));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn find(&self, path: &str) -> Result<Vec<Found>> {
        let segments = edit::segments(path);
        match self.origin {
            Some(part) if self.is_in_host() => edit::host_find(part, &segments),
            _ => Ok(edit::find(self.map()?, &segments)),
        }
    }

    /// A document from a JSON value (normally an object). Handy in tests and for documents a
    /// plugin builds from scratch.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"a": true}));
    /// assert_eq!(doc.as_bytes(), br#"{"a":true}"#);
    /// ```
    pub fn from_json(value: Value) -> Document {
        Document::from_bytes(value.to_string().into_bytes())
    }

    /// A document from a JSON object.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let mut map = serde_json::Map::new();
    /// map.insert("a".into(), 1.into());
    /// assert_eq!(Document::from_map(map).get_i64("a")?, Some(1));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn from_map(map: Map<String, Value>) -> Document {
        Document::from_json(Value::Object(map))
    }

    /// The document's bytes, exactly as received (or built).
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// assert_eq!(Document::from_bytes(b"{}".to_vec()).as_bytes(), b"{}");
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        self.text()
    }

    /// The document's bytes, consuming it.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// assert_eq!(Document::from_bytes(b"{}".to_vec()).into_bytes(), b"{}".to_vec());
    /// ```
    pub fn into_bytes(self) -> Vec<u8> {
        self.text();
        self.bytes.into_inner().unwrap_or_default()
    }

    /// The parsed top-level object. An error if the bytes are not a JSON object (the host never
    /// sends such a thing; a previous plugin in the chain might).
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// assert_eq!(Document::from_bytes(br#"{"a": 1}"#.to_vec()).map()?.len(), 1);
    /// assert!(Document::from_bytes(b"[1]".to_vec()).map().is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn map(&self) -> Result<&Map<String, Value>> {
        self.parsed
            .get_or_init(|| match serde_json::from_slice::<Value>(self.text()) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err("document is not a JSON object".to_owned()),
                Err(err) => Err(format!("document is not valid JSON: {err}")),
            })
            .as_ref()
            .map_err(Error::invalid_event)
    }

    /// A copy of the parsed object, to modify and turn back into a document with
    /// [`Document::from_map`].
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"a": 1, "secret": 2}));
    /// let mut map = doc.to_map()?;
    /// map.remove("secret");
    /// assert_eq!(Document::from_map(map).as_bytes(), br#"{"a":1}"#);
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn to_map(&self) -> Result<Map<String, Value>> {
        self.map().cloned()
    }

    /// The value at a dotted path, or `None` when any segment is missing.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"a": {"b": [10, 20]}}));
    /// assert_eq!(doc.get("a.b.1")?, Some(&serde_json::json!(20)));
    /// assert_eq!(doc.get("a.c")?, None);
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn get(&self, path: &str) -> Result<Option<&Value>> {
        let map = self.map()?;
        let mut segments = path.split('.');
        let first = segments.next().unwrap_or_default();
        Ok(map.get(first).and_then(|v| get_in(v, segments)))
    }

    /// Every value a dotted path reaches, following MongoDB's array rule: a non-numeric segment
    /// applied to an array applies to each element. `items.sku` on
    /// `{"items": [{"sku": "a"}, {"sku": "b"}]}` reaches `"a"` and `"b"`.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"items": [{"sku": "a"}, {"sku": "b"}]}));
    /// let skus: Vec<_> = doc.get_all("items.sku")?.into_iter().filter_map(|v| v.as_str()).collect();
    /// assert_eq!(skus, ["a", "b"]);
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn get_all(&self, path: &str) -> Result<Vec<&Value>> {
        let map = self.map()?;
        let segments: Vec<&str> = path.split('.').collect();
        let mut out = Vec::new();
        if let Some((first, rest)) = segments.split_first() {
            if let Some(v) = map.get(*first) {
                collect_all(v, rest, &mut out);
            }
        }
        Ok(out)
    }

    /// The string at `path`; `None` if absent, an [`Error::InvalidEvent`] if it is not a string.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"name": "Ada", "n": 1}));
    /// assert_eq!(doc.get_str("name")?, Some("Ada"));
    /// assert!(doc.get_str("n").is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn get_str(&self, path: &str) -> Result<Option<&str>> {
        match self.get(path)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(path, "a string", other)),
        }
    }

    /// The integer at `path` (a JSON integer, or relaxed EJSON's `{"$numberLong": "…"}`);
    /// `None` if absent, an [`Error::InvalidEvent`] for anything else.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"a": 5, "b": {"$numberLong": "9"}, "c": 1.5}));
    /// assert_eq!(doc.get_i64("a")?, Some(5));
    /// assert_eq!(doc.get_i64("b")?, Some(9));
    /// assert!(doc.get_i64("c").is_err());
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn get_i64(&self, path: &str) -> Result<Option<i64>> {
        match self.get(path)? {
            None => Ok(None),
            Some(v) => as_i64(v)
                .map(Some)
                .ok_or_else(|| wrong_type(path, "an integer", v)),
        }
    }

    /// The number at `path` as `f64` (any JSON number, or an EJSON `$numberDouble`,
    /// `$numberLong` or `$numberDecimal` wrapper, rounded); `None` if absent.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"a": 1.5, "d": {"$numberDecimal": "2.25"}}));
    /// assert_eq!(doc.get_f64("a")?, Some(1.5));
    /// assert_eq!(doc.get_f64("d")?, Some(2.25));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn get_f64(&self, path: &str) -> Result<Option<f64>> {
        match self.get(path)? {
            None => Ok(None),
            Some(v) => as_f64(v)
                .map(Some)
                .ok_or_else(|| wrong_type(path, "a number", v)),
        }
    }

    /// The boolean at `path`; `None` if absent.
    ///
    /// ```
    /// # use tidegate_plugin::Document;
    /// let doc = Document::from_json(serde_json::json!({"ok": true}));
    /// assert_eq!(doc.get_bool("ok")?, Some(true));
    /// # Ok::<(), tidegate_plugin::Error>(())
    /// ```
    pub fn get_bool(&self, path: &str) -> Result<Option<bool>> {
        match self.get(path)? {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(path, "a boolean", other)),
        }
    }
}

/// Follows `segments` from `value`: object fields by name, array elements by index.
///
/// ```
/// use serde_json::json;
/// let v = json!({"a": [{"b": 1}]});
/// assert_eq!(tidegate_plugin::document::get_path(&v, "a.0.b"), Some(&json!(1)));
/// ```
pub fn get_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    get_in(value, path.split('.'))
}

fn get_in<'a, 's>(
    mut value: &'a Value,
    segments: impl Iterator<Item = &'s str>,
) -> Option<&'a Value> {
    for segment in segments {
        value = match value {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Every value `segments` reaches from `value` under MongoDB's array rule (see
/// [`Document::get_all`]).
///
/// ```
/// use serde_json::json;
/// let v = json!([{"b": 1}, {"b": 2}, {"c": 3}]);
/// let mut found = Vec::new();
/// tidegate_plugin::document::collect_all(&v, &["b"], &mut found);
/// assert_eq!(found, [&json!(1), &json!(2)]);
/// ```
pub fn collect_all<'a>(value: &'a Value, segments: &[&str], out: &mut Vec<&'a Value>) {
    let Some((first, rest)) = segments.split_first() else {
        out.push(value);
        return;
    };
    match value {
        Value::Object(map) => {
            if let Some(v) = map.get(*first) {
                collect_all(v, rest, out);
            }
        }
        Value::Array(items) => match first.parse::<usize>() {
            Ok(i) => {
                if let Some(v) = items.get(i) {
                    collect_all(v, rest, out);
                }
            }
            Err(_) => {
                for item in items.iter().filter(|i| i.is_object()) {
                    collect_all(item, segments, out);
                }
            }
        },
        _ => {}
    }
}

/// An integer, plain or as `{"$numberLong": "…"}` / `{"$numberInt": "…"}`.
///
/// ```
/// # use tidegate_plugin::document::as_i64;
/// assert_eq!(as_i64(&serde_json::json!({"$numberLong": "-3"})), Some(-3));
/// ```
pub fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::Object(map) if map.len() == 1 => map
            .get("$numberLong")
            .or_else(|| map.get("$numberInt"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok()),
        _ => None,
    }
}

/// A number as `f64`, plain or in an EJSON number wrapper.
///
/// ```
/// # use tidegate_plugin::document::as_f64;
/// assert_eq!(as_f64(&serde_json::json!({"$numberDouble": "Infinity"})), Some(f64::INFINITY));
/// ```
pub fn as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::Object(map) if map.len() == 1 => {
            let (key, v) = map.iter().next()?;
            match key.as_str() {
                "$numberLong" | "$numberInt" | "$numberDouble" | "$numberDecimal" => {
                    v.as_str()?.parse().ok()
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Milliseconds since the epoch of an EJSON `$date` value: an ISO-8601 string (relaxed form)
/// or `{"$numberLong": "…"}` (canonical form, and relaxed outside years 1970–9999).
///
/// ```
/// # use tidegate_plugin::document::date_millis;
/// use serde_json::json;
/// assert_eq!(date_millis(&json!("1970-01-01T00:00:01.5Z")), Some(1500));
/// assert_eq!(date_millis(&json!("1970-01-01T01:00:00+01:00")), Some(0));
/// assert_eq!(date_millis(&json!("2000-03-01T00:00:00.25Z")), Some(951_868_800_250));
/// assert_eq!(date_millis(&json!("2000-03-01")), None);
/// assert_eq!(date_millis(&json!({"$numberLong": "-5"})), Some(-5));
/// ```
pub fn date_millis(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => parse_iso(s),
        Value::Number(n) => n.as_i64(),
        other => as_i64(other),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]` followed by `Z` or `±HH:MM`.
fn parse_iso(s: &str) -> Option<i64> {
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if s.get(4..5)? != "-" || s.get(7..8)? != "-" || s.get(13..14)? != ":" {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" => 0,
        tz if tz.len() == 6 => {
            let sign = match &tz[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            sign * (tz[1..3].parse::<i64>().ok()? * 60 + tz[4..6].parse::<i64>().ok()?)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(((days * 24 + h) * 60 + mi - offset) * 60_000 + sec * 1000 + millis)
}

fn wrong_type(path: &str, expected: &str, got: &Value) -> Error {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    Error::invalid_event(format!("`{path}` is {kind}, expected {expected}"))
}

impl Clone for Document {
    fn clone(&self) -> Document {
        Document {
            origin: self.origin,
            bytes: self.bytes.clone(),
            parsed: self.parsed.clone(),
            edits: self.edits.clone(),
        }
    }
}

impl PartialEq for Document {
    fn eq(&self, other: &Document) -> bool {
        match (self.origin, other.origin) {
            // The same part, untouched on both sides: equal without fetching it.
            (Some(a), Some(b)) if a == b && !self.is_local() && !other.is_local() => {
                self.edits == other.edits
            }
            _ => self.text() == other.text(),
        }
    }
}

impl Eq for Document {}

impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.origin, self.bytes.get()) {
            (_, Some(bytes)) => write!(f, "Document({})", String::from_utf8_lossy(bytes)),
            (Some(part), None) => write!(
                f,
                "Document(<{part:?} in the host, {} edit(s)>)",
                self.edits.len()
            ),
            (None, None) => write!(f, "Document(?)"),
        }
    }
}

impl From<Value> for Document {
    fn from(value: Value) -> Document {
        Document::from_json(value)
    }
}
