//! What a plugin is and what it may consume: its entry in a chain, its sandbox limits (with
//! the plugin → tenant/pipeline → default fallback), its capabilities, quarantine, and the
//! engine they all share.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

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
    /// Most MiB of compiled plugins kept in `cache_dir`: past it the least recently used are
    /// deleted (they are compiled again if needed), so that plugin versions pushed one after
    /// another cannot fill the disk. Default: 10240.
    #[serde(default = "default_cache_max_mib")]
    pub cache_max_mib: u64,
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
    /// Watch plugin files and hot-reload a changed one (see `plugin::reload`). Default: true.
    #[serde(default = "default_true")]
    pub watch_plugins: bool,
    /// How often plugin files are checked, in milliseconds. Default: 1000.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// Plugin worker threads shared by every unit (there are as many background workers
    /// beside them, for units using more than their fair share of CPU; see
    /// `sandbox::pool`). 0 means one per core. One value per process: the first config
    /// loaded sets it. Default: 0.
    #[serde(default)]
    pub workers: u32,
    /// Run units that use more than their fair share of CPU on low-priority background
    /// workers (see `sandbox::pool`). `false`: every unit runs on the normal workers, in
    /// fair order only. One value per process, like `workers`. Default: true.
    #[serde(default = "default_true")]
    pub background: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cache: true,
            cache_dir: None,
            cache_max_mib: default_cache_max_mib(),
            pooling: true,
            max_instances: default_max_instances(),
            watch_plugins: true,
            watch_interval_ms: default_watch_interval_ms(),
            workers: 0,
            background: true,
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
    /// After a call that breaks one of the plugin's limits (fuel, deadline, memory, output
    /// size), the unit pauses for this many times the call's duration (at most
    /// [`MAX_BREACH_PAUSE`]) before its next event. The limits bound one call, this bounds
    /// the rate of such calls: a plugin that breaks its limits on every event gets at most
    /// 1/(1 + N) of a core, so the other units keep the CPU they need until quarantine (or a
    /// fix) takes it out. A cheap call's failed event still costs the change stream, the dead
    /// letter and the servers their share, so in a run of failures the pause also doubles
    /// with each one, up to [`FAILED_RUN_PAUSE`]: at most ten such events a second. Only the
    /// offending unit waits; nothing is dropped. 0 turns it off. Default: 4.
    #[serde(default = "default_breach_pause")]
    pub breach_pause: u32,
}

/// The longest pause one limit breach costs (see [`QuarantineConfig::breach_pause`]): long
/// enough to matter against a hog, short enough that a stop or a reload is not held up.
pub const MAX_BREACH_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// How far the pause of a run of limit breaches doubles (see
/// [`QuarantineConfig::breach_pause`]): a cap on the *rate* of failed events (ten a second),
/// not on their CPU. It never lengthens the pause of a costly call (a hog's stays four times
/// the call), so a plugin that fails on every event reaches quarantine as soon as before.
pub const FAILED_RUN_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            after_failures: default_quarantine_after(),
            action: QuarantineAction::default(),
            breach_pause: default_breach_pause(),
        }
    }
}

fn default_breach_pause() -> u32 {
    4
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
    /// After loading, the keys of `config_file` are here too.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// More config keys, read from a JSON (or, named `*.toml`, TOML) file relative to the
    /// config file's folder, re-read on SIGHUP; see `config::plugin_config_file`. After
    /// loading, the absolute path.
    pub config_file: Option<PathBuf>,
    /// Sandbox limits for this plugin, overriding the pipeline's or tenant's key by key.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Only for tenants managed through the admin API (`tenants_from = "nats"`): the
    /// SHA-256 (hex) of the component in the plugin object store. Set by a plugin push;
    /// absent until the first one (the tenant is held until then).
    pub sha256: Option<String>,
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

fn default_true() -> bool {
    true
}
fn default_watch_interval_ms() -> u64 {
    1000
}
pub(super) fn default_cache_max_mib() -> u64 {
    10 * 1024
}
fn default_max_instances() -> u32 {
    256
}
fn default_quarantine_after() -> u32 {
    100
}
