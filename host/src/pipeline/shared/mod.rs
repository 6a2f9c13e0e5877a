//! One change stream per tenanted pipeline, shared by its tenants.
//!
//! ```text
//!                       ┌─ router ─▶ lane ─▶ tenant a: chain ▶ framer ▶ publisher ▶ checkpoint
//!  MongoDB ─▶ reader ───┼─ router ─▶ lane ─▶ tenant b: …
//!  (one client,         └─ (by namespace or tenant key, O(1) per event)
//!   one change stream)       tenant c, detached: its own stream from its own position ─▶ …
//! ```
//!
//! A pipeline with `[[pipeline.tenant]]`s and `tenant_reader = "shared"` (the default) has
//! one [`SharedReader`]: one MongoDB client and one change stream over the pipeline's whole
//! scope, opened at "now" (it keeps no position of its own), and a router (`route.rs`) that
//! hands each event to the tenants it belongs to. Everything below the source stays per
//! tenant: plugins, stream and subjects, dead letters, checkpoint.
//!
//! Each tenant unit's source is a lane (`lane.rs`): it starts *detached*, reading its own
//! change stream (narrowed on the server to its namespaces and key values) from its own
//! checkpoint, and joins the shared reader once it has caught up, with nothing lost or
//! repeated at the hand-over. Attached, the lane steps aside: the tenant's chain stage reads
//! the router's channel itself (`pipeline::inlet`) until the router detaches the tenant.
//! Lanes are counted in events and bytes (`channel.rs`), and the router routes what the
//! reader has queued in one pass, so each tenant gets one share of several events per pass;
//! it takes the reader's next batch only while the lanes together hold less than a bound (the
//! process as a whole behind: the shared stream waits). The
//! router never waits for a tenant while another could be kept waiting: when a tenant's lane
//! is full (slow plugins, its stream unavailable, a halted or held chain) while another
//! attached tenant keeps up, the tenant is detached and catches up alone again (when nobody
//! keeps up, the only tenant attached or every tenant behind, it is waited for instead: see
//! `route.rs`); at most `pipeline.tenant_catch_up_streams` tenants
//! at once, the others waiting detached for a turn. So a restart replays only each tenant's own
//! backlog, and a slow tenant never stalls the others.
//!
//! Readers live in a registry keyed by pipeline id (and MongoDB URI): the first tenant unit
//! that runs starts its pipeline's reader, the last one to stop ends it. Adding a tenant to a
//! running pipeline is running its unit ([`crate::pipeline::run`]); removing it is stopping
//! the unit.

mod channel;
mod lane;
mod route;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use mongodb::change_stream::event::ResumeToken;
use tokio::sync::{mpsc, watch};

use super::AbortOnDrop;
use crate::config::{HistoryLostPolicy, PipelineConfig, SnapshotMode, TenantKey, TenantReader};
use crate::error::Error;
use crate::source;
use route::{Command, Router};

#[cfg(test)]
pub(crate) use channel::lane_channel;
pub(crate) use channel::LaneReceiver;
pub(crate) use lane::run as read_lane;

/// Batches read ahead of the router.
const READER_QUEUE_BATCHES: usize = 16;

/// One pipeline's shared change stream and router; dropped (and stopped) with its last
/// tenant unit.
pub(crate) struct SharedReader {
    client: mongodb::Client,
    commands: mpsc::UnboundedSender<Command>,
    /// The token of the last item the router routed.
    position: watch::Receiver<Option<ResumeToken>>,
    /// Permits to read a change stream of one's own, catching up
    /// (`pipeline.tenant_catch_up_streams`); a tenant without one waits detached.
    catch_up: Arc<tokio::sync::Semaphore>,
    /// The pipeline's id: its series carries the catch-up gauges.
    id: String,
    _tasks: [AbortOnDrop; 3],
}

impl SharedReader {
    /// The MongoDB client every tenant unit of the pipeline uses.
    pub(crate) fn client(&self) -> &mongodb::Client {
        &self.client
    }
}

