//! Where a pipeline's position is saved: a NATS KV bucket (default) or a MongoDB collection.
//!
//! A checkpoint is written only with a [`Position`] the sink reports, i.e. a resume token
//! whose event and every earlier one JetStream has acknowledged. It also records the id of
//! the last acknowledged message, which lets the restarted publisher keep chaining
//! `Nats-Expected-Last-Msg-Id` from where it stopped.

use async_nats::jetstream::{self, kv};
use bson::{doc, Bson, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::{DatabaseOptions, ReadConcern, WriteConcern};

use crate::config::{CheckpointConfig, CheckpointStoreKind};
use crate::error::Error;
use crate::sink::Position;

/// A checkpoint backend bound to one pipeline.
pub enum CheckpointStore {
    /// One key per pipeline in a KV bucket.
    NatsKv {
        /// The bucket.
        store: Box<kv::Store>,
        /// The pipeline id (the key).
        key: String,
    },
    /// One document per pipeline, `_id` = pipeline id.
    Mongo {
        /// The collection.
        collection: mongodb::Collection<Document>,
        /// The pipeline id.
        key: String,
    },
}

impl CheckpointStore {
    /// Opens (creating if needed) the configured store for `pipeline`.
    pub async fn open(
        config: &CheckpointConfig,
        pipeline: &str,
        js: &jetstream::Context,
        mongo: &mongodb::Client,
    ) -> Result<CheckpointStore, Error> {
        let fail = |message: String| Error::Checkpoint {
            pipeline: pipeline.to_string(),
            message,
        };
        match config.store {
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
                Ok(CheckpointStore::NatsKv {
                    store: Box::new(store),
                    key: pipeline.to_string(),
                })
            }
            // Majority writes: a checkpoint that a failover could roll back would let the
            // position go backwards (replaying is harmless; it is just wasted work).
            CheckpointStoreKind::Mongodb => Ok(CheckpointStore::Mongo {
                collection: mongo
                    .database_with_options(
                        &config.database,
                        DatabaseOptions::builder()
                            .write_concern(WriteConcern::majority())
                            .read_concern(ReadConcern::majority())
                            .build(),
                    )
                    .collection(&config.collection),
                key: pipeline.to_string(),
            }),
        }
    }

    fn fail(&self, message: String) -> Error {
        let (CheckpointStore::NatsKv { key, .. } | CheckpointStore::Mongo { key, .. }) = self;
        Error::Checkpoint {
            pipeline: key.clone(),
            message,
        }
    }

    /// The saved position, if any.
    pub async fn load(&self) -> Result<Option<Position>, Error> {
        let saved: Option<Document> = match self {
            CheckpointStore::NatsKv { store, key } => {
                match store
                    .get(key.as_str())
                    .await
                    .map_err(|err| self.fail(format!("cannot read key '{key}': {err}")))?
                {
                    None => None,
                    Some(bytes) => {
                        let value: serde_json::Value =
                            serde_json::from_slice(&bytes).map_err(|err| {
                                self.fail(format!(
                                    "key '{key}' does not hold a tidegate checkpoint: {err}"
                                ))
                            })?;
                        match Bson::try_from(value) {
                            Ok(Bson::Document(doc)) => Some(doc),
                            _ => {
                                return Err(self.fail(format!(
                                    "key '{key}' does not hold a tidegate checkpoint document"
                                )))
                            }
                        }
                    }
                }
            }
            CheckpointStore::Mongo { collection, key } => collection
                .find_one(doc! { "_id": key.as_str() })
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
        Ok(Some(Position { token, last_msg_id }))
    }

    /// Saves a position.
    pub async fn save(&self, position: &Position) -> Result<(), Error> {
        let token = bson::serialize_to_bson(&position.token)
            .map_err(|err| self.fail(format!("cannot encode token: {err}")))?;
        let mut record = doc! {
            "token": token,
            "savedAt": bson::DateTime::now(),
        };
        if let Some(id) = &position.last_msg_id {
            record.insert("lastMsgId", id.as_str());
        }
        match self {
            CheckpointStore::NatsKv { store, key } => {
                let bytes = serde_json::to_vec(&Bson::Document(record).into_canonical_extjson())
                    .map_err(|err| self.fail(format!("cannot encode checkpoint: {err}")))?;
                store
                    .put(key.as_str(), bytes.into())
                    .await
                    .map_err(|err| self.fail(format!("cannot write key '{key}': {err}")))?;
            }
            CheckpointStore::Mongo { collection, key } => {
                collection
                    .replace_one(doc! { "_id": key.as_str() }, record)
                    .upsert(true)
                    .await
                    .map_err(|err| self.fail(format!("cannot write checkpoint '{key}': {err}")))?;
            }
        }
        Ok(())
    }
}
