//! How far a pipeline is durably published: what the checkpoint stores and a restart resumes
//! from, including how far a running snapshot has come.
//!
//! Snapshot progress is typed everywhere it travels (event, unit, position) and becomes a
//! BSON document only where the checkpoint is stored, in a form that must not change:
//! checkpoints written by earlier versions (NATS KV and MongoDB stores) still have to load.

use bson::{doc, Bson, Document};
use mongodb::change_stream::event::ResumeToken;

use super::Namespace;

/// How far the pipeline is durably published.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Resume after this token.
    pub token: ResumeToken,
    /// The last message id the stream acknowledged, if any: the predecessor for the next
    /// `Nats-Expected-Last-Msg-Id`.
    pub last_msg_id: Option<String>,
    /// While a snapshot runs, how far it has come.
    pub snapshot: Option<SnapshotProgress>,
}

/// How far a running snapshot has come, saved with every position so that a restart goes on
/// after the last acknowledged document instead of starting over. Boxed: it rides in every
/// event and unit, most of which carry none.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotProgress {
    /// A snapshot that holds the stream while it reads (initial, or a blocking signal).
    Initial(Box<InitialProgress>),
    /// A snapshot read between watermarks beside the stream (an incremental signal).
    Incremental(Box<IncrementalProgress>),
}

/// The progress of a snapshot that holds the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct InitialProgress {
    /// The stream position captured before reading: streaming resumes after it.
    pub start: ResumeToken,
    /// Every namespace to read, in order.
    pub namespaces: Vec<Namespace>,
    /// Index of the namespace being read.
    pub index: usize,
    /// `_id` of the last document handed on in that namespace (`None`: none yet).
    pub last_id: Option<Bson>,
    /// Documents handed on so far, for progress lines.
    pub done: u64,
    /// A query per namespace (same order; empty: every document), from a signal's
    /// `additional-conditions`.
    pub filters: Vec<Document>,
}

/// The progress of an incremental snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct IncrementalProgress {
    /// Names the snapshot in event ids and watermarks: the signal event's id.
    pub id: String,
    /// Every namespace to read, in order.
    pub namespaces: Vec<Namespace>,
    /// Index of the namespace being read.
    pub index: usize,
    /// `_id` of the last document published in that namespace (`None`: none yet).
    pub last_id: Option<Bson>,
    /// Documents published so far.
    pub done: u64,
    /// Chunks started so far: numbers the watermarks (`<id>:<chunk>`), which continue after
    /// a restart instead of repeating.
    pub chunks: u64,
    /// Paused by a `pause-snapshot` signal: no new chunk starts until `resume-snapshot`.
    pub paused: bool,
    /// A query per namespace (empty: every document), from `additional-conditions`.
    pub filters: Vec<Document>,
}

impl SnapshotProgress {
    /// The form saved in the checkpoint.
    pub fn to_document(&self) -> Document {
        match self {
            SnapshotProgress::Initial(progress) => progress.to_document(),
            SnapshotProgress::Incremental(progress) => progress.to_document(),
        }
    }

    /// Reads the form saved in the checkpoint: an incremental snapshot's is marked
    /// `incremental: true`.
    pub fn from_document(saved: &Document) -> Result<SnapshotProgress, String> {
        if saved.get_bool("incremental").unwrap_or(false) {
            IncrementalProgress::from_document(saved)
                .map(|progress| SnapshotProgress::Incremental(Box::new(progress)))
        } else {
            InitialProgress::from_document(saved)
                .map(|progress| SnapshotProgress::Initial(Box::new(progress)))
        }
    }
}

impl InitialProgress {
    /// The form saved in the checkpoint.
    pub fn to_document(&self) -> Document {
        // A token the server gave always serializes; were it not to, loading the checkpoint
        // would fail with a clear error rather than resume from a wrong place.
        let start = bson::serialize_to_bson(&self.start).unwrap_or(Bson::Null);
        let mut progress = doc! {
            "start": start,
            "namespaces": namespace_names(&self.namespaces),
            "index": self.index as i64,
            "done": self.done as i64,
        };
        if let Some(id) = &self.last_id {
            progress.insert("lastId", id.clone());
        }
        insert_filters(&mut progress, &self.filters);
        progress
    }

    /// Reads the form saved in the checkpoint.
    pub fn from_document(saved: &Document) -> Result<InitialProgress, String> {
        let start = saved
            .get("start")
            .cloned()
            .ok_or("snapshot progress has no start")?;
        let start: ResumeToken = bson::deserialize_from_bson(start).map_err(|e| e.to_string())?;
        let namespaces = saved
            .get_array("namespaces")
            .map_err(|e| e.to_string())?
            .iter()
            .filter_map(|ns| ns.as_str())
            .map(|ns| {
                let (db, coll) = ns.split_once('.').unwrap_or((ns, ""));
                Namespace {
                    db: db.to_string(),
                    coll: Some(coll.to_string()),
                }
            })
            .collect();
        Ok(InitialProgress {
            start,
            namespaces,
            index: saved_count(saved, "index") as usize,
            last_id: saved.get("lastId").cloned(),
            done: saved_count(saved, "done"),
            filters: saved_filters(saved),
        })
    }

    /// Whether every namespace has been read.
    pub fn finished(&self) -> bool {
        self.index >= self.namespaces.len()
    }
}

