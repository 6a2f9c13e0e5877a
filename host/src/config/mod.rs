//! The configuration file: its TOML model, defaults, environment overrides and validation.
//!
//! Every key is documented on its field below and in `examples/quickstart/tidegate.toml`.
//! Unknown keys are errors (a typo must never silently fall back to a default), and every
//! error names the file and the key at fault, never showing the file's text (it may hold
//! secrets).

pub mod ha;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;
use crate::model::subject::{is_under_prefix, is_valid_subject, SubjectTemplate};
use crate::model::Change;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Folder that holds plugin components (`<name>.wasm`). Relative paths are resolved against
    /// the config file's folder. Default: `plugins`.
    #[serde(default = "default_plugin_dir")]
    pub plugin_dir: PathBuf,
    /// The NATS server every pipeline publishes to.
    pub nats: NatsConfig,
    /// Log format and level.
    #[serde(default)]
    pub log: LogConfig,
    /// The wasm engine shared by every plugin.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// The operations endpoint (health, metrics, status); absent: none.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// High availability: leases shared with other instances (see [`crate::ha::lease`]).
    #[serde(default)]
    pub ha: ha::HaConfig,
    /// One entry per change stream to relay. At least one is required. After loading,
    /// each tenant of a pipeline is an entry of its own (see [`TenantConfig`]).
    #[serde(rename = "pipeline")]
    pub pipelines: Vec<PipelineConfig>,
    /// The file this config was read from, for SIGHUP. Not a config key.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// How to reach NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Overridden by the environment variable
    /// `TIDEGATE_NATS_URL`, so that credentials in URLs need not live in the file.
    pub url: String,
    /// How long to wait for a JetStream acknowledgement before the publish is treated as
    /// failed and retried. Default: 5000.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Authentication, `[nats.auth]` (see [`crate::security::NatsAuth`]). Default: none.
    #[serde(default)]
    pub auth: crate::security::NatsAuth,
    /// TLS, `[nats.tls]` (see [`crate::security::NatsTls`]). Absent: TLS only if the server
    /// asks for it.
    pub tls: Option<crate::security::NatsTls>,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `tidegate=debug`. The `RUST_LOG` environment
    /// variable overrides it. Default: `info,async_nats=warn`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

/// The engine every plugin runs in.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Keep compiled plugins on disk, so a restart or reload skips compilation (seconds for
    /// large Python or JavaScript components). Default: true.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// Where compiled plugins are kept. Default: `$XDG_CACHE_HOME/tidegate/compiled`, else
    /// `$HOME/.cache/tidegate/compiled`. tidegate creates it private to its user and loads
    /// only files it wrote there itself.
    pub cache_dir: Option<PathBuf>,
    /// Pre-reserve instance slots (wasmtime's pooling allocator): faster instantiation after
    /// a trap or reload. Falls back to on-demand allocation, with a warning, where the
    /// machine cannot reserve the address space. Default: true.
    #[serde(default = "default_true")]
    pub pooling: bool,
    /// Most plugin instances alive at once (each plugin has one, plus one while it is being
    /// reloaded). Past it, loading a plugin fails with a clear error rather than exhausting
    /// memory. Default: 256.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Watch plugin files and hot-reload a changed one (see `reload`). Default: true.
    #[serde(default = "default_true")]
    pub watch_plugins: bool,
    /// How often plugin files are checked, in milliseconds. Default: 1000.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cache: true,
            cache_dir: None,
            pooling: true,
            max_instances: default_max_instances(),
            watch_plugins: true,
            watch_interval_ms: default_watch_interval_ms(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

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
    /// See `oversize`.
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
    /// Set when this unit was made from a `[[pipeline.tenant]]`: which tenant it runs and
    /// what it may see. Not a config key.
    #[serde(skip)]
    pub tenant: Option<TenantScope>,
}

/// One tenant of a pipeline (`[[pipeline.tenant]]`). At load time each tenant becomes a
/// unit of its own with id `<pipeline>.<tenant>`: its own change stream (narrowed on the
/// server to its namespaces), plugin thread, publisher and checkpoint, so a slow or broken
/// tenant can never hold another one back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Unique within the pipeline: letters, digits, `-` and `_`.
    pub id: String,
    /// The namespaces the tenant may see: `db.coll`, or `db.*` for a whole database. They
    /// must lie inside the pipeline's own scope. Enforced on the server (`$match`) and
    /// again in the host before any plugin sees an event.
    pub namespaces: Vec<String>,
    /// The tenant's plugin chain.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// Limits for the tenant's plugins (a plugin's own `limits` override them).
    #[serde(default)]
    pub limits: LimitOverrides,
    /// What the tenant's plugins may use. Default: nothing.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// How the tenant's failing plugins are handled.
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// The tenant's stream and subjects. Every output must stay under its `subject_prefix`.
    pub sink: SinkConfig,
}

/// What a tenant unit may see, kept for the host-side check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantScope {
    /// The tenant's id.
    pub id: String,
    /// Its namespaces, parsed.
    pub namespaces: Vec<NamespacePattern>,
}

/// `db.coll` or `db.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePattern {
    /// Database name.
    pub db: String,
    /// Collection name; `None` for every collection of `db`.
    pub coll: Option<String>,
}

