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
//!
//! # Pace
//! A pipeline's units (its tenants) share one pace of writes ([`pace`]), so that a thousand
//! tenants do not make a thousand writes a second.

mod kv;
mod mongo;
pub mod pace;

use std::sync::atomic::AtomicU64;

use async_nats::jetstream;
use bson::{doc, Document};
use mongodb::change_stream::event::ResumeToken;

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
    NatsKv(Box<async_nats::jetstream::kv::Store>),
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
                Backend::NatsKv(Box::new(kv::open(config, js, fail).await?))
            }
            CheckpointStoreKind::Mongodb => Backend::Mongo(mongo::collection(config, mongo)),
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
        let saved = match &self.backend {
            Backend::NatsKv(store) => self.claim_kv(store).await?,
            Backend::Mongo(collection) => self.claim_mongo(collection).await?,
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
        match &self.backend {
            Backend::NatsKv(store) => self.save_kv(store, position, &record).await,
            Backend::Mongo(collection) => self.save_mongo(collection, position, record).await,
        }
    }
}

/// Deletes `pipeline`'s saved position, for a tenant removed together with its data: a
/// unit of that id started later begins where a new one would. A writer still running
/// loses its compare-and-set on the KV key and is fenced; with the MongoDB store it could
/// write the record again, so the caller stops the unit first.
pub async fn forget(
    config: &CheckpointConfig,
    pipeline: &str,
    js: &jetstream::Context,
    mongodb_uri: &str,
) -> Result<(), Error> {
    let fail = |message: String| Error::Checkpoint {
        pipeline: pipeline.to_string(),
        message,
    };
    match config.store {
        CheckpointStoreKind::NatsKv => {
            let store = kv::open(config, js, fail).await?;
            store
                .purge(pipeline)
                .await
                .map_err(|err| fail(format!("cannot delete key '{pipeline}': {err}")))
        }
        CheckpointStoreKind::Mongodb => {
            let client = crate::security::mongo_client(mongodb_uri)
                .await
                .map_err(|err| fail(format!("cannot reach MongoDB: {err}")))?;
            mongo::collection(config, &client)
                .delete_one(doc! { "_id": pipeline })
                .await
                .map(drop)
                .map_err(|err| fail(format!("cannot delete the record: {err}")))
        }
    }
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
