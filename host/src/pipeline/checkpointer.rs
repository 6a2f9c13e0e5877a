//! The pipeline's checkpoint writer, a task beside the publishing loop.

use std::sync::Arc;

use tokio::sync::watch;

use crate::checkpoint::CheckpointStore;
use crate::error::Error;
use crate::model::Position;

/// Writes checkpoints in a task of its own, off the publishing loop: a checkpoint store that
/// hangs (NATS away) must not stop acknowledgements from being settled or the drain from
/// ending. The loop posts the acknowledged position; the saver writes the newest one, retrying
/// failures, and after the loop drops its sender makes one last attempt and ends.
pub(super) struct CheckpointSaver;

impl CheckpointSaver {
    pub(super) fn spawn(
        store: Arc<CheckpointStore>,
        saved: Option<Position>,
    ) -> (watch::Sender<Option<Position>>, tokio::task::JoinHandle<()>) {
        let (positions, mut wanted) = watch::channel(saved.clone());
        let task = tokio::spawn(async move {
            let mut saved = saved;
            let mut failing = false;
            loop {
                let closed = wanted.changed().await.is_err();
                let position = wanted.borrow_and_update().clone();
                if let Some(position) = position.filter(|p| saved.as_ref() != Some(p)) {
                    match store.save(&position).await {
                        Ok(()) => {
                            if failing {
                                tracing::info!(pipeline = %store.pipeline(), "checkpoint saved again");
                            }
                            failing = false;
                            saved = Some(position);
                        }
                        // Deposed: the pipeline is stopping (the lease keeper logs why).
                        Err(Error::Fenced { .. }) => return,
                        // The position is kept and saved with the next one; a crash meanwhile
                        // only replays events already stored, which the stream's tail skips.
                        Err(err) => {
                            crate::ops::metrics::pipeline(store.pipeline())
                                .set_error(&err.to_string());
                            if !failing {
                                tracing::warn!(pipeline = %store.pipeline(), error = %err, "checkpoint not saved; will retry");
                            }
                            failing = true;
                        }
                    }
                }
                if closed {
                    return;
                }
            }
        });
        (positions, task)
    }
}
