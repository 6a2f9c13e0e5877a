//! Events over MongoDB's 16 MiB document limit (`pipeline.oversize`).
//!
//! The server builds a change event in memory and fails the cursor with `BSONObjectTooLarge`
//! when the event cannot be returned as one document (a large update with pre- and
//! post-images, say): resuming hits the same event again, so the stream can never move past
//! it by itself. Three answers:
//!
//! - `fail`: no extra stage. On BSONObjectTooLarge the source reads the stream again from
//!   its last position with the `skip` stage ([`probe_config`]): the events before the large
//!   one go through as usual, and the large one arrives as a stub, so the pipeline stops with
//!   an error naming it ([`describe`]) and these settings.
//! - `skip`: [`skip_stage`] runs last on the server. It sums `$bsonSize` over the event's
//!   top-level document fields and, over [`SKIP_LIMIT`], replaces the event by a stub that
//!   keeps only the fields tidegate reads plus the size ([`MARKER`]); the host dead-letters
//!   that stub with reason `oversize`.
//! - `split`: `$changeStreamSplitLargeEvent` (MongoDB 6.0.9+ / 7.0+) runs last and the server
//!   sends such an event as fragments `splitEvent: {fragment, of}`, each with a resume token
//!   of its own; [`Fragments`] joins them back into one event. A stream resumed from a
//!   fragment's token starts at the next fragment, so only the last fragment's token, once the
//!   event is whole, may become a position; a restart in between re-reads the event from its
//!   first fragment.

use bson::{doc, Document, RawBsonRef, RawDocument, RawDocumentBuf};

use crate::config::{OversizePolicy, PipelineConfig, EVENT_FIELDS, SPLIT_STAGE};
use crate::model::Change;

/// MongoDB's BSONObjectTooLarge: an event (or anything) over the 16 MiB document limit.
pub const BSON_OBJECT_TOO_LARGE: i32 = 10334;

/// Above this sum of `$bsonSize`s, `oversize = "skip"` strips the event: 16 MiB less 64 KiB,
/// room for the top-level scalars the sum leaves out and the reply around the event.
pub const SKIP_LIMIT: i64 = 16 * 1024 * 1024 - 64 * 1024;

/// The field [`skip_stage`] sets, on a stripped event only, to the event's size in bytes.
pub const MARKER: &str = "__tidegateOversize";

/// The first MongoDB 6.0 release with `$changeStreamSplitLargeEvent` (and 7.0 has it).
pub const SPLIT_MINIMUM: &str = "6.0.9";

/// The stages this pipeline's oversize policy appends after every other stage (MongoDB wants
/// `$changeStreamSplitLargeEvent` last, and the skip stage must see the final event).
pub fn stages(pipeline: &PipelineConfig) -> Vec<Document> {
    if pipeline.splits_large_events() {
        return vec![doc! { SPLIT_STAGE: {} }];
    }
    match pipeline.oversize {
        OversizePolicy::Skip => vec![skip_stage()],
        OversizePolicy::Fail | OversizePolicy::Split => Vec::new(),
    }
}

/// The `oversize = "skip"` stage: an event whose top-level documents sum to more than
/// [`SKIP_LIMIT`] bytes becomes a stub of the fields tidegate reads and [`MARKER`]; any other event
/// passes unchanged (`$$ROOT`). Each top-level document (`fullDocument`, the pre-image,
/// `updateDescription`, …) is within 16 MiB by itself, so `$bsonSize` can measure them where
/// it could not measure the whole event.
pub fn skip_stage() -> Document {
    let size = doc! { "$sum": { "$map": {
        "input": { "$objectToArray": "$$ROOT" },
        "in": { "$cond": [
            { "$eq": [{ "$type": "$$this.v" }, "object"] },
            { "$bsonSize": "$$this.v" },
            0,
        ] },
    } } };
    let mut stub = Document::new();
    // Every field tidegate reads; the documents are what the stub leaves out.
    for field in EVENT_FIELDS {
        stub.insert(*field, format!("${field}"));
    }
    stub.insert(MARKER, "$$size");
    doc! { "$replaceWith": { "$let": {
        "vars": { "size": size },
        "in": { "$cond": [{ "$gt": ["$$size", SKIP_LIMIT] }, stub, "$$ROOT"] },
    } } }
}

