//! Extended JSON v2 (<https://www.mongodb.com/docs/manual/reference/mongodb-extended-json/>)
//! written straight from raw BSON, and read back into raw BSON.
//!
//! Written: the published `relaxed-json` / `canonical-json` payloads and the documents handed
//! to plugins. Fields keep the document's own order; every BSON type has the spec's form,
//! including the ones the relaxed mode keeps in canonical form (non-finite doubles, dates
//! before 1970 or after 9999). The bytes are read once, element by element, with no
//! intermediate tree and no serde deserialisation, so a sub-document whose keys merely look
//! like a type wrapper (`{"$oid": "not-an-oid"}`, legal field names since MongoDB 5.0) is
//! written as the document it is. Extended JSON has no escape for such keys, so a reader
//! cannot tell that document from a type wrapper (the spec's own limitation): the `bson`
//! encoding is the exact one.
//!
//! Read: documents a plugin hands back. The JSON keeps its field order, and a value equal to
//! what the original document had at the same path keeps the original BSON (an Int64 that
//! fits in 32 bits, a `{"$oid": …}` sub-document); a new integer keeps the numeric type of the
//! value it replaces. Anything else follows the spec's parser rules: an object whose keys are
//! exactly a type wrapper's is that type (with values of the wrong type an error); other
//! objects, `$`-prefixed keys included, are documents.

use bson::raw::{CStr, RawBson, RawBsonRef, RawDocument, RawDocumentBuf, RawElement};
use bson::RawArrayBuf;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Which Extended JSON format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Numbers and in-range dates as plain JSON; everything else as type wrappers.
    Relaxed,
    /// Every non-JSON-native type, numbers included, as a type wrapper.
    Canonical,
}

/// A document as relaxed Extended JSON bytes (the plugin boundary's form).
pub fn relaxed(doc: &RawDocument) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(doc.as_bytes().len() + 64);
    write_document(doc, Mode::Relaxed, &mut out)?;
    Ok(out)
}

/// Writes `doc` as one JSON object, fields in the document's order. Fails only on malformed
/// BSON (strings that are not UTF-8 are written with U+FFFD replacements).
pub fn write_document(doc: &RawDocument, mode: Mode, out: &mut Vec<u8>) -> Result<(), String> {
    out.push(b'{');
    for (i, element) in doc.iter_elements().enumerate() {
        let element = element.map_err(|e| format!("malformed BSON: {e}"))?;
        if i > 0 {
            out.push(b',');
        }
        write_str(element.key().as_str(), out);
        out.push(b':');
        write_element(&element, mode, out)?;
    }
    out.push(b'}');
    Ok(())
}

/// Writes one element's value; strings that are not UTF-8 get U+FFFD replacements.
fn write_element(element: &RawElement<'_>, mode: Mode, out: &mut Vec<u8>) -> Result<(), String> {
    match element.value() {
        Ok(value) => write_value(value, mode, out),
        Err(_) => {
            let lossy = element
                .value_utf8_lossy()
                .map_err(|e| format!("malformed BSON: {e}"))?;
            write_value(lossy.as_raw_bson_ref(), mode, out)
        }
    }
}

/// Serialises a value that cannot fail to serialise (strings, numbers, small JSON trees)
/// into a `Vec`, whose writes cannot fail either.
fn write_serde<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let _infallible = serde_json::to_writer(&mut *out, value);
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    write_serde(s, out);
}

/// `{"<wrapper>":"<text>"}`.
fn write_wrapped_str(wrapper: &str, text: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(wrapper.as_bytes());
    out.extend_from_slice(b"\":");
    write_str(text, out);
    out.push(b'}');
}

/// The decimal text of a finite double, shortest form that reads back to the same bits
/// (`1.0`, `-0.0`, `1e300`: always with a fraction or an exponent, as the spec's
/// *non-integer*).
fn finite_double_text(f: f64, out: &mut Vec<u8>) {
    write_serde(&f, out);
}

