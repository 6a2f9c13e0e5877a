//! Logging elections: reads and checkpoint writes stall while a replica set has no primary,
//! and without a line saying so the stall looks like a tidegate hang.

use std::time::Instant;

/// A driver topology listener that logs the deployment losing its primary (a warning: an
/// election, a step-down, the primary unreachable) and getting one again (with how long it
/// had none), once each. Writes and change streams wait for the primary meanwhile.
pub fn log_elections(
    pipeline: &str,
) -> mongodb::event::EventHandler<mongodb::event::sdam::SdamEvent> {
    use mongodb::event::sdam::SdamEvent;
    let pipeline = pipeline.to_string();
    let lost_at = std::sync::Mutex::new(None::<Instant>);
    mongodb::event::EventHandler::callback(move |event: SdamEvent| {
        let SdamEvent::TopologyDescriptionChanged(change) = event else {
            return;
        };
        let before = change.previous_description.has_writable_server();
        let after = change.new_description.has_writable_server();
        let Ok(mut lost_at) = lost_at.lock() else {
            return;
        };
        // The client's own shutdown also ends in an `Unknown` topology: not an election.
        let closing =
            change.new_description.topology_type() == mongodb::event::sdam::TopologyType::Unknown;
        match (before, after) {
            (true, false) if lost_at.is_none() && !closing => {
                *lost_at = Some(Instant::now());
                tracing::warn!(
                    pipeline = %pipeline,
                    topology = ?change.new_description.topology_type(),
                    "MongoDB has no primary (election, step-down or primary unreachable); \
                     reading and checkpointing wait for one"
                );
            }
            (false, true) => {
                if let Some(since) = lost_at.take() {
                    tracing::info!(
                        pipeline = %pipeline,
                        without_primary_ms = since.elapsed().as_millis() as u64,
                        "MongoDB has a primary again after {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
            }
            _ => {}
        }
    })
}
