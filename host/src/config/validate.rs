//! Checks of a parsed config that serde cannot express, one function per section.
//!
//! Every check records its problem and carries on, so that one run of `tidegate check`
//! lists everything wrong with a file instead of one mistake per attempt. A check is
//! skipped only where an earlier problem makes it meaningless (a subject template cannot
//! be tried against an invalid prefix, say).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::pipeline::FullDocument;
use super::pipeline::{
    parse_start_at, parse_token, NamespaceFilter, PipelineConfig, SnapshotMode, TenantsFrom,
    OPERATION_TYPES,
};
use super::plugins::QuarantineAction;
use super::sink::{Encoding, Format};
use super::stage::{check_split_stage, check_stage};
use super::tenants::TenantConfig;
use super::tenants::{expand_tenants, NamespacePattern};
use super::{capture_list, plugin_config_file};
use super::{Config, NatsConfig};
use crate::model::subject::{is_under_prefix, is_valid_subject, SubjectTemplate};
use crate::model::Change;

/// The problems found so far, in the order they were found (which follows the file's).
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<String>);

impl Problems {
    /// Records a problem; its text names the key at fault.
    pub(super) fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    /// Records `result`'s problem, if it has one.
    fn check(&mut self, result: Result<(), String>) {
        if let Err(problem) = result {
            self.push(problem);
        }
    }

    /// One problem is reported as it is; several as a count, then one per line, so each
    /// can be found by its key.
    pub(super) fn into_result(self) -> Result<(), String> {
        match self.0.as_slice() {
            [] => Ok(()),
            [one] => Err(one.clone()),
            many => Err(format!("{} problems:\n  {}", many.len(), many.join("\n  "))),
        }
    }
}

/// What must be unique across every unit of the file.
#[derive(Default)]
struct Seen {
    /// Unit ids: they key checkpoints and message ids.
    ids: HashSet<String>,
    /// Stream names: ordering is enforced with `Nats-Expected-Last-Msg-Id`, one writer each.
    streams: HashSet<String>,
    /// Streams shared by a pipeline's tenants (one publisher writes each), by pipeline.
    shared_streams: HashMap<String, String>,
}

impl Config {
    /// Reads the files the config names (capture lists, plugin config files; relative to
    /// `base`), expands tenants into units (see [`expand_tenants`]) and checks the whole
    /// file, reporting every problem found at once.
    pub(super) fn expand_and_validate(&mut self, base: &Path) -> Result<(), String> {
        let mut problems = Problems::default();
        check_nats(&self.nats, &mut problems);
        if self.sandbox.cache_max_mib == 0 {
            problems.push("sandbox.cache_max_mib: must be at least 1".into());
        }
        if self.sandbox.max_instances == 0 {
            problems.push("sandbox.max_instances: must be at least 1".into());
        }
        for problem in self.ha.problems() {
            problems.push(problem);
        }
        for problem in self.admin.iter().flat_map(|a| a.problems()) {
            problems.push(problem);
        }
        if self.pipelines.is_empty() {
            problems.push("no [[pipeline]] is configured; at least one is needed".into());
        }
        let mut seen = Seen::default();
        let mut units = Vec::new();
        for mut pipeline in std::mem::take(&mut self.pipelines) {
            capture_list::load(&mut pipeline, base, &mut problems);
            if pipeline.tenants_from == TenantsFrom::Nats {
                check_template(&pipeline, self.admin.is_some(), &mut seen, &mut problems);
                self.managed.push(pipeline);
                continue;
            }
            for mut unit in expand_tenants(pipeline, &mut problems) {
                plugin_config_file::load(&mut unit, base, &mut problems);
                check_unit(&unit, &mut seen, &mut problems);
                units.push(unit);
            }
        }
        self.pipelines = units;
        problems.into_result()
    }
}