/// The size [`skip_stage`] recorded on a stub, if `event` is one.
pub fn marked_size(event: &RawDocument) -> Option<i64> {
    match event.get(MARKER).ok().flatten()? {
        RawBsonRef::Int32(n) => Some(i64::from(n)),
        RawBsonRef::Int64(n) => Some(n),
        RawBsonRef::Double(n) => Some(n as i64),
        _ => None,
    }
}

/// Whether a server of `version` (buildInfo's `version`) has `$changeStreamSplitLargeEvent`:
/// 6.0.9 and later 6.0 patches, and 6.3 (the first rapid release with it) onwards.
pub fn supports_split(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    let patch = parts.next().unwrap_or(0);
    match (major, minor) {
        (0..=5, _) => false,
        (6, 0) => patch >= 9,
        (6, 1..=2) => false,
        _ => true,
    }
}

/// The fragments of a split event read so far.
#[derive(Debug, Default)]
pub struct Fragments {
    parts: Vec<RawDocumentBuf>,
    of: i64,
}

impl Fragments {
    /// Whether part of an event has been read but not all of it: the stream's position is
    /// then inside the event, where no checkpoint may point.
    pub fn in_progress(&self) -> bool {
        !self.parts.is_empty()
    }

    /// Forgets a partly read event: the stream is reopened before it and sends it again.
    pub fn clear(&mut self) {
        self.parts.clear();
        self.of = 0;
    }

    /// Takes one document from the stream: a whole event comes back as is, a fragment is
    /// kept, and the last fragment of an event comes back as the event reassembled. An
    /// error means fragments arrived out of sequence (they are forgotten).
    pub fn add(&mut self, document: RawDocumentBuf) -> Result<Option<RawDocumentBuf>, String> {
        let Some((fragment, of)) = split_event(&document) else {
            if self.in_progress() {
                let read = self.parts.len();
                let of = self.of;
                self.clear();
                return Err(format!(
                    "a whole event arrived after fragment {read} of {of} of a split event"
                ));
            }
            return Ok(Some(document));
        };
        let expected = self.parts.len() as i64 + 1;
        if fragment != expected || of < 1 || fragment > of || (fragment > 1 && of != self.of) {
            let read = self.parts.len();
            let before = self.of;
            self.clear();
            return Err(format!(
                "fragment {fragment} of {of} of a split event arrived after fragment {read} of {before}"
            ));
        }
        if fragment == 1 {
            tracing::info!(
                fragments = of,
                "an event over 16 MiB is arriving in {of} fragments (split event); reassembling it"
            );
        }
        self.of = of;
        self.parts.push(document);
        if fragment < of {
            return Ok(None);
        }
        let whole = self.assemble();
        self.clear();
        whole.map(Some)
    }

    /// Joins the fragments: every field of each, in order, except `splitEvent`, and as `_id`
    /// the last fragment's resume token (resuming after it goes on after the whole event).
    fn assemble(&self) -> Result<RawDocumentBuf, String> {
        let unreadable =
            |e: bson::error::Error| format!("unreadable fragment of a split event: {e}");
        let mut whole = RawDocumentBuf::new();
        let last = self.parts.last().ok_or("no fragments to reassemble")?;
        for element in last.iter() {
            let (key, value) = element.map_err(unreadable)?;
            if key.as_str() == "_id" {
                whole.append(key, value);
            }
        }
        for part in &self.parts {
            for element in part.iter() {
                let (key, value) = element.map_err(unreadable)?;
                if !matches!(key.as_str(), "_id" | "splitEvent") {
                    whole.append(key, value);
                }
            }
        }
        tracing::info!(
            bytes = whole.as_bytes().len(),
            fragments = self.parts.len(),
            "split event reassembled"
        );
        Ok(whole)
    }
}

