//! Where a pipeline's position is saved: a NATS KV bucket (default) or a MongoDB collection.
//!
//! A checkpoint is written only with a [`Position`] the sink reports, i.e. a resume token
//! whose event and every earlier one JetStream has acknowledged. It also records the id of
//! the last acknowledged message, which lets the restarted publisher keep chaining
//! `Nats-Expected-Last-Msg-Id` from where it stopped.
//!
//! # Fencing
//! Every record names its `writer` (a random id per opened store). Writes are conditional on
//! the record still being this writer's: a compare-and-set on the KV revision, or a MongoDB
//! filter on `writer`. Opening the store claims an existing record (rewrites it with the new
//! writer), so once a new owner has loaded the checkpoint, a previous owner that wakes up can
//! no longer move it; its write fails, its [`Fence`] is revoked and its pipeline stops. A
//! write whose reply was lost is recognised by the writer id and not mistaken for a rival's.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::{self, kv};
use bson::{doc, Bson, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::{DatabaseOptions, ReadConcern, WriteConcern};

use crate::config::{CheckpointConfig, CheckpointStoreKind};
use crate::error::Error;
use crate::ha::fence::Fence;
use crate::model::Position;

/// A checkpoint backend bound to one pipeline.
pub struct CheckpointStore {
    backend: Backend,
    /// The pipeline id: the key or `_id`.
    key: String,
    /// This store's writer id, recorded in every record it writes.
    writer: String,
    /// The KV revision of the record as this store last read or wrote it; 0 = none.
    revision: AtomicU64,
    fence: Fence,
}

enum Backend {
    /// One key per pipeline in a KV bucket.
    NatsKv(Box<kv::Store>),
    /// One document per pipeline, `_id` = pipeline id.
    Mongo(mongodb::Collection<Document>),
}

impl CheckpointStore {
    /// Opens (creating if needed) the configured store for `pipeline`. Writes stop once
    /// `fence` no longer holds.
    pub async fn open(
        config: &CheckpointConfig,
        pipeline: &str,
        js: &jetstream::Context,
        mongo: &mongodb::Client,
        fence: Fence,
    ) -> Result<CheckpointStore, Error> {
        let fail = |message: String| Error::Checkpoint {
            pipeline: pipeline.to_string(),
            message,
        };
        let backend = match config.store {
            CheckpointStoreKind::NatsKv => {
                let store = match js.get_key_value(&config.bucket).await {
                    Ok(store) => store,
                    Err(_) => js
                        .create_key_value(kv::Config {
                            bucket: config.bucket.clone(),
                            description: "tidegate pipeline positions".into(),
                            history: 1,
                            storage: jetstream::stream::StorageType::File,
                            ..Default::default()
                        })
                        .await
                        .map_err(|err| {
                            fail(format!(
                                "cannot open or create KV bucket '{}': {err}",
                                config.bucket
                            ))
                        })?,
                };
                Backend::NatsKv(Box::new(store))
            }
            // Majority writes: a checkpoint that a failover could roll back would let the
            // position go backwards (replaying is harmless; it is just wasted work).
            CheckpointStoreKind::Mongodb => Backend::Mongo(
                mongo
                    .database_with_options(
                        &config.database,
                        DatabaseOptions::builder()
                            .write_concern(WriteConcern::majority())
                            .read_concern(ReadConcern::majority())
                            .build(),
                    )
                    .collection(&config.collection),
            ),
        };
        Ok(CheckpointStore {
            backend,
            key: pipeline.to_string(),
            writer: writer_id(),
            revision: AtomicU64::new(0),
            fence,
        })
    }

    /// The unit whose position this store keeps.
    pub fn pipeline(&self) -> &str {
        &self.key
    }

    fn fail(&self, message: String) -> Error {
        Error::Checkpoint {
            pipeline: self.key.clone(),
            message,
        }
    }

    /// Revokes the fence: another writer owns the record now.
    fn fenced(&self, detail: &str) -> Error {
        let message = format!(
            "another instance has taken this pipeline over ({detail}); to run several \
             instances of one config, enable [ha]"
        );
        self.fence.revoke(&message);
        Error::Fenced {
            pipeline: self.key.clone(),
            message,
        }
    }

    /// The saved position, if any, claiming the record for this store's writes (see the
    /// module docs).
    pub async fn load(&self) -> Result<Option<Position>, Error> {
        let key = self.key.as_str();
        let saved: Option<Document> = match &self.backend {
            Backend::NatsKv(store) => {
                // A rival may write between our read and our claim: read again then. Only a
                // deposed owner can be writing, and its fence ends within a lease's time.
                let mut attempts = 0;
                loop {
                    let entry = store
                        .entry(key)
                        .await
                        .map_err(|err| self.fail(format!("cannot read key '{key}': {err}")))?
                        .filter(|e| e.operation == kv::Operation::Put);
                    let Some(entry) = entry else { break None };
                    let mut saved = self.decode(&entry.value)?;
                    saved.insert("writer", self.writer.as_str());
                    match store
                        .update(key, self.encode(&saved)?, entry.revision)
                        .await
                    {
                        Ok(revision) => {
                            self.revision.store(revision, Ordering::Release);
                            break Some(saved);
                        }
                        Err(err) if attempts < 20 => {
                            attempts += 1;
                            tracing::debug!(pipeline = %key, error = %err, "checkpoint claim raced; retrying");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Err(err) => {
                            return Err(self.fail(format!("cannot claim key '{key}': {err}")))
                        }
                    }
                }
            }
            Backend::Mongo(collection) => collection
                .find_one_and_update(
                    doc! { "_id": key },
                    doc! { "$set": { "writer": self.writer.as_str() } },
                )
                .await
                .map_err(|err| self.fail(format!("cannot read checkpoint '{key}': {err}")))?,
        };
        let Some(saved) = saved else {
            return Ok(None);
        };
        let token = saved
            .get("token")
            .cloned()
            .ok_or_else(|| self.fail("checkpoint has no 'token' field".into()))?;
        let token: ResumeToken = bson::deserialize_from_bson(token)
            .map_err(|err| self.fail(format!("checkpoint token is unreadable: {err}")))?;
        let last_msg_id = saved.get_str("lastMsgId").ok().map(str::to_string);
        let snapshot = saved
            .get_document("snapshot")
            .ok()
            .map(crate::model::SnapshotProgress::from_document)
            .transpose()
            .map_err(|err| {
                self.fail(format!("checkpoint snapshot progress is unreadable: {err}"))
            })?;
        let position = Position {
            token,
            last_msg_id,
            snapshot,
        };
        let saved_at = saved
            .get_datetime("savedAt")
            .ok()
            .map(|t| t.timestamp_millis());
        crate::ops::metrics::pipeline(key).checkpoint_loaded(&position, saved_at);
        Ok(Some(position))
    }

    fn decode(&self, bytes: &[u8]) -> Result<Document, Error> {
        let key = &self.key;
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|err| {
            self.fail(format!(
                "key '{key}' does not hold a tidegate checkpoint: {err}"
            ))
        })?;
        match Bson::try_from(value) {
            Ok(Bson::Document(doc)) => Ok(doc),
            _ => Err(self.fail(format!(
                "key '{key}' does not hold a tidegate checkpoint document"
            ))),
        }
    }

    fn encode(&self, record: &Document) -> Result<bytes::Bytes, Error> {
        serde_json::to_vec(&Bson::Document(record.clone()).into_canonical_extjson())
            .map(Into::into)
            .map_err(|err| self.fail(format!("cannot encode checkpoint: {err}")))
    }

    /// Saves a position, if this store still owns the record and the fence holds.
    pub async fn save(&self, position: &Position) -> Result<(), Error> {
        if !self.fence.holds() {
            return Err(Error::Fenced {
                pipeline: self.key.clone(),
                message: self.fence.reason(),
            });
        }
        let token = bson::serialize_to_bson(&position.token)
            .map_err(|err| self.fail(format!("cannot encode token: {err}")))?;
        let mut record = doc! {
            "token": token,
            "savedAt": bson::DateTime::now(),
            "writer": self.writer.as_str(),
        };
        if let Some(id) = &position.last_msg_id {
            record.insert("lastMsgId", id.as_str());
        }
        if let Some(snapshot) = &position.snapshot {
            record.insert("snapshot", snapshot.to_document());
        }
        let key = self.key.as_str();
        match &self.backend {
            Backend::NatsKv(store) => {
                let bytes = self.encode(&record)?;
                for _ in 0..2 {
                    let revision = self.revision.load(Ordering::Acquire);
                    let written = match revision {
                        0 => store
                            .create(key, bytes.clone())
                            .await
                            .map_err(|e| e.to_string()),
                        _ => store
                            .update(key, bytes.clone(), revision)
                            .await
                            .map_err(|e| e.to_string()),
                    };
                    let err = match written {
                        Ok(revision) => {
                            self.revision.store(revision, Ordering::Release);
                            crate::ops::metrics::pipeline(key).checkpointed(position);
                            return Ok(());
                        }
                        Err(err) => err,
                    };
                    // Either someone else wrote, or our own earlier write landed but its
                    // reply was lost: the record's writer tells which.
                    let entry = store
                        .entry(key)
                        .await
                        .map_err(|e| {
                            self.fail(format!(
                                "cannot write key '{key}': {err}; cannot read it back: {e}"
                            ))
                        })?
                        .filter(|e| e.operation == kv::Operation::Put);
                    match entry {
                        Some(entry) if entry.revision == revision => {
                            return Err(self.fail(format!("cannot write key '{key}': {err}")))
                        }
                        Some(entry) if self.is_ours(&entry.value) => {
                            self.revision.store(entry.revision, Ordering::Release)
                        }
                        Some(_) => return Err(self.fenced("its checkpoint has another writer")),
                        None if revision == 0 => {
                            return Err(self.fail(format!("cannot write key '{key}': {err}")))
                        }
                        None => return Err(self.fenced("its checkpoint was deleted")),
                    }
                }
                Err(self.fail(format!("cannot write key '{key}': it keeps changing")))
            }
            Backend::Mongo(collection) => {
                match collection
                    .replace_one(doc! { "_id": key, "writer": self.writer.as_str() }, record)
                    .upsert(true)
                    .await
                {
                    Ok(_) => {
                        crate::ops::metrics::pipeline(key).checkpointed(position);
                        Ok(())
                    }
                    // The upsert found no record of ours and could not insert one: the
                    // record exists with another writer.
                    Err(err) if is_duplicate_key(&err) => {
                        Err(self.fenced("its checkpoint has another writer"))
                    }
                    Err(err) => Err(self.fail(format!("cannot write checkpoint '{key}': {err}"))),
                }
            }
        }
    }

    fn is_ours(&self, bytes: &[u8]) -> bool {
        self.decode(bytes)
            .is_ok_and(|doc| doc.get_str("writer").ok() == Some(self.writer.as_str()))
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(
        err.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == 11000
    )
}

/// A writer id unique to this store: process id, time and a hash seeded by the OS.
fn writer_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{}-{:016x}", std::process::id(), hasher.finish())
}