impl NamespacePattern {
    /// Parses `db.coll` or `db.*`.
    pub fn parse(text: &str) -> Result<NamespacePattern, String> {
        let (db, coll) = text
            .split_once('.')
            .ok_or_else(|| format!("'{text}' is not 'db.collection' or 'db.*'"))?;
        if db.is_empty() || coll.is_empty() || db.contains(['*', '$', ' ']) {
            return Err(format!("'{text}' is not 'db.collection' or 'db.*'"));
        }
        let coll = match coll {
            "*" => None,
            c if c.contains('*') => {
                return Err(format!(
                    "'{text}': only a whole database may be matched with '*' (as in 'db.*')"
                ))
            }
            c => Some(c.to_string()),
        };
        Ok(NamespacePattern {
            db: db.to_string(),
            coll,
        })
    }

    /// Whether an event on `db`/`coll` falls under this pattern. Database-level events
    /// (no collection, like dropDatabase) match any pattern of their database.
    pub fn matches(&self, db: &str, coll: Option<&str>) -> bool {
        self.db == db
            && match (&self.coll, coll) {
                (Some(mine), Some(theirs)) => mine == theirs,
                _ => true,
            }
    }
}

/// Capabilities a plugin may be granted. Plugins that import WASI get a deny-by-default
/// implementation: no files, no network, an empty environment, a clock stopped at the Unix
/// epoch and a fixed random stream, unless granted here. Plugins that import nothing from
/// WASI are unaffected.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// The real wall and monotonic clocks. Without it time stands still, so verdicts do not
    /// depend on when an event is (re)played.
    #[serde(default)]
    pub clock: bool,
    /// The host's random numbers. Without it the random stream is the same on every call.
    #[serde(default)]
    pub random: bool,
    /// Environment variables the plugin may read (name only; the value is the host's).
    #[serde(default)]
    pub env: Vec<String>,
    /// Host folders the plugin may read, mounted read-only at the same path.
    #[serde(default)]
    pub read_dirs: Vec<PathBuf>,
}

/// What happens to a plugin that fails many events in a row.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuarantineConfig {
    /// Consecutive failed events (errors, traps, limit violations) after which the plugin
    /// is quarantined: no longer called until it is reloaded. 0 turns quarantine off.
    /// Default: 100.
    #[serde(default = "default_quarantine_after")]
    pub after_failures: u32,
    /// What a quarantined plugin's events become: `dead-letter` (default: each one is
    /// published to the dead-letter subject, reason `quarantined`), `skip` (dropped and
    /// counted) or `halt` (the unit stops with an error; other units carry on).
    #[serde(default)]
    pub action: QuarantineAction,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            after_failures: default_quarantine_after(),
            action: QuarantineAction::default(),
        }
    }
}

/// See [`QuarantineConfig::action`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum QuarantineAction {
    /// Dead-letter every event the plugin would have seen.
    #[default]
    DeadLetter,
    /// Drop them, counted.
    Skip,
    /// Stop the unit.
    Halt,
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

/// One plugin in a chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The plugin's name, used in logs, dead-letter headers and (without `file`) to find
    /// `<plugin_dir>/<name>.wasm`.
    pub name: String,
    /// Explicit path to the component; relative to the config file's folder.
    pub file: Option<PathBuf>,
    /// Key/values the plugin reads through its `config` import. Values must be strings.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Sandbox limits for this plugin, overriding the pipeline's or tenant's key by key.
    #[serde(default)]
    pub limits: LimitOverrides,
}

/// What one plugin call may consume before it is stopped and the event dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginLimits {
    /// Most memory the plugin instance may hold, in MiB: all its linear memories plus its
    /// tables (see `sandbox::TABLE_ELEMENT_BYTES`) together.
    pub memory_mib: u32,
    /// Most fuel (roughly, wasm instructions) one call may burn.
    pub fuel_per_call: u64,
    /// Wall-clock limit for one call, in milliseconds.
    pub timeout_ms: u64,
    /// Most outputs one transform call may return.
    pub max_outputs: u32,
    /// Most bytes of documents all outputs of one call may carry together.
    pub max_output_bytes: u64,
    /// Most log lines one call may write; the rest are counted and dropped.
    pub log_lines_per_call: u32,
    /// Most bytes of log messages one call may write; the rest are counted and dropped.
    pub log_bytes_per_call: u32,
}

impl Default for PluginLimits {
    fn default() -> Self {
        LimitOverrides::default().resolve()
    }
}

/// Limits as written in the file: any key may be left out and falls back to the level
/// above (plugin → tenant or pipeline → built-in default).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// Most memory a plugin instance may hold, in MiB: all its linear memories and tables
    /// together. Default: 64.
    pub memory_mib: Option<u32>,
    /// Most fuel (roughly, wasm instructions) one call may burn. Deterministic: the same
    /// event gets the same verdict on replay. Default: 100,000,000.
    pub fuel_per_call: Option<u64>,
    /// Wall-clock limit for one call, in milliseconds. Default: 1000.
    pub timeout_ms: Option<u64>,
    /// Most outputs one transform call may return. Default: 100.
    pub max_outputs: Option<u32>,
    /// Most bytes of documents the outputs of one call may carry together. Default: 4 MiB.
    pub max_output_bytes: Option<u64>,
    /// Most log lines one call may write. Default: 32.
    pub log_lines_per_call: Option<u32>,
    /// Most bytes of log messages one call may write. Default: 16 KiB.
    pub log_bytes_per_call: Option<u32>,
}