/// `splitEvent: {fragment, of}` of a fragment; `None` for a whole event.
fn split_event(document: &RawDocument) -> Option<(i64, i64)> {
    let split = document.get_document("splitEvent").ok()?;
    let number = |key: &str| match split.get(key).ok().flatten() {
        Some(RawBsonRef::Int32(n)) => i64::from(n),
        Some(RawBsonRef::Int64(n)) => n,
        Some(RawBsonRef::Double(n)) => n as i64,
        _ => 0,
    };
    Some((number("fragment"), number("of")))
}

/// What to tell an operator whose stream stopped on an event over 16 MiB, after
/// `described` (the event, as far as it could be identified).
pub fn fatal_message(pipeline: &PipelineConfig, described: &str) -> String {
    let why = "MongoDB cannot return it as one document (BSONObjectTooLarge), so the stream \
               cannot move past it";
    let fix = if pipeline.splits_large_events() {
        "even split into fragments it does not fit: fragments are cut between top-level \
         fields, and one of them is over 16 MiB by itself. Leave that field out with a \
         `$project` exclusion in `stages`, or set `oversize = \"skip\"` to dead-letter a stub \
         of such events"
            .to_string()
    } else if pipeline.oversize == OversizePolicy::Skip {
        "even its stub (the fields tidegate reads) is over the limit, or fields added by \
         `stages` are not documents that `$bsonSize` counts. Leave the large fields out with a \
         `$project` exclusion in `stages`"
            .to_string()
    } else {
        format!(
            "set `oversize = \"split\"` (MongoDB {SPLIT_MINIMUM}+ / 7.0+: the event arrives in \
             fragments, reassembled into one) or `oversize = \"skip\"` (a stub of such events \
             goes to the dead-letter subject), or make events smaller (no pre-/post-images, \
             `$project` exclusions in `stages`)"
        )
    };
    format!("an event over 16 MiB stopped the stream: {described}. {why}; {fix}")
}

/// Names an event for [`fatal_message`]: operation, namespace, document key, cluster time,
/// resume token and size.
pub fn describe(change: &Change, size: Option<i64>) -> String {
    let key = change
        .document_key()
        .and_then(|key| crate::model::ejson::relaxed(key).ok())
        .map(|json| String::from_utf8_lossy(&json).into_owned())
        .unwrap_or_else(|| "unknown".into());
    let time = change
        .cluster_time()
        .map(|t| format!("{}.{}", t.time, t.increment))
        .unwrap_or_else(|| "unknown".into());
    let mut out = format!(
        "{} on {} of document key {key} at cluster time {time} (resume token {})",
        change.operation().as_str(),
        change.namespace(),
        change.id(),
    );
    if let Some(size) = size {
        out.push_str(&format!(", {size} bytes"));
    }
    out
}

/// The pipeline as [`fatal`](fatal_message)'s probe reads it: with the `skip` stage (and no
/// split stage), so that an oversize event arrives as a stub that names it.
pub fn probe_config(pipeline: &PipelineConfig) -> PipelineConfig {
    let mut probe = pipeline.clone();
    probe.oversize = OversizePolicy::Skip;
    probe
        .stages
        .retain(|stage| !stage.contains_key(SPLIT_STAGE));
    probe
}

