//! Heartbeat writes: a quiet pipeline still sees an event in its stream now and then, so its
//! position (and checkpoint) keeps moving and never ages out of the oplog.

use std::time::Duration;

use bson::{doc, Document};

use crate::config::PipelineConfig;

/// Updates this unit's document in `heartbeat_collection` every `heartbeat_write_ms`, so
/// that the change stream always has an event to move its position with. Runs until
/// aborted; a failed write is retried at the next tick.
pub async fn write_heartbeats(client: mongodb::Client, pipeline: PipelineConfig) {
    let Some((db, coll)) = pipeline
        .heartbeat_collection
        .as_deref()
        .and_then(|c| c.split_once('.'))
    else {
        return;
    };
    let heartbeats = client.database(db).collection::<Document>(coll);
    let mut tick = tokio::time::interval(Duration::from_millis(pipeline.heartbeat_write_ms));
    let mut failing = false;
    loop {
        tick.tick().await;
        let written = heartbeats
            .update_one(
                doc! { "_id": &pipeline.id },
                doc! { "$set": { "at": bson::DateTime::now() } },
            )
            .upsert(true)
            .await;
        match written {
            Ok(_) => failing = false,
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(pipeline = %pipeline.id, error = %err, "cannot write the heartbeat document; retrying");
            }
            Err(_) => {}
        }
    }
}
