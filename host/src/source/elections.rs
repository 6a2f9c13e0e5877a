//! Logging elections: reads and checkpoint writes stall while a replica set has no primary,
//! and without a line saying so the stall looks like a tidegate hang.

use std::time::Instant;

use mongodb::event::sdam::{SdamEvent, TopologyDescription, TopologyType};
use mongodb::options::ServerAddress;
use mongodb::ServerType;

/// A driver topology listener that logs every election the client sees. Either the
/// deployment loses its primary (a warning: an election, a step-down, the primary
/// unreachable) and gets one again (with how long it had none), once each; or the primary
/// moves from one member to another with no gap in between (after a primary is killed, the
/// driver can hear of the new one before it notices the old one is gone): a warning naming
/// both. Writes and change streams wait for the primary, or follow it.
pub fn log_elections(pipeline: &str) -> mongodb::event::EventHandler<SdamEvent> {
    let pipeline = pipeline.to_string();
    let lost_at = std::sync::Mutex::new(None::<Instant>);
    mongodb::event::EventHandler::callback(move |event: SdamEvent| {
        let SdamEvent::TopologyDescriptionChanged(change) = event else {
            return;
        };
        let new = &change.new_description;
        let Ok(mut lost_at) = lost_at.lock() else {
            return;
        };
        // The client's own shutdown also ends in an `Unknown` topology: not an election.
        let closing = new.topology_type() == TopologyType::Unknown;
        let before = writer(&change.previous_description);
        match what_changed(before, writer(new), lost_at.is_some(), closing) {
            Change::Lost => {
                *lost_at = Some(Instant::now());
                tracing::warn!(
                    pipeline = %pipeline,
                    "MongoDB has no primary (election, step-down or primary unreachable); \
                     reading and checkpointing wait for one"
                );
            }
            Change::Regained(now) => {
                let since = lost_at.take().unwrap_or_else(Instant::now);
                tracing::info!(
                    pipeline = %pipeline,
                    primary = %now,
                    without_primary_ms = since.elapsed().as_millis() as u64,
                    "MongoDB has a primary again after {:.1} s",
                    since.elapsed().as_secs_f64()
                );
            }
            Change::Moved { before, after } => {
                tracing::warn!(
                    pipeline = %pipeline,
                    previous_primary = %before,
                    primary = %after,
                    "MongoDB's primary moved from {before} to {after} (an election, with no \
                     gap the driver saw); reading and checkpointing follow it"
                );
            }
            Change::Nothing => {}
        }
    })
}

/// What a topology change means for the log.
#[derive(Debug, PartialEq)]
enum Change {
    /// Writes had somewhere to go and now have none.
    Lost,
    /// Writes have somewhere to go again, after a loss that was logged.
    Regained(Writer),
    /// The primary is another member, with no gap between.
    Moved { before: Writer, after: Writer },
    /// Nothing to tell: the same writer, the first discovery, a shutdown.
    Nothing,
}

/// The change from writer `before` to `after`; `lost` is whether a loss was logged and not
/// yet its end, `closing` whether the client is shutting down (its topology goes `Unknown`).
fn what_changed(
    before: Option<Writer>,
    after: Option<Writer>,
    lost: bool,
    closing: bool,
) -> Change {
    match (before, after) {
        (Some(_), None) if !lost && !closing => Change::Lost,
        (None, Some(now)) if lost => Change::Regained(now),
        (Some(before), Some(after)) if before != after => Change::Moved { before, after },
        _ => Change::Nothing,
    }
}

/// Where writes go in a topology.
#[derive(Debug, PartialEq)]
enum Writer {
    /// A replica set's primary.
    Primary(ServerAddress),
    /// A sharded cluster's routers, a single server or a load balancer.
    Other,
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Writer::Primary(address) => address.fmt(f),
            Writer::Other => f.write_str("(not a replica set)"),
        }
    }
}

/// Where writes can go in `topology`, if anywhere. A replica set's is read off its members
/// (the one that is primary), not off the topology's type: the driver was seen to keep the
/// type "with primary" while every member it knew of had stepped down to secondary.
fn writer(topology: &TopologyDescription) -> Option<Writer> {
    match topology.topology_type() {
        TopologyType::ReplicaSetWithPrimary | TopologyType::ReplicaSetNoPrimary => {
            let mut primaries = topology
                .servers()
                .into_iter()
                .filter(|(_, server)| server.server_type() == ServerType::RsPrimary)
                .map(|(address, _)| address.clone());
            let primary = primaries.next()?;
            // Two members both primary (the old one not yet seen to step down): the driver
            // will settle on one; no writer to name until it does.
            primaries
                .next()
                .is_none()
                .then_some(Writer::Primary(primary))
        }
        _ if topology.has_writable_server() => Some(Writer::Other),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary_at(port: u16) -> Writer {
        Writer::Primary(ServerAddress::Tcp {
            host: "127.0.0.1".into(),
            port: Some(port),
        })
    }

    fn primary(port: u16) -> Option<Writer> {
        Some(primary_at(port))
    }

    #[test]
    fn every_election_is_told_once_whichever_way_the_driver_sees_it() {
        // A step-down: the primary gone, then another one.
        assert_eq!(what_changed(primary(1), None, false, false), Change::Lost);
        assert_eq!(what_changed(None, None, true, false), Change::Nothing);
        assert_eq!(
            what_changed(None, primary(2), true, false),
            Change::Regained(primary_at(2))
        );
        // A killed primary whose successor the driver heard of first.
        assert!(matches!(
            what_changed(primary(2), primary(3), false, false),
            Change::Moved { .. }
        ));
        // Nothing else is an election: the same primary, the first discovery, a shutdown,
        // a sharded cluster's routers.
        assert_eq!(
            what_changed(primary(3), primary(3), false, false),
            Change::Nothing
        );
        assert_eq!(
            what_changed(None, primary(1), false, false),
            Change::Nothing
        );
        assert_eq!(what_changed(primary(1), None, false, true), Change::Nothing);
        assert_eq!(
            what_changed(Some(Writer::Other), Some(Writer::Other), false, false),
            Change::Nothing
        );
    }
}