impl LimitOverrides {
    /// These overrides, with unset keys taken from `fallback`.
    pub fn or(self, fallback: LimitOverrides) -> LimitOverrides {
        LimitOverrides {
            memory_mib: self.memory_mib.or(fallback.memory_mib),
            fuel_per_call: self.fuel_per_call.or(fallback.fuel_per_call),
            timeout_ms: self.timeout_ms.or(fallback.timeout_ms),
            max_outputs: self.max_outputs.or(fallback.max_outputs),
            max_output_bytes: self.max_output_bytes.or(fallback.max_output_bytes),
            log_lines_per_call: self.log_lines_per_call.or(fallback.log_lines_per_call),
            log_bytes_per_call: self.log_bytes_per_call.or(fallback.log_bytes_per_call),
        }
    }

    /// The limits, with built-in defaults for unset keys.
    pub fn resolve(self) -> PluginLimits {
        PluginLimits {
            memory_mib: self.memory_mib.unwrap_or(64),
            fuel_per_call: self.fuel_per_call.unwrap_or(100_000_000),
            timeout_ms: self.timeout_ms.unwrap_or(1000),
            max_outputs: self.max_outputs.unwrap_or(100),
            max_output_bytes: self.max_output_bytes.unwrap_or(4 * 1024 * 1024),
            log_lines_per_call: self.log_lines_per_call.unwrap_or(32),
            log_bytes_per_call: self.log_bytes_per_call.unwrap_or(16 * 1024),
        }
    }
}

/// The JetStream side of a pipeline.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// JetStream stream name. Created (subjects `<subject_prefix>.>`) when missing; when it
    /// exists it must cover those subjects and keep a long enough duplicate window. Each
    /// pipeline needs a stream of its own: ordering is enforced with
    /// `Nats-Expected-Last-Msg-Id`, which assumes one writer.
    pub stream: String,
    /// First subject token(s) of everything this pipeline publishes, e.g. `cdc` or `cdc.shop`.
    pub subject_prefix: String,
    /// Subject of each event. Placeholders: `{prefix}`, `{db}`, `{coll}`, `{operation}`.
    /// Must start with `{prefix}.`. Default: `{prefix}.{db}.{coll}.{operation}`.
    #[serde(default = "default_subject_template")]
    pub subject_template: String,
    /// Subject for events a plugin failed on. Default: `<subject_prefix>.dead-letter`.
    pub dead_letter_subject: Option<String>,
    /// Payload encoding: `relaxed-json` (default), `canonical-json` or `bson`.
    #[serde(default)]
    pub encoding: Encoding,
    /// Most messages published but not yet acknowledged. Default: 256.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Smallest JetStream duplicate window (seconds) tidegate accepts on the stream, and the
    /// window it sets when it creates the stream. Default: 120.
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
}

/// How a published payload is encoded.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// MongoDB relaxed Extended JSON v2: readable, numbers as plain JSON numbers.
    #[default]
    RelaxedJson,
    /// Canonical Extended JSON v2: lossless, every BSON type explicit.
    CanonicalJson,
    /// The event as one BSON document.
    Bson,
}

impl Encoding {
    /// The value of the `Content-Type` header published with each message.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::RelaxedJson => "application/json; ejson=relaxed",
            Encoding::CanonicalJson => "application/json; ejson=canonical",
            Encoding::Bson => "application/bson",
        }
    }
}

/// Where a pipeline's position is saved.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// `nats-kv` (default) or `mongodb`.
    #[serde(default)]
    pub store: CheckpointStoreKind,
    /// KV bucket for `nats-kv`. Default: `tidegate-checkpoints`.
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// Database for `mongodb` (on the pipeline's own deployment). Default: `tidegate`.
    #[serde(default = "default_checkpoint_database")]
    pub database: String,
    /// Collection for `mongodb`. Default: `checkpoints`.
    #[serde(default = "default_checkpoint_collection")]
    pub collection: String,
    /// How often the acknowledged position is saved, in milliseconds. Default: 1000.
    /// A crash replays at most this much (JetStream drops the replayed duplicates).
    #[serde(default = "default_checkpoint_interval_ms")]
    pub interval_ms: u64,
    /// How often the oplog's size, fill and write rate are read to project the checkpoint's
    /// headroom (see `oplog`), in milliseconds. Default: 10000.
    #[serde(default = "default_oplog_check_interval_ms")]
    pub oplog_check_interval_ms: u64,
    /// Below this projected headroom (seconds until the oplog overwrites the checkpointed
    /// position at the current write rate) tidegate warns. Default: 3600.
    #[serde(default = "default_oplog_warn_headroom_secs")]
    pub oplog_warn_headroom_secs: u64,
    /// Below this projected headroom tidegate logs an error and `/readyz` reports the
    /// pipeline. Default: 600.
    #[serde(default = "default_oplog_error_headroom_secs")]
    pub oplog_error_headroom_secs: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            store: CheckpointStoreKind::default(),
            bucket: default_bucket(),
            database: default_checkpoint_database(),
            collection: default_checkpoint_collection(),
            interval_ms: default_checkpoint_interval_ms(),
            oplog_check_interval_ms: default_oplog_check_interval_ms(),
            oplog_warn_headroom_secs: default_oplog_warn_headroom_secs(),
            oplog_error_headroom_secs: default_oplog_error_headroom_secs(),
        }
    }
}

/// Checkpoint backends.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointStoreKind {
    /// A NATS key-value bucket.
    #[default]
    NatsKv,
    /// A MongoDB collection, one document per pipeline.
    Mongodb,
}

