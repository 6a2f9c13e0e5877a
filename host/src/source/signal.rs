//! Signal documents in a pipeline's `signal_collection`, read the way Debezium's MongoDB
//! source signal channel documents them, into what the source should do — or the reason a
//! document cannot be acted on (logged at WARN and counted by the source, never dropped in
//! silence).
//!
//! Accepted forms (Debezium, "Sending signals to a Debezium connector"):
//! - `type`: `execute-snapshot`, `stop-snapshot`, `pause-snapshot`, `resume-snapshot`, `log`,
//!   in any letter case;
//! - `data`: a sub-document, or the same as a JSON string (as Debezium's examples write it);
//! - `data.type`: `incremental` (default) or `blocking`, in any letter case;
//! - `data.data-collections`: names (`db.coll`, or `"db"."coll"` quoted when a part holds a
//!   dot) or regular expressions matched against the whole `db.coll` of every namespace in
//!   the pipeline's scope;
//! - `data.additional-conditions`: `[{"data-collection": "db.coll", "filter": <query>}]`, the
//!   query a JSON string (`{"color": "blue"}`, or the shell's relaxed `{color: 'blue'}`, as
//!   Debezium's `Document.parse` reads it) or a sub-document, applied to that collection's
//!   snapshot reads.

use bson::{Bson, Document};

/// How a requested snapshot runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Chunk by chunk between watermarks while streaming goes on.
    Incremental,
    /// Streaming pauses while the collections are read, then resumes where it paused.
    Blocking,
}

/// An `execute-snapshot` request.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRequest {
    /// How it runs.
    pub kind: SnapshotKind,
    /// Anchored regular expressions, one per `data-collections` entry (names are escaped).
    pub patterns: Vec<String>,
    /// The entries as written, for log lines.
    pub requested: Vec<String>,
    /// `additional-conditions`: `(db.coll, filter)`.
    pub conditions: Vec<(String, Document)>,
}

/// What a signal-collection document means to the source.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// Start a snapshot.
    Execute(SnapshotRequest),
    /// Stop the running incremental snapshot: all of it (no patterns), or only the
    /// collections these anchored expressions match.
    Stop {
        /// The snapshot kind named (`blocking` cannot be stopped: it holds the stream).
        kind: SnapshotKind,
        /// Anchored regular expressions; empty: everything.
        patterns: Vec<String>,
    },
    /// Pause the running incremental snapshot after its current chunk.
    Pause,
    /// Resume a paused incremental snapshot.
    Resume,
    /// Write this message to the log.
    Log(String),
    /// One of tidegate's own watermarks (this unit's or another's).
    Watermark {
        /// `open` or `close`.
        open: bool,
        /// The watermark's window id.
        window: String,
        /// The unit that wrote it.
        unit: String,
    },
    /// Not a signal tidegate can act on; the reason says why and what would work.
    Invalid(String),
}

/// The signal types, for messages.
const SUPPORTED: &str = "execute-snapshot, stop-snapshot, pause-snapshot, resume-snapshot, log";

impl Signal {
    /// Reads a signal document (the inserted document of a signal-collection event).
    pub fn parse(document: &Document) -> Signal {
        parse(document).unwrap_or_else(Signal::Invalid)
    }
}

fn parse(document: &Document) -> Result<Signal, String> {
    let kind = match document.get("type") {
        Some(Bson::String(kind)) => kind.trim().to_ascii_lowercase(),
        Some(_) => return Err("`type` must be a string".into()),
        None => return Err(format!("no `type` field (one of {SUPPORTED})")),
    };
    match kind.as_str() {
        // tidegate's own, written in exactly this form.
        "snapshot-window-open" | "snapshot-window-close" => Ok(Signal::Watermark {
            open: kind == "snapshot-window-open",
            window: document.get_str("window").unwrap_or_default().to_string(),
            unit: document.get_str("unit").unwrap_or_default().to_string(),
        }),
        "execute-snapshot" => execute(&data(document)?.unwrap_or_default()),
        "stop-snapshot" => {
            let data = data(document)?.unwrap_or_default();
            let (patterns, _) = collections(&data, false)?;
            Ok(Signal::Stop {
                kind: snapshot_kind(&data)?,
                patterns,
            })
        }
        "pause-snapshot" => Ok(Signal::Pause),
        "resume-snapshot" => Ok(Signal::Resume),
        "log" => {
            let data = data(document)?.unwrap_or_default();
            match data.get("message") {
                Some(Bson::String(message)) => Ok(Signal::Log(message.clone())),
                _ => Err("a `log` signal needs `data.message` (a string)".into()),
            }
        }
        other => Err(format!(
            "unknown signal type '{other}' (supported: {SUPPORTED})"
        )),
    }
}

