//! Where a run starts, decided before anything is published: the checkpoint, or else a start
//! resolved now and saved first; and the stream's own last message of this unit as a floor.

use tokio::sync::watch;

use crate::checkpoint::CheckpointStore;
use crate::config::PipelineConfig;
use crate::error::Error;
use crate::model::Position;
use crate::sink::Floor;
use crate::source;

/// Where a run starts: the position to resume after (saved before anything is published),
/// or without one, the cluster time to open at; and the stream's tail as a floor.
pub(super) struct Start {
    pub(super) position: Option<Position>,
    pub(super) floor: Option<Floor>,
    pub(super) at_time: Option<bson::Timestamp>,
}

/// Decides where the unit starts, from its checkpoint and the stream's last message `tail`:
/// after the later of the two. Without either, the start is resolved now and saved before
/// anything is published, so that a crash at any moment restarts from the same place.
/// `None` when shut down meanwhile.
pub(super) async fn resolve_start(
    mongo: &mongodb::Client,
    pipeline: &PipelineConfig,
    checkpoints: &CheckpointStore,
    checkpoint: Option<Position>,
    tail: &Option<String>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Start>, Error> {
    let id = pipeline.id.as_str();
    let floor = tail.as_deref().and_then(|tail| Floor::parse(id, tail));
    if tail.is_some() && floor.is_none() {
        tracing::warn!(pipeline = id, tail = ?tail, "the stream's last message under this unit's subjects is not this unit's; ordering continues from it");
    }
    if let Some(position) = checkpoint {
        let floor = floor.filter(|f| f.lies_after(&position.token));
        match &floor {
            Some(floor) => tracing::info!(
                pipeline = id,
                tail = %floor.msg_id(),
                checkpoint = ?position.last_msg_id,
                "resuming after checkpoint; the stream holds messages past it, which are not published again"
            ),
            None => tracing::info!(pipeline = id, "resuming after checkpoint"),
        }
        if let Some(new) =
            source::first_position(mongo, pipeline, Some(&position), shutdown).await?
        {
            return save_start(checkpoints, pipeline, new, floor)
                .await
                .map(Some);
        }
        return Ok(Some(Start {
            position: Some(position),
            floor,
            at_time: None,
        }));
    }
    // No checkpoint, but the stream holds this unit's messages (the checkpoint was deleted,
    // or written by a version that published first): the tail is the position.
    if let Some((floor, time)) = floor.as_ref().and_then(|f| Some((f.clone(), f.time()?))) {
        tracing::warn!(
            pipeline = id,
            tail = %floor.msg_id(),
            "no checkpoint, but the stream holds this unit's messages: continuing from its last one"
        );
        return Ok(Some(Start {
            position: None,
            floor: Some(floor),
            at_time: Some(time),
        }));
    }
    if let Some(floor) = &floor {
        tracing::warn!(pipeline = id, tail = %floor.msg_id(), "no checkpoint; the stream's last message (a snapshot read) gives no position to continue from: starting afresh");
    }
    match source::first_position(mongo, pipeline, None, shutdown).await? {
        Some(position) => save_start(checkpoints, pipeline, position, floor)
            .await
            .map(Some),
        None if *shutdown.borrow() => Ok(None),
        // An explicit start (`start_at` time, `start_after_token`) is the same on every
        // restart: nothing to save.
        None => {
            tracing::info!(
                pipeline = id,
                "no checkpoint: starting at the configured position"
            );
            Ok(Some(Start {
                position: None,
                floor,
                at_time: None,
            }))
        }
    }
}

/// Saves a newly resolved start before anything is published.
async fn save_start(
    checkpoints: &CheckpointStore,
    pipeline: &PipelineConfig,
    position: Position,
    floor: Option<Floor>,
) -> Result<Start, Error> {
    checkpoints.save(&position).await?;
    tracing::info!(
        pipeline = %pipeline.id,
        snapshot = position.snapshot.is_some(),
        "start position saved before publishing"
    );
    Ok(Start {
        position: Some(position),
        floor,
        at_time: None,
    })
}
