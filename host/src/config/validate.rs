//! Checks of a parsed config that serde cannot express.

use std::collections::HashSet;

use super::pipeline::{
    parse_start_at, parse_token, NamespaceFilter, SnapshotMode, OPERATION_TYPES,
};
use super::plugins::QuarantineAction;
use super::stage::{check_split_stage, check_stage};
use super::tenants::NamespacePattern;
use super::Config;
use crate::model::subject::{is_under_prefix, is_valid_subject, SubjectTemplate};
use crate::model::Change;

impl Config {
    pub(super) fn validate(&self) -> Result<(), String> {
        self.ha.validate()?;
        self.nats.auth.validate()?;
        let urls = crate::security::parse_nats_urls(&self.nats.url)?;
        if urls.credentials.is_some() && self.nats.auth.is_configured() {
            return Err(
                "nats.url carries credentials (`user:password@` or `token@`) and \
                        [nats.auth] is set too: give them in one place only"
                    .into(),
            );
        }
        if let Some(tls) = &self.nats.tls {
            tls.validate()?;
        }
        if self.pipelines.is_empty() {
            return Err("no [[pipeline]] is configured; at least one is needed".into());
        }
        if self.sandbox.max_instances == 0 {
            return Err("sandbox.max_instances: must be at least 1".into());
        }
        let mut ids = HashSet::new();
        let mut streams = HashSet::new();
        for pipeline in &self.pipelines {
            let at = |key: &str| format!("pipeline '{}': {key}", pipeline.id);
            // A tenant unit's id is `<pipeline>.<tenant>`, both parts checked alike.
            if !pipeline.id.split('.').all(is_valid_id)
                || pipeline.id.contains('.') != pipeline.tenant.is_some()
            {
                return Err(format!(
                    "pipeline id '{}' must be non-empty and use only letters, digits, '-' and '_'",
                    pipeline.id
                ));
            }
            if !ids.insert(pipeline.id.as_str()) {
                return Err(format!("pipeline id '{}' is used twice", pipeline.id));
            }
            if !streams.insert(pipeline.sink.stream.as_str()) {
                return Err(format!(
                    "{}: stream '{}' is already used by another pipeline; each pipeline needs its own \
                     stream because ordering is enforced with Nats-Expected-Last-Msg-Id",
                    at("sink.stream"),
                    pipeline.sink.stream
                ));
            }
            if pipeline.database.is_none() && !pipeline.collections.is_empty() {
                return Err(format!(
                    "{}: collections are listed but no database is set",
                    at("collections")
                ));
            }
            let sink = &pipeline.sink;
            if !is_valid_subject(&sink.subject_prefix, false) {
                return Err(format!(
                    "{}: '{}' is not a valid NATS subject prefix (dot-separated tokens, no spaces or wildcards)",
                    at("sink.subject_prefix"),
                    sink.subject_prefix
                ));
            }
            if !sink.subject_template.starts_with("{prefix}.") {
                return Err(format!(
                    "{}: '{}' must start with '{{prefix}}.' so every subject stays in the stream",
                    at("sink.subject_template"),
                    sink.subject_template
                ));
            }
            let probe = SubjectTemplate::parse(&sink.subject_template, &sink.subject_prefix)
                .map(|template| template.render(&Change::probe()))
                .map_err(|err| {
                    format!(
                        "{}: {err} (placeholders: {{prefix}}, {{db}}, {{coll}}, {{operation}})",
                        at("sink.subject_template")
                    )
                })?;
            if !is_valid_subject(&probe, false) {
                return Err(format!(
                    "{}: '{}' does not make a valid NATS subject",
                    at("sink.subject_template"),
                    sink.subject_template
                ));
            }
            let dead_letter = pipeline.dead_letter_subject();
            if !is_valid_subject(&dead_letter, false)
                || !is_under_prefix(&dead_letter, &sink.subject_prefix)
            {
                return Err(format!(
                    "{}: '{}' must be a valid subject under '{}.'",
                    at("sink.dead_letter_subject"),
                    dead_letter,
                    sink.subject_prefix
                ));
            }
            if sink.max_in_flight == 0 {
                return Err(format!("{}: must be at least 1", at("sink.max_in_flight")));
            }
            if sink.duplicate_window_secs == 0 {
                return Err(format!(
                    "{}: must be at least 1 second: deduplication is how restarts avoid duplicates",
                    at("sink.duplicate_window_secs")
                ));
            }
            if pipeline.checkpoint.interval_ms == 0
                || pipeline.checkpoint.oplog_check_interval_ms == 0
            {
                return Err(format!(
                    "{}: must be at least 1",
                    at("checkpoint.interval_ms / oplog_check_interval_ms")
                ));
            }
            if pipeline.checkpoint.oplog_error_headroom_secs
                > pipeline.checkpoint.oplog_warn_headroom_secs
            {
                return Err(format!(
                    "{}: the error threshold ({} s) must not exceed the warning threshold ({} s)",
                    at("checkpoint.oplog_error_headroom_secs"),
                    pipeline.checkpoint.oplog_error_headroom_secs,
                    pipeline.checkpoint.oplog_warn_headroom_secs
                ));
            }
            for entry in pipeline.include.iter().chain(&pipeline.exclude) {
                NamespaceFilter::parse(entry)
                    .map_err(|e| format!("{}: {e}", at("include/exclude")))?;
            }
            for op in &pipeline.skip_operations {
                if op == "invalidate" {
                    return Err(format!(
                        "{}: invalidate cannot be skipped: it is how capture follows a dropped or renamed namespace",
                        at("skip_operations")
                    ));
                }
                if !OPERATION_TYPES.contains(&op.as_str()) {
                    return Err(format!(
                        "{}: unknown operation '{op}' (known: {})",
                        at("skip_operations"),
                        OPERATION_TYPES.join(", ")
                    ));
                }
            }
            for stage in &pipeline.stages {
                check_stage(stage).map_err(|e| format!("{}: {e}", at("stages")))?;
            }
            check_split_stage(pipeline).map_err(|e| format!("{}: {e}", at("stages")))?;
            if pipeline.snapshot != SnapshotMode::Never
                && (pipeline.start_at.as_deref().is_some_and(|s| s != "now")
                    || pipeline.start_after_token.is_some())
            {
                return Err(format!(
                    "{}: a snapshot starts capture from now; it cannot be combined with start_at \
                     or start_after_token",
                    at("snapshot")
                ));
            }
            let control = [
                ("signal_collection", &pipeline.signal_collection),
                ("heartbeat_collection", &pipeline.heartbeat_collection),
            ];
            for (key, signals) in control
                .iter()
                .filter_map(|(k, c)| c.as_ref().map(|c| (*k, c)))
            {
                // Outside the pipeline's database or collection, the stream is widened to
                // see it too (see `source::watch_level`).
                NamespacePattern::parse(signals)
                    .ok()
                    .filter(|p| p.coll.is_some())
                    .ok_or_else(|| format!("{}: '{signals}' is not 'db.collection'", at(key)))?;
            }
            if pipeline.shutdown_timeout_secs == 0 {
                return Err(format!(
                    "{}: must be at least 1",
                    at("shutdown_timeout_secs")
                ));
            }
            if pipeline.heartbeat_write_ms == 0 {
                return Err(format!("{}: must be at least 1", at("heartbeat_write_ms")));
            }
            if pipeline.snapshot_chunk_size == 0 {
                return Err(format!("{}: must be at least 1", at("snapshot_chunk_size")));
            }
            if let Some(start) = &pipeline.start_at {
                parse_start_at(start).map_err(|e| format!("{}: {e}", at("start_at")))?;
            }
            if let Some(token) = &pipeline.start_after_token {
                parse_token(token).map_err(|e| format!("{}: {e}", at("start_after_token")))?;
            }
            if pipeline.quarantine.after_failures == 0
                && pipeline.quarantine.action != QuarantineAction::DeadLetter
            {
                return Err(format!(
                    "{}: an action is set but after_failures = 0 turns quarantine off",
                    at("quarantine")
                ));
            }
            for dir in &pipeline.capabilities.read_dirs {
                if !dir.is_absolute() {
                    return Err(format!(
                        "{}: '{}' must be an absolute path",
                        at("capabilities.read_dirs"),
                        dir.display()
                    ));
                }
            }
            let mut names = HashSet::new();
            for plugin in &pipeline.plugins {
                if !is_valid_id(&plugin.name) {
                    return Err(format!(
                        "{}: plugin name '{}' must use only letters, digits, '-' and '_'",
                        at("plugins"),
                        plugin.name
                    ));
                }
                if !names.insert(plugin.name.as_str()) {
                    return Err(format!(
                        "{}: plugin '{}' appears twice; give the second a different name and a `file`",
                        at("plugins"),
                        plugin.name
                    ));
                }
                let limits = pipeline.plugin_limits(plugin);
                if limits.memory_mib == 0
                    || limits.fuel_per_call == 0
                    || limits.timeout_ms == 0
                    || limits.max_output_bytes == 0
                {
                    return Err(format!(
                        "{}: memory_mib, fuel_per_call, timeout_ms and max_output_bytes of \
                         plugin '{}' must be greater than zero",
                        at("limits"),
                        plugin.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `id` is a valid pipeline, tenant or plugin name: letters, digits, `-` and `_`.
pub(super) fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