/// Writes one value in `mode` (a document key's `_id` in a header, a top-level field alone).
pub fn write_value(value: RawBsonRef<'_>, mode: Mode, out: &mut Vec<u8>) -> Result<(), String> {
    let canonical = mode == Mode::Canonical;
    match value {
        RawBsonRef::String(s) => write_str(s, out),
        RawBsonRef::Document(doc) => write_document(doc, mode, out)?,
        RawBsonRef::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter_elements().enumerate() {
                let item = item.map_err(|e| format!("malformed BSON: {e}"))?;
                if i > 0 {
                    out.push(b',');
                }
                write_element(&item, mode, out)?;
            }
            out.push(b']');
        }
        RawBsonRef::Int32(n) if canonical => write_wrapped_str("$numberInt", &n.to_string(), out),
        RawBsonRef::Int32(n) => write_serde(&n, out),
        RawBsonRef::Int64(n) if canonical => write_wrapped_str("$numberLong", &n.to_string(), out),
        RawBsonRef::Int64(n) => write_serde(&n, out),
        RawBsonRef::Double(f) if f.is_nan() => write_wrapped_str("$numberDouble", "NaN", out),
        RawBsonRef::Double(f) if f.is_infinite() => {
            let text = if f > 0.0 { "Infinity" } else { "-Infinity" };
            write_wrapped_str("$numberDouble", text, out)
        }
        RawBsonRef::Double(f) if canonical => {
            out.extend_from_slice(b"{\"$numberDouble\":\"");
            finite_double_text(f, out);
            out.extend_from_slice(b"\"}");
        }
        RawBsonRef::Double(f) => finite_double_text(f, out),
        RawBsonRef::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        RawBsonRef::Null => out.extend_from_slice(b"null"),
        RawBsonRef::ObjectId(oid) => write_wrapped_str("$oid", &oid.to_hex(), out),
        RawBsonRef::DateTime(date) => write_date(date.timestamp_millis(), mode, out),
        RawBsonRef::Timestamp(ts) => {
            out.extend_from_slice(b"{\"$timestamp\":{\"t\":");
            write_serde(&ts.time, out);
            out.extend_from_slice(b",\"i\":");
            write_serde(&ts.increment, out);
            out.extend_from_slice(b"}}");
        }
        RawBsonRef::Decimal128(d) => write_wrapped_str("$numberDecimal", &d.to_string(), out),
        RawBsonRef::Symbol(s) => write_wrapped_str("$symbol", s, out),
        RawBsonRef::JavaScriptCode(code) => write_wrapped_str("$code", code, out),
        RawBsonRef::JavaScriptCodeWithScope(cws) => {
            out.extend_from_slice(b"{\"$code\":");
            write_str(cws.code, out);
            out.extend_from_slice(b",\"$scope\":");
            write_document(cws.scope, mode, out)?;
            out.push(b'}');
        }
        RawBsonRef::RegularExpression(regex) => {
            // BSON regex options are stored sorted; the spec requires them sorted.
            let mut options: Vec<char> = regex.options.as_str().chars().collect();
            options.sort_unstable();
            let options: String = options.into_iter().collect();
            out.extend_from_slice(b"{\"$regularExpression\":{\"pattern\":");
            write_str(regex.pattern.as_str(), out);
            out.extend_from_slice(b",\"options\":");
            write_str(&options, out);
            out.extend_from_slice(b"}}");
        }
        RawBsonRef::Undefined => out.extend_from_slice(b"{\"$undefined\":true}"),
        RawBsonRef::MinKey => out.extend_from_slice(b"{\"$minKey\":1}"),
        RawBsonRef::MaxKey => out.extend_from_slice(b"{\"$maxKey\":1}"),
        // Binary (base64) and DBPointer: the bson crate's forms, which are the spec's.
        RawBsonRef::Binary(_) | RawBsonRef::DbPointer(_) => {
            let owned = bson::Bson::try_from(value).map_err(|e| format!("malformed BSON: {e}"))?;
            write_serde(&owned.into_relaxed_extjson(), out);
        }
    }
    Ok(())
}

/// Milliseconds of 9999-12-31T23:59:59.999Z, the last instant the relaxed ISO form covers.
const LAST_ISO_MILLIS: i64 = 253_402_300_799_999;

