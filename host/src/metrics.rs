//! Every number tidegate exposes, in one registry: counters, gauges and histograms per
//! series, rendered as Prometheus text for `/metrics` and read by `/status` and the summary
//! log line.
//!
//! A series is one pipeline (and, as pipelines gain tenants, one tenant of it): its
//! [`Labels`] come from the configuration only, never from event data, so the number of
//! series is bounded by the config. Stages find their series with [`series`] (or
//! [`pipeline`]) and update plain atomics; nothing here blocks the event path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mongodb::change_stream::event::ResumeToken;

/// The label set of a series, in a fixed order: `pipeline`, then e.g. `tenant`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Labels(Vec<(&'static str, String)>);

impl Labels {
    /// The labels of a whole pipeline.
    pub fn pipeline(id: &str) -> Labels {
        Labels(vec![("pipeline", id.to_string())])
    }

    /// These labels plus one more (e.g. `tenant`).
    pub fn with(mut self, name: &'static str, value: &str) -> Labels {
        self.0.push((name, value.to_string()));
        self
    }

    /// The value of label `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name="value",…` with Prometheus escaping.
    fn render(&self) -> String {
        self.0
            .iter()
            .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What a pipeline is doing, for `/status` and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Connecting, loading the checkpoint, opening the change stream.
    Starting = 0,
    /// The change stream is open and events flow.
    Running = 1,
    /// MongoDB is unreachable or failed; retrying.
    Retrying = 2,
    /// Another instance holds the lease (high availability): deliberately idle.
    Standby = 3,
    /// Stopped (shutdown, or failed).
    Stopped = 4,
}

impl State {
    /// The name shown on `/status`.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Retrying => "retrying",
            State::Standby => "standby",
            State::Stopped => "stopped",
        }
    }

    fn from_u8(n: u8) -> State {
        match n {
            1 => State::Running,
            2 => State::Retrying,
            3 => State::Standby,
            4 => State::Stopped,
            _ => State::Starting,
        }
    }
}

/// A cumulative histogram with fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Publish round trips: sub-millisecond to the ack timeout.
const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Plugin calls: microseconds to the default one-second deadline.
const CALL_BOUNDS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0,
];
/// End-to-end lag: the resume token's clock has one-second resolution.
const LAG_BOUNDS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// A plugin of a series' chain, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    /// Its name in the config.
    pub name: String,
    /// `filter` or `transform`.
    pub world: String,
    /// SHA-256 of the component file, hex.
    pub sha256: String,
}

/// Everything measured for one series.
#[derive(Debug)]
pub struct PipelineMetrics {
    labels: Labels,
    read: AtomicU64,
    filtered: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    out_of_scope: AtomicU64,
    /// Dead letters by (plugin, reason): both from bounded sets (the config's plugins,
    /// tidegate's reasons).
    dead_letters: Mutex<std::collections::BTreeMap<(String, String), u64>>,
    reloads_applied: AtomicU64,
    reloads_refused: AtomicU64,
    snapshot_documents: AtomicU64,
    published: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    checkpoints: AtomicU64,
    leases_lost: AtomicU64,
    /// Unix ms of the last checkpoint write; 0 = none yet.
    checkpoint_at_ms: AtomicI64,
    /// Unix seconds of the change at the acknowledged position; 0 = unknown.
    position_secs: AtomicI64,
    state: AtomicU8,
    /// Unix seconds of the oplog's oldest and newest entries; 0 = unknown.
    oplog_oldest_secs: AtomicI64,
    oplog_newest_secs: AtomicI64,
    last_msg_id: Mutex<Option<String>>,
    plugins: Mutex<Vec<PluginInfo>>,
    /// Time from handing a message to the client to its JetStream acknowledgement.
    pub publish_latency: Histogram,
    /// Time from a change's commit in MongoDB to its acknowledgement by JetStream.
    pub lag: Histogram,
}

/// The counters behind the pipeline summary line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Events read from the change stream.
    pub read: u64,
    /// Events a filter dropped.
    pub filtered: u64,
    /// Events sent to the dead-letter subject.
    pub dead_lettered: u64,
    /// Messages JetStream stored.
    pub published: u64,
    /// Messages JetStream reported as already stored.
    pub duplicates: u64,
    /// Publish attempts that failed and were retried.
    pub retries: u64,
}