impl Config {
    /// The unit tenant `tenant` of the `tenants_from = "nats"` pipeline `pipeline` runs as,
    /// checked like a `[[pipeline.tenant]]` of the file, plus what only the admin API's
    /// tenants must obey: plugins come from the object store (`sha256`), never from files
    /// on the host, and no plugin may ask for more memory than the engine's slots hold.
    /// `streams` are the streams other units use. Every problem is reported at once.
    pub fn tenant_unit(
        &self,
        pipeline: &str,
        tenant: TenantConfig,
        streams: &HashSet<String>,
    ) -> Result<PipelineConfig, String> {
        let Some(template) = self.managed.iter().find(|p| p.id == pipeline) else {
            let known: Vec<&str> = self.managed.iter().map(|p| p.id.as_str()).collect();
            return Err(format!(
                "pipeline '{pipeline}' does not take tenants from the admin API (those that \
                 do: [{}]; they have tenants_from = \"nats\")",
                known.join(", ")
            ));
        };
        let mut problems = Problems::default();
        let mut template = template.clone();
        // The unit keeps `tenants_from = "nats"`: its plugins may name digests.
        template.tenants = vec![tenant];
        let mut units = expand_tenants(template, &mut problems);
        let Some(unit) = units.pop() else {
            problems.into_result()?;
            return Err(format!(
                "pipeline '{pipeline}': the tenant was not accepted"
            ));
        };
        // The streams the admin API's pipelines share among their tenants are theirs alone.
        let shared_streams: HashMap<String, String> = self
            .managed
            .iter()
            .filter(|p| !p.sink.stream.is_empty())
            .map(|p| (p.sink.stream.clone(), p.id.clone()))
            .collect();
        let mut seen = Seen {
            ids: self.pipelines.iter().map(|p| p.id.clone()).collect(),
            streams: streams.clone(),
            shared_streams,
        };
        seen.streams
            .extend(self.pipelines.iter().map(|p| p.sink.stream.clone()));
        seen.streams.extend(seen.shared_streams.keys().cloned());
        check_unit(&unit, &mut seen, &mut problems);
        for plugin in &unit.plugins {
            if plugin.file.is_some() || plugin.config_file.is_some() {
                problems.push(format!(
                    "{}: plugin '{}': `file` and `config_file` name files on the host; an admin \
                     API tenant's plugins come from the object store (push them) and its \
                     config is given inline",
                    at(&unit, "plugins"),
                    plugin.name
                ));
            }
            if plugin.sha256.as_deref().is_some_and(|d| {
                d.len() != 64
                    || !d
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }) {
                problems.push(format!(
                    "{}: plugin '{}': sha256 must be 64 lower-case hex digits",
                    at(&unit, "plugins"),
                    plugin.name
                ));
            }
            let memory = unit.plugin_limits(plugin).memory_mib;
            if memory > self.largest_memory_mib() {
                problems.push(format!(
                    "{}: plugin '{}': memory_mib = {memory} is more than this instance's \
                     plugin slots hold ({} MiB, the largest limit in its config file)",
                    at(&unit, "plugins"),
                    plugin.name,
                    self.largest_memory_mib()
                ));
            }
        }
        problems.into_result()?;
        Ok(unit)
    }
}

/// A `tenants_from = "nats"` pipeline: a template whose source settings its tenants inherit;
/// what belongs to a tenant (plugins, sink…) comes with each tenant, as for file tenants.
fn check_template(unit: &PipelineConfig, admin: bool, seen: &mut Seen, problems: &mut Problems) {
    if !admin {
        problems.push(format!(
            "{}: tenants from NATS are managed through the admin API: add an [admin] section",
            at(unit, "tenants_from")
        ));
    }
    if !unit.tenants.is_empty() {
        problems.push(format!(
            "{}: with tenants_from = \"nats\" tenants are added through the admin API, not \
             as [[pipeline.tenant]] tables",
            at(unit, "tenant")
        ));
    }
    if !unit.plugins.is_empty() {
        problems.push(format!(
            "pipeline '{}' has tenants: plugins belong to each tenant, not the pipeline",
            unit.id
        ));
    }
    // A `[pipeline.sink]` is the stream the tenants share (each tenant's unit is checked
    // when the admin API adds it); no other pipeline may write it.
    if !unit.sink.stream.is_empty() && !seen.streams.insert(unit.sink.stream.clone()) {
        problems.push(format!(
            "{}: stream '{}' is already used by another pipeline",
            at(unit, "sink.stream"),
            unit.sink.stream
        ));
    }
    check_identity(unit, &mut seen.ids, problems);
    check_capture(unit, problems);
    check_start(unit, problems);
    check_control(unit, problems);
    check_checkpoint(unit, problems);
}