/// The running readers, by (pipeline id, MongoDB URI).
type Registry = tokio::sync::Mutex<HashMap<(String, String), Weak<SharedReader>>>;

fn registry() -> &'static Registry {
    static READERS: OnceLock<Registry> = OnceLock::new();
    READERS.get_or_init(Registry::default)
}

/// The shared reader of tenant unit `unit`'s pipeline, started on first use; `None` for a
/// unit that reads on its own (not a tenant, or `tenant_reader = "own"`).
pub(crate) async fn reader_for(unit: &PipelineConfig) -> Result<Option<Arc<SharedReader>>, Error> {
    let Some(tenant) = &unit.tenant else {
        return Ok(None);
    };
    if unit.tenant_reader != TenantReader::Shared {
        return Ok(None);
    }
    let key = (tenant.pipeline.clone(), unit.mongodb_uri.clone());
    let mut readers = registry().lock().await;
    if let Some(reader) = readers.get(&key).and_then(Weak::upgrade) {
        return Ok(Some(reader));
    }
    let reader = Arc::new(start(unit, &tenant.pipeline).await?);
    readers.retain(|_, reader| reader.strong_count() > 0);
    readers.insert(key, Arc::downgrade(&reader));
    Ok(Some(reader))
}

/// Starts pipeline `id`'s reader, configured as tenant unit `unit`'s pipeline.
async fn start(unit: &PipelineConfig, id: &str) -> Result<SharedReader, Error> {
    let topology = source::log_elections(id);
    let client = crate::security::mongo_client_watched(&unit.mongodb_uri, Some(topology))
        .await
        .map_err(|err| Error::Source {
            pipeline: unit.id.clone(),
            message: format!("invalid MongoDB URI: {err}"),
        })?;
    let config = reader_config(unit, id);
    let key = unit
        .tenant_key
        .as_deref()
        .and_then(|key| TenantKey::parse(key).ok());
    let (batches_tx, batches) = mpsc::channel(READER_QUEUE_BATCHES);
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (position_tx, position) = watch::channel(None);
    // Dropped with the reader, which stops the stream.
    let (_stop, stop) = watch::channel(false);
    let reading = {
        let (client, config) = (client.clone(), config.clone());
        tokio::spawn(async move {
            let _stop = _stop;
            let id = config.id.clone();
            if let Err(err) = source::run(client, config, None, None, batches_tx, stop).await {
                tracing::error!(pipeline = %id, error = %err, "the shared change stream stopped; each tenant reads on alone");
            }
        })
    };
    let router = Router::new(id, key).lane_events(unit.tenant_lane_events);
    let routing = tokio::spawn(router.run(batches, commands_rx, position_tx));
    let heartbeats = tokio::spawn(source::write_heartbeats(client.clone(), config));
    tracing::info!(pipeline = %id, "shared change stream starting for the pipeline's tenants");
    Ok(SharedReader {
        client,
        commands,
        position,
        catch_up: Arc::new(tokio::sync::Semaphore::new(
            unit.tenant_catch_up_streams.max(1) as usize,
        )),
        id: id.to_string(),
        _tasks: [
            AbortOnDrop(reading),
            AbortOnDrop(routing),
            AbortOnDrop(heartbeats),
        ],
    })
}

/// The reader's own config: the pipeline's scope and stream options, no tenant narrowing
/// (a tenant added at run time needs no reopening), opened at "now", no snapshot.
fn reader_config(unit: &PipelineConfig, id: &str) -> PipelineConfig {
    PipelineConfig {
        id: id.to_string(),
        tenant: None,
        plugins: Vec::new(),
        start_at: None,
        start_after_token: None,
        snapshot: SnapshotMode::Never,
        signal_collection: None,
        // Never skip ahead or snapshot: a tenant would miss events. Failing detaches every
        // tenant, and each one's own stream applies the pipeline's policy.
        on_history_lost: HistoryLostPolicy::Fail,
        shared_reader: true,
        ..unit.clone()
    }
}