fn default_plugin_dir() -> PathBuf {
    PathBuf::from("plugins")
}
fn default_ack_timeout_ms() -> u64 {
    5000
}
fn default_log_level() -> String {
    // The NATS client logs every reconnect attempt at info; tidegate says it once.
    "info,async_nats=warn".to_string()
}
fn default_true() -> bool {
    true
}
fn default_watch_interval_ms() -> u64 {
    1000
}
fn default_max_instances() -> u32 {
    256
}
fn default_quarantine_after() -> u32 {
    100
}
fn default_subject_template() -> String {
    "{prefix}.{db}.{coll}.{operation}".to_string()
}
fn default_max_in_flight() -> usize {
    256
}
fn default_duplicate_window_secs() -> u64 {
    120
}
fn default_bucket() -> String {
    "tidegate-checkpoints".to_string()
}
fn default_checkpoint_database() -> String {
    "tidegate".to_string()
}
fn default_checkpoint_collection() -> String {
    "checkpoints".to_string()
}
fn default_heartbeat_write_ms() -> u64 {
    10_000
}
fn default_shutdown_timeout_secs() -> u64 {
    30
}
fn default_snapshot_chunk() -> u32 {
    1000
}
fn default_oplog_check_interval_ms() -> u64 {
    10_000
}
fn default_oplog_warn_headroom_secs() -> u64 {
    3600
}
fn default_oplog_error_headroom_secs() -> u64 {
    600
}
fn default_checkpoint_interval_ms() -> u64 {
    1000
}

