//! Every number tidegate exposes, in one registry: counters, gauges and histograms per
//! series, rendered as Prometheus text for `/metrics` and read by `/status` and the summary
//! log line.
//!
//! A series is one pipeline (and, as pipelines gain tenants, one tenant of it): its
//! [`Labels`] come from the configuration only, never from event data, so the number of
//! series is bounded by the config. Stages find their series with [`series`] (or
//! [`pipeline`]) and update plain atomics; nothing here blocks the event path.

mod histogram;
mod labels;
mod prometheus;
mod series;
mod status;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mongodb::change_stream::event::ResumeToken;

pub use histogram::Histogram;
pub use labels::{Labels, State};
pub use series::{Counts, LastError, PipelineMetrics, PluginInfo};

use histogram::CALL_BOUNDS;

/// How often [`Registry::sample_history`] is called: the step of `/status`'s history and of
/// the page's graphs.
pub const HISTORY_STEP: Duration = Duration::from_secs(5);

/// Why a plugin's call dead-letters an event: the `reason` label values of
/// `tidegate_dead_letters_total` with a plugin, declared at zero.
pub const PLUGIN_FAILURE_REASONS: [crate::model::failure::FailureKind; 8] =
    crate::model::failure::FailureKind::PLUGIN_DECLARED;
/// Why the host dead-letters an event itself (`sink::framer`), with an empty `plugin`.
pub const HOST_FAILURE_REASONS: [crate::model::failure::FailureKind; 3] =
    crate::model::failure::FailureKind::HOST_DECLARED;

/// Why a unit waited instead of running its next events: the `quota` label values of
/// `tidegate_quota_wait_seconds_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaWait {
    /// `quota.events_per_sec`.
    EventsPerSec,
    /// `quota.bytes_per_sec`.
    BytesPerSec,
    /// `quota.cpu_share`.
    CpuShare,
    /// `quarantine.breach_pause` (not a quota, but waited out the same way).
    BreachPause,
}

impl QuotaWait {
    /// Every reason, in label order.
    pub const ALL: [QuotaWait; 4] = [
        QuotaWait::EventsPerSec,
        QuotaWait::BytesPerSec,
        QuotaWait::CpuShare,
        QuotaWait::BreachPause,
    ];

    /// The label value: the config key.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaWait::EventsPerSec => "events_per_sec",
            QuotaWait::BytesPerSec => "bytes_per_sec",
            QuotaWait::CpuShare => "cpu_share",
            QuotaWait::BreachPause => "breach_pause",
        }
    }
}

/// The calls of one plugin of a chain (labels: `pipeline`, `plugin`, and later `tenant`).
#[derive(Debug)]
pub struct PluginMetrics {
    labels: Labels,
    calls: AtomicU64,
    failures: AtomicU64,
    fuel: AtomicU64,
    /// Largest linear memory an instance reached, bytes.
    memory_peak: AtomicU64,
    /// Wall-clock time per call.
    pub call_time: Histogram,
}

impl PluginMetrics {
    /// Records one call: how long it took, the fuel it burnt, the plugin's peak memory so
    /// far, and whether it failed (the event was dead-lettered).
    pub fn call(&self, elapsed: Duration, fuel: u64, memory_peak: u64, failed: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.memory_peak.fetch_max(memory_peak, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.fuel.fetch_add(fuel, Ordering::Relaxed);
        self.call_time.observe(elapsed);
    }
}

/// The series of plugin `name` in the chain with `labels`, created on first use.
pub fn plugin(labels: &Labels, name: &str) -> Arc<PluginMetrics> {
    let labels = labels.clone().with("plugin", name);
    let mut all = registry()
        .plugins
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    all.entry(labels.clone())
        .or_insert_with(|| {
            Arc::new(PluginMetrics {
                labels,
                calls: AtomicU64::new(0),
                memory_peak: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                fuel: AtomicU64::new(0),
                call_time: Histogram::new(CALL_BOUNDS),
            })
        })
        .clone()
}

/// All series of this process.
#[derive(Debug)]
pub struct Registry {
    series: Mutex<BTreeMap<Labels, Arc<PipelineMetrics>>>,
    plugins: Mutex<BTreeMap<Labels, Arc<PluginMetrics>>>,
    /// This instance's name when high availability is on.
    instance: OnceLock<String>,
    /// When the registry (in effect, the process) started.
    started: Instant,
}

/// The process-wide registry.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        series: Mutex::default(),
        plugins: Mutex::default(),
        instance: OnceLock::new(),
        started: Instant::now(),
    })
}

/// The series with `labels`, created on first use.
pub fn series(labels: Labels) -> Arc<PipelineMetrics> {
    let mut all = registry()
        .series
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    all.entry(labels.clone())
        .or_insert_with(|| Arc::new(PipelineMetrics::new(labels)))
        .clone()
}

