//! Removing a tenant together with its data (`DELETE /v1/tenants/<id>?purge=true`): its
//! stream (messages and dead letters), its checkpoint, and the plugin components no other
//! tenant uses.
//!
//! The record is first marked suspended, so every instance stops the tenant's unit; the
//! data goes once this instance has stopped it, and the record last, so a purge that fails
//! half-way can be asked for again. An instance elsewhere that still drains the unit can
//! neither move the deleted checkpoint (its compare-and-set fails) nor publish into the
//! deleted stream (JetStream has no stream for its subjects any more).

use std::time::Duration;

use async_nats::jetstream::{self, context::DeleteStreamErrorKind};
use serde_json::json;

use super::Admin;
use crate::config::PipelineConfig;
use crate::ops::metrics::{self, State};

/// What was deleted, as the API answers it.
pub(super) async fn tenant(
    admin: &Admin,
    id: &str,
    unit: &PipelineConfig,
    components: Vec<String>,
) -> Result<serde_json::Value, String> {
    stopped_here(id, unit).await?;
    let stream = &unit.sink.stream;
    let stream_deleted = match unit.sink.shared_prefix {
        // A stream the pipeline's tenants share stays: only the tenant's subjects go.
        Some(_) => purge_subjects(admin, stream, &unit.sink.subject_prefix).await?,
        None => match admin.js.delete_stream(stream).await {
            Ok(_) => true,
            Err(err)
                if matches!(err.kind(), DeleteStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                false
            }
            Err(err) => return Err(format!("cannot delete stream '{stream}': {err}")),
        },
    };
    crate::checkpoint::forget(&unit.checkpoint, id, &admin.js, &unit.mongodb_uri)
        .await
        .map_err(|err| err.to_string())?;
    let deleted = admin.store.delete_unused(components, Some(id)).await?;
    Ok(json!({
        "stream": stream_deleted.then_some(stream),
        "checkpoint": true,
        "components": deleted,
    }))
}

/// Purges the messages under `<prefix>.>` from the shared `stream`; whether it exists.
async fn purge_subjects(admin: &Admin, stream: &str, prefix: &str) -> Result<bool, String> {
    let handle = match admin.js.get_stream_no_info(stream).await {
        Ok(handle) => handle,
        Err(err) if crate::sink::is_stream_not_found(&err) => return Ok(false),
        Err(err) => return Err(format!("cannot open stream '{stream}': {err}")),
    };
    handle
        .purge()
        .filter(format!("{prefix}.>"))
        .await
        .map_err(|err| format!("cannot purge '{prefix}.>' from stream '{stream}': {err}"))?;
    Ok(true)
}

/// Waits until this instance no longer runs unit `id` (its metrics series is forgotten
/// when it has stopped), for at most its shutdown timeout and a margin.
async fn stopped_here(id: &str, unit: &PipelineConfig) -> Result<(), String> {
    let ceiling = Duration::from_secs(unit.shutdown_timeout_secs + 30);
    let running = || {
        metrics::registry()
            .all()
            .iter()
            .any(|s| s.unit_id() == id && s.state() != State::Stopped)
    };
    let waited = tokio::time::timeout(ceiling, async {
        while running() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    waited.map_err(|_| {
        format!(
            "tenant '{id}' is suspended but its unit has not stopped after {} s; nothing was \
             deleted: ask for the removal again",
            ceiling.as_secs()
        )
    })
}