impl PipelineMetrics {
    fn new(labels: Labels) -> PipelineMetrics {
        PipelineMetrics {
            labels,
            read: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            out_of_scope: AtomicU64::new(0),
            dead_letters: Mutex::new(Default::default()),
            reloads_applied: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            snapshot_documents: AtomicU64::new(0),
            published: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            checkpoint_at_ms: AtomicI64::new(0),
            position_secs: AtomicI64::new(0),
            state: AtomicU8::new(State::Starting as u8),
            oplog_oldest_secs: AtomicI64::new(0),
            oplog_newest_secs: AtomicI64::new(0),
            last_msg_id: Mutex::new(None),
            plugins: Mutex::new(Vec::new()),
            publish_latency: Histogram::new(LATENCY_BOUNDS),
            lag: Histogram::new(LAG_BOUNDS),
        }
    }

    /// The series' labels.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The unit's id: `<pipeline>`, or `<pipeline>.<tenant>` for a tenant.
    pub fn unit_id(&self) -> String {
        let pipeline = self.labels.get("pipeline").unwrap_or_default();
        match self.labels.get("tenant") {
            Some(tenant) => format!("{pipeline}.{tenant}"),
            None => pipeline.to_string(),
        }
    }

    /// One event read from the change stream.
    pub fn read(&self) {
        self.read.fetch_add(1, Ordering::Relaxed);
    }

    /// One event dropped by a filter.
    pub fn filtered(&self) {
        self.filtered.fetch_add(1, Ordering::Relaxed);
    }