/// A datetime: canonical `{"$date":{"$numberLong":"<ms>"}}`; relaxed, for years 1970 to
/// 9999, `{"$date":"<RFC 3339>"}` with milliseconds only when not zero (the spec's form),
/// else the canonical form.
fn write_date(millis: i64, mode: Mode, out: &mut Vec<u8>) {
    if mode == Mode::Relaxed && (0..=LAST_ISO_MILLIS).contains(&millis) {
        out.extend_from_slice(b"{\"$date\":\"");
        out.extend_from_slice(iso_date(millis).as_bytes());
        out.extend_from_slice(b"\"}");
    } else {
        out.extend_from_slice(b"{\"$date\":{\"$numberLong\":\"");
        out.extend_from_slice(millis.to_string().as_bytes());
        out.extend_from_slice(b"\"}}");
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.mmm]Z` for `0 <= millis <= LAST_ISO_MILLIS`.
fn iso_date(millis: i64) -> String {
    let days = millis.div_euclid(86_400_000);
    let in_day = millis.rem_euclid(86_400_000);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
    let (second, ms) = (in_day / 1000 % 60, in_day % 1000);
    let mut text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
    if ms != 0 {
        text.push_str(&format!(".{ms:03}"));
    }
    text.push('Z');
    text
}

// ---------------------------------------------------------------------------------------------
// Reading

/// JSON as parsed, objects in their own order (serde_json's map would sort them).
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
        Ok(Json::Int(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
        Ok(match i64::try_from(n) {
            Ok(n) => Json::Int(n),
            Err(_) => Json::UInt(n),
        })
    }
    fn visit_f64<E>(self, f: f64) -> Result<Json, E> {
        Ok(Json::Float(f))
    }
    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::Str(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(entry) = map.next_entry::<String, Json>()? {
            entries.push(entry);
        }
        Ok(Json::Object(entries))
    }
}

/// Where a value sits, for error messages (built only when one is needed).
#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    key: &'a str,
}

impl Path<'_> {
    fn render(&self) -> String {
        match self.parent {
            Some(parent) => format!("{}.{}", parent.render(), self.key),
            None => self.key.to_string(),
        }
    }
}

/// Parses Extended JSON (relaxed or canonical) bytes that must hold an object into a BSON
/// document. `field` names it in errors; `original` is the document it replaces, whose
/// values are kept wherever the JSON still says the same (see the module docs).
pub fn parse_document(
    field: &str,
    bytes: &[u8],
    original: Option<&RawDocument>,
) -> Result<RawDocumentBuf, String> {
    let json: Json = serde_json::from_slice(bytes)
        .map_err(|err| format!("field '{field}' is not valid JSON: {err}"))?;
    let path = Path {
        parent: None,
        key: field,
    };
    match json {
        Json::Object(entries) => to_document(&entries, original, &path),
        other => Err(format!(
            "field '{field}' must be a JSON object, got {}",
            kind(&other)
        )),
    }
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Int(_) | Json::UInt(_) | Json::Float(_) => "a number",
        Json::Str(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn to_document(
    entries: &[(String, Json)],
    original: Option<&RawDocument>,
    path: &Path<'_>,
) -> Result<RawDocumentBuf, String> {
    let mut out = RawDocumentBuf::new();
    for (key, value) in entries {
        let here = Path {
            parent: Some(path),
            key,
        };
        let name: &CStr = key
            .as_str()
            .try_into()
            .map_err(|_| format!("field '{}': key contains a NUL byte", here.render()))?;
        let before = original.and_then(|o| o.get(key).ok().flatten());
        match to_bson(value, before, &here)? {
            Converted::Kept(kept) => out.append(name, kept),
            Converted::New(new) => out.append(name, new),
        }
    }
    Ok(out)
}

/// A value read back: the original's (untouched bytes) or a new one.
enum Converted<'a> {
    Kept(RawBsonRef<'a>),
    New(RawBson),
}

fn to_bson<'a>(
    value: &Json,
    before: Option<RawBsonRef<'a>>,
    path: &Path<'_>,
) -> Result<Converted<'a>, String> {
    // Containers are compared element by element on the way down (unchanged elements keep
    // their bytes); a leaf is kept whole when the JSON is still what it was written as.
    match (value, before) {
        (Json::Object(entries), Some(RawBsonRef::Document(doc))) if same_keys(entries, doc) => {
            return to_document(entries, Some(doc), path).map(|d| Converted::New(d.into()));
        }
        (Json::Array(items), Some(RawBsonRef::Array(array))) => {
            let mut out = RawArrayBuf::new();
            let mut olds = array.into_iter();
            for (i, item) in items.iter().enumerate() {
                let index = i.to_string();
                let here = Path {
                    parent: Some(path),
                    key: &index,
                };
                let old = olds.next().and_then(Result::ok);
                match to_bson(item, old, &here)? {
                    Converted::Kept(kept) => out.push(kept),
                    Converted::New(new) => out.push(new),
                }
            }
            return Ok(Converted::New(out.into()));
        }
        (_, Some(old)) if renders_as(old, value) => return Ok(Converted::Kept(old)),
        _ => {}
    }
    Ok(Converted::New(match value {
        Json::Null => RawBson::Null,
        Json::Bool(b) => RawBson::Boolean(*b),
        Json::Str(s) => RawBson::String(s.clone()),
        Json::Int(_) | Json::UInt(_) | Json::Float(_) => number(value, before),
        Json::Array(items) => {
            let mut out = RawArrayBuf::new();
            for (i, item) in items.iter().enumerate() {
                let index = i.to_string();
                let here = Path {
                    parent: Some(path),
                    key: &index,
                };
                match to_bson(item, None, &here)? {
                    Converted::Kept(kept) => out.push(kept),
                    Converted::New(new) => out.push(new),
                }
            }
            out.into()
        }
        Json::Object(entries) => match wrapper(entries, path)? {
            Some(typed) => typed,
            None => to_document(entries, None, path)?.into(),
        },
    }))
}

/// Whether a JSON object has exactly the keys of a document (in any order: some JSON
/// libraries sort them): then it is that document edited, never a type wrapper.
fn same_keys(entries: &[(String, Json)], doc: &RawDocument) -> bool {
    let mut keys = std::collections::HashSet::with_capacity(entries.len());
    for element in doc.iter_elements() {
        match element {
            Ok(element) => keys.insert(element.key().as_str()),
            Err(_) => return false,
        };
    }
    keys.len() == entries.len() && entries.iter().all(|(k, _)| keys.contains(k.as_str()))
}

/// Whether `value` is exactly what the relaxed writer writes for `old`.
fn renders_as(old: RawBsonRef<'_>, value: &Json) -> bool {
    match (old, value) {
        (RawBsonRef::Null, Json::Null) => true,
        (RawBsonRef::Boolean(a), Json::Bool(b)) => a == *b,
        (RawBsonRef::String(a), Json::Str(b)) => a == b,
        (RawBsonRef::Int32(a), Json::Int(b)) => i64::from(a) == *b,
        (RawBsonRef::Int64(a), Json::Int(b)) => a == *b,
        (RawBsonRef::Double(a), Json::Float(b)) if a.is_finite() => a.to_bits() == b.to_bits(),
        (RawBsonRef::Document(_) | RawBsonRef::Array(_), _) => false,
        (
            RawBsonRef::Null
            | RawBsonRef::Boolean(_)
            | RawBsonRef::String(_)
            | RawBsonRef::Int32(_)
            | RawBsonRef::Int64(_),
            _,
        ) => false,
        // Type wrappers (and non-finite doubles): compare with what was written.
        (old, Json::Object(_)) => {
            let mut written = Vec::new();
            write_value(old, Mode::Relaxed, &mut written).is_ok()
                && serde_json::from_slice::<Json>(&written).is_ok_and(|w| w == *value)
        }
        _ => false,
    }
}

/// A JSON number as BSON: an integer keeps the numeric type of the value it replaces where it
/// can; otherwise the spec's rule (the smallest integer type that holds it, else a double).
fn number(value: &Json, before: Option<RawBsonRef<'_>>) -> RawBson {
    let integer = match value {
        Json::Int(n) => Some(*n),
        _ => None,
    };
    match (value, integer, before) {
        (_, Some(n), Some(RawBsonRef::Int64(_))) => RawBson::Int64(n),
        (_, Some(n), Some(RawBsonRef::Double(_))) => RawBson::Double(n as f64),
        (_, Some(n), _) => match i32::try_from(n) {
            Ok(small) => RawBson::Int32(small),
            Err(_) => RawBson::Int64(n),
        },
        (Json::UInt(n), _, _) => RawBson::Double(*n as f64),
        (Json::Float(f), _, _) => RawBson::Double(*f),
        _ => RawBson::Null,
    }
}

/// The type a wrapper object stands for: `Ok(None)` when the keys are not exactly a wrapper's
/// (then it is a document); an error when they are but the values do not fit.
fn wrapper(entries: &[(String, Json)], path: &Path<'_>) -> Result<Option<RawBson>, String> {
    if !entries.iter().any(|(k, _)| k.starts_with('$')) {
        return Ok(None);
    }
    let mut keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let bad = |what: &str| {
        format!(
            "field '{}': invalid Extended JSON {what} (MongoDB's Extended JSON has no escape \
             for documents shaped like type wrappers)",
            path.render()
        )
    };
    let text = |key: &str| match get(key) {
        Some(Json::Str(s)) => Ok(s.as_str()),
        _ => Err(bad(key)),
    };
    let typed = match keys.as_slice() {
        ["$oid"] => bson::oid::ObjectId::parse_str(text("$oid")?)
            .map(RawBson::ObjectId)
            .map_err(|_| bad("$oid"))?,
        ["$symbol"] => RawBson::Symbol(text("$symbol")?.to_string()),
        ["$numberInt"] => {
            RawBson::Int32(text("$numberInt")?.parse().map_err(|_| bad("$numberInt"))?)
        }
        ["$numberLong"] => RawBson::Int64(
            text("$numberLong")?
                .parse()
                .map_err(|_| bad("$numberLong"))?,
        ),
        ["$numberDouble"] => RawBson::Double(match text("$numberDouble")? {
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            other => other.parse().map_err(|_| bad("$numberDouble"))?,
        }),
        ["$numberDecimal"] => RawBson::Decimal128(
            text("$numberDecimal")?
                .parse()
                .map_err(|_| bad("$numberDecimal"))?,
        ),
        ["$code"] => RawBson::JavaScriptCode(text("$code")?.to_string()),
        ["$code", "$scope"] => match get("$scope") {
            Some(Json::Object(scope)) => {
                RawBson::JavaScriptCodeWithScope(bson::raw::RawJavaScriptCodeWithScope {
                    code: text("$code")?.to_string(),
                    scope: to_document(scope, None, path)?,
                })
            }
            _ => return Err(bad("$scope")),
        },
        ["$timestamp"] => match get("$timestamp") {
            Some(Json::Object(ts)) => {
                let part = |name: &str| match ts.iter().find(|(k, _)| k == name) {
                    Some((_, Json::Int(n))) => u32::try_from(*n).ok(),
                    _ => None,
                };
                match (ts.len(), part("t"), part("i")) {
                    (2, Some(time), Some(increment)) => {
                        RawBson::Timestamp(bson::Timestamp { time, increment })
                    }
                    _ => return Err(bad("$timestamp")),
                }
            }
            _ => return Err(bad("$timestamp")),
        },
        ["$regularExpression"] => match get("$regularExpression") {
            Some(Json::Object(re)) if re.len() == 2 => {
                let part = |name: &str| match re.iter().find(|(k, _)| k == name) {
                    Some((_, Json::Str(s))) => Some(s.as_str()),
                    _ => None,
                };
                match (part("pattern"), part("options")) {
                    (Some(pattern), Some(options)) => {
                        regex(pattern, options).ok_or_else(|| bad("$regularExpression"))?
                    }
                    _ => return Err(bad("$regularExpression")),
                }
            }
            _ => return Err(bad("$regularExpression")),
        },
        // Legacy form; a `$regex` query operator (an object value) stays a document.
        ["$options", "$regex"] => match (get("$regex"), get("$options")) {
            (Some(Json::Str(pattern)), Some(Json::Str(options))) => {
                regex(pattern, options).ok_or_else(|| bad("$regex"))?
            }
            _ => return Ok(None),
        },
        ["$date"] => match get("$date") {
            Some(Json::Str(iso)) => {
                RawBson::DateTime(bson::DateTime::parse_rfc3339_str(iso).map_err(|_| bad("$date"))?)
            }
            Some(Json::Int(ms)) => RawBson::DateTime(bson::DateTime::from_millis(*ms)),
            Some(Json::Object(long)) => match long.as_slice() {
                [(key, Json::Str(ms))] if key == "$numberLong" => RawBson::DateTime(
                    bson::DateTime::from_millis(ms.parse().map_err(|_| bad("$date"))?),
                ),
                _ => return Err(bad("$date")),
            },
            _ => return Err(bad("$date")),
        },
        ["$minKey"] if get("$minKey") == Some(&Json::Int(1)) => RawBson::MinKey,
        ["$maxKey"] if get("$maxKey") == Some(&Json::Int(1)) => RawBson::MaxKey,
        ["$undefined"] if get("$undefined") == Some(&Json::Bool(true)) => RawBson::Undefined,
        ["$minKey"] | ["$maxKey"] | ["$undefined"] => return Err(bad(keys[0])),
        // Binary, UUID and DBPointer: the bson crate's parser, which follows the spec.
        ["$binary"] | ["$binary", "$type"] | ["$uuid"] | ["$dbPointer"] => {
            let value = to_serde(&Json::Object(entries.to_vec()));
            match bson::Bson::try_from(value) {
                Ok(bson::Bson::Document(_)) | Err(_) => return Err(bad(keys[0])),
                Ok(typed) => RawBson::try_from(typed).map_err(|_| bad(keys[0]))?,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(typed))
}

fn regex(pattern: &str, options: &str) -> Option<RawBson> {
    let mut sorted: Vec<char> = options.chars().collect();
    sorted.sort_unstable();
    Some(RawBson::RegularExpression(bson::Regex {
        pattern: pattern.to_string().try_into().ok()?,
        options: sorted.into_iter().collect::<String>().try_into().ok()?,
    }))
}

fn to_serde(json: &Json) -> serde_json::Value {
    use serde_json::Value;
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Int(n) => Value::from(*n),
        Json::UInt(n) => Value::from(*n),
        Json::Float(f) => Value::from(*f),
        Json::Str(s) => Value::String(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(to_serde).collect()),
        Json::Object(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), to_serde(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    /// RFC 3339 as the spec writes it: milliseconds only when not zero.
    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_date(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(iso_date(LAST_ISO_MILLIS), "9999-12-31T23:59:59.999Z");
        for millis in [
            0,
            86_399_999,
            951_782_400_001,
            1_700_000_000_123,
            LAST_ISO_MILLIS,
        ] {
            let back = bson::DateTime::parse_rfc3339_str(iso_date(millis)).unwrap();
            assert_eq!(back.timestamp_millis(), millis);
        }
    }

    /// What the writer writes, the reader reads back to the same bytes, with no original
    /// to lean on (every wrapper form, canonical numbers included).
    #[test]
    fn canonical_round_trips_every_type() {
        let doc = rawdoc! {
            "i32": 1, "i64": 2_i64, "f": 1.5, "whole": 2.0, "nan": f64::NAN, "ninf": f64::NEG_INFINITY,
            "s": "x", "oid": bson::oid::ObjectId::new(), "t": true, "null": bson::RawBson::Null,
            "date": bson::DateTime::from_millis(1_700_000_000_123),
            "far": bson::DateTime::from_millis(253_402_300_800_000), "old": bson::DateTime::from_millis(-1),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Uuid, bytes: vec![9; 16] },
            "dec": "-1.5E+3".parse::<bson::Decimal128>().unwrap(),
            "re": bson::Regex { pattern: "^a".try_into().unwrap(), options: "im".try_into().unwrap() },
            "ts": bson::Timestamp { time: 5, increment: 6 },
            "code": bson::RawBson::JavaScriptCode("f()".into()),
            "sym": bson::RawBson::Symbol("s".into()),
            "min": bson::RawBson::MinKey, "max": bson::RawBson::MaxKey, "undef": bson::RawBson::Undefined,
            "nested": { "arr": [1, { "a": 2_i64 }] },
        };
        for mode in [Mode::Canonical, Mode::Relaxed] {
            let mut text = Vec::new();
            write_document(&doc, mode, &mut text).unwrap();
            let back = parse_document("doc", &text, None).unwrap();
            if mode == Mode::Canonical {
                // NaN's bits are not kept by JSON; compare everything else by bytes.
                let strip = |d: &RawDocument| {
                    let mut copy = RawDocumentBuf::new();
                    for e in d.iter() {
                        let (k, v) = e.unwrap();
                        if k.as_str() != "nan" {
                            copy.append(k, v);
                        }
                    }
                    copy
                };
                assert_eq!(strip(&back).as_bytes(), strip(&doc).as_bytes(), "{mode:?}");
            }
            assert!(back.get_f64("nan").unwrap().is_nan());
            assert_eq!(
                back.get_datetime("far").unwrap(),
                doc.get_datetime("far").unwrap()
            );
        }
    }

    /// Objects that are not exactly a wrapper's keys are documents; exactly a wrapper's keys
    /// with a wrong value are an error naming the path.
    #[test]
    fn wrapper_rules() {
        let doc = parse_document(
            "d",
            br#"{"a":{"$oid":"x","n":1},"b":{"$regex":{"$ne":1}},"c":{"$type":2},"d":{"$numberLong":"7"}}"#,
            None,
        )
        .unwrap();
        assert!(doc.get_document("a").is_ok());
        assert!(doc.get_document("b").is_ok());
        assert!(doc.get_document("c").is_ok());
        assert_eq!(doc.get_i64("d").unwrap(), 7);
        let err = parse_document("d", br#"{"x":[{"$date":true}]}"#, None).unwrap_err();
        assert!(err.contains("'d.x.0'"), "{err}");
    }
}