fn execute(data: &Document) -> Result<Signal, String> {
    let kind = snapshot_kind(data)?;
    let (patterns, requested) = collections(data, true)?;
    if data.contains_key("additional-condition") {
        return Err(
            "`additional-condition` (a single SQL condition, removed in Debezium 2.5) is not \
             supported; use `additional-conditions`: [{\"data-collection\": \"db.coll\", \
             \"filter\": \"{\\\"field\\\": \\\"value\\\"}\"}]"
                .into(),
        );
    }
    let conditions = match data.get("additional-conditions") {
        None | Some(Bson::Null) => Vec::new(),
        Some(Bson::Array(all)) => all.iter().map(condition).collect::<Result<_, _>>()?,
        Some(_) => return Err("`additional-conditions` must be an array".into()),
    };
    Ok(Signal::Execute(SnapshotRequest {
        kind,
        patterns,
        requested,
        conditions,
    }))
}

/// `data`: a sub-document, or a JSON string holding one.
fn data(document: &Document) -> Result<Option<Document>, String> {
    match document.get("data") {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(data)) => Ok(Some(data.clone())),
        Some(Bson::String(text)) if text.trim().is_empty() => Ok(None),
        Some(Bson::String(text)) => json_document(text)
            .map(Some)
            .map_err(|e| format!("`data` is not a JSON object: {e}")),
        Some(other) => Err(format!(
            "`data` must be a sub-document or a JSON string, not {:?}",
            other.element_type()
        )),
    }
}

/// `data.type`, case-insensitive; `incremental` when absent.
fn snapshot_kind(data: &Document) -> Result<SnapshotKind, String> {
    match data.get("type") {
        None | Some(Bson::Null) => Ok(SnapshotKind::Incremental),
        Some(Bson::String(kind)) => match kind.trim().to_ascii_lowercase().as_str() {
            "incremental" => Ok(SnapshotKind::Incremental),
            "blocking" => Ok(SnapshotKind::Blocking),
            other => Err(format!(
                "unknown snapshot type '{other}' in `data.type` (incremental or blocking)"
            )),
        },
        Some(_) => Err("`data.type` must be a string".into()),
    }
}

/// `data.data-collections` as anchored regular expressions, and as written. `required`:
/// absent or empty is an error (nothing to snapshot).
fn collections(data: &Document, required: bool) -> Result<(Vec<String>, Vec<String>), String> {
    let written: Vec<String> = match data.get("data-collections") {
        None | Some(Bson::Null) => Vec::new(),
        Some(Bson::Array(all)) => all
            .iter()
            .map(|c| match c {
                Bson::String(name) => Ok(name.trim().to_string()),
                _ => Err("`data-collections` must hold strings".to_string()),
            })
            .collect::<Result<_, _>>()?,
        // Debezium's property form: one comma-separated string.
        Some(Bson::String(list)) => list
            .split(',')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect(),
        Some(_) => return Err("`data-collections` must be an array of strings".into()),
    };
    if required && written.is_empty() {
        return Err(
            "`data.data-collections` is missing or empty: nothing to snapshot (list names \
             such as \"db.coll\" or regular expressions)"
                .into(),
        );
    }
    Ok((
        written.iter().map(String::as_str).map(pattern).collect(),
        written,
    ))
}

/// An anchored regular expression for one `data-collections` entry: `"db"."coll"` is a
/// literal name (Debezium's quoting for names holding dots); anything else a regex matched
/// against the whole `db.coll`, as Debezium matches it.
pub fn pattern(entry: &str) -> String {
    match quoted_name(entry) {
        Some(literal) => format!("^{}$", escape_regex(&literal)),
        None => format!("^(?:{entry})$"),
    }
}

/// `"db"."coll"` → `db.coll`.
fn quoted_name(entry: &str) -> Option<String> {
    let inner = entry.strip_prefix('"')?.strip_suffix('"')?;
    let (db, coll) = inner.split_once("\".\"")?;
    (!db.contains('"') && !coll.contains('"')).then(|| format!("{db}.{coll}"))
}

fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One `additional-conditions` entry.
fn condition(entry: &Bson) -> Result<(String, Document), String> {
    let Bson::Document(entry) = entry else {
        return Err("`additional-conditions` entries must be objects".into());
    };
    // Debezium's MongoDB page writes the key once as `data-collections`.
    let collection = ["data-collection", "data-collections"]
        .iter()
        .find_map(|key| entry.get_str(key).ok())
        .map(|name| quoted_name(name.trim()).unwrap_or_else(|| name.trim().to_string()))
        .ok_or("an `additional-conditions` entry needs `data-collection` (\"db.coll\")")?;
    let filter = match entry.get("filter") {
        Some(Bson::Document(filter)) => filter.clone(),
        Some(Bson::String(text)) => json_document(text).map_err(|e| {
            format!(
                "the filter for {collection} ({text}) is not a MongoDB query document: {e}; \
                 write it as JSON, e.g. {{\"color\": \"blue\"}}"
            )
        })?,
        _ => {
            return Err(format!(
                "the `additional-conditions` entry for {collection} needs `filter`"
            ))
        }
    };
    Ok((collection, filter))
}

