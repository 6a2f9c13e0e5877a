//! How close each pipeline's position is to the oldest entry MongoDB's oplog still holds.
//!
//! If the position falls out of the oplog, the change stream cannot resume
//! (`ChangeStreamHistoryLost`) and events are lost. This task reads the oplog's oldest and
//! newest entries now and then and records the headroom (position − oldest) and the window
//! (newest − oldest) in the pipeline's metrics; `/readyz` reports a pipeline whose headroom is
//! under a tenth of the window. It also warns in the log well before the position falls
//! out: past half of the window a warning, past 80 % an error. Where the oplog cannot be read
//! (a sharded cluster through mongos, a user without read access to `local`), nothing is
//! recorded.

use std::time::Duration;

use bson::{doc, Document, Timestamp};
use tokio::sync::watch;

use crate::config::PipelineConfig;

/// Records the oplog headroom of `pipeline` until `shutdown`.
pub async fn watch_headroom(pipeline: PipelineConfig, mut shutdown: watch::Receiver<bool>) {
    let metrics = crate::metrics::pipeline(&pipeline.id);
    let client = match crate::security::mongo_client(&pipeline.mongodb_uri).await {
        Ok(client) => client,
        Err(_) => return, // the pipeline itself reports a bad URI
    };
    let every = Duration::from_millis(pipeline.checkpoint.oplog_check_interval_ms);
    let mut said = false;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), every);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match ends(&client).await {
            Ok((oldest, newest)) => {
                metrics.set_oplog(i64::from(oldest.time), i64::from(newest.time));
                warn_if_near_the_edge(&pipeline.id, &metrics);
            }
            Err(err) if !said => {
                said = true;
                tracing::info!(pipeline = %pipeline.id, error = %err, "cannot read the oplog's ends; no oplog headroom metric");
            }
            Err(_) => {}
        }
    }
}

/// Logs a warning when the acknowledged position has used half of the oplog's window, an
/// error past 80 %, with both figures.
fn warn_if_near_the_edge(pipeline: &str, metrics: &crate::metrics::PipelineMetrics) {
    let (Some(headroom), Some(window)) = (
        metrics.oplog_headroom_seconds(),
        metrics.oplog_window_seconds(),
    ) else {
        return;
    };
    if window <= 0 {
        return;
    }
    let age = window - headroom;
    let used = age as f64 / window as f64;
    if used >= 0.8 {
        tracing::error!(
            pipeline,
            checkpoint_age_s = age,
            oplog_window_s = window,
            "the checkpoint is close to falling out of the oplog; catch up or enlarge the oplog"
        );
    } else if used >= 0.5 {
        tracing::warn!(
            pipeline,
            checkpoint_age_s = age,
            oplog_window_s = window,
            "the checkpoint is past half of the oplog's window"
        );
    }
}

/// The times of the oplog's oldest and newest entries.
pub async fn ends(client: &mongodb::Client) -> Result<(Timestamp, Timestamp), String> {
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let oplog = &oplog;
    let at = |order: i32| async move {
        let entry = oplog
            .find_one(doc! {})
            .sort(doc! { "$natural": order })
            .projection(doc! { "ts": 1 })
            .await
            .map_err(|err| err.to_string())?
            .ok_or("the oplog is empty")?;
        entry.get_timestamp("ts").map_err(|err| err.to_string())
    };
    Ok((at(1).await?, at(-1).await?))
}
