//! The pipeline's checkpoint writer, a task beside the publishing loop.

use std::sync::Arc;

use tokio::sync::watch;

use crate::checkpoint::pace::WritePace;
use crate::checkpoint::CheckpointStore;
use crate::error::Error;
use crate::model::Position;

/// Writes checkpoints in a task of its own, off the publishing loop: a checkpoint store that
/// hangs (NATS away) must not stop acknowledgements from being settled or the drain from
/// ending. The loop posts the acknowledged position; the saver waits for its slot in the
/// pipeline's write pace (shared by its tenants), then writes the newest one, retrying
/// failures. After the loop drops its sender it makes one last attempt at once, whatever
/// the pace, and ends.
pub(super) struct CheckpointSaver;

impl CheckpointSaver {
    pub(super) fn spawn(
        store: Arc<CheckpointStore>,
        saved: Option<Position>,
        pace: Arc<WritePace>,
    ) -> (watch::Sender<Option<Position>>, tokio::task::JoinHandle<()>) {
        let (positions, mut wanted) = watch::channel(saved.clone());
        let task = tokio::spawn(async move {
            let mut saved = saved;
            let mut failing = false;
            loop {
                let mut closed = wanted.changed().await.is_err();
                if !closed {
                    closed = wait_for_slot(&pace, &mut wanted).await;
                }
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

/// Waits for this unit's next slot in `pace`, taking in the positions posted meanwhile (the
/// newest is written when the slot comes). Returns early, with `true`, when the loop has
/// dropped its sender: the last position is written at once.
async fn wait_for_slot(pace: &WritePace, wanted: &mut watch::Receiver<Option<Position>>) -> bool {
    let slot = tokio::time::sleep_until(pace.reserve());
    tokio::pin!(slot);
    loop {
        tokio::select! {
            () = &mut slot => return false,
            changed = wanted.changed() => if changed.is_err() {
                return true;
            },
        }
    }
}