impl Config {
    /// Reads, parses, applies environment overrides to and validates a config file.
    /// Relative paths inside it are made absolute against the file's folder.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|err| Error::Config {
            path: path.to_path_buf(),
            message: format!("cannot read it: {err}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config =
            Config::parse(&text, base, |name| std::env::var(name).ok()).map_err(|message| {
                Error::Config {
                    path: path.to_path_buf(),
                    message,
                }
            })?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses config text. `base` resolves relative paths; `env` looks up overrides.
    pub fn parse(
        text: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let mut config: Config =
            toml::from_str(text).map_err(|err| describe_toml_error(text, &err))?;
        if let Some(url) = env("TIDEGATE_NATS_URL") {
            config.nats.url = url;
        }
        for pipeline in &mut config.pipelines {
            if let Some(uri) = env(&pipeline_env_var(&pipeline.id, "MONGODB_URI")) {
                pipeline.mongodb_uri = uri;
            }
            crate::security::remember_mongodb_uri_secret(&pipeline.mongodb_uri);
        }
        config.plugin_dir = base.join(&config.plugin_dir);
        config.pipelines = expand_tenants(std::mem::take(&mut config.pipelines))?;
        config.nats.auth.resolve(base);
        if let Some(tls) = &mut config.nats.tls {
            tls.resolve(base);
        }
        for plugin in config
            .pipelines
            .iter_mut()
            .flat_map(|p| p.plugins.iter_mut())
        {
            if let Some(file) = &plugin.file {
                plugin.file = Some(base.join(file));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The largest memory cap of any plugin, which sizes the engine's instance slots.
    pub fn largest_memory_mib(&self) -> u32 {
        self.pipelines
            .iter()
            .flat_map(|p| p.plugins.iter().map(|plugin| p.plugin_limits(plugin)))
            .map(|limits| limits.memory_mib)
            .max()
            .unwrap_or(0)
    }

    fn validate(&self) -> Result<(), String> {
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

/// Turns every pipeline with `[[pipeline.tenant]]`s into one unit per tenant (see
/// [`TenantConfig`]); pipelines without tenants are units as they are.
fn expand_tenants(pipelines: Vec<PipelineConfig>) -> Result<Vec<PipelineConfig>, String> {
    let mut units = Vec::new();
    for mut pipeline in pipelines {
        let tenants = std::mem::take(&mut pipeline.tenants);
        if tenants.is_empty() {
            if pipeline.sink.stream.is_empty() || pipeline.sink.subject_prefix.is_empty() {
                return Err(format!(
                    "pipeline '{}': [pipeline.sink] with `stream` and `subject_prefix` is \
                     required (or [[pipeline.tenant]]s, each with its own sink)",
                    pipeline.id
                ));
            }
            units.push(pipeline);
            continue;
        }
        if !pipeline.plugins.is_empty()
            || !pipeline.sink.stream.is_empty()
            || pipeline.limits != LimitOverrides::default()
            || pipeline.capabilities != Capabilities::default()
            || pipeline.quarantine != QuarantineConfig::default()
        {
            return Err(format!(
                "pipeline '{}' has tenants: plugins, limits, capabilities, quarantine and sink \
                 belong in each [[pipeline.tenant]], not in the pipeline",
                pipeline.id
            ));
        }
        let mut ids = HashSet::new();
        for tenant in tenants {
            let at =
                |key: &str| format!("pipeline '{}', tenant '{}': {key}", pipeline.id, tenant.id);
            if !is_valid_id(&tenant.id) {
                return Err(format!(
                    "{}: the id must be non-empty and use only letters, digits, '-' and '_'",
                    at("id")
                ));
            }
            if !ids.insert(tenant.id.clone()) {
                return Err(format!("{}: used twice", at("id")));
            }
            if tenant.namespaces.is_empty() {
                return Err(format!(
                    "{}: list what the tenant may see ('db.coll' or 'db.*')",
                    at("namespaces")
                ));
            }
            let mut namespaces = Vec::new();
            for text in &tenant.namespaces {
                let pattern = NamespacePattern::parse(text)
                    .map_err(|e| format!("{}: {e}", at("namespaces")))?;
                let inside = pipeline
                    .database
                    .as_ref()
                    .is_none_or(|db| *db == pattern.db)
                    && (pipeline.collections.is_empty()
                        || pattern
                            .coll
                            .as_ref()
                            .is_some_and(|c| pipeline.collections.contains(c)));
                if !inside {
                    return Err(format!(
                        "{}: '{text}' lies outside what the pipeline watches",
                        at("namespaces")
                    ));
                }
                namespaces.push(pattern);
            }
            units.push(PipelineConfig {
                id: format!("{}.{}", pipeline.id, tenant.id),
                plugins: tenant.plugins,
                limits: tenant.limits,
                capabilities: tenant.capabilities,
                quarantine: tenant.quarantine,
                sink: tenant.sink,
                tenants: Vec::new(),
                tenant: Some(TenantScope {
                    id: tenant.id,
                    namespaces,
                }),
                ..pipeline.clone()
            });
        }
    }
    Ok(units)
}

impl PipelineConfig {
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

    /// Whether this unit may see an event on `namespace`: always without tenants; for a
    /// tenant, only its namespaces (and stream-level events such as invalidate, which have
    /// no namespace).
    pub fn may_see(&self, namespace: &crate::model::Namespace) -> bool {
        let Some(tenant) = &self.tenant else {
            return true;
        };
        namespace.db.is_empty()
            || tenant
                .namespaces
                .iter()
                .any(|p| p.matches(&namespace.db, namespace.coll.as_deref()))
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

/// A TOML syntax or type error, described without showing any of the file's text: the
/// line at fault may hold a password or a connection string with credentials. It names the
/// line, the column, the key on that line (when it is a plain key) and its table, which is
/// enough to find the mistake; string values quoted by the message are masked too.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = mask_quoted_strings(err.message().trim());
    let Some(span) = err.span() else {
        return format!("{message} (the file's text is not shown: it may hold secrets)");
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line_number = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
        });
    // The table header above the line, `[name]` or `[[name]]`.
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|header| {
            let name = header.trim_start_matches('[');
            let depth = header.len() - name.len();
            let name = name.split(']').next()?.trim();
            let plain = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
            plain.then(|| format!("{}{name}{}", "[".repeat(depth), "]".repeat(depth)))
        });
    let place = match (key, table) {
        (Some(key), Some(table)) => format!(", key `{key}` in {table}"),
        (Some(key), None) => format!(", key `{key}`"),
        (None, Some(table)) => format!(", in {table}"),
        (None, None) => String::new(),
    };
    format!(
        "line {line_number}, column {column}{place}: {message} (the line is not shown: it may hold secrets)"
    )
}

/// `message` with the contents of serde's quoted values (`string "…"`, `char '…'`)
/// replaced by `…`: a value given to the wrong key may be a secret.
fn mask_quoted_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(found) = ["string \"", "char '"]
        .iter()
        .filter_map(|opener| rest.find(opener).map(|i| (i, *opener)))
        .min()
    {
        let (at, opener) = found;
        let quote = opener.chars().last().unwrap_or('"');
        let value_start = at + opener.len();
        out.push_str(&rest[..value_start]);
        out.push('…');
        // Debug formatting escapes quotes inside the value as `\"`.
        let mut escaped = false;
        let mut end = rest.len();
        for (i, c) in rest[value_start..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                c if c == quote => {
                    end = value_start + i;
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Checks one user stage: an allowed operator that leaves `_id` and the fields tidegate
/// reads alone.
pub fn check_stage(stage: &toml::Table) -> Result<bson::Document, String> {
    let json = serde_json::to_value(stage).map_err(|e| e.to_string())?;
    let document = json
        .as_object()
        .cloned()
        .map(bson::Document::try_from)
        .ok_or("a stage must be a table")?
        .map_err(|e| e.to_string())?;
    let mut keys = document.keys();
    let (Some(operator), None) = (keys.next(), keys.next()) else {
        return Err(
            "each stage must have exactly one operator, like { \"$match\" = { … } }".into(),
        );
    };
    let touched = |field: &str| {
        let top = field.split('.').next().unwrap_or(field);
        EVENT_FIELDS.contains(&top)
    };
    let body = document.get(operator);
    match (operator.as_str(), body) {
        ("$match", Some(bson::Bson::Document(_))) => {}
        ("$project", Some(bson::Bson::Document(fields))) => {
            for (field, value) in fields {
                let excluded = matches!(value, bson::Bson::Int32(0) | bson::Bson::Int64(0) | bson::Bson::Boolean(false));
                if !excluded {
                    return Err(format!(
                        "$project may only exclude fields (`{field}` would keep only some and drop what tidegate reads)"
                    ));
                }
                if touched(field) {
                    return Err(format!("$project may not remove `{field}`, which tidegate reads"));
                }
            }
        }
        ("$addFields" | "$set", Some(bson::Bson::Document(fields))) => {
            if let Some(field) = fields.keys().find(|f| touched(f)) {
                return Err(format!("{operator} may not change `{field}`, which tidegate reads"));
            }
        }
        ("$unset", Some(body)) => {
            let fields: Vec<String> = match body {
                bson::Bson::String(one) => vec![one.clone()],
                bson::Bson::Array(many) => many.iter().filter_map(|f| f.as_str().map(str::to_string)).collect(),
                _ => return Err("$unset takes a field name or a list of them".into()),
            };
            if let Some(field) = fields.iter().find(|f| touched(f)) {
                return Err(format!("$unset may not remove `{field}`, which tidegate reads"));
            }
        }
        (SPLIT_STAGE, Some(bson::Bson::Document(options))) if options.is_empty() => {}
        ("$match" | "$project" | "$addFields" | "$set", _) => {
            return Err(format!("{operator} takes a table"));
        }
        (SPLIT_STAGE, _) => return Err(format!("{SPLIT_STAGE} takes an empty table: {{}}")),
        (other, _) => {
            return Err(format!(
                "{other} is not allowed (allowed: $match, $project with exclusions, $addFields, $set, $unset, and last {SPLIT_STAGE})"
            ))
        }
    }
    Ok(document)
}

/// `$changeStreamSplitLargeEvent` among the user's stages: only last (as MongoDB requires),
/// where tidegate reassembles the fragments exactly as with `oversize = "split"`; not with
/// `oversize = "skip"`, which would then never see an oversize event.
fn check_split_stage(pipeline: &PipelineConfig) -> Result<(), String> {
    let is_split = |stage: &toml::Table| stage.contains_key(SPLIT_STAGE);
    let Some(at) = pipeline.stages.iter().position(is_split) else {
        return Ok(());
    };
    if at + 1 != pipeline.stages.len() {
        return Err(format!(
            "{SPLIT_STAGE} must be the last stage (MongoDB's rule); better still, drop it and \
             set `oversize = \"split\"`, which appends it and reassembles the fragments"
        ));
    }
    if pipeline.oversize == OversizePolicy::Skip {
        return Err(format!(
            "{SPLIT_STAGE} splits oversize events, which contradicts `oversize = \"skip\"`: \
             keep one of them"
        ));
    }
    Ok(())
}

/// Whether `id` is a valid pipeline, tenant or plugin name: letters, digits, `-` and `_`.
fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The environment variable that overrides `key` of pipeline `id`.
pub fn pipeline_env_var(id: &str, key: &str) -> String {
    let id: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("TIDEGATE_PIPELINE_{id}_{key}")
}

/// The `[http]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:9464` or `0.0.0.0:9464`.
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [nats]
        url = "nats://127.0.0.1:4222"
        [[pipeline]]
        id = "orders"
        mongodb_uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
        database = "shop"
        collections = ["orders"]
        [pipeline.sink]
        stream = "ORDERS"
        subject_prefix = "cdc"
    "#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/tidegate"), |_| None)
    }

    /// Defaults are applied and relative paths resolved against the file's folder.
    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(MINIMAL).expect("valid");
        let p = &config.pipelines[0];
        assert_eq!(config.plugin_dir, Path::new("/etc/tidegate/plugins"));
        assert_eq!(p.sink.subject_template, "{prefix}.{db}.{coll}.{operation}");
        assert_eq!(p.sink.encoding, Encoding::RelaxedJson);
        assert_eq!(p.sink.max_in_flight, 256);
        assert_eq!(p.dead_letter_subject(), "cdc.dead-letter");
        assert_eq!(p.checkpoint.store, CheckpointStoreKind::NatsKv);
    }

    /// MongoDB's own camelCase spellings of the document-image options are aliases.
    #[test]
    fn mongodb_spellings_of_image_options_are_accepted() {
        let with = |full: &str, before: &str| {
            let text = MINIMAL.replace(
                "collections = [\"orders\"]",
                &format!(
                    "collections = [\"orders\"]\nfull_document = \"{full}\"\n\
                     full_document_before_change = \"{before}\""
                ),
            );
            let config = parse(&text).expect("valid");
            let p = &config.pipelines[0];
            (p.full_document, p.full_document_before_change)
        };
        use FullDocument as F;
        use FullDocumentBeforeChange as B;
        assert_eq!(
            with("updateLookup", "whenAvailable"),
            (F::UpdateLookup, B::WhenAvailable)
        );
        assert_eq!(
            with("whenAvailable", "required"),
            (F::WhenAvailable, B::Required)
        );
        assert_eq!(with("required", "off"), (F::Required, B::Off));
        assert_eq!(with("default", "off"), (F::Off, B::Off));
        assert_eq!(
            with("update-lookup", "when-available"),
            (F::UpdateLookup, B::WhenAvailable)
        );
    }

    /// A signal collection in another database than a collection-scoped pipeline's (the
    /// stream is widened to see it).
    #[test]
    fn signal_collection_may_be_outside_the_scope() {
        let text = MINIMAL.replace(
            "collections = [\"orders\"]",
            "collections = [\"orders\"]\nsignal_collection = \"streamkap.streamkap_signal\"",
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.pipelines[0].signal_collection.as_deref(),
            Some("streamkap.streamkap_signal")
        );
    }

    /// A misspelt key is an error that names it, not a silent default.
    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let text = MINIMAL.replace("subject_prefix", "subject_prefx");
        let err = parse(&text).expect_err("typo must fail");
        assert!(err.contains("subject_prefx"), "{err}");
    }

    /// A mistake on a line that holds a secret is reported by line, column and key, never
    /// by showing the line (or the value, when a message quotes it).
    #[test]
    fn config_errors_never_show_a_secret() {
        const SECRET: &str = "Typo-Secret-9";
        let with = |extra: &str| format!("{MINIMAL}\n{extra}\n");
        let auth = |line: &str| with(&format!("[nats.auth]\nuser = \"u\"\n{line}"));
        let uri = format!("mongodb://u:{SECRET}@h/?replicaSet=rs0");
        let cases = [
            (
                auth(&format!("pasword = \"{SECRET}\"")),
                "key `pasword` in [nats.auth]",
            ),
            (
                auth(&format!("password = \"{SECRET}\" x")),
                "key `password`",
            ),
            (auth(&format!("password = \"{SECRET}")), "line 15"),
            (auth(&format!("password = '{SECRET}")), "line 15"),
            // Reported where the file ends, still naming the table.
            (
                auth(&format!("password = \"\"\"{SECRET}")),
                "in [nats.auth]",
            ),
            (auth(&format!("password = {SECRET}")), "key `password`"),
            (
                auth(&format!("password = \"{SECRET}\"\npassword = \"{SECRET}\"")),
                "line 16",
            ),
            (
                auth(&format!("token = {{ value = \"{SECRET}\" }}")),
                "key `token`",
            ),
            (
                MINIMAL.replace(
                    "url = \"nats://127.0.0.1:4222\"",
                    &format!("url = \"nats://127.0.0.1:4222\"\nack_timeout_ms = \"{SECRET}\""),
                ),
                "key `ack_timeout_ms` in [nats]",
            ),
            (
                MINIMAL.replace(
                    "mongodb_uri = \"mongodb://127.0.0.1:27017/?replicaSet=rs0\"",
                    &format!("mongodb_uri = \"{uri}\" trailing"),
                ),
                "key `mongodb_uri` in [[pipeline]]",
            ),
            (
                MINIMAL.replace(
                    "mongodb_uri = \"mongodb://127.0.0.1:27017/?replicaSet=rs0\"",
                    &format!("mongodb_uri \"{uri}\""),
                ),
                "line 6",
            ),
            (
                with(&format!(
                    "[[pipeline.plugins]]\nname = \"x\"\nconfig = {{ key = \"{SECRET}\" x }}"
                )),
                "key `config` in [[pipeline.plugins]]",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).expect_err(&text);
            assert!(!err.contains(SECRET), "{err}");
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(err.contains("line "), "{err}");
        }
    }

    /// Credentials in `nats.url` and `[nats.auth]` at once are refused, without echoing them.
    #[test]
    fn url_credentials_conflict_with_nats_auth() {
        let text = MINIMAL.replace("nats://127.0.0.1", "nats://u:Url-Secret-8@127.0.0.1")
            + "\n[nats.auth]\ntoken = \"t\"\n";
        let err = parse(&text).expect_err("conflict");
        assert!(err.contains("give them in one place only"), "{err}");
        assert!(!err.contains("Url-Secret-8"), "{err}");
        let text = MINIMAL.replace("nats://127.0.0.1", "nats://u:Url-Secret-8@127.0.0.1");
        assert!(parse(&text).is_ok());
    }

    /// Secrets such as URIs can come from the environment instead of the file.
    #[test]
    fn environment_overrides_uris() {
        let config = Config::parse(MINIMAL, Path::new("."), |name| match name {
            "TIDEGATE_NATS_URL" => Some("nats://secret@n:4222".into()),
            "TIDEGATE_PIPELINE_ORDERS_MONGODB_URI" => Some("mongodb://user:pw@m/".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(config.nats.url, "nats://secret@n:4222");
        assert_eq!(config.pipelines[0].mongodb_uri, "mongodb://user:pw@m/");
    }

    /// Two pipelines writing one stream would break the ordering chain: refused.
    #[test]
    fn shared_stream_is_refused() {
        let second = MINIMAL
            .split("[[pipeline]]")
            .nth(1)
            .expect("has pipeline")
            .replace("\"orders\"\n", "\"orders2\"\n");
        let text = format!("{MINIMAL}\n[[pipeline]]{second}");
        let err = parse(&text).expect_err("shared stream");
        assert!(err.contains("already used by another pipeline"), "{err}");
    }

    /// Templates that would publish outside the stream's subjects are refused.
    #[test]
    fn subject_template_must_stay_under_prefix() {
        let text = MINIMAL.replace(
            "subject_prefix = \"cdc\"",
            "subject_prefix = \"cdc\"\nsubject_template = \"other.{db}\"",
        );
        assert!(parse(&text)
            .expect_err("bad template")
            .contains("{prefix}."));
        let text = MINIMAL.replace(
            "subject_prefix = \"cdc\"",
            "subject_prefix = \"cdc\"\nsubject_template = \"{prefix}.{nope}\"",
        );
        assert!(parse(&text)
            .expect_err("bad placeholder")
            .contains("placeholders"));
    }

    const TENANTS: &str = r#"
        [nats]
        url = "nats://127.0.0.1:4222"
        [[pipeline]]
        id = "shop"
        mongodb_uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
        database = "shop"
        [[pipeline.tenant]]
        id = "acme"
        namespaces = ["shop.orders", "shop.returns"]
        limits = { memory_mib = 16, timeout_ms = 200 }
        capabilities = { clock = true }
        [pipeline.tenant.sink]
        stream = "ACME"
        subject_prefix = "tenants.acme"
        [[pipeline.tenant.plugins]]
        name = "redact"
        limits = { timeout_ms = 50 }
        [[pipeline.tenant]]
        id = "globex"
        namespaces = ["shop.*"]
        [pipeline.tenant.sink]
        stream = "GLOBEX"
        subject_prefix = "tenants.globex"
    "#;

    /// Each tenant becomes a unit of its own, inheriting the source and keeping its own
    /// sink, plugins, limits (merged key by key) and capabilities.
    #[test]
    fn tenants_become_units() {
        let config = parse(TENANTS).expect("valid");
        let ids: Vec<&str> = config.pipelines.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["shop.acme", "shop.globex"]);
        let acme = &config.pipelines[0];
        assert_eq!(acme.database.as_deref(), Some("shop"));
        assert_eq!(acme.sink.stream, "ACME");
        assert_eq!(acme.dead_letter_subject(), "tenants.acme.dead-letter");
        assert!(acme.capabilities.clock && !acme.capabilities.random);
        let limits = acme.plugin_limits(&acme.plugins[0]);
        assert_eq!((limits.memory_mib, limits.timeout_ms), (16, 50));
        assert_eq!(
            limits.fuel_per_call, 100_000_000,
            "unset keys keep the default"
        );
        let scope = acme.tenant.as_ref().expect("tenant scope");
        assert_eq!(scope.id, "acme");
        let ns = |db: &str, coll: Option<&str>| crate::model::Namespace {
            db: db.into(),
            coll: coll.map(Into::into),
        };
        assert!(acme.may_see(&ns("shop", Some("orders"))));
        assert!(!acme.may_see(&ns("shop", Some("secrets"))));
        assert!(!acme.may_see(&ns("other", Some("orders"))));
        assert!(
            acme.may_see(&ns("shop", None)),
            "dropDatabase of its database"
        );
        assert!(acme.may_see(&ns("", None)), "invalidate");
        assert!(config.pipelines[1].may_see(&ns("shop", Some("anything"))));
    }

    /// Tenant mistakes are named precisely.
    #[test]
    fn tenant_mistakes_are_refused() {
        let cases = [
            (
                "\"shop.*\"]",
                "\"other.*\"]",
                "outside what the pipeline watches",
            ),
            ("\"shop.*\"]", "\"shop.ord*\"]", "only a whole database"),
            (
                "namespaces = [\"shop.*\"]",
                "namespaces = []",
                "list what the tenant may see",
            ),
            ("id = \"globex\"", "id = \"acme\"", "used twice"),
            (
                "stream = \"GLOBEX\"",
                "stream = \"ACME\"",
                "already used by another pipeline",
            ),
            (
                "database = \"shop\"",
                "database = \"shop\"\nplugins = [{ name = \"x\" }]",
                "belong in each",
            ),
        ];
        for (from, to, expected) in cases {
            let text = TENANTS.replacen(from, to, 1);
            assert_ne!(text, TENANTS, "{from}");
            let err = parse(&text).expect_err(expected);
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let no_sink = MINIMAL
            .replace("[pipeline.sink]", "[pipeline.checkpoint]")
            .replace("stream = \"ORDERS\"\n", "")
            .replace("subject_prefix = \"cdc\"\n", "");
        assert!(parse(&no_sink)
            .expect_err("no sink")
            .contains("[pipeline.sink]"));
    }

    /// User stages may filter and add fields but never touch the resume token or what
    /// tidegate reads.
    #[test]
    fn user_stages_are_checked() {
        let stage = |text: &str| -> Result<bson::Document, String> {
            let table: toml::Table =
                toml::from_str(&format!("s = {text}")).map_err(|e| e.to_string())?;
            match table.get("s") {
                Some(toml::Value::Table(t)) => check_stage(t),
                _ => Err("not a table".into()),
            }
        };
        assert!(stage(r#"{ "$match" = { "fullDocument.paid" = true } }"#).is_ok());
        assert!(stage(r#"{ "$project" = { "fullDocument.secret" = 0 } }"#).is_ok());
        assert!(stage(r#"{ "$set" = { "fullDocument.x" = 1 } }"#).is_ok());
        for (text, expected) in [
            (r#"{ "$project" = { "_id" = 0 } }"#, "may not remove `_id`"),
            (
                r#"{ "$project" = { "fullDocument" = 1 } }"#,
                "may only exclude",
            ),
            (r#"{ "$set" = { "_id" = "x" } }"#, "may not change `_id`"),
            (r#"{ "$unset" = ["ns.coll"] }"#, "may not remove `ns.coll`"),
            (
                r#"{ "$replaceRoot" = { "newRoot" = "$fullDocument" } }"#,
                "not allowed",
            ),
            (
                r#"{ "$match" = { "a" = 1 }, "$set" = { "b" = 1 } }"#,
                "exactly one operator",
            ),
        ] {
            let err = stage(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn start_positions_parse() {
        assert_eq!(parse_start_at("now"), Ok(StartAt::Now));
        assert_eq!(
            parse_start_at("1732270000.3"),
            Ok(StartAt::ClusterTime(bson::Timestamp {
                time: 1_732_270_000,
                increment: 3
            }))
        );
        assert_eq!(
            parse_start_at("2026-11-22T10:00:00Z"),
            Ok(StartAt::ClusterTime(bson::Timestamp {
                time: 1_795_341_600,
                increment: 0
            }))
        );
        assert!(parse_start_at("yesterday").is_err());
        assert!(parse_token(r#"{"_data": "8263"}"#).is_ok());
        assert!(parse_token(r#"{"data": 1}"#).unwrap_err().contains("_data"));
        assert!(parse_token("not json").is_err());
        let text = MINIMAL.replace(
            "database = \"shop\"",
            "database = \"shop\"\nskip_operations = [\"invalidate\"]",
        );
        assert!(parse(&text).unwrap_err().contains("cannot be skipped"));
        let text = MINIMAL.replace(
            "database = \"shop\"",
            "database = \"shop\"\ninclude = [\"//\"]",
        );
        assert!(parse(&text).unwrap_err().contains("empty regex"));
    }

    #[test]
    fn subject_helpers() {
        assert!(is_valid_subject("a.b.c", false));
        assert!(!is_valid_subject("a..b", false));
        assert!(!is_valid_subject("a.*", false));
        assert!(is_valid_subject("a.>", true));
        assert!(!is_valid_subject("a b", false));
        assert!(is_under_prefix("cdc.x", "cdc"));
        assert!(!is_under_prefix("cdcx.y", "cdc"));
        assert!(!is_under_prefix("cdc", "cdc"));
    }
}