/// `[nats]`: its auth and TLS sections, and credentials given in two places.
fn check_nats(nats: &NatsConfig, problems: &mut Problems) {
    problems.check(nats.auth.validate());
    match crate::security::parse_nats_urls(&nats.url) {
        Err(problem) => problems.push(problem),
        Ok(urls) if urls.credentials.is_some() && nats.auth.is_configured() => problems.push(
            "nats.url carries credentials (`user:password@` or `token@`) and \
                        [nats.auth] is set too: give them in one place only"
                .into(),
        ),
        Ok(_) => {}
    }
    if let Some(tls) = &nats.tls {
        problems.check(tls.validate());
    }
}

/// One unit (a pipeline, or one tenant of it), section by section in the order the keys
/// usually appear in the file.
fn check_unit(unit: &PipelineConfig, seen: &mut Seen, problems: &mut Problems) {
    check_identity(unit, &mut seen.ids, problems);
    check_capture(unit, problems);
    check_start(unit, problems);
    check_control(unit, problems);
    check_sink(unit, seen, problems);
    check_checkpoint(unit, problems);
    check_plugins(unit, problems);
    super::quota::check_quota(unit, problems);
}

/// `pipeline '<id>': <key>`, the prefix of every problem of a unit.
fn at(unit: &PipelineConfig, key: &str) -> String {
    format!("pipeline '{}': {key}", unit.id)
}

/// The unit's id and scope.
fn check_identity(unit: &PipelineConfig, ids: &mut HashSet<String>, problems: &mut Problems) {
    // A tenant unit's id is `<pipeline>.<tenant>`, both parts checked alike.
    if !unit.id.split('.').all(is_valid_id) || unit.id.contains('.') != unit.tenant.is_some() {
        problems.push(format!(
            "pipeline id '{}' must be non-empty and use only letters, digits, '-' and '_'",
            unit.id
        ));
    }
    if !ids.insert(unit.id.clone()) {
        problems.push(format!("pipeline id '{}' is used twice", unit.id));
    }
    if unit.database.is_none() && !unit.collections.is_empty() {
        problems.push(format!(
            "{}: collections are listed but no database is set",
            at(unit, "collections")
        ));
    }
}

/// What the change stream captures: namespace filters, skipped operations, user stages.
fn check_capture(unit: &PipelineConfig, problems: &mut Problems) {
    for entry in unit.include.iter().chain(&unit.exclude) {
        if let Err(e) = NamespaceFilter::parse(entry) {
            problems.push(format!("{}: {e}", at(unit, "include/exclude")));
        }
    }
    for op in &unit.skip_operations {
        if op == "invalidate" {
            problems.push(format!(
                "{}: invalidate cannot be skipped: it is how capture follows a dropped or renamed namespace",
                at(unit, "skip_operations")
            ));
        } else if !OPERATION_TYPES.contains(&op.as_str()) {
            problems.push(format!(
                "{}: unknown operation '{op}' (known: {})",
                at(unit, "skip_operations"),
                OPERATION_TYPES.join(", ")
            ));
        }
    }
    for stage in &unit.stages {
        if let Err(e) = check_stage(stage) {
            problems.push(format!("{}: {e}", at(unit, "stages")));
        }
    }
    if let Err(e) = check_split_stage(unit) {
        problems.push(format!("{}: {e}", at(unit, "stages")));
    }
}

