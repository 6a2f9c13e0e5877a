//! One pipeline's source side: what it watches, where it starts, and what its change
//! stream does with invalidates, lost history, oversize events and snapshots.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::capture_list::CollectionList;
use super::plugins::{Capabilities, LimitOverrides, PluginConfig, PluginLimits, QuarantineConfig};
use super::quota::Quota;
use super::sink::{CheckpointConfig, SinkConfig};
use super::tenants::{NamespacePattern, TenantConfig, TenantScope};

/// One relay: a change stream, a plugin chain, a JetStream stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name: letters, digits, `-` and `_`. It keys the checkpoint and prefixes every
    /// message id, so renaming a pipeline starts it afresh.
    pub id: String,
    /// MongoDB connection string (a replica set or sharded cluster: change streams need one).
    /// Overridden by `TIDEGATE_PIPELINE_<ID>_MONGODB_URI` (ID upper-cased, `-` as `_`).
    pub mongodb_uri: String,
    /// Database to watch. Absent: the whole deployment.
    pub database: Option<String>,
    /// Collections of `database` to watch. Absent or empty: the whole database.
    #[serde(default)]
    pub collections: Vec<String>,
    /// The capture list as a CSV file of `database,collection` rows (Streamkap's bulk-upload
    /// form), relative to the config file's folder; instead of `collections`, and with
    /// `database` only when every row is in it. See `config::capture_list`. After loading,
    /// the absolute path.
    pub collections_file: Option<PathBuf>,
    /// The collections `collections_file` lists, read at load time (and on SIGHUP). Empty
    /// without a file. Not a config key.
    #[serde(skip)]
    pub collection_list: CollectionList,
    /// Whether update events carry the whole document after the change: `off` (default),
    /// `update-lookup`, `when-available` or `required` (MongoDB's `fullDocument`).
    #[serde(default)]
    pub full_document: FullDocument,
    /// Whether events carry the document before the change: `off` (default),
    /// `when-available` or `required` (MongoDB's `fullDocumentBeforeChange`; the collection
    /// needs `changeStreamPreAndPostImages`).
    #[serde(default)]
    pub full_document_before_change: FullDocumentBeforeChange,
    /// Namespaces to capture, within `database`/`collections` (default: everything there):
    /// `db.coll`, `db.*`, or `/regex/` matched against `db.coll`. Pushed to the server.
    #[serde(default)]
    pub include: Vec<String>,
    /// Namespaces to leave out, in the same forms; applied after `include`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Operation types never captured, e.g. `["delete"]`. `invalidate` cannot be skipped.
    #[serde(default)]
    pub skip_operations: Vec<String>,
    /// Extra aggregation stages appended to the change stream's pipeline: `$match`,
    /// `$project` (exclusions only), `$addFields`/`$set` and `$unset`, never touching `_id`
    /// (the resume token) or the fields tidegate reads.
    #[serde(default)]
    pub stages: Vec<toml::Table>,
    /// What an event over MongoDB's 16 MiB document limit does (a large update with pre- and
    /// post-images, say), which the server cannot return whole: `fail` (default: stop with an
    /// error naming the event and these settings), `skip` (a server-side stage strips it to a
    /// stub that goes to the dead-letter subject with reason `oversize`) or `split` (MongoDB
    /// 6.0.9+ / 7.0+ sends it in fragments, reassembled into one event before the plugins).
    /// See `source::oversize`.
    #[serde(default)]
    pub oversize: OversizePolicy,
    /// DDL events too (create, createIndexes, modify, …): MongoDB's `showExpandedEvents`
    /// (6.0+). Default: false.
    #[serde(default)]
    pub show_expanded_events: bool,
    /// Where a pipeline without a checkpoint starts: `now` (default), an RFC 3339 time
    /// (`2026-11-22T10:00:00Z`), or a cluster time `<seconds>.<increment>`; the time must
    /// still be in the oplog.
    #[serde(default)]
    pub start_at: Option<String>,
    /// A resume token to start after when there is no checkpoint, as JSON (a change event's
    /// `_id`, e.g. `{"_data": "8263…"}`). Takes precedence over `start_at`.
    #[serde(default)]
    pub start_after_token: Option<String>,
    /// What a drop, rename or dropDatabase of the watched namespace does: `continue`
    /// (default: the events are published and capture goes on with `startAfter`) or `stop`
    /// (the events before the invalidate are published, then the pipeline stops with an
    /// error, at the same place on every restart, until the policy or checkpoint changes).
    #[serde(default)]
    pub on_invalidate: InvalidatePolicy,
    /// What happens when the checkpoint is no longer in the oplog: `fail` (default: stop with
    /// the checkpoint's time and the oplog's oldest entry), `latest` (resume from now,
    /// logged as an error with what was skipped) or `resnapshot` (take a new snapshot, then
    /// stream from where it began; also what `snapshot = "when-needed"` does).
    #[serde(default)]
    pub on_history_lost: HistoryLostPolicy,
    /// When existing documents are published as `snapshot-read` events before streaming:
    /// `never` (default), `initial` (when the pipeline has no checkpoint), `when-needed`
    /// (no checkpoint, or the checkpoint fell out of the oplog) or `always` (at every start).
    /// A snapshot interrupted by a crash or a stop resumes where it was.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// A collection (`db.coll`, in any database) watched for Debezium-style signal documents
    /// (see [`crate::source::signal`]): `{type: "execute-snapshot", data: {"data-collections":
    /// ["db.coll"], type: "incremental"}}` starts an incremental snapshot while streaming
    /// goes on (`blocking`: streaming pauses while it runs), `{type: "stop-snapshot"}` stops
    /// it. tidegate writes its watermarks there too, so it needs write access. Its events are
    /// never published; outside the pipeline's database or collection, the change stream is
    /// widened to see it. Absent: no signals.
    pub signal_collection: Option<String>,
    /// Publish a heartbeat message on `<subject_prefix>.heartbeat` at most this often while
    /// the stream is idle (payload: the unit and the stream's cluster time), so consumers can
    /// tell a quiet pipeline from a dead one. 0 (default): none.
    #[serde(default)]
    pub heartbeat_publish_ms: u64,
    /// A collection (`db.coll`, in any database) that tidegate updates every
    /// `heartbeat_write_ms` (one document per unit). Its events are never published; they
    /// keep the stream's position moving where filters leave a busy cluster's stream with
    /// nothing to return for long. Absent: no writes.
    pub heartbeat_collection: Option<String>,
    /// How often the heartbeat document is written, in milliseconds. Default: 10000.
    #[serde(default = "default_heartbeat_write_ms")]
    pub heartbeat_write_ms: u64,
    /// Documents per snapshot chunk (one query, one progress step). Default: 1000.
    #[serde(default = "default_snapshot_chunk")]
    pub snapshot_chunk_size: u32,
    /// On SIGTERM/SIGINT, how long (seconds) the unit may take to publish and settle what it
    /// holds and checkpoint; past it, it stops with what is acknowledged checkpointed, logs
    /// what was left unpublished (read again on restart) and the process exits non-zero.
    /// Default: 30. Tenants inherit their pipeline's.
    #[serde(default = "default_shutdown_timeout_secs")]
    pub shutdown_timeout_secs: u64,
    /// Plugins every event goes through, in order. With tenants, each tenant has its own.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// Sandbox limits for every plugin of this pipeline; a plugin's own `limits` override
    /// them key by key. With tenants, each tenant has its own.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// What this pipeline's plugins may use beyond their own memory. Default: nothing.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// How a plugin that keeps failing is handled.
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// What the unit may consume in all (see [`Quota`]). With tenants, each tenant has its
    /// own.
    #[serde(default)]
    pub quota: Quota,
    /// Where messages go. Required without tenants; with tenants, each tenant has its own.
    #[serde(default)]
    pub sink: SinkConfig,
    /// Where the position is saved.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Tenants sharing this pipeline's MongoDB source, each isolated from the others: its
    /// own namespaces, plugins, limits, stream, subjects, dead letters and checkpoint.
    /// Absent: the pipeline is one unit of its own.
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
    /// Where the pipeline's tenants come from: `file` (default: its `[[pipeline.tenant]]`
    /// tables) or `nats` (managed at run time through the admin API, kept in NATS; see
    /// `[admin]` and docs/platform.md). With `nats` the pipeline is a template every
    /// tenant inherits its source settings from, and is not a unit itself.
    #[serde(default)]
    pub tenants_from: TenantsFrom,
    /// How a pipeline's tenants read MongoDB: `shared` (default: one change stream for the
    /// whole pipeline, each event routed to its tenants; a tenant that falls behind reads
    /// on alone and rejoins, see `pipeline::shared`) or `own` (a change stream per tenant).
    #[serde(default)]
    pub tenant_reader: TenantReader,
    /// Route events to tenants by a value in the event instead of by namespace alone: a
    /// dotted path such as `fullDocument.tenantId` (deletes read it from
    /// `fullDocumentBeforeChange`) or `documentKey.tenantId` (a shard key). Each tenant owns
    /// the string values in its `key_values` (default: its id). Absent: by namespace only.
    #[serde(default)]
    pub tenant_key: Option<String>,
    /// With a shared reader: how many of the pipeline's tenants may read a change stream of
    /// their own at once, catching up (at start, after a detach) before they rejoin. The
    /// others wait detached, their position kept, until one joins; the reader never waits
    /// for them. Bounds the change streams (and mongod's work) a restart after a long stop
    /// or a burst of detaches opens. Default: 8.
    #[serde(default = "default_tenant_catch_up_streams")]
    pub tenant_catch_up_streams: u32,
    /// With a shared reader: how many events it queues for one attached tenant (and at most
    /// 64 MiB of documents, see `pipeline::shared`). A tenant
    /// that falls this far behind while another keeps up is detached, to read on alone from
    /// its own position; lower detaches sooner (less memory per tenant behind), higher
    /// absorbs larger bursts for one tenant. At most 65,536, the events the reader queues
    /// across all its tenants. Default: 16,384.
    #[serde(default = "default_tenant_lane_events")]
    pub tenant_lane_events: u32,
    /// Set when this unit was made from a `[[pipeline.tenant]]`: which tenant it runs and
    /// what it may see. Not a config key.
    #[serde(skip)]
    pub tenant: Option<TenantScope>,
    /// Set on the config a pipeline's shared reader reads with (`pipeline::shared`), never
    /// on a unit's: its change stream serves every tenant, so it asks for far larger
    /// batches (see `source::open`). Not a config key.
    #[serde(skip)]
    pub shared_reader: bool,
}