/// A JSON object (Extended JSON allowed) as a document; the shell's relaxed syntax (bare
/// keys, single quotes) is accepted too, as Debezium's `Document.parse` accepts it.
pub fn json_document(text: &str) -> Result<Document, String> {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(strict) => serde_json::from_str(&relaxed_to_json(text))
            .map_err(|_| format!("not JSON: {strict}"))?,
    };
    match Bson::try_from(value) {
        Ok(Bson::Document(document)) => Ok(document),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not Extended JSON: {e}")),
    }
}

/// Rewrites the shell's relaxed object syntax into JSON: single-quoted strings become
/// double-quoted, bare keys are quoted. Strict JSON passes through unchanged.
fn relaxed_to_json(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            // A string: copied with double quotes, escapes kept.
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != c {
                match chars[i] {
                    '\\' if i + 1 < chars.len() => {
                        if chars[i + 1] == '\'' {
                            out.push('\'');
                        } else {
                            out.push('\\');
                            out.push(chars[i + 1]);
                        }
                        i += 2;
                        continue;
                    }
                    '"' => out.push_str("\\\""),
                    other => out.push(other),
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            if chars.get(next) == Some(&':') {
                out.push('"');
                out.push_str(&word);
                out.push('"');
            } else {
                out.push_str(&word);
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn request(signal: Signal) -> SnapshotRequest {
        match signal {
            Signal::Execute(request) => request,
            other => panic!("not an execute-snapshot: {other:?}"),
        }
    }

    /// `data` as a JSON string reads exactly as the same sub-document.
    #[test]
    fn data_as_string_or_document() {
        let text = Signal::parse(&doc! {
            "type": "execute-snapshot",
            "data": "{\"data-collections\": [\"db1.products\"], \"type\": \"INCREMENTAL\"}",
        });
        let sub = Signal::parse(&doc! {
            "type": "Execute-Snapshot",
            "data": { "data-collections": ["db1.products"], "type": "incremental" },
        });
        assert_eq!(text, sub);
        assert_eq!(request(text).patterns, vec!["^(?:db1.products)$"]);
    }

    #[test]
    fn blocking_quoted_names_and_conditions() {
        let request = request(Signal::parse(&doc! {
            "type": "execute-snapshot",
            "data": {
                "data-collections": ["\"public\".\"My.Collection\"", "shop\\.o.*"],
                "type": "BLOCKING",
                "additional-conditions": [
                    { "data-collection": "public.My.Collection", "filter": "{color: 'blue'}" },
                ],
            },
        }));
        assert_eq!(request.kind, SnapshotKind::Blocking);
        assert_eq!(request.patterns[0], "^public\\.My\\.Collection$");
        assert_eq!(request.patterns[1], "^(?:shop\\.o.*)$");
        assert_eq!(
            request.conditions,
            vec![("public.My.Collection".to_string(), doc! { "color": "blue" })]
        );
    }

    /// Every refusal says why.
    #[test]
    fn refusals_name_the_problem() {
        let reason = |d: Document| match Signal::parse(&d) {
            Signal::Invalid(reason) => reason,
            other => panic!("accepted {d}: {other:?}"),
        };
        assert!(reason(doc! { "type": "execute-snapshots" }).contains("unknown signal type"));
        assert!(
            reason(doc! { "type": "execute-snapshot", "data": "{not json" })
                .contains("not a JSON object")
        );
        assert!(
            reason(doc! { "type": "execute-snapshot", "data": {} }).contains("data-collections")
        );
        assert!(reason(doc! { "type": "execute-snapshot",
        "data": { "data-collections": ["a.b"], "type": "parallel" } })
        .contains("unknown snapshot type"));
        assert!(reason(doc! { "type": "execute-snapshot", "data": {
            "data-collections": ["a.b"],
            "additional-conditions": [{ "data-collection": "a.b", "filter": "color='blue'" }],
        } })
        .contains("not a MongoDB query document"));
    }

    #[test]
    fn stop_with_and_without_collections() {
        assert_eq!(
            Signal::parse(&doc! { "type": "stop-snapshot" }),
            Signal::Stop {
                kind: SnapshotKind::Incremental,
                patterns: vec![]
            }
        );
        assert_eq!(
            Signal::parse(&doc! { "type": "stop-snapshot",
            "data": "{\"data-collections\": [\"db1.table1\"], \"type\": \"INCREMENTAL\"}" }),
            Signal::Stop {
                kind: SnapshotKind::Incremental,
                patterns: vec!["^(?:db1.table1)$".into()]
            }
        );
    }
}