/// Whether the server of `client` has `$changeStreamSplitLargeEvent`, when this pipeline
/// needs it: an error naming the server's version and the minimum if not. A server that
/// cannot be asked now is not refused here (the stream's open then fails on the unknown
/// stage, which is fatal too).
pub async fn check_split_support(
    client: &mongodb::Client,
    pipeline: &PipelineConfig,
) -> Result<(), crate::Error> {
    if !pipeline.splits_large_events() {
        return Ok(());
    }
    let info = match client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await
    {
        Ok(info) => info,
        Err(err) => {
            tracing::warn!(pipeline = %pipeline.id, error = %err, "cannot check $changeStreamSplitLargeEvent support now");
            return Ok(());
        }
    };
    let version = info.get_str("version").unwrap_or("unknown");
    if supports_split(version) {
        return Ok(());
    }
    Err(crate::Error::Source {
        pipeline: pipeline.id.clone(),
        message: format!(
            "oversize = \"split\" (or a {SPLIT_STAGE} stage) needs {SPLIT_STAGE}, which MongoDB \
             has from {SPLIT_MINIMUM} (and 7.0); this server is {version}. Upgrade it, or use \
             oversize = \"skip\" or \"fail\""
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    #[test]
    fn split_support_by_version() {
        for old in ["4.4.29", "5.0.31", "6.0.5", "6.0.8", "6.1.0", "6.2.1"] {
            assert!(!supports_split(old), "{old}");
        }
        for new in ["6.0.9", "6.0.27", "6.3.2", "7.0.0", "8.0.4", "7.0.12-ent"] {
            assert!(supports_split(new), "{new}");
        }
    }

    fn fragment(token: &str, n: i32, of: i32, field: &str) -> RawDocumentBuf {
        let mut doc =
            rawdoc! { "_id": { "_data": token }, "splitEvent": { "fragment": n, "of": of } };
        doc.append(bson::raw::CString::try_from(field).unwrap(), n);
        doc
    }

    #[test]
    fn fragments_join_into_one_event_with_the_last_token() {
        let mut fragments = Fragments::default();
        assert!(fragments
            .add(fragment("a1", 1, 3, "operationType"))
            .unwrap()
            .is_none());
        assert!(fragments.in_progress());
        assert!(fragments
            .add(fragment("a2", 2, 3, "fullDocument"))
            .unwrap()
            .is_none());
        let whole = fragments
            .add(fragment("a3", 3, 3, "fullDocumentBeforeChange"))
            .unwrap()
            .unwrap();
        assert!(!fragments.in_progress());
        let whole = Document::try_from(whole).unwrap();
        assert_eq!(
            whole,
            doc! {
                "_id": { "_data": "a3" },
                "operationType": 1,
                "fullDocument": 2,
                "fullDocumentBeforeChange": 3,
            }
        );
    }

    #[test]
    fn fragments_out_of_sequence_are_refused_and_forgotten() {
        let mut fragments = Fragments::default();
        fragments.add(fragment("a1", 1, 3, "a")).unwrap();
        assert!(fragments.add(fragment("a3", 3, 3, "c")).is_err());
        assert!(!fragments.in_progress());
        // A fragment sequence cut short by a whole event.
        fragments.add(fragment("b1", 1, 2, "a")).unwrap();
        assert!(fragments.add(rawdoc! { "_id": { "_data": "c" } }).is_err());
        // A whole event passes as is.
        let whole = rawdoc! { "_id": { "_data": "d" }, "operationType": "insert" };
        assert_eq!(fragments.add(whole.clone()).unwrap(), Some(whole));
    }

    #[test]
    fn stages_follow_the_policy() {
        let config = |extra: &str| {
            crate::config::Config::parse(
                &format!(
                    "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[[pipeline]]\nid = \"p\"\n\
                     mongodb_uri = \"mongodb://x\"\n{extra}\n[pipeline.sink]\n\
                     stream = \"S\"\nsubject_prefix = \"s\"\n"
                ),
                std::path::Path::new("."),
                |_| None,
            )
        };
        let split = config("oversize = \"split\"").unwrap();
        assert_eq!(stages(&split.pipelines[0]), vec![doc! { SPLIT_STAGE: {} }]);
        let skip = config("oversize = \"skip\"").unwrap();
        assert_eq!(stages(&skip.pipelines[0]), vec![skip_stage()]);
        let fail = config("").unwrap();
        assert!(stages(&fail.pipelines[0]).is_empty());
        let user = config("stages = [{ \"$changeStreamSplitLargeEvent\" = {} }]").unwrap();
        assert!(user.pipelines[0].splits_large_events());
        let err =
            config("stages = [{ \"$changeStreamSplitLargeEvent\" = {} }, { \"$match\" = {} }]")
                .unwrap_err();
        assert!(err.contains("must be the last stage"), "{err}");
        let err =
            config("oversize = \"skip\"\nstages = [{ \"$changeStreamSplitLargeEvent\" = {} }]")
                .unwrap_err();
        assert!(err.contains("contradicts"), "{err}");
    }
}