/// See [`PipelineConfig::tenants_from`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TenantsFrom {
    /// `[[pipeline.tenant]]` tables in the file.
    #[default]
    File,
    /// The admin API's tenant records in NATS KV.
    Nats,
}

/// See [`PipelineConfig::tenant_reader`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TenantReader {
    /// One change stream per pipeline, shared by its tenants.
    #[default]
    Shared,
    /// One change stream per tenant.
    Own,
}

/// See [`PipelineConfig::on_invalidate`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum InvalidatePolicy {
    /// Publish and continue after the invalidate with `startAfter`.
    #[default]
    Continue,
    /// Stop the pipeline with an error.
    Stop,
}

/// See [`PipelineConfig::oversize`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OversizePolicy {
    /// Stop with an error naming the event.
    #[default]
    Fail,
    /// Dead-letter a stub of the event and go on.
    Skip,
    /// Read it in fragments and reassemble it.
    Split,
}

/// The stage that makes MongoDB send events over 16 MiB in fragments. Allowed in `stages`
/// only last (where MongoDB requires it), where it means `oversize = "split"`.
pub const SPLIT_STAGE: &str = "$changeStreamSplitLargeEvent";

/// See [`PipelineConfig::on_history_lost`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HistoryLostPolicy {
    /// Stop with a clear error.
    #[default]
    Fail,
    /// Resume from now, loudly.
    Latest,
    /// Take a new snapshot, then stream from where it began.
    Resnapshot,
}

