//! How close each pipeline's position is to the oldest entry MongoDB's oplog still holds.
//!
//! If the position falls out of the oplog, the change stream cannot resume
//! (`ChangeStreamHistoryLost`) and events are lost. This task reads the oplog's oldest and
//! newest entries now and then and records the headroom (position − oldest) and the window
//! (newest − oldest) in the pipeline's metrics; `/readyz` reports a pipeline whose headroom is
//! under a tenth of the window. Where the oplog cannot be read (a sharded cluster through
//! mongos, a user without read access to `local`), nothing is recorded.

use std::time::Duration;

use bson::{doc, Document};
use tokio::sync::watch;

use crate::config::PipelineConfig;

/// How often the oplog's ends are read.
const EVERY: Duration = Duration::from_secs(10);

/// Records the oplog headroom of `pipeline` until `shutdown`.
pub async fn watch_headroom(pipeline: PipelineConfig, mut shutdown: watch::Receiver<bool>) {
    let metrics = crate::metrics::pipeline(&pipeline.id);
    let client = match crate::security::mongo_client(&pipeline.mongodb_uri).await {
        Ok(client) => client,
        Err(_) => return, // the pipeline itself reports a bad URI
    };
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let mut said = false;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), EVERY);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match ends(&oplog).await {
            Ok((oldest, newest)) => metrics.set_oplog(oldest, newest),
            Err(err) if !said => {
                said = true;
                tracing::info!(pipeline = %pipeline.id, error = %err, "cannot read the oplog's ends; no oplog headroom metric");
            }
            Err(_) => {}
        }
    }
}

/// Unix seconds of the oplog's oldest and newest entries.
async fn ends(oplog: &mongodb::Collection<Document>) -> Result<(i64, i64), String> {
    let at = |order: i32| async move {
        let entry = oplog
            .find_one(doc! {})
            .sort(doc! { "$natural": order })
            .projection(doc! { "ts": 1 })
            .await
            .map_err(|err| err.to_string())?
            .ok_or("the oplog is empty")?;
        entry
            .get_timestamp("ts")
            .map(|ts| i64::from(ts.time))
            .map_err(|err| err.to_string())
    };
    Ok((at(1).await?, at(-1).await?))
}
