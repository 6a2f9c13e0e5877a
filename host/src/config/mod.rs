//! The configuration file: its TOML model, defaults, environment overrides and validation.
//!
//! Every key is documented on its field and in `examples/quickstart/tidegate.toml`.
//! Unknown keys are errors (a typo must never silently fall back to a default), and every
//! error names the file and the key at fault, never showing the file's text (it may hold
//! secrets). A file with several mistakes gets them all reported in one run.
//!
//! This module holds the top level (the file, `[nats]`, `[log]`, `[http]`) and how a file
//! becomes a [`Config`]; each section's model lives beside it (`pipeline`, `tenants`,
//! `plugins`, `quota`, `sink`, [`ha`]), as do its checks (`validate`, `stage`) and the secret-safe
//! description of TOML errors (`toml_errors`). Everything is re-exported here, so users
//! name `config::X` whatever file `X` lives in.

pub mod admin;
mod capture_list;
pub mod ha;
mod pipeline;
mod plugin_config_file;
mod plugins;
mod quota;
mod sink;
mod stage;
mod tenants;
mod toml_errors;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::capture_list::{CollectionList, MAX_CAPTURE_LIST_BYTES};
pub(crate) use self::pipeline::EVENT_FIELDS;
pub use self::pipeline::{
    parse_start_at, parse_token, FullDocument, FullDocumentBeforeChange, HistoryLostPolicy,
    InvalidatePolicy, NamespaceFilter, OversizePolicy, PipelineConfig, SnapshotMode, StartAt,
    TenantReader, TenantsFrom, OPERATION_TYPES, SPLIT_STAGE,
};
pub use self::plugin_config_file::{read as read_plugin_config_file, MAX_PLUGIN_CONFIG_BYTES};
pub use self::plugins::{
    Capabilities, LimitOverrides, PluginConfig, PluginLimits, QuarantineAction, QuarantineConfig,
    SandboxConfig, FAILED_RUN_PAUSE, MAX_BREACH_PAUSE,
};
pub use self::quota::Quota;
pub use self::sink::{
    CheckpointConfig, CheckpointStoreKind, Encoding, Format, SinkConfig, Storage,
};
pub use self::stage::check_stage;
pub use self::tenants::{
    NamespacePattern, TenantConfig, TenantKey, TenantScope, DEFAULT_TENANT_LANE_EVENTS,
    KEYED_OPERATIONS, SHARED_READER_EVENTS,
};
use self::toml_errors::describe_toml_error;
use crate::error::Error;

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
    /// The admin API and the tenants it manages in NATS; absent: none.
    #[serde(default)]
    pub admin: Option<admin::AdminConfig>,
    /// One entry per change stream to relay. At least one is required. After loading,
    /// each tenant of a pipeline is an entry of its own (see [`TenantConfig`]).
    #[serde(rename = "pipeline")]
    pub pipelines: Vec<PipelineConfig>,
    /// The pipelines with `tenants_from = "nats"`: templates for the tenants the admin API
    /// adds, not units. Not a config key.
    #[serde(skip)]
    pub managed: Vec<PipelineConfig>,
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

/// The `[http]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:9464` or `0.0.0.0:9464`.
    pub address: String,
    /// Most distinct tenants whose metrics carry their own `tenant` label; further tenants
    /// are counted together under `tenant="_other"` (a warning says so once), so a platform
    /// with thousands of tenants cannot flood the scraper. Default: 100.
    #[serde(default = "default_max_tenant_series")]
    pub max_tenant_series: usize,
}

/// See [`HttpConfig::max_tenant_series`].
pub const DEFAULT_MAX_TENANT_SERIES: usize = 100;

fn default_max_tenant_series() -> usize {
    DEFAULT_MAX_TENANT_SERIES
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

    /// Parses config text. `base` resolves relative paths (and the files named by
    /// `collections_file` and plugins' `config_file` are read from it); `env` looks up
    /// overrides. Every
    /// problem found is reported, one per line, except when the TOML itself does not parse
    /// (nothing else can be checked then).
    pub fn parse(
        text: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let mut config: Config =
            toml::from_str(text).map_err(|err| describe_toml_error(text, &err))?;
        config.apply_env(env);
        config.expand_and_validate(base)?;
        config.resolve_paths(base);
        Ok(config)
    }

    /// Environment overrides, so that credentials in URLs need not live in the file.
    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(url) = env("TIDEGATE_NATS_URL") {
            self.nats.url = url;
        }
        for pipeline in &mut self.pipelines {
            if let Some(uri) = env(&pipeline_env_var(&pipeline.id, "MONGODB_URI")) {
                pipeline.mongodb_uri = uri;
            }
            crate::security::remember_mongodb_uri_secret(&pipeline.mongodb_uri);
        }
    }

    /// Makes relative paths absolute against the config file's folder, so that they do not
    /// depend on where tidegate was started. Runs after tenant expansion, which moves each
    /// tenant's plugins into its unit.
    fn resolve_paths(&mut self, base: &Path) {
        self.plugin_dir = base.join(&self.plugin_dir);
        self.nats.auth.resolve(base);
        if let Some(admin) = &mut self.admin {
            admin.resolve(base);
        }
        if let Some(tls) = &mut self.nats.tls {
            tls.resolve(base);
        }
        for plugin in self.pipelines.iter_mut().flat_map(|p| p.plugins.iter_mut()) {
            if let Some(file) = &plugin.file {
                plugin.file = Some(base.join(file));
            }
        }
    }

    /// The largest memory cap of any plugin, which sizes the engine's instance slots. With
    /// tenants managed in NATS, whose limits are not known at start, at least the default
    /// 64 MiB (a tenant asking for more is refused by the admin API, see
    /// [`Config::tenant_unit`]).
    pub fn largest_memory_mib(&self) -> u32 {
        let managed = match self.managed.is_empty() {
            true => 0,
            false => crate::config::PluginLimits::default().memory_mib,
        };
        self.pipelines
            .iter()
            .flat_map(|p| p.plugins.iter().map(|plugin| p.plugin_limits(plugin)))
            .map(|limits| limits.memory_mib)
            .max()
            .unwrap_or(0)
            .max(managed)
    }
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
