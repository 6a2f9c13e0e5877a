//! Where a pipeline's events go (its JetStream stream and subjects) and where its position
//! is saved.

use serde::Deserialize;

/// The JetStream side of a pipeline.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// JetStream stream name. Created (subjects `<subject_prefix>.>`) when missing; when it
    /// exists it must cover those subjects and keep a long enough duplicate window. Each
    /// pipeline needs a stream of its own: ordering is enforced with
    /// `Nats-Expected-Last-Msg-Id`, which assumes one writer. (A pipeline's tenants may
    /// share its stream: one publisher then writes it for all of them.)
    pub stream: String,
    /// First subject token(s) of everything this pipeline publishes, e.g. `cdc` or `cdc.shop`.
    pub subject_prefix: String,
    /// Subject of each event. Placeholders: `{prefix}`, `{db}`, `{coll}`, `{operation}`,
    /// `{key}` (the document key's `_id`, escaped into one token: see
    /// `model::key::subject_token`). Must start with `{prefix}.`.
    /// Default: `{prefix}.{db}.{coll}.{operation}`.
    #[serde(default = "default_subject_template")]
    pub subject_template: String,
    /// Subject for events a plugin failed on. Default: `<subject_prefix>.dead-letter`.
    pub dead_letter_subject: Option<String>,
    /// Payload encoding: `relaxed-json` (default), `canonical-json` or `bson`.
    #[serde(default)]
    pub encoding: Encoding,
    /// Payload shape: `change-event` (default), `debezium` or `full-document`.
    #[serde(default)]
    pub format: Format,
    /// Most messages published but not yet acknowledged. Default: 256.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Smallest JetStream duplicate window (seconds) tidegate accepts on the stream, and the
    /// window it sets when it creates the stream. Default: 120.
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
    /// Replicas of a stream tidegate creates (1 to 5). Default: 1.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Storage of a stream tidegate creates: `file` (default) or `memory`.
    #[serde(default)]
    pub storage: Storage,
    /// Age (seconds) past which a created stream discards messages. Default: none (kept).
    pub max_age_secs: Option<u64>,
    /// Bytes past which a created stream discards its oldest messages. Default: no limit.
    pub max_bytes: Option<u64>,
    /// Messages a created stream keeps per subject (with `{key}` in the template, `1`
    /// keeps the latest event of each document). Default: no limit.
    pub max_msgs_per_subject: Option<u64>,
    /// Set at load, never configured: for a tenant publishing into its pipeline's stream
    /// (a `[pipeline.sink]` beside tenants without a sink of their own), the pipeline's
    /// subject prefix, which the stream covers; the tenant's `subject_prefix` is then
    /// `<it>.<tenant id>`, and one publisher writes the stream for every tenant
    /// (`sink::shared`).
    #[serde(skip)]
    pub shared_prefix: Option<String>,
}

impl SinkConfig {
    /// The prefix the stream's subjects (`<it>.>`) cover: the unit's own, or for a stream
    /// the pipeline's tenants share, the pipeline's.
    pub fn stream_prefix(&self) -> &str {
        self.shared_prefix
            .as_deref()
            .unwrap_or(&self.subject_prefix)
    }
}

/// The shape of a published payload (see `docs/formats.md`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The server's change event, `id` in place of `_id`, plus `tsMs`.
    #[default]
    ChangeEvent,
    /// The value Debezium's MongoDB connector emits (as Kafka Connect's JSON converter
    /// writes it with `schemas.enable=false`).
    Debezium,
    /// The document alone; an empty payload for deletes.
    FullDocument,
}

impl Format {
    /// The name used in the config file and in `Content-Type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::ChangeEvent => "change-event",
            Format::Debezium => "debezium",
            Format::FullDocument => "full-document",
        }
    }

    /// The `Content-Type` of a payload in this format and `encoding`: the change-event
    /// form keeps the bare encoding's type it always had, the others add
    /// `format=<format>`.
    pub fn content_type(self, encoding: Encoding) -> String {
        match self {
            Format::ChangeEvent => encoding.content_type().to_string(),
            other => format!("{}; format={}", encoding.content_type(), other.as_str()),
        }
    }
}

/// Where a created stream keeps its messages.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    /// On disk.
    #[default]
    File,
    /// In memory (lost when the server restarts).
    Memory,
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
    /// The most checkpoint writes a second the pipeline makes, all its tenants together.
    /// Default: 100. With more tenants than this × `interval_ms` ÷ 1000, each tenant saves
    /// less often than `interval_ms` (at a thousand tenants, about every 10 s): a crash then
    /// replays more, and JetStream drops the replayed duplicates (see `checkpoint::pace`).
    #[serde(default = "default_checkpoint_max_writes_per_sec")]
    pub max_writes_per_sec: u32,
    /// How often the oplog's size, fill and write rate are read to project the checkpoint's
    /// headroom (see `ops::oplog`), in milliseconds. Default: 10000.
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
            max_writes_per_sec: default_checkpoint_max_writes_per_sec(),
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

fn default_subject_template() -> String {
    "{prefix}.{db}.{coll}.{operation}".to_string()
}
fn default_replicas() -> usize {
    1
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
fn default_checkpoint_max_writes_per_sec() -> u32 {
    100
}