/// See [`PipelineConfig::snapshot`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMode {
    /// Never read existing documents.
    #[default]
    Never,
    /// When there is no checkpoint.
    Initial,
    /// When there is no checkpoint or it fell out of the oplog.
    WhenNeeded,
    /// At every start.
    Always,
}

/// Operation types MongoDB change streams report (what `skip_operations` may name).
pub const OPERATION_TYPES: &[&str] = &[
    "insert",
    "update",
    "replace",
    "delete",
    "drop",
    "rename",
    "dropDatabase",
    "create",
    "createIndexes",
    "dropIndexes",
    "modify",
    "shardCollection",
    "refineCollectionShardKey",
    "reshardCollection",
];

/// Top-level fields of a change event that tidegate reads: user stages may not touch them.
pub(crate) const EVENT_FIELDS: &[&str] = &[
    "_id",
    "operationType",
    "ns",
    "to",
    "documentKey",
    "clusterTime",
    "wallTime",
    "lsid",
    "txnNumber",
];

/// `fullDocument` for update events. MongoDB's own spellings (`updateLookup`,
/// `whenAvailable`, `default`) are accepted as aliases.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FullDocument {
    /// Updates carry only their update description.
    #[default]
    #[serde(alias = "default")]
    Off,
    /// The server looks up the current document (it may be newer than the change).
    #[serde(alias = "updateLookup")]
    UpdateLookup,
    /// The post-image, when the collection records images.
    #[serde(alias = "whenAvailable")]
    WhenAvailable,
    /// The post-image; the stream fails if it is missing.
    Required,
}

