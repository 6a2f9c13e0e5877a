//! The MongoDB store: one document per pipeline (`_id` = pipeline id), writes fenced by a
//! filter on the record's `writer`.

use bson::{doc, Document};
use mongodb::options::{DatabaseOptions, ReadConcern, WriteConcern};

use super::CheckpointStore;
use crate::config::CheckpointConfig;
use crate::error::Error;
use crate::model::Position;

/// The configured collection. Majority writes: a checkpoint that a failover could roll back
/// would let the position go backwards (replaying is harmless; it is just wasted work).
pub(super) fn collection(
    config: &CheckpointConfig,
    mongo: &mongodb::Client,
) -> mongodb::Collection<Document> {
    mongo
        .database_with_options(
            &config.database,
            DatabaseOptions::builder()
                .write_concern(WriteConcern::majority())
                .read_concern(ReadConcern::majority())
                .build(),
        )
        .collection(&config.collection)
}

impl CheckpointStore {
    /// Reads the record and claims it for this store's writes (see the module docs).
    pub(super) async fn claim_mongo(
        &self,
        collection: &mongodb::Collection<Document>,
    ) -> Result<Option<Document>, Error> {
        let key = self.key.as_str();
        collection
            .find_one_and_update(
                doc! { "_id": key },
                doc! { "$set": { "writer": self.writer.as_str() } },
            )
            .await
            .map_err(|err| self.fail(format!("cannot read checkpoint '{key}': {err}")))
    }

    /// Writes `record` if the document is still this store's.
    pub(super) async fn save_mongo(
        &self,
        collection: &mongodb::Collection<Document>,
        position: &Position,
        record: Document,
    ) -> Result<(), Error> {
        let key = self.key.as_str();
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

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(
        err.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == 11000
    )
}