/// Where a unit without a checkpoint starts.
fn check_start(unit: &PipelineConfig, problems: &mut Problems) {
    if unit.snapshot != SnapshotMode::Never
        && (unit.start_at.as_deref().is_some_and(|s| s != "now")
            || unit.start_after_token.is_some())
    {
        problems.push(format!(
            "{}: a snapshot starts capture from now; it cannot be combined with start_at \
             or start_after_token",
            at(unit, "snapshot")
        ));
    }
    if let Some(Err(e)) = unit.start_at.as_deref().map(parse_start_at) {
        problems.push(format!("{}: {e}", at(unit, "start_at")));
    }
    if let Some(Err(e)) = unit.start_after_token.as_deref().map(parse_token) {
        problems.push(format!("{}: {e}", at(unit, "start_after_token")));
    }
}

/// Signal and heartbeat collections, and the intervals that must not be zero.
fn check_control(unit: &PipelineConfig, problems: &mut Problems) {
    let control = [
        ("signal_collection", &unit.signal_collection),
        ("heartbeat_collection", &unit.heartbeat_collection),
    ];
    for (key, collection) in control
        .iter()
        .filter_map(|(k, c)| c.as_ref().map(|c| (*k, c)))
    {
        // Outside the pipeline's database or collection, the stream is widened to see it
        // too (see `source::open::watch_level`).
        if !NamespacePattern::parse(collection).is_ok_and(|p| p.coll.is_some()) {
            problems.push(format!(
                "{}: '{collection}' is not 'db.collection'",
                at(unit, key)
            ));
        }
    }
    let at_least_one = [
        ("shutdown_timeout_secs", unit.shutdown_timeout_secs),
        ("heartbeat_write_ms", unit.heartbeat_write_ms),
        ("snapshot_chunk_size", u64::from(unit.snapshot_chunk_size)),
    ];
    for (key, value) in at_least_one {
        if value == 0 {
            problems.push(format!("{}: must be at least 1", at(unit, key)));
        }
    }
}

/// `[pipeline.sink]`: a stream of the unit's own and subjects that stay inside it.
fn check_sink(unit: &PipelineConfig, seen: &mut Seen, problems: &mut Problems) {
    let sink = &unit.sink;
    // A tenant's sink is required by serde; a pipeline's is optional so that a pipeline
    // with tenants can go without.
    if unit.tenant.is_none() && (sink.stream.is_empty() || sink.subject_prefix.is_empty()) {
        problems.push(format!(
            "pipeline '{}': [pipeline.sink] with `stream` and `subject_prefix` is \
             required (or [[pipeline.tenant]]s, each with its own sink)",
            unit.id
        ));
        return;
    }
    let pipeline = unit.tenant.as_ref().map(|t| t.pipeline.as_str());
    let shared_by_its_pipeline = sink.shared_prefix.is_some()
        && seen.shared_streams.get(&sink.stream).map(String::as_str) == pipeline;
    if sink.shared_prefix.is_some() && !shared_by_its_pipeline {
        if let Some(pipeline) = pipeline {
            seen.shared_streams
                .insert(sink.stream.clone(), pipeline.to_string());
        }
    }
    if !shared_by_its_pipeline && !seen.streams.insert(sink.stream.clone()) {
        problems.push(format!(
            "{}: stream '{}' is already used by another pipeline; each pipeline needs its own \
             stream because ordering is enforced with Nats-Expected-Last-Msg-Id",
            at(unit, "sink.stream"),
            sink.stream
        ));
    }
    if is_valid_subject(&sink.subject_prefix, false) {
        check_subject_template(unit, problems);
        check_dead_letter_subject(unit, problems);
    } else {
        problems.push(format!(
            "{}: '{}' is not a valid NATS subject prefix (dot-separated tokens, no spaces or wildcards)",
            at(unit, "sink.subject_prefix"),
            sink.subject_prefix
        ));
    }
    if sink.max_in_flight == 0 {
        problems.push(format!(
            "{}: must be at least 1",
            at(unit, "sink.max_in_flight")
        ));
    }
    if sink.duplicate_window_secs == 0 {
        problems.push(format!(
            "{}: must be at least 1 second: deduplication is how restarts avoid duplicates",
            at(unit, "sink.duplicate_window_secs")
        ));
    }
    check_format(unit, problems);
    check_stream_settings(unit, problems);
}