    /// One event sent to the dead-letter subject because `plugin` (empty: the host)
    /// failed with `reason` (`out-of-fuel`, `deadline`, `memory`, …).
    pub fn dead_lettered(&self, plugin: &str, reason: &str) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut all) = self.dead_letters.lock() {
            *all.entry((plugin.to_string(), reason.to_string()))
                .or_default() += 1;
        }
    }

    /// A snapshot (initial or incremental) read `count` more documents.
    pub fn snapshot_read(&self, count: usize) {
        self.snapshot_documents
            .fetch_add(count as u64, Ordering::Relaxed);
    }

    /// A hot reload (or SIGHUP) put new plugins in place.
    pub fn reload_applied(&self) {
        self.reloads_applied.fetch_add(1, Ordering::Relaxed);
    }

    /// A hot reload was refused; the running plugins stayed.
    pub fn reload_refused(&self) {
        self.reloads_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// One event dropped because its plugin is quarantined with the `skip` action.
    pub fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// One event outside a tenant's namespaces, stopped by the host-side check.
    pub fn out_of_scope(&self) {
        self.out_of_scope.fetch_add(1, Ordering::Relaxed);
    }

    /// One message acknowledged: stored, or a duplicate of one already stored.
    pub fn acked(&self, duplicate: bool, latency: Option<Duration>) {
        match duplicate {
            true => self.duplicates.fetch_add(1, Ordering::Relaxed),
            false => self.published.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(latency) = latency {
            self.publish_latency.observe(latency);
        }
    }

    /// One failed publish, to be retried.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// The acknowledged position moved to `token`, after message `last_msg_id`.
    pub fn position(&self, token: &ResumeToken, last_msg_id: Option<&str>) {
        if let Some(secs) = token_seconds(token) {
            self.position_secs.store(secs, Ordering::Relaxed);
            let lag = unix_now().as_secs() as i64 - secs;
            self.lag
                .observe(Duration::from_secs(u64::try_from(lag).unwrap_or(0)));
        }
        if let (Some(id), Ok(mut kept)) = (last_msg_id, self.last_msg_id.lock()) {
            if kept.as_deref() != Some(id) {
                *kept = Some(id.to_string());
            }
        }
    }

    /// A checkpoint was written.
    pub fn checkpointed(&self) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.checkpoint_at_ms
            .store(unix_now().as_millis() as i64, Ordering::Relaxed);
    }

    /// This instance lost the pipeline's lease.
    pub fn lease_lost(&self) {
        self.leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets what the pipeline is doing.
    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// What the pipeline is doing.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Records the chain's plugins.
    pub fn set_plugins(&self, plugins: Vec<PluginInfo>) {
        if let Ok(mut kept) = self.plugins.lock() {
            *kept = plugins;
        }
    }

    /// The counters so far.
    pub fn counts(&self) -> Counts {
        Counts {
            read: self.read.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    /// Seconds between the newest acknowledged change and now; `None` before the first.
    pub fn lag_seconds(&self) -> Option<i64> {
        match self.position_secs.load(Ordering::Relaxed) {
            0 => None,
            secs => Some((unix_now().as_secs() as i64 - secs).max(0)),
        }
    }

    /// Seconds since the last checkpoint write; `None` before the first.
    pub fn checkpoint_age_seconds(&self) -> Option<f64> {
        match self.checkpoint_at_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(((unix_now().as_millis() as i64 - ms).max(0)) as f64 / 1000.0),
        }
    }

    /// Records the times of the oplog's oldest and newest entries.
    pub fn set_oplog(&self, oldest_secs: i64, newest_secs: i64) {
        self.oplog_oldest_secs.store(oldest_secs, Ordering::Relaxed);
        self.oplog_newest_secs.store(newest_secs, Ordering::Relaxed);
    }

    /// Seconds of history the oplog holds, if known.
    pub fn oplog_window_seconds(&self) -> Option<i64> {
        match self.oplog_oldest_secs.load(Ordering::Relaxed) {
            0 => None,
            oldest => Some(self.oplog_newest_secs.load(Ordering::Relaxed) - oldest),
        }
    }

    /// Seconds between the oplog's oldest entry and the acknowledged position, if both are
    /// known: how long the pipeline could stall before its position falls out of the oplog
    /// (at the current write rate).
    pub fn oplog_headroom_seconds(&self) -> Option<i64> {
        match (
            self.oplog_oldest_secs.load(Ordering::Relaxed),
            self.position_secs.load(Ordering::Relaxed),
        ) {
            (0, _) | (_, 0) => None,
            (oldest, position) => Some(position - oldest),
        }
    }

    /// Whether the position is within the oldest tenth of the oplog's window.
    pub fn near_oplog_edge(&self) -> bool {
        match (self.oplog_headroom_seconds(), self.oplog_window_seconds()) {
            (Some(headroom), Some(window)) => headroom < window / 10,
            _ => false,
        }
    }

    /// Writes the summary log line.
    pub fn log(&self) {
        let c = self.counts();
        tracing::info!(
            pipeline = self.unit_id(),
            read = c.read,
            filtered = c.filtered,
            dead_lettered = c.dead_lettered,
            skipped = self.skipped.load(Ordering::Relaxed),
            out_of_scope = self.out_of_scope.load(Ordering::Relaxed),
            published = c.published,
            duplicates = c.duplicates,
            retries = c.retries,
            "pipeline summary"
        );
    }

    /// This series as `/status` JSON.
    pub fn status(&self) -> serde_json::Value {
        let c = self.counts();
        let labels: serde_json::Map<String, serde_json::Value> = self
            .labels
            .0
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone().into()))
            .collect();
        serde_json::json!({
            "labels": labels,
            "state": self.state().name(),
            "position": {
                "last_msg_id": self.last_msg_id.lock().ok().and_then(|id| id.clone()),
                "change_time_unix": match self.position_secs.load(Ordering::Relaxed) {
                    0 => None,
                    secs => Some(secs),
                },
            },
            "lag_seconds": self.lag_seconds(),
            "oplog_headroom_seconds": self.oplog_headroom_seconds(),
            "oplog_window_seconds": self.oplog_window_seconds(),
            "checkpoint_age_seconds": self.checkpoint_age_seconds(),
            "counts": {
                "read": c.read,
                "filtered": c.filtered,
                "dead_lettered": c.dead_lettered,
                "published": c.published,
                "duplicates": c.duplicates,
                "retries": c.retries,
                "leases_lost": self.leases_lost.load(Ordering::Relaxed),
            },
            "plugins": self.plugins.lock().map(|p| p.clone()).unwrap_or_default(),
        })
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
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<BTreeMap<Labels, Arc<PipelineMetrics>>>,
    plugins: Mutex<BTreeMap<Labels, Arc<PluginMetrics>>>,
    /// This instance's name when high availability is on.
    instance: OnceLock<String>,
}

/// The process-wide registry.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
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

/// The labels of a unit: `pipeline`, and `tenant` for a tenant unit `<pipeline>.<tenant>`.
pub fn unit_labels(id: &str) -> Labels {
    match id.split_once('.') {
        Some((pipeline, tenant)) => Labels::pipeline(pipeline).with("tenant", tenant),
        None => Labels::pipeline(id),
    }
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

    /// Every series, in label order.
    pub fn all(&self) -> Vec<Arc<PipelineMetrics>> {
        self.series
            .lock()
            .map(|all| all.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The Prometheus text exposition (format 0.0.4) of every series.
    pub fn render(&self) -> String {
        let all = self.all();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tidegate_build_info The running version.\n# TYPE tidegate_build_info gauge\ntidegate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        type Read = fn(&PipelineMetrics) -> Option<f64>;
        let families: &[(&str, &str, &str, Read)] = &[
            (
                "tidegate_events_read_total",
                "counter",
                "Change events read from MongoDB.",
                |m| Some(m.read.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_events_filtered_total",
                "counter",
                "Events a filter plugin dropped.",
                |m| Some(m.filtered.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_events_dead_lettered_total",
                "counter",
                "Events sent to the dead-letter subject.",
                |m| Some(m.dead_lettered.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_snapshot_documents_total",
                "counter",
                "Documents read by snapshots (initial and incremental): their progress.",
                |m| Some(m.snapshot_documents.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_events_skipped_total",
                "counter",
                "Events dropped because their plugin is quarantined with the `skip` action.",
                |m| Some(m.skipped.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_events_out_of_scope_total",
                "counter",
                "Events outside a tenant's namespaces, stopped in the host (should stay 0).",
                |m| Some(m.out_of_scope.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_messages_published_total",
                "counter",
                "Messages JetStream stored.",
                |m| Some(m.published.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_messages_duplicate_total",
                "counter",
                "Messages JetStream deduplicated (already stored).",
                |m| Some(m.duplicates.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_publish_retries_total",
                "counter",
                "Failed publishes that were retried.",
                |m| Some(m.retries.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_checkpoints_total",
                "counter",
                "Checkpoints written.",
                |m| Some(m.checkpoints.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_leases_lost_total",
                "counter",
                "Times this instance lost the pipeline's lease (high availability).",
                |m| Some(m.leases_lost.load(Ordering::Relaxed) as f64),
            ),
            (
                "tidegate_checkpoint_age_seconds",
                "gauge",
                "Seconds since the last checkpoint write.",
                |m| m.checkpoint_age_seconds(),
            ),
            (
                "tidegate_lag_seconds",
                "gauge",
                "Seconds between the newest acknowledged change's commit and now.",
                |m| m.lag_seconds().map(|s| s as f64),
            ),
            (
                "tidegate_oplog_headroom_seconds",
                "gauge",
                "Seconds between the oplog's oldest entry and the acknowledged position.",
                |m| m.oplog_headroom_seconds().map(|s| s as f64),
            ),
            (
                "tidegate_oplog_window_seconds",
                "gauge",
                "Seconds of history the oplog holds.",
                |m| m.oplog_window_seconds().map(|s| s as f64),
            ),
            (
                "tidegate_pipeline_running",
                "gauge",
                "1 while the change stream is open here.",
                |m| {
                    Some(if m.state() == State::Running {
                        1.0
                    } else {
                        0.0
                    })
                },
            ),
            (
                "tidegate_pipeline_standby",
                "gauge",
                "1 while another instance holds the lease.",
                |m| {
                    Some(if m.state() == State::Standby {
                        1.0
                    } else {
                        0.0
                    })
                },
            ),
        ];
        for (name, kind, help, read) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for m in &all {
                if let Some(value) = read(m) {
                    let _ = writeln!(out, "{name}{{{}}} {value}", m.labels.render());
                }
            }
        }
        self.render_labelled(&mut out, &all);
        render_signals(&mut out, &all);
        type Get = fn(&PipelineMetrics) -> &Histogram;
        let histograms: &[(&str, &str, Get)] = &[
            ("tidegate_publish_latency_seconds", "Time from publishing a message to its JetStream acknowledgement.", |m| &m.publish_latency),
            ("tidegate_end_to_end_lag_seconds", "Time from a change's commit in MongoDB to its acknowledgement by JetStream (one-second resolution).", |m| &m.lag),
        ];
        for (name, help, get) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for m in &all {
                get(m).render(&mut out, name, &m.labels.render());
            }
        }
        let plugins: Vec<Arc<PluginMetrics>> = self
            .plugins
            .lock()
            .map(|all| all.values().cloned().collect())
            .unwrap_or_default();
        type Count = fn(&PluginMetrics) -> u64;
        let counters: &[(&str, &str, Count)] = &[
            ("tidegate_plugin_calls_total", "Plugin calls.", |m| {
                m.calls.load(Ordering::Relaxed)
            }),
            (
                "tidegate_plugin_failures_total",
                "Plugin calls that returned an error or trapped (fuel, deadline, memory).",
                |m| m.failures.load(Ordering::Relaxed),
            ),
            (
                "tidegate_plugin_fuel_total",
                "Fuel (about one unit per wasm instruction) plugin calls burnt.",
                |m| m.fuel.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for m in &plugins {
                let _ = writeln!(out, "{name}{{{}}} {}", m.labels.render(), read(m));
            }
        }
        let name = "tidegate_plugin_memory_peak_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} Largest linear memory an instance of the plugin reached.\n# TYPE {name} gauge"
        );
        for m in &plugins {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                m.labels.render(),
                m.memory_peak.load(Ordering::Relaxed)
            );
        }
        let name = "tidegate_plugin_call_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Wall-clock time of one plugin call.\n# TYPE {name} histogram"
        );
        for m in &plugins {
            m.call_time.render(&mut out, name, &m.labels.render());
        }
        out
    }
}

impl Registry {
    /// The families with a label beyond the series' own: per plugin, reason or outcome.
    fn render_labelled(&self, out: &mut String, all: &[Arc<PipelineMetrics>]) {
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            out,
            "tidegate_dead_letters_total",
            "counter",
            "Dead-lettered events by plugin (empty: the host) and reason.",
        );
        for m in all {
            let Ok(reasons) = m.dead_letters.lock() else {
                continue;
            };
            for ((plugin, reason), count) in reasons.iter() {
                let _ = writeln!(
                    out,
                    "tidegate_dead_letters_total{{{},plugin=\"{}\",reason=\"{}\"}} {count}",
                    m.labels.render(),
                    escape(plugin),
                    escape(reason)
                );
            }
        }
        family(
            out,
            "tidegate_plugin_reloads_total",
            "counter",
            "Hot reloads and SIGHUP reloads, applied or refused (the running plugins stay).",
        );
        for m in all {
            let labels = m.labels.render();
            let _ = writeln!(
                out,
                "tidegate_plugin_reloads_total{{{labels},outcome=\"applied\"}} {}",
                m.reloads_applied.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "tidegate_plugin_reloads_total{{{labels},outcome=\"refused\"}} {}",
                m.reloads_refused.load(Ordering::Relaxed)
            );
        }
    }
}

/// The cluster time (Unix seconds) a resume token encodes: tokens of MongoDB 4.2+ are
/// `{_data: "82<8-byte timestamp>…"}` in hex, the timestamp's high half being seconds.
pub fn token_seconds(token: &ResumeToken) -> Option<i64> {
    crate::event::token_time(token)
        .map(|t| i64::from(t.time))
        .filter(|s| *s > 0)
}

/// What `/status` shows of a chain's plugins: the exact versions running.
pub fn plugin_infos(chain: &crate::plugin::Chain) -> Vec<PluginInfo> {
    chain
        .plugins()
        .iter()
        .map(|p| PluginInfo {
            name: p.name().to_string(),
            world: format!("{:?}", p.world()).to_lowercase(),
            sha256: p.hash().trim_start_matches("sha256:").to_string(),
        })
        .collect()
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
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

/// `tidegate_signals_total{…,outcome}`, every outcome of every series (zero included).
fn render_signals(out: &mut String, all: &[Arc<PipelineMetrics>]) {
    let _ = writeln!(
        out,
        "# HELP tidegate_signals_total Signal documents read from signal_collection, by outcome.\n\
         # TYPE tidegate_signals_total counter"
    );
    let counts = signal_counts()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for m in all {
        for outcome in SIGNAL_OUTCOMES {
            let n = counts
                .get(&(m.labels.clone(), outcome))
                .copied()
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "tidegate_signals_total{{{},outcome=\"{outcome}\"}} {n}",
                m.labels.render()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_time_is_decoded() {
        let token: ResumeToken = bson::deserialize_from_bson(bson::Bson::Document(
            bson::doc! { "_data": "826560A7F2000000012B022C0100296E5A1004" },
        ))
        .expect("token");
        assert_eq!(token_seconds(&token), Some(0x6560_A7F2));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_millis(1500));
        h.observe(Duration::from_secs(9));
        let mut out = String::new();
        h.render(&mut out, "x", "p=\"a\"");
        assert!(out.contains("x_bucket{p=\"a\",le=\"1\"} 1\n"));
        assert!(out.contains("x_bucket{p=\"a\",le=\"2\"} 2\n"));
        assert!(out.contains("x_bucket{p=\"a\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{p=\"a\"} 3\n"));
    }

    #[test]
    fn near_the_oplog_edge_within_its_oldest_tenth() {
        let m = PipelineMetrics::new(Labels::pipeline("p"));
        assert!(!m.near_oplog_edge(), "unknown is not near");
        m.set_oplog(1000, 2000);
        m.position_secs.store(1050, Ordering::Relaxed);
        assert_eq!(m.oplog_headroom_seconds(), Some(50));
        assert!(m.near_oplog_edge());
        m.position_secs.store(1900, Ordering::Relaxed);
        assert!(!m.near_oplog_edge());
    }

    #[test]
    fn labels_are_escaped_and_extensible() {
        let labels = Labels::pipeline("a\"b").with("tenant", "t1");
        assert_eq!(labels.render(), "pipeline=\"a\\\"b\",tenant=\"t1\"");
        assert_eq!(labels.get("tenant"), Some("t1"));
    }
}