impl IncrementalProgress {
    /// The form saved in the checkpoint.
    pub fn to_document(&self) -> Document {
        let mut progress = doc! {
            "incremental": true,
            "id": &self.id,
            "namespaces": namespace_names(&self.namespaces),
            "index": self.index as i64,
            "done": self.done as i64,
            "chunks": self.chunks as i64,
        };
        if let Some(id) = &self.last_id {
            progress.insert("lastId", id.clone());
        }
        if self.paused {
            progress.insert("paused", true);
        }
        insert_filters(&mut progress, &self.filters);
        progress
    }

    /// Reads the form saved in the checkpoint (without its `incremental: true` mark).
    pub fn from_document(saved: &Document) -> Result<IncrementalProgress, String> {
        let id = saved
            .get_str("id")
            .map_err(|e| format!("incremental snapshot progress: {e}"))?;
        let namespaces = saved
            .get_array("namespaces")
            .map_err(|e| format!("incremental snapshot progress: {e}"))?
            .iter()
            .filter_map(|ns| ns.as_str())
            .filter_map(|ns| ns.split_once('.'))
            .map(|(db, coll)| Namespace {
                db: db.to_string(),
                coll: Some(coll.to_string()),
            })
            .collect();
        Ok(IncrementalProgress {
            id: id.to_string(),
            namespaces,
            index: saved_count(saved, "index") as usize,
            last_id: saved.get("lastId").cloned(),
            done: saved_count(saved, "done"),
            chunks: saved_count(saved, "chunks"),
            paused: saved.get_bool("paused").unwrap_or(false),
            filters: saved_filters(saved),
        })
    }
}

/// Namespaces as saved: `db.coll` strings.
fn namespace_names(namespaces: &[Namespace]) -> Vec<Bson> {
    namespaces
        .iter()
        .map(|ns| Bson::String(ns.to_string()))
        .collect()
}

/// A saved counter; missing or negative reads as 0.
fn saved_count(saved: &Document, key: &str) -> u64 {
    saved.get_i64(key).unwrap_or(0).max(0) as u64
}

/// Saves per-namespace filters in a progress document (only when there are any, so that
/// progress without filters keeps its earlier form).
fn insert_filters(progress: &mut Document, filters: &[Document]) {
    if filters.iter().any(|f| !f.is_empty()) {
        let filters: Vec<Bson> = filters.iter().cloned().map(Bson::Document).collect();
        progress.insert("filters", filters);
    }
}

/// The per-namespace filters saved by [`insert_filters`].
fn saved_filters(saved: &Document) -> Vec<Document> {
    saved
        .get_array("filters")
        .map(|all| {
            all.iter()
                .map(|f| f.as_document().cloned().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(data: &str) -> ResumeToken {
        bson::deserialize_from_bson(Bson::Document(doc! { "_data": data })).expect("token")
    }

    /// Documents as earlier versions saved them: each must read into the typed progress and
    /// be written back byte for byte, or existing checkpoints would not resume.
    #[test]
    fn old_checkpoint_forms_round_trip() {
        let saved = [
            // An initial snapshot at its start.
            doc! {
                "start": { "_data": "8263A1" },
                "namespaces": ["shop.orders", "shop.users"],
                "index": 0_i64,
                "done": 0_i64,
            },
            // An initial snapshot half-way, with a signal's filters.
            doc! {
                "start": { "_data": "8263A1" },
                "namespaces": ["shop.orders"],
                "index": 0_i64,
                "done": 7_i64,
                "lastId": 42,
                "filters": [{ "color": "blue" }],
            },
            // An incremental snapshot, paused.
            doc! {
                "incremental": true,
                "id": "i8263A2",
                "namespaces": ["shop.orders", "shop.users"],
                "index": 1_i64,
                "done": 120_i64,
                "chunks": 3_i64,
                "lastId": bson::oid::ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").expect("oid"),
                "paused": true,
            },
            // An incremental snapshot running, with filters.
            doc! {
                "incremental": true,
                "id": "i8263A2",
                "namespaces": ["shop.orders"],
                "index": 0_i64,
                "done": 0_i64,
                "chunks": 1_i64,
            },
        ];
        for saved in saved {
            let progress = SnapshotProgress::from_document(&saved).expect("decode");
            let written = progress.to_document();
            assert_eq!(written, saved);
            assert_eq!(
                bson::serialize_to_vec(&written).expect("encode"),
                bson::serialize_to_vec(&saved).expect("encode")
            );
        }
    }

    /// The typed progress reads back as it was written.
    #[test]
    fn progress_round_trips() {
        let initial = SnapshotProgress::Initial(Box::new(InitialProgress {
            start: token("8263A1"),
            namespaces: vec![Namespace {
                db: "shop".into(),
                coll: Some("orders".into()),
            }],
            index: 0,
            last_id: Some(Bson::Int32(42)),
            done: 7,
            filters: vec![doc! { "color": "blue" }],
        }));
        let incremental = SnapshotProgress::Incremental(Box::new(IncrementalProgress {
            id: "i8263A2".into(),
            namespaces: vec![Namespace {
                db: "shop".into(),
                coll: Some("users".into()),
            }],
            index: 0,
            last_id: None,
            done: 0,
            chunks: 2,
            paused: false,
            filters: Vec::new(),
        }));
        for progress in [initial, incremental] {
            let saved = progress.to_document();
            assert_eq!(SnapshotProgress::from_document(&saved), Ok(progress));
        }
    }
}