/// The series of a whole pipeline.
pub fn pipeline(id: &str) -> Arc<PipelineMetrics> {
    series(unit_labels(id))
}

/// Drops a unit's series (a tenant the admin API suspended or removed), so that it leaves
/// `/status`, `/readyz` and `/metrics`. Its plugins' series stay until the process ends.
pub fn forget(id: &str) {
    let labels = unit_labels(id);
    if labels.get("tenant") == Some(OTHER_TENANT) {
        // Shared by every tenant past the cardinality guard: the others still count there.
        return;
    }
    registry()
        .series
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(&labels);
}

/// The labels of a unit: `pipeline`, and `tenant` for a tenant unit `<pipeline>.<tenant>`
/// (under the cardinality guard: see [`set_max_tenant_series`]).
pub fn unit_labels(id: &str) -> Labels {
    match id.split_once('.') {
        Some((pipeline, tenant)) => {
            Labels::pipeline(pipeline).with("tenant", guard_tenant(pipeline, tenant))
        }
        None => Labels::pipeline(id),
    }
}

/// The `tenant` label value of the tenants past the cardinality guard.
pub const OTHER_TENANT: &str = "_other";

static MAX_TENANT_SERIES: AtomicUsize = AtomicUsize::new(crate::config::DEFAULT_MAX_TENANT_SERIES);

/// Sets the cardinality guard: at most `max` distinct tenants (pipeline and tenant pairs)
/// get series of their own; the series of any further tenant are shared under
/// `tenant="_other"` (their counters add up there), and a warning says so once. Tenants
/// already seen keep their series. Call before units start.
pub fn set_max_tenant_series(max: usize) {
    MAX_TENANT_SERIES.store(max, Ordering::Relaxed);
}

/// `tenant`, or [`OTHER_TENANT`] once the guard's cap of distinct tenants is reached.
fn guard_tenant<'a>(pipeline: &str, tenant: &'a str) -> &'a str {
    static SEEN: OnceLock<Mutex<std::collections::BTreeSet<(String, String)>>> = OnceLock::new();
    static WARNED: AtomicBool = AtomicBool::new(false);
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = (pipeline.to_string(), tenant.to_string());
    let max = MAX_TENANT_SERIES.load(Ordering::Relaxed);
    if seen.contains(&key) {
        return tenant;
    }
    if seen.len() < max {
        seen.insert(key);
        return tenant;
    }
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            max_tenant_series = max,
            "more tenants than http.max_tenant_series: the metrics of tenant '{tenant}' of \
             pipeline '{pipeline}' and of every further tenant are counted together under \
             tenant=\"{OTHER_TENANT}\" (raise http.max_tenant_series to see them apart)"
        );
    }
    OTHER_TENANT
}

impl Registry {
    /// Records this instance's name (high availability).
    pub fn set_instance(&self, name: &str) {
        let _ = self.instance.set(name.to_string());
    }

    /// This instance's name, when high availability is on.
    pub fn instance(&self) -> Option<String> {
        self.instance.get().cloned()
    }

    /// Seconds since the process started.
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Takes a history sample of every series; called every [`HISTORY_STEP`].
    pub fn sample_history(&self) {
        for series in self.all() {
            series.sample();
        }
    }

    /// Every series, in label order.
    pub fn all(&self) -> Vec<Arc<PipelineMetrics>> {
        self.series
            .lock()
            .map(|all| all.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// The cluster time (Unix seconds) a resume token encodes: tokens of MongoDB 4.2+ are
/// `{_data: "82<8-byte timestamp>…"}` in hex, the timestamp's high half being seconds.
pub fn token_seconds(token: &ResumeToken) -> Option<i64> {
    crate::model::token::token_time(token)
        .map(|t| i64::from(t.time))
        .filter(|s| *s > 0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

// Signals (`signal_collection`): kept in a block of their own.

/// The outcomes of a signal document, each a series of `tidegate_signals_total` from zero:
/// `accepted` (acted on), `refused` (understood, but nothing to act on now: say a snapshot
/// already running, or no collection in scope), `invalid` (unreadable or unsupported).
pub const SIGNAL_OUTCOMES: [&str; 3] = ["accepted", "refused", "invalid"];

fn signal_counts() -> &'static Mutex<BTreeMap<(Labels, &'static str), u64>> {
    static COUNTS: OnceLock<Mutex<BTreeMap<(Labels, &'static str), u64>>> = OnceLock::new();
    COUNTS.get_or_init(Default::default)
}

/// Counts one signal document of unit `unit` with `outcome` (one of [`SIGNAL_OUTCOMES`]).
pub fn count_signal(unit: &str, outcome: &'static str) {
    let mut counts = signal_counts()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *counts.entry((unit_labels(unit), outcome)).or_default() += 1;
}