/// The payload format with the encoding and the change stream options it needs.
fn check_format(unit: &PipelineConfig, problems: &mut Problems) {
    let sink = &unit.sink;
    match sink.format {
        Format::ChangeEvent => {}
        Format::Debezium if sink.encoding == Encoding::Bson => problems.push(format!(
            "{}: format = \"debezium\" is a JSON envelope whose `before`, `after` and \
             `updatedFields` are Extended JSON strings; it cannot be encoded as bson. Use \
             encoding = \"relaxed-json\" or \"canonical-json\"",
            at(unit, "sink.format")
        )),
        Format::Debezium => {}
        Format::FullDocument if unit.full_document == FullDocument::Off => problems.push(format!(
            "{}: format = \"full-document\" publishes the document itself, and updates carry \
             none with full_document = \"off\". Set pipeline.full_document = \"update-lookup\" \
             (or \"required\" / \"when-available\" with changeStreamPreAndPostImages on the \
             collections)",
            at(unit, "sink.format")
        )),
        Format::FullDocument => {}
    }
}

/// Settings of a stream tidegate creates: JetStream's own bounds, checked before it is asked.
fn check_stream_settings(unit: &PipelineConfig, problems: &mut Problems) {
    let sink = &unit.sink;
    if !(1..=5).contains(&sink.replicas) {
        problems.push(format!(
            "{}: {} is not a replica count JetStream accepts (1 to 5)",
            at(unit, "sink.replicas"),
            sink.replicas
        ));
    }
    let limits = [
        ("sink.max_age_secs", sink.max_age_secs),
        ("sink.max_bytes", sink.max_bytes),
        ("sink.max_msgs_per_subject", sink.max_msgs_per_subject),
    ];
    for (key, value) in limits {
        if value == Some(0) {
            problems.push(format!(
                "{}: must be at least 1 (leave it out for no limit)",
                at(unit, key)
            ));
        }
        if value.is_some_and(|v| i64::try_from(v).is_err()) {
            problems.push(format!(
                "{}: is larger than JetStream accepts",
                at(unit, key)
            ));
        }
    }
    if let Some(max_age) = sink.max_age_secs.filter(|age| *age > 0) {
        if max_age < sink.duplicate_window_secs {
            problems.push(format!(
                "{}: {max_age} s is shorter than sink.duplicate_window_secs = {} s; JetStream \
                 refuses a duplicate window longer than the stream's max age",
                at(unit, "sink.max_age_secs"),
                sink.duplicate_window_secs
            ));
        }
    }
}

/// The template must render, under the prefix, to a valid subject; tried on a probe event.
fn check_subject_template(unit: &PipelineConfig, problems: &mut Problems) {
    let sink = &unit.sink;
    let key = at(unit, "sink.subject_template");
    if !sink.subject_template.starts_with("{prefix}.") {
        problems.push(format!(
            "{key}: '{}' must start with '{{prefix}}.' so every subject stays in the stream",
            sink.subject_template
        ));
        return;
    }
    match SubjectTemplate::parse(&sink.subject_template, &sink.subject_prefix)
        .map(|template| template.render(&Change::probe()))
    {
        Err(err) => problems.push(format!(
            "{key}: {err} (placeholders: {{prefix}}, {{db}}, {{coll}}, {{operation}}, {{key}})"
        )),
        Ok(probe) if !is_valid_subject(&probe, false) => problems.push(format!(
            "{key}: '{}' does not make a valid NATS subject",
            sink.subject_template
        )),
        Ok(_) => {}
    }
}

