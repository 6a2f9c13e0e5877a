//! The NATS KV store: one key per pipeline in a bucket, records as canonical extended JSON,
//! writes fenced by compare-and-set on the key's revision.

use std::sync::atomic::Ordering;

use async_nats::jetstream::{self, kv};
use bson::{Bson, Document};

use super::CheckpointStore;
use crate::config::CheckpointConfig;
use crate::error::Error;
use crate::model::Position;

/// Opens the configured bucket, creating it if needed.
pub(super) async fn open(
    config: &CheckpointConfig,
    js: &jetstream::Context,
    fail: impl Fn(String) -> Error,
) -> Result<kv::Store, Error> {
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
    Ok(store)
}

impl CheckpointStore {
    /// Reads the record and claims it for this store's writes (see the module docs).
    pub(super) async fn claim_kv(&self, store: &kv::Store) -> Result<Option<Document>, Error> {
        let key = self.key.as_str();
        // A rival may write between our read and our claim: read again then. Only a
        // deposed owner can be writing, and its fence ends within a lease's time.
        let mut attempts = 0;
        loop {
            let entry = store
                .entry(key)
                .await
                .map_err(|err| self.fail(format!("cannot read key '{key}': {err}")))?
                .filter(|e| e.operation == kv::Operation::Put);
            let Some(entry) = entry else { return Ok(None) };
            let mut saved = self.decode(&entry.value)?;
            saved.insert("writer", self.writer.as_str());
            match store
                .update(key, self.encode(&saved)?, entry.revision)
                .await
            {
                Ok(revision) => {
                    self.revision.store(revision, Ordering::Release);
                    return Ok(Some(saved));
                }
                Err(err) if attempts < 20 => {
                    attempts += 1;
                    tracing::debug!(pipeline = %key, error = %err, "checkpoint claim raced; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(err) => return Err(self.fail(format!("cannot claim key '{key}': {err}"))),
            }
        }
    }

    /// Writes `record` if the key is still this store's; tells a lost reply to our own write
    /// from a rival's write by the record's writer.
    pub(super) async fn save_kv(
        &self,
        store: &kv::Store,
        position: &Position,
        record: &Document,
    ) -> Result<(), Error> {
        let key = self.key.as_str();
        let bytes = self.encode(record)?;
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

    /// The record a key holds, as a document.
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

    fn is_ours(&self, bytes: &[u8]) -> bool {
        self.decode(bytes)
            .is_ok_and(|doc| doc.get_str("writer").ok() == Some(self.writer.as_str()))
    }
}