/// `fullDocumentBeforeChange`. MongoDB's own spelling `whenAvailable` is accepted as an
/// alias.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FullDocumentBeforeChange {
    /// No pre-images.
    #[default]
    Off,
    /// The pre-image when the collection records them.
    #[serde(alias = "whenAvailable")]
    WhenAvailable,
    /// The pre-image; the stream fails if it is missing.
    Required,
}

impl PipelineConfig {
    /// The id of the `[[pipeline]]` this unit comes from: its own, or its tenant's pipeline's
    /// (what a pipeline's tenants share: its stream's publisher, its checkpoint pace).
    pub fn pipeline_id(&self) -> &str {
        self.tenant
            .as_ref()
            .map_or(self.id.as_str(), |tenant| tenant.pipeline.as_str())
    }

    /// Whether the stream carries events over 16 MiB in fragments to reassemble:
    /// `oversize = "split"`, or `$changeStreamSplitLargeEvent` as the last user stage.
    pub fn splits_large_events(&self) -> bool {
        self.oversize == OversizePolicy::Split
            || self
                .stages
                .last()
                .is_some_and(|stage| stage.contains_key(SPLIT_STAGE))
    }

    /// The limits `plugin` runs under: its own, then the pipeline's (or tenant's), then the
    /// built-in defaults.
    pub fn plugin_limits(&self, plugin: &PluginConfig) -> PluginLimits {
        plugin.limits.or(self.limits).resolve()
    }

    /// The dead-letter subject, with its default applied.
    pub fn dead_letter_subject(&self) -> String {
        self.sink
            .dead_letter_subject
            .clone()
            .unwrap_or_else(|| format!("{}.dead-letter", self.sink.subject_prefix))
    }

    /// The file a plugin is loaded from.
    pub fn plugin_path(plugin: &PluginConfig, plugin_dir: &Path) -> PathBuf {
        plugin
            .file
            .clone()
            .unwrap_or_else(|| plugin_dir.join(format!("{}.wasm", plugin.name)))
    }
}

/// One `include`/`exclude` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceFilter {
    /// `db.coll` or `db.*`.
    Pattern(NamespacePattern),
    /// `/regex/`, matched by the server against `db.coll`.
    Regex(String),
}

impl NamespaceFilter {
    /// Parses one entry.
    pub fn parse(text: &str) -> Result<NamespaceFilter, String> {
        match text.strip_prefix('/').and_then(|t| t.strip_suffix('/')) {
            Some("") => Err(format!("'{text}' is an empty regex")),
            Some(regex) => Ok(NamespaceFilter::Regex(regex.to_string())),
            None => NamespacePattern::parse(text).map(NamespaceFilter::Pattern),
        }
    }
}

/// Where a pipeline without a checkpoint starts.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAt {
    /// From now.
    Now,
    /// At this cluster time.
    ClusterTime(bson::Timestamp),
}

/// Parses `start_at`: `now`, an RFC 3339 time, or `<seconds>.<increment>`.
pub fn parse_start_at(text: &str) -> Result<StartAt, String> {
    if text == "now" {
        return Ok(StartAt::Now);
    }
    if let Some((secs, inc)) = text.split_once('.') {
        if let (Ok(time), Ok(increment)) = (secs.parse::<u32>(), inc.parse::<u32>()) {
            return Ok(StartAt::ClusterTime(bson::Timestamp { time, increment }));
        }
    }
    let at = bson::DateTime::parse_rfc3339_str(text).map_err(|_| {
        format!("'{text}' is not `now`, an RFC 3339 time or `<seconds>.<increment>`")
    })?;
    let time = u32::try_from(at.timestamp_millis() / 1000)
        .map_err(|_| format!("'{text}' is outside what a cluster time can hold"))?;
    Ok(StartAt::ClusterTime(bson::Timestamp { time, increment: 0 }))
}

/// Parses `start_after_token`: a JSON object such as `{"_data": "82…"}`.
pub fn parse_token(text: &str) -> Result<bson::Document, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let document = bson::Document::try_from(
        value
            .as_object()
            .cloned()
            .ok_or("must be a JSON object such as {\"_data\": \"82…\"}")?,
    )
    .map_err(|e| format!("not a resume token: {e}"))?;
    if !document.contains_key("_data") {
        return Err("must hold `_data`, as a change event's `_id` does".into());
    }
    Ok(document)
}

fn default_heartbeat_write_ms() -> u64 {
    10_000
}
fn default_shutdown_timeout_secs() -> u64 {
    30
}
fn default_tenant_catch_up_streams() -> u32 {
    8
}
fn default_tenant_lane_events() -> u32 {
    super::DEFAULT_TENANT_LANE_EVENTS
}
fn default_snapshot_chunk() -> u32 {
    1000
}