/// Dead letters must land in the unit's own stream.
fn check_dead_letter_subject(unit: &PipelineConfig, problems: &mut Problems) {
    let dead_letter = unit.dead_letter_subject();
    if !is_valid_subject(&dead_letter, false)
        || !is_under_prefix(&dead_letter, &unit.sink.subject_prefix)
    {
        problems.push(format!(
            "{}: '{}' must be a valid subject under '{}.'",
            at(unit, "sink.dead_letter_subject"),
            dead_letter,
            unit.sink.subject_prefix
        ));
    }
}

/// `[pipeline.checkpoint]`: intervals and oplog headroom thresholds.
fn check_checkpoint(unit: &PipelineConfig, problems: &mut Problems) {
    let checkpoint = &unit.checkpoint;
    if checkpoint.interval_ms == 0 || checkpoint.oplog_check_interval_ms == 0 {
        problems.push(format!(
            "{}: must be at least 1",
            at(unit, "checkpoint.interval_ms / oplog_check_interval_ms")
        ));
    }
    if checkpoint.max_writes_per_sec == 0 {
        problems.push(format!(
            "{}: must be at least 1 (the pipeline's checkpoints, all its tenants together, \
             are written at most this many times a second)",
            at(unit, "checkpoint.max_writes_per_sec")
        ));
    }
    if checkpoint.oplog_error_headroom_secs > checkpoint.oplog_warn_headroom_secs {
        problems.push(format!(
            "{}: the error threshold ({} s) must not exceed the warning threshold ({} s)",
            at(unit, "checkpoint.oplog_error_headroom_secs"),
            checkpoint.oplog_error_headroom_secs,
            checkpoint.oplog_warn_headroom_secs
        ));
    }
}

/// Quarantine, capabilities and the plugin chain with each plugin's resolved limits.
fn check_plugins(unit: &PipelineConfig, problems: &mut Problems) {
    if unit.quarantine.after_failures == 0 && unit.quarantine.action != QuarantineAction::DeadLetter
    {
        problems.push(format!(
            "{}: an action is set but after_failures = 0 turns quarantine off",
            at(unit, "quarantine")
        ));
    }
    for dir in unit
        .capabilities
        .read_dirs
        .iter()
        .filter(|d| !d.is_absolute())
    {
        problems.push(format!(
            "{}: '{}' must be an absolute path",
            at(unit, "capabilities.read_dirs"),
            dir.display()
        ));
    }
    let mut names = HashSet::new();
    for plugin in &unit.plugins {
        if plugin.sha256.is_some() && unit.tenants_from == TenantsFrom::File {
            problems.push(format!(
                "{}: plugin '{}': sha256 is only for tenants managed through the admin API; \
                 name a file here",
                at(unit, "plugins"),
                plugin.name
            ));
        }
        if !is_valid_id(&plugin.name) {
            problems.push(format!(
                "{}: plugin name '{}' must use only letters, digits, '-' and '_'",
                at(unit, "plugins"),
                plugin.name
            ));
        }
        if !names.insert(plugin.name.as_str()) {
            problems.push(format!(
                "{}: plugin '{}' appears twice; give the second a different name and a `file`",
                at(unit, "plugins"),
                plugin.name
            ));
        }
        let limits = unit.plugin_limits(plugin);
        if limits.memory_mib == 0
            || limits.fuel_per_call == 0
            || limits.timeout_ms == 0
            || limits.max_output_bytes == 0
        {
            problems.push(format!(
                "{}: memory_mib, fuel_per_call, timeout_ms and max_output_bytes of \
                 plugin '{}' must be greater than zero",
                at(unit, "limits"),
                plugin.name
            ));
        }
    }
}

/// Whether `id` is a valid pipeline, tenant or plugin name: letters, digits, `-` and `_`.
pub(super) fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
